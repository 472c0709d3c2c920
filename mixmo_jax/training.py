"""MixMo training: the jitted train step (Algorithm 1) and the run that
feeds it, as `python -m mixmo_jax.main` and `mixmo_jax.train` start it.

    training.train_and_evaluate(config, workdir)

validates the config (before the workdir is touched), takes the workdir's
lock, writes config.json and trains, resuming from the workdir's newest
verified checkpoint: each step's unique samples come from `feed.Feeder` (a
pure function of (seed, step)), `make_train_step` runs the step, the test
set is evaluated every `eval_every_epochs` (`evaluate_epoch`), verified
checkpoints are saved every `checkpoint_every_epochs`, at the end and at
each evaluated epoch of best test top-1 so far (`keep_best_checkpoint`),
SIGTERM / SIGINT save the current step and stop (`preemption`), and a
non-finite loss stops the run (`progress.Reporter`).

`train_step` is a pure function `(state, images, labels) -> (state,
metrics)` jitted over the device mesh with the state donated: a short piece
of glue that calls the method (`mixmo_jax.mixmo`). Everything random about
a batch happens inside it, from the step's keys (`keys.step_keys(seed,
step)`): batch repetition, pad-crop-flip, AugMix, member permutations,
in-pixel CutMix / Mixup, kappa and masks, the mixing itself, the reweighted
loss and the update. The host only ships the step's unique samples, so
resuming is exact.
"""
import contextlib
import functools
import signal
from typing import Any
from collections.abc import Callable

from absl import logging
import jax
import jax.numpy as jnp
from flax.training import train_state

from mixmo_jax import (config_validation, keys, locking, models, optim,
                       preemption, resume_config, sharding, workdir as wd)
from mixmo_jax.data import augment
from mixmo_jax.data import augmix
from mixmo_jax.data import pipeline
from mixmo_jax.mixmo import batch as mixmo_batch
from mixmo_jax.mixmo import loss as mixmo_loss
from mixmo_jax.mixmo import registry
from mixmo_jax.mixmo import schedule


class TrainState(train_state.TrainState):
  """Flax TrainState with BatchNorm statistics."""
  batch_stats: Any = None


def _init_state(config, model, steps_per_epoch: int, mesh):
  """The jitted, argument-free initialisation of the state on `mesh`."""
  init_key = keys.init_key(config.seed)
  size = config.image_size
  tx = optim.make_optimizer(config, steps_per_epoch)

  def init():
    variables = model.init(init_key, jnp.zeros((1, size, size, 3)), train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                              batch_stats=variables['batch_stats'], tx=tx)
    # A strongly typed int32 step, like a restored one: a fresh and a resumed
    # run then share one compiled train step.
    return state.replace(step=jnp.asarray(0, jnp.int32))

  return jax.jit(init, out_shardings=sharding.replicated(mesh))


def create_train_state(config, model, steps_per_epoch: int, mesh) -> TrainState:
  """Initialises parameters from the seed, replicated on `mesh`."""
  return _init_state(config, model, steps_per_epoch, mesh)()


def abstract_train_state(config, model, steps_per_epoch: int,
                         mesh) -> TrainState:
  """The state's shapes, dtypes and shardings (`jax.ShapeDtypeStruct`
  leaves) without computing anything: what compiling the train step ahead
  of time for `mesh` needs, also for devices this process cannot run."""
  return jax.eval_shape(_init_state(config, model, steps_per_epoch, mesh))


def state_to_tree(state: TrainState) -> dict[str, Any]:
  """The checkpointed part of the state (a plain dict of arrays)."""
  return {
      'step': state.step,
      'params': state.params,
      'batch_stats': state.batch_stats,
      'opt_state': state.opt_state
  }


def tree_to_state(state: TrainState, tree: dict[str, Any]) -> TrainState:
  return state.replace(**tree)


def permutation_groups(config) -> int:
  """G = batch_size / mixing.permutation_group_rows (1 when 0: the global
  batch), the row groups of `mixmo.batch.member_batch`."""
  rows = config.mixing.permutation_group_rows
  return config.batch_size // rows if rows else 1


def member_inputs(key, images, labels, weights, config, partner_images=None,
                  partner_labels=None):
  """The step's M member inputs and targets: `mixmo.batch.member_batch`
  with the config's settings, normalised.

  Returns:
    xs float32 [B, M, H, W, 3] (normalised) and targets int32 [B, M] or
    float32 [B, M, C].
  """
  aug = config.augment
  crop = functools.partial(augment.random_crop_flip, padding=aug.crop_padding,
                           flip=aug.flip)
  pixel_augment = None
  if aug.augmix:  # On the uint8 member inputs, after crop / flip.
    pixel_augment = functools.partial(augmix.augmix, rule=aug.augmix_rule,
                                      severity=aug.augmix_severity,
                                      width=aug.augmix_width,
                                      depth=aug.augmix_depth, as_float=True)
  xs, targets = mixmo_batch.member_batch(
      key, images, labels, weights, num_members=config.num_members,
      repetitions=config.batch_repetitions, num_classes=config.num_classes,
      input_repetition=config.mixing.input_repetition,
      groups=permutation_groups(config), augment=crop,
      augment_per_copy=aug.per_copy, pixel_augment=pixel_augment,
      pixel_augment_draws=aug.augmix_draws, pixel_mix=aug.pixel_mix,
      pixel_mix_rule=aug.pixel_mix_rule, pixel_mix_prob=aug.pixel_mix_prob,
      cutmix_alpha=aug.cutmix_alpha, mixup_alpha=aug.mixup_alpha,
      partner_images=partner_images, partner_labels=partner_labels)
  mean, std = tuple(config.image_mean), tuple(config.image_std)
  return augment.normalize(xs, mean, std), targets


def train_step(state: TrainState, images, labels, partner_images=None,
               partner_labels=None, *, config, steps_per_epoch, stem_hw,
               mesh) -> tuple[TrainState, dict[str, jax.Array]]:
  """One MixMo update (Algorithm 1 lines 3-34), everything on device.

  Args:
    state: replicated TrainState.
    images: uint8 [N, H, W, 3], the step's N = batch_size / b unique samples,
      sharded over 'data'.
    labels: int32 [N].
    partner_images: uint8 [B, M, H, W, 3], partner_labels: int32 [B, M],
      the pixel mix's partners from the whole training set when
      `pipeline.needs_partners(config)` (`feed.Feeder`), else None.

  Returns:
    The new state and scalar metrics.
  """
  k_data, k_mix = keys.step_keys(config.seed, state.step)
  epoch = state.step // steps_per_epoch + 1  # 1-indexed, Algorithm 1.
  mix = config.mixing
  p = schedule.patch_probability(epoch, config.num_epochs, mix.p,
                                 mix.p_decay_fraction)
  weights, kappa = registry.sample_mixing_weights(k_mix, config.batch_size,
                                                  config.num_members, *stem_hw,
                                                  method=mix.method,
                                                  alpha=mix.alpha, p=p)
  # Drawn whole on every device: a draw split over devices would agree on
  # each trip of the Dirichlet's rejection loop by an all-reduce. The same
  # values either way (jax's random bits do not depend on the sharding).
  weights, kappa = jax.lax.with_sharding_constraint((weights, kappa),
                                                    sharding.replicated(mesh))
  xs, targets = member_inputs(k_data, images, labels, weights, config,
                              partner_images, partner_labels)
  xs = jax.lax.with_sharding_constraint(xs, sharding.data_sharded(mesh))
  loss_weights = mixmo_loss.member_weights(kappa, mix.r)  # Eq. 5.
  l2 = config.optimizer.l2

  def loss_fn(params):
    logits, new_vars = state.apply_fn(
        {
            'params': params,
            'batch_stats': state.batch_stats
        }, xs, mix_weights=weights, train=True, mutable=['batch_stats'])
    ce = mixmo_loss.mixmo_loss(logits, targets, loss_weights)  # Eq. 4.
    penalty = mixmo_loss.l2_penalty(params)
    return ce + l2 * penalty, (ce, penalty, logits, new_vars)

  grads, (ce, penalty, logits, new_vars) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=new_vars['batch_stats'])
  hard = targets if targets.ndim == 2 else jnp.argmax(targets, -1)
  return state, {
      'loss':
          ce + l2 * penalty,
      'cross_entropy':
          ce,
      'l2':
          penalty,
      'learning_rate':
          optim.learning_rate_schedule(config, steps_per_epoch)(state.step - 1),
      'patch_probability':
          p,
      'train_top1':
          jnp.mean(jnp.argmax(logits, -1) == hard),
  }


def make_train_step(config, model, steps_per_epoch: int, mesh) -> Callable:
  """`train_step` jitted over `mesh`, state replicated and donated."""
  step = functools.partial(train_step, config=config,
                           steps_per_epoch=steps_per_epoch,
                           stem_hw=tuple(models.stem_resolution(config)),
                           mesh=mesh)
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  inputs = (data,) * (4 if pipeline.needs_partners(config) else 2)
  return jax.jit(step, in_shardings=(rep,) + inputs, out_shardings=(rep, rep),
                 donate_argnums=0)


def evaluate_epoch(config, state, predict, test, mesh, step: int, epoch: int, *,
                   with_logits: bool = False) -> Any:
  """The test-set evaluation during training, with the metrics and names
  of `python -m mixmo_jax.evaluate` (which evaluates a saved checkpoint).

  Returns:
    {'step', 'epoch', **metrics.evaluation_metrics(...)}; with
    `with_logits`, (that record, the [N, M, C] member logits).
  """

  from mixmo_jax.evaluation import inference, metrics
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = inference.predict_member_logits(predict, variables, test[0],
                                           config.eval_batch_size, mesh)
  result = metrics.evaluation_metrics(
      logits, test[1], ensemble=config.evaluation.ensemble,
      calibration_seed=config.evaluation.calibration_seed)
  record = {'step': step, 'epoch': epoch, **result}
  return (record, logits) if with_logits else record


def _top1(record: dict[str, Any]):
  """The ensemble test top-1 of an evaluation record, or None."""
  top1 = (record.get('ensemble') or {}).get('top1')
  return top1 if isinstance(top1, (int, float)) else None


def train_and_evaluate(config, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Validates, locks the workdir, writes config.json and trains (resuming).

  Set the XLA flags first (`platform.setup(config)`, as main and
  `mixmo_jax.train` do). Every config field is validated before the workdir
  is touched; then the workdir's lock is taken (one trainer per workdir,
  `locking.trainer_lock`), the config compared with the one stored with the
  checkpoints, config.json written and the run trained. SIGINT / SIGTERM
  save a checkpoint and stop; the previous signal handlers are restored on
  return.

  Args:
    config: a ConfigDict, e.g. from `mixmo_jax.configs.get('digits')`.
    workdir: the run's folder (created if needed).
    allow_config_change: resume even though fields that change training
      differ from the workdir's config (the change is recorded).

  Returns:
    The last evaluation record ({'step', 'epoch', 'ensemble', 'members',
    'diversity', ...}), {'step': s, 'preempted': True} after SIGTERM /
    SIGINT, or {'step': s, 'finished': True} when the run had finished.

  Raises:
    config_validation.ConfigError: see `prepare_workdir`; or a workdir named
      by a URL this package cannot use (`workdir.url_problem`).
    locking.WorkdirBusyError: another trainer holds the workdir.
    workdir.WorkdirError: the workdir (or its lock file) cannot be used.
    data.DatasetUnavailableError, checkpointing.CheckpointError (also a
    failed or impossible checkpoint write), checkpointing.NonFiniteStateError,
    progress.NonFiniteLossError: from training.
  """
  if wd.url_problem(workdir):
    raise config_validation.ConfigError(wd.url_problem(workdir))
  config_validation.validate(config)  # Before the workdir is touched.
  lock = (
      locking.trainer_lock(workdir)
      if jax.process_index() == 0 else contextlib.nullcontext())
  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  from mixmo_jax import progress
  progress.setup_logging()
  preemption.reset()
  stopper = preemption.Preemption()  # A Ctrl-C while starting stops too.
  try:
    with lock:
      prepare_workdir(config, workdir, allow_config_change)
      if jax.process_index() == 0:  # A read-only folder: now, not later.
        _check_checkpoint_folder(workdir)
      return _train(config, workdir, stopper)
  finally:
    preemption.reset()
    for signum, handler in handlers.items():
      if handler is not None:
        signal.signal(signum, handler)


def prepare_workdir(config, workdir: str,
                    allow_config_change: bool = False) -> None:
  """Compares a valid `config` (`train_and_evaluate` validates it first)
  with the workdir's config and writes it, with the run id.

  Raises:
    config_validation.ConfigError: a resume with a changed config (unless
      allow_config_change).
  """
  changes = resume_config.check_resume(workdir, config, allow_config_change)
  if jax.process_index() != 0:
    return
  if changes:
    logging.warning('Config changed since the last run: %s', changes)
    wd.record_config_changes(workdir, changes, allow_config_change)
  wd.write_config(workdir, config)
  wd.ensure_run_id(workdir)


def _check_checkpoint_folder(workdir: str) -> None:
  from mixmo_jax import checkpointing
  folder = wd.path(workdir, wd.CHECKPOINTS)
  try:
    wd.check_writable(folder)
  except OSError as e:
    raise checkpointing.CheckpointError(
        f'cannot write checkpoints in {folder} ({e.strerror or e}); make it '
        'writable or use another --workdir') from e


def _train(config, workdir: str,
           stopper: preemption.Preemption) -> dict[str, Any]:
  """Trains (resuming from the workdir's checkpoint) and evaluates: the
  run of `train_and_evaluate`, in a prepared and locked workdir."""

  from mixmo_jax import checkpointing, data, feed, progress  # orbax: slow.
  from mixmo_jax.evaluation import inference
  mesh = sharding.make_mesh()
  train_x, train_y = data.load_split(config, 'train')
  if config.num_train_examples:
    train_x = train_x[:config.num_train_examples]
    train_y = train_y[:config.num_train_examples]
  test = data.load_split(config, 'test')
  spe = pipeline.steps_per_epoch(config, len(train_y))
  total = spe * config.num_epochs
  model = models.get_model(config)
  feeder = feed.Feeder(config, train_x, train_y, mesh)

  state = create_train_state(config, model, spe, mesh)
  logging.info('%s, %d members: %s parameters.', config.model.name,
               config.num_members, f'{models.num_params(state.params):,}')
  if logging.vlog_is_on(1):  # --verbosity=1
    logging.vlog(1, 'Parameters:\n%s', models.parameter_table(state.params))
  ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints,
                                    config=config)
  restored, start = ckpt.restore_latest(state_to_tree(state))
  if restored is not None:
    state = tree_to_state(state, restored)
    logging.info('Resumed from the checkpoint at step %d.', start)
  if start >= total:
    logging.warning(
        'The run in %s already finished (step %d of %d): '
        'nothing to do.', workdir, start, total)
    ckpt.close()
    return {'step': start, 'finished': True}
  if jax.process_index() == 0:
    wd.truncate_history(workdir, start)
  # Every process reads the same checkpoints: the same save decisions.
  best_top1 = (ckpt.best() or (None,))[0]

  reporter = progress.Reporter(workdir, total, config=config,
                               steps_per_epoch=spe, start_step=start)
  step_fn = make_train_step(config, model, spe, mesh)
  predict = inference.make_predict_fn(model, mesh, config.image_mean,
                                      config.image_std)
  record = {'step': start}
  last_good = (f'step {start} in {ckpt.directory}' if restored is not None else
               f'none (no checkpoint in {ckpt.directory} yet)')
  if stopper.requested and jax.process_count() == 1:  # While starting.
    logging.warning('Stopped by %s before step %d.', stopper.signal_name,
                    start + 1)
    ckpt.close()
    return {'step': start, 'preempted': True}
  logging.info('%d steps per epoch, %d steps, %d devices.', spe, total,
               jax.device_count())
  try:
    # The next steps' batches are prepared and transferred while a step runs.
    with feed.Prefetcher(feeder, start, total, depth=2) as batches:
      for step in range(start, total):
        # Prepared while the last step ran.
        batch, waited = batches.get(step)
        state, step_metrics = step_fn(state, *batch)
        done = step + 1
        if locking.lease_lost():  # A gs:// workdir taken over: write no more.
          raise locking.WorkdirBusyError(
              f'another trainer took over {workdir} (this one did not renew '
              f'its lease in time); stopped at step {done} without saving')
        reporter.step(done, step_metrics, data_wait=waited)
        epoch_end, last = done % spe == 0, done == total
        epoch = done // spe
        top1 = None
        if done % config.log_every_steps == 0 or epoch_end:
          reporter.flush(done, last_good)
        if epoch_end and (epoch % config.eval_every_epochs == 0 or last):
          error = None
          try:
            record, logits = evaluate_epoch(config, state, predict, test, mesh,
                                            done, epoch, with_logits=True)
            reporter.evaluation(record, logits, test[1])
            if jax.process_index() == 0:
              wd.append_history(workdir, record)
          except Exception as e:
            error = e
          # A failed evaluation or history line loses no training: every
          # process learns of it (process 0 alone writes the history) and
          # saves the epoch first (the top-1 ranks only evaluated saves).
          if sharding.any_process(error is not None):
            ckpt.save(done, state_to_tree(state))
            saved = f'the checkpoint of step {done} was saved first'
            if error is None:
              raise wd.WorkdirError(f'another process failed to evaluate or '
                                    f'record step {done} (see its log); '
                                    f'{saved}')
            if isinstance(error, wd.WorkdirError):
              raise wd.WorkdirError(f'{error} ({saved})') from None
            raise error
          top1 = _top1(record) if config.keep_best_checkpoint else None
        new_best = top1 is not None and (best_top1 is None or top1 >= best_top1)
        if new_best:
          best_top1 = top1
        stop = stopper.reached(ckpt, done)
        save = epoch_end and epoch % config.checkpoint_every_epochs == 0
        if save or last or stop or new_best:
          reporter.flush(done, last_good)
          ckpt.save(done, state_to_tree(state),
                    metrics=None if top1 is None else {'top1': top1})
          last_good = f'step {done} in {ckpt.directory}'
        if stop:
          logging.warning('Stopped by %s after step %d (checkpoint saved).',
                          stopper.signal_name or 'preemption', done)
          record = {'step': done, 'preempted': True}
          break
  except BaseException as e:
    # Failed, or stopped at once: the event file is closed without the
    # summary (every event is on disk already; in a bucket the rest is
    # uploaded, unless another trainer took the workdir over).
    reporter.abort(upload=not isinstance(e, locking.WorkdirBusyError))
    raise
  reporter.close(wd.read_history(workdir))
  ckpt.close()
  return record

"""The training loop: data, periodic evaluation, checkpoints, logging.

The step itself is `training.train_step`; this loop feeds it each step's
unique samples (`feed.Feeder`, a pure function of (seed, step)), evaluates
every `eval_every_epochs`, saves verified checkpoints every
`checkpoint_every_epochs`, at the end and (`keep_best_checkpoint`) at each
evaluated epoch of best test top-1 so far, kept through rotation, stops
cleanly on SIGTERM or SIGINT (saving
the current step, `preemption`), and refuses to continue past a non-finite
loss (`progress.Reporter`).
"""
import os
import signal
from typing import Any, Dict

from absl import logging
import jax

from mixmo_jax import (checkpointing, data, feed, models, preemption,
                       progress, sharding, training, workdir as wd)
from mixmo_jax.data import pipeline
from mixmo_jax.evaluation import inference, metrics

# Test hook: SIGKILL this process right after the given step (deterministic).
FAULT_KILL_ENV = 'MIXMO_FAULT_KILL_AFTER_STEP'
NonFiniteLossError = progress.NonFiniteLossError


def evaluate(config, state, predict, test, mesh, step: int,
             epoch: int, *, with_logits: bool = False) -> Dict[str, Any]:
  """Test-set evaluation with the `evaluate` metrics and names.

  Returns:
    {'step', 'epoch', **metrics.evaluation_metrics(...)}; with
    `with_logits`, (that record, the [N, M, C] member logits).
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = inference.predict_member_logits(
      predict, variables, test[0], config.eval_batch_size, mesh)
  result = metrics.evaluation_metrics(
      logits, test[1], ensemble=config.evaluation.ensemble,
      calibration_seed=config.evaluation.calibration_seed)
  record = {'step': step, 'epoch': epoch, **result}
  return (record, logits) if with_logits else record


def _top1(record: Dict[str, Any]):
  """The ensemble test top-1 of an evaluation record, or None."""
  top1 = (record.get('ensemble') or {}).get('top1')
  return top1 if isinstance(top1, (int, float)) else None


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains (resuming from the workdir's checkpoint) and evaluates.

  Returns:
    The last evaluation record ({'step', 'epoch', 'ensemble', 'members',
    'diversity', ...}), or {'step': s, 'preempted': True} after SIGTERM.
  """
  stopper = preemption.Preemption()  # Before the slow start: SIGTERM stops.
  progress.setup_logging()
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

  state = training.create_train_state(config, model, spe, mesh)
  logging.info('%s, %d members: %s parameters.', config.model.name,
               config.num_members, f'{models.num_params(state.params):,}')
  ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints,
                                    config=config)
  restored, start = ckpt.restore_latest(training.state_to_tree(state))
  if restored is not None:
    state = training.tree_to_state(state, restored)
    logging.info('Resumed from the checkpoint at step %d.', start)
  if start >= total:
    logging.warning('The run in %s already finished (step %d of %d): '
                    'nothing to do.', workdir, start, total)
    ckpt.close()
    return {'step': start, 'finished': True}
  if jax.process_index() == 0:
    wd.truncate_history(workdir, start)
  # Every process reads the same checkpoints: the same save decisions.
  best_top1 = (ckpt.best() or (None,))[0]

  reporter = progress.Reporter(workdir, total, config=config,
                               steps_per_epoch=spe, start_step=start)
  step_fn = training.make_train_step(config, model, spe, mesh)
  predict = inference.make_predict_fn(model, mesh, config.image_mean,
                                      config.image_std)
  kill_after = int(os.environ.get(FAULT_KILL_ENV, '-1'))
  record = {'step': start}
  last_good = (f'step {start} in {ckpt.directory}' if restored is not None
               else f'none (no checkpoint in {ckpt.directory} yet)')
  if stopper.requested and jax.process_count() == 1:  # While starting.
    logging.warning('Stopped by %s before step %d.', stopper.signal_name,
                    start + 1)
    ckpt.close()
    return {'step': start, 'preempted': True}
  logging.info('%d steps per epoch, %d steps, %d devices.', spe, total,
               jax.device_count())
  # The next steps' batches are prepared and transferred while a step runs.
  with feed.Prefetcher(feeder, start, total, depth=2) as batches:
    for step in range(start, total):
      batch, waited = batches.get(step)  # Prepared while the last step ran.
      state, step_metrics = step_fn(state, *batch)
      done = step + 1
      if wd.lease_lost():  # A gs:// workdir taken over: write nothing more.
        raise wd.WorkdirBusyError(
            f'another trainer took over {workdir} (this one did not renew '
            f'its lease in time); stopped at step {done} without saving')
      reporter.step(done, step_metrics, data_wait=waited)
      if done == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
      epoch_end, last = done % spe == 0, done == total
      epoch = done // spe
      top1 = None
      if done % config.log_every_steps == 0 or epoch_end:
        reporter.flush(done, last_good)
      if epoch_end and (epoch % config.eval_every_epochs == 0 or last):
        error = None
        try:
          record, logits = evaluate(config, state, predict, test, mesh, done,
                                    epoch, with_logits=True)
          checkpointing.fault_hook('eval', done)
          reporter.evaluation(record, logits, test[1])
          if jax.process_index() == 0:
            wd.append_history(workdir, record)
        except Exception as e:  # pylint: disable=broad-except
          error = e
        # A failed evaluation or history line loses no training: every
        # process learns of it (process 0 alone writes the history) and
        # saves the epoch first (the top-1 ranks only evaluated saves).
        if sharding.any_process(error is not None):
          ckpt.save(done, training.state_to_tree(state))
          saved = f'the checkpoint of step {done} was saved first'
          if error is None:
            raise wd.WorkdirError(f'another process failed to evaluate or '
                                  f'record step {done} (see its log); '
                                  f'{saved}')
          if isinstance(error, wd.WorkdirError):
            raise wd.WorkdirError(f'{error} ({saved})') from None
          raise error
        top1 = _top1(record) if config.keep_best_checkpoint else None
      new_best = top1 is not None and (best_top1 is None
                                       or top1 >= best_top1)
      if new_best:
        best_top1 = top1
      stop = stopper.reached(ckpt, done)
      save = epoch_end and epoch % config.checkpoint_every_epochs == 0
      if save or last or stop or new_best:
        reporter.flush(done, last_good)
        ckpt.save(done, training.state_to_tree(state),
                  metrics=None if top1 is None else {'top1': top1})
        last_good = f'step {done} in {ckpt.directory}'
      if stop:
        logging.warning('Stopped by %s after step %d (checkpoint saved).',
                        stopper.signal_name or 'preemption', done)
        record = {'step': done, 'preempted': True}
        break
  reporter.close(wd.read_history(workdir))
  ckpt.close()
  return record

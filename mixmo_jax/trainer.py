"""The training loop: data, periodic evaluation, checkpoints, logging.

The step itself is `train.train_step`; this loop only feeds it each step's
unique samples (a pure function of (seed, step)), evaluates every
`eval_every_epochs`, saves verified checkpoints every
`checkpoint_every_epochs` and at the end, stops cleanly on SIGTERM (saving the
current step), and refuses to continue past a non-finite loss.
"""
import json
import os
import signal
from typing import Any, Dict, List

from absl import logging
from clu import metric_writers, periodic_actions
import jax
import numpy as np

from mixmo_jax import (augmix, checkpointing, cli, inference, input_pipeline,
                       metrics, models, sharding, train)

HISTORY_FILE = 'eval_history.jsonl'
# Test hook: SIGKILL this process right after the given step (deterministic).
FAULT_KILL_ENV = 'MIXMO_FAULT_KILL_AFTER_STEP'


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class _Preemption:
  """Records SIGTERM; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def reached(self, ckpt, step: int) -> bool:
    """Whether to save and stop after `step`.

    With several processes jax's preemption service (started by
    jax.distributed.initialize) notices the SIGTERM and orbax makes every
    process agree on the same step; a process-local flag could let one host
    stop alone.
    """
    if jax.process_count() > 1:
      return ckpt.manager.reached_preemption(step)
    return self.requested


def _host_batch(config, step, train_x, train_y, num_unique, mesh):
  """This process's slice of the step's unique samples, as global arrays."""
  idx = input_pipeline.train_indices(config.seed, step, len(train_y), num_unique)
  local = input_pipeline.process_slice(num_unique, jax.process_index(),
                                       jax.process_count())
  images, labels = train_x[idx[local]], train_y[idx[local]]
  if config.augment.augmix:  # Host-side, deterministic from (seed, step).
    aug = config.augment
    images = augmix.augmix_batch(
        images, config.seed, step, severity=aug.augmix_severity,
        width=aug.augmix_width, depth=aug.augmix_depth, first_index=local.start)
  return sharding.global_batch((images, labels), mesh)


def _truncate_history(workdir: str, step: int) -> None:
  """Drops evaluations newer than the restored step (written before a kill)."""
  path = os.path.join(workdir, HISTORY_FILE)
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if _history_step(l) <= step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(lines)
  os.replace(tmp, path)


def _history_step(line: str) -> float:
  """The step of a history line; inf for a line cut short by a kill."""
  try:
    return json.loads(line)['step'] if line.endswith('\n') else float('inf')
  except (ValueError, KeyError, TypeError):
    return float('inf')


def _evaluate(config, workdir, state, predict, test, mesh, writer, step, epoch):
  """Periodic test-set evaluation with the `evaluate` metrics and names."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = inference.predict_member_logits(
      predict, variables, test[0], config.eval_batch_size, mesh)
  result = metrics.evaluation_metrics(
      logits, test[1], ensemble=config.evaluation.ensemble,
      calibration_seed=config.evaluation.calibration_seed)
  record = {'step': step, 'epoch': epoch, **result}
  writer.write_scalars(step, {f'eval/{k}': v for k, v in
                              metrics.flatten_metrics(result).items()
                              if isinstance(v, (int, float))})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, HISTORY_FILE), 'a') as f:
      f.write(json.dumps(record) + '\n')
  logging.info('epoch %d step %d: ensemble top1 %.4f nll %.4f, members %s',
               epoch, step, result['ensemble']['top1'],
               result['ensemble']['nll'],
               [round(m['top1'], 4) for m in result['members']])
  return record


def _flush(pending: List[Dict[str, Any]], writer, first_step: int,
           last_good: str) -> None:
  """Writes the mean train metrics and stops on a non-finite loss.

  `last_good` describes the newest checkpoint, for the error message.
  """
  if not pending:
    return
  host = jax.device_get(pending)
  losses = np.array([m['loss'] for m in host])
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    raise NonFiniteLossError(
        f'non-finite loss {losses[bad[0]]} at step {first_step + bad[0] + 1}; '
        f'training stopped, nothing saved after it; last good checkpoint: '
        f'{last_good}')
  means = {f'train/{k}': float(np.mean([m[k] for m in host])) for k in host[0]}
  writer.write_scalars(first_step + len(host), means)
  pending.clear()


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains (resuming from the workdir's checkpoint) and evaluates.

  Returns:
    The last evaluation record ({'step', 'epoch', 'ensemble', 'members',
    'diversity', ...}), or {'step': s, 'preempted': True} after SIGTERM.
  """
  preemption = _Preemption()  # Before the slow start: a SIGTERM then stops too.
  cli.quiet_orbax_logs()
  mesh = sharding.make_mesh()
  train_x, train_y = input_pipeline.load_split(config, 'train')
  if config.num_train_examples:
    train_x = train_x[:config.num_train_examples]
    train_y = train_y[:config.num_train_examples]
  test = input_pipeline.load_split(config, 'test')
  spe = input_pipeline.steps_per_epoch(config, len(train_y))
  total = spe * config.num_epochs
  num_unique = input_pipeline.unique_per_step(config)
  model = models.get_model(config)

  state = train.create_train_state(config, model, spe, mesh)
  ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
  restored, start = ckpt.restore_latest(train.state_to_tree(state))
  if restored is not None:
    state = train.tree_to_state(state, restored)
    logging.info('Resumed from the checkpoint at step %d.', start)
  _truncate_history(workdir, start)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  step_fn = train.make_train_step(config, model, spe, mesh)
  predict = inference.make_predict_fn(model, mesh, config.image_mean,
                                      config.image_std)
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
  kill_after = int(os.environ.get(FAULT_KILL_ENV, '-1'))
  pending, record = [], {'step': start}
  last_good = (f'step {start} in {ckpt.directory}' if restored is not None
               else f'none (no checkpoint in {ckpt.directory} yet)')
  if preemption.requested and jax.process_count() == 1:  # While starting.
    logging.warning('Stopped by SIGTERM before step %d.', start + 1)
    ckpt.close()
    return {'step': start, 'preempted': True}
  logging.info('%d steps per epoch, %d steps, %d devices.', spe, total,
               jax.device_count())
  for step in range(start, total):
    state, step_metrics = step_fn(
        state, *_host_batch(config, step, train_x, train_y, num_unique, mesh))
    pending.append(step_metrics)
    done = step + 1
    report(done)
    if done == kill_after:
      os.kill(os.getpid(), signal.SIGKILL)
    epoch_end, last = done % spe == 0, done == total
    epoch = done // spe
    if done % config.log_every_steps == 0 or epoch_end:
      _flush(pending, writer, done - len(pending), last_good)
    if epoch_end and (epoch % config.eval_every_epochs == 0 or last):
      record = _evaluate(config, workdir, state, predict, test, mesh, writer,
                         done, epoch)
    stop = preemption.reached(ckpt, done)
    if (epoch_end and epoch % config.checkpoint_every_epochs == 0) or last or stop:
      _flush(pending, writer, done - len(pending), last_good)
      ckpt.save(done, train.state_to_tree(state))
      last_good = f'step {done} in {ckpt.directory}'
    if stop:
      logging.warning('Stopped by SIGTERM after step %d (checkpoint saved).',
                      done)
      record = {'step': done, 'preempted': True}
      break
  writer.flush()
  ckpt.close()
  return record

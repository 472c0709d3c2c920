"""What a run reports: train metrics, evaluations, progress, to logs and
TensorBoard (clu writers; only process 0 writes event files).
"""
from typing import Any, Dict, List

from absl import logging
from clu import metric_writers, periodic_actions
import jax
import numpy as np

from mixmo_jax.evaluation import metrics


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class Reporter:
  """Collects the step metrics and writes them every `log_every_steps`.

  Args:
    workdir: the run's folder (TensorBoard event files).
    total_steps: the run's number of steps (for the progress and ETA).
  """

  def __init__(self, workdir: str, total_steps: int):
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    self.progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=self.writer)
    self.pending: List[Dict[str, Any]] = []

  def step(self, step: int, step_metrics: Dict[str, Any],
           data_wait: float = 0.0) -> None:
    """Records the (device) metrics of the step that ends at `step`.

    `data_wait` is the seconds the loop waited for this step's host batch
    (for the data-wait fraction).
    """
    del data_wait  # Reported by the console (not yet).
    self.pending.append(step_metrics)
    self.progress(step)

  def flush(self, step: int, last_good: str) -> None:
    """Writes the mean train metrics of the pending steps.

    Raises:
      NonFiniteLossError: a pending loss is NaN or infinite (`last_good`
        describes the newest checkpoint, for the message).
    """
    if not self.pending:
      return
    host = jax.device_get(self.pending)
    first = step - len(host)
    losses = np.array([m['loss'] for m in host])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      raise NonFiniteLossError(
          f'non-finite loss {losses[bad[0]]} at step {first + bad[0] + 1}; '
          f'training stopped, nothing saved after it; last good checkpoint: '
          f'{last_good}')
    means = {f'train/{k}': float(np.mean([m[k] for m in host]))
             for k in host[0]}
    self.writer.write_scalars(step, means)
    self.pending.clear()

  def evaluation(self, record: Dict[str, Any]) -> None:
    """Writes an evaluation record (`loop.evaluate`'s) to TensorBoard and
    the log."""
    self.writer.write_scalars(record['step'], {
        f'eval/{k}': v for k, v in metrics.flatten_metrics(record).items()
        if isinstance(v, (int, float)) and k not in ('step', 'epoch')})
    logging.info('epoch %d step %d: ensemble top1 %.4f nll %.4f, members %s',
                 record['epoch'], record['step'], record['ensemble']['top1'],
                 record['ensemble']['nll'],
                 [round(m['top1'], 4) for m in record['members']])

  def close(self) -> None:
    self.writer.flush()

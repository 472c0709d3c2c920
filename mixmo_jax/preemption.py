"""Stopping cleanly: a signal is recorded and the loop saves at the next step.

SIGTERM (a preemption) and SIGINT (Ctrl-C) are recorded by `Preemption`; the
training loop then saves a checkpoint after the current step and exits (a
second Ctrl-C stops at once, as Python's default does).  With several processes
jax's preemption service (started by `jax.distributed.initialize`) notices
the signal and orbax makes every process agree on the same step.
"""
import signal

from absl import logging
import jax

_SIGNAL = {'name': None}  # The signal received by this process, if any.


def reset() -> None:
  """Forgets a recorded signal (at the start and end of
  `training.train_and_evaluate`)."""
  _SIGNAL['name'] = None


class Preemption:
  """Records SIGTERM / SIGINT; `reached(ckpt, step)` says whether to save
  and stop.

  The record is the process's, not the instance's: a signal caught by an
  earlier instance (`training.train_and_evaluate` installs one before the
  slow start) is seen by the loop's.
  """

  def __init__(self):
    signal.signal(signal.SIGTERM, self._handle)
    signal.signal(signal.SIGINT, self._handle)

  @property
  def requested(self) -> bool:
    return _SIGNAL['name'] is not None

  @property
  def signal_name(self):
    return _SIGNAL['name']

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now.
    _SIGNAL['name'] = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint and stopping.',
                    _SIGNAL['name'])

  def reached(self, ckpt, step: int) -> bool:
    """Whether to save and stop after `step`.

    With several processes the decision is orbax's `reached_preemption`
    (every process agrees); a process-local flag could let one host stop
    alone.
    """
    if jax.process_count() > 1:
      return ckpt.manager.reached_preemption(step)
    return self.requested

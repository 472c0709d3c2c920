"""`python -m mixmo_jax.main`, SIGKILLed at a chosen point (tests only).

    MIXMO_TEST_KILL=step:15 python tests/fault_main.py --config=... --workdir=...

  step:N   right after step N (its metrics reported, nothing of it saved)
  eval:N   right after the evaluation at step N, before it is reported or
           written to the history
  save:N   while the checkpoint of step N is being written: as soon as its
           temporary folder exists (a local workdir)

    MIXMO_TEST_FILL_DISK=10:262144:/mnt/disk python tests/fault_main.py ...

  fills the disk holding /mnt/disk right after the checkpoint of step 10 is
  saved, leaving 262144 bytes free (a file `filler` there): the next
  checkpoint then meets a real full disk, whatever its size.

The kill is real (SIGKILL: no handler, no cleanup) and deterministic (at a
step, not after a time); the production code has no hook for it: this
wraps the package's own functions before running main.
"""
import os
import runpy
import signal
import sys
import threading
import time

KILL_ENV = 'MIXMO_TEST_KILL'
FILL_ENV = 'MIXMO_TEST_FILL_DISK'
POINTS = ('step', 'eval', 'save')


def _kill() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_once_written(directory: str, step: int) -> None:
  """SIGKILLs the process once the temporary folder of `step` exists in
  `directory` (mid-write), or after 60 s."""

  def watch():
    deadline = time.time() + 60
    while time.time() < deadline:
      if os.path.isdir(directory) and any(
          n.startswith(f'{step}.') for n in os.listdir(directory)):
        break
      time.sleep(0.0005)
    _kill()

  threading.Thread(target=watch, daemon=True).start()


def install(spec: str) -> None:
  """Wraps the function of `spec`'s point ('step:15') to kill there."""
  point, _, step = spec.partition(':')
  if point not in POINTS or not step.isdigit():
    raise SystemExit(f'{KILL_ENV}={spec!r}: POINT:STEP, POINT in {POINTS}')
  step = int(step)
  from mixmo_jax import checkpointing, progress
  if point == 'step':
    reported = progress.Reporter.step

    def step_then_kill(self, done, *args, **kwargs):
      reported(self, done, *args, **kwargs)
      if done == step:
        _kill()

    progress.Reporter.step = step_then_kill
  elif point == 'eval':
    evaluation = progress.Reporter.evaluation

    def kill_before_reporting(self, record, *args, **kwargs):
      if record.get('step') == step:
        _kill()
      return evaluation(self, record, *args, **kwargs)

    progress.Reporter.evaluation = kill_before_reporting
  else:
    save = checkpointing.Checkpointer.save

    def save_and_kill(self, at, *args, **kwargs):
      if at == step:
        _kill_once_written(self.directory, at)
      return save(self, at, *args, **kwargs)

    checkpointing.Checkpointer.save = save_and_kill


def fill_disk(folder: str, leave: int) -> None:
  """Writes `folder`/filler until `leave` bytes of its disk are free."""
  stats = os.statvfs(folder)
  size = stats.f_bavail * stats.f_frsize - leave
  chunk = b'\0' * (1 << 20)
  with open(os.path.join(folder, 'filler'), 'wb') as f:
    while size > 0:
      f.write(chunk[:min(size, len(chunk))])
      size -= len(chunk)


def install_fill(spec: str) -> None:
  """Fills the disk after the save of a step ('10:262144:/mnt/disk')."""
  step, leave, folder = spec.split(':', 2)
  from mixmo_jax import checkpointing
  save = checkpointing.Checkpointer.save

  def save_then_fill(self, at, *args, **kwargs):
    result = save(self, at, *args, **kwargs)
    if at == int(step):
      fill_disk(folder, int(leave))
    return result

  checkpointing.Checkpointer.save = save_then_fill


if __name__ == '__main__':
  if os.environ.get(KILL_ENV):
    install(os.environ[KILL_ENV])
  if os.environ.get(FILL_ENV):
    install_fill(os.environ[FILL_ENV])
  sys.argv = ['mixmo_jax.main'] + sys.argv[1:]
  runpy.run_module('mixmo_jax.main', run_name='__main__')

"""A benchmark peer stepped in a child process, interleaved with ours.

    peer = PeerProcess('experiments.torch_peer:TorchStep', depth=16, ...)
    # python=PATH: another interpreter (e.g. a venv with torch, while this
    # one runs a newer jax); the child imports only the peer's module.
    print(peer.about())        # e.g. 'torch 2.14.1 (2 threads)'
    peer.step()                # one untimed step (warm-up)
    seconds = peer.time(2)     # seconds per step over 2 steps
    peer.close()

Why a second process: two frameworks in one process share its cores with
each other's thread pools, and a pool that is still spinning after its
round could slow the other framework's next one. Here each framework has
its own process and threads, the two still alternate round by round (so
the machine's drift hits both alike), and the process that waits is
blocked on a pipe. On the 2-core Intel machine the two forms measured the
same within the noise (WRN-16-4, M = 2, batch 64, 5 rounds of 2 steps,
alternating runs: torch/jax 0.84, 0.85 here vs 0.82, 0.82 in one process),
so `experiments.benchmark --peer=torch` keeps one process by default and
this one behind `--peer_process=own`, to check a machine where they differ.

The protocol is one line each way, on the child's stdin and stdout:
    parent: JSON {"factory": "module:Class", "kwargs": {...}}
    child:  'ready <JSON about string>'
    parent: 'step'     child: 'ok'
    parent: 'time N'   child: '<seconds per step>'
The class needs `step()` and `time(steps) -> float`; an `about()` method,
if present, describes it. The child's errors come back as a RuntimeError
with its stderr's last lines.
"""
import json
import subprocess
import sys
import tempfile
from typing import Any


class PeerProcess:
  """A `factory(**kwargs)` object in a child process (see module doc)."""

  def __init__(self, factory: str, cwd: str | None = None,
               env: dict | None = None, python: str | None = None,
               **kwargs: Any):
    # stderr goes to a file, so a chatty peer can never fill a pipe and block.
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self._proc = subprocess.Popen(
        [python or sys.executable, '-m', 'experiments.peer_process'], cwd=cwd,
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=self._stderr, text=True)
    reply = self._ask(json.dumps({'factory': factory, 'kwargs': kwargs}))
    if not reply.startswith('ready '):
      self._fail(f'expected "ready", got {reply!r}')
    self._about = json.loads(reply[len('ready '):])

  def about(self) -> str:
    """The peer's own description (its `about()`, else the factory)."""
    return self._about

  def _ask(self, line: str) -> str:
    try:
      self._proc.stdin.write(line + '\n')
      self._proc.stdin.flush()
    except BrokenPipeError:
      self._fail('the peer process exited')
    reply = self._proc.stdout.readline()
    if not reply:
      self._fail('the peer process exited')
    return reply.strip()

  def _fail(self, what: str):
    self._proc.kill()
    self._proc.wait()
    self._stderr.seek(0)
    err = self._stderr.read()[-2000:]
    self.close()
    raise RuntimeError(f'benchmark peer: {what}; its stderr:\n{err}')

  def step(self) -> None:
    """One untimed step."""
    if self._ask('step') != 'ok':
      self._fail('step failed')

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps, timed in the child."""
    reply = self._ask(f'time {int(steps)}')
    try:
      return float(reply)
    except ValueError:
      self._fail(f'expected seconds, got {reply!r}')

  def close(self) -> None:
    """Ends the child (end of its input) and closes every file of it."""
    if self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait(timeout=60)
    for f in (self._proc.stdin, self._proc.stdout, self._stderr):
      f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _serve() -> None:
  """The child: builds the object, then answers 'step' / 'time N' lines."""
  import importlib
  # Replies own stdout; whatever the peer prints goes to stderr instead.
  out, sys.stdout = sys.stdout, sys.stderr

  def reply(text):
    print(text, file=out, flush=True)

  spec = json.loads(sys.stdin.readline())
  module, name = spec['factory'].split(':')
  obj = getattr(importlib.import_module(module), name)(**spec['kwargs'])
  reply('ready ' +
        json.dumps(obj.about() if hasattr(obj, 'about') else spec['factory']))
  for line in sys.stdin:
    words = line.split()
    if words == ['step']:
      obj.step()
      reply('ok')
    elif len(words) == 2 and words[0] == 'time':
      reply(repr(float(obj.time(int(words[1])))))
    else:
      reply(f'unknown command {line.strip()!r}')


if __name__ == '__main__':
  _serve()

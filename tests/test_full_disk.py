"""Real storage faults: a full disk (a small tmpfs the test mounts) and a
read-only file (a read-only bind mount), never a monkeypatched exception.

Each fault ends in one line (an exception with a one-line message, or one
`error:` line and exit code 1 from the CLI), leaves no temporary file, and
loses nothing written before: earlier checkpoints verify, and a resume once
the fault is gone ends on the same bits as a run that never met it. The
mounts need root; where `mount` is refused the tests are skipped, saying so.
"""
import contextlib
import glob
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, mount_or_skip, xla_flags
from mixmo_jax import checkpointing, sharding
from mixmo_jax import locking
from mixmo_jax import workdir as wd

# A 3-epoch WRN-10-1 digits run, a checkpoint every epoch (~0.7 MB each).
TINY = ('--config=configs/digits.py', '--config.model.width=1',
        '--config.num_epochs=3', '--config.checkpoint_every_epochs=1',
        '--config.eval_every_epochs=1', '--config.num_train_examples=320',
        '--config.optimizer.decay_epochs=()')


def _read_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


@contextlib.contextmanager
def tmpfs(folder, size):
  """A tmpfs of `size` (e.g. '1200k') mounted on `folder` while inside."""
  os.makedirs(folder, exist_ok=True)
  mount_or_skip('-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder))
  try:
    yield str(folder)
  finally:
    subprocess.run(['umount', '-l', str(folder)], check=True)


def fill(folder):
  """Writes a filler file in `folder` until the disk is full (ENOSPC)."""
  chunk = b'\0' * 4096
  with open(os.path.join(folder, 'filler'), 'wb', buffering=0) as f:
    while True:
      try:
        f.write(chunk)
      except OSError as e:
        assert e.errno == 28, e  # ENOSPC, not another error.
        break
  with pytest.raises(OSError):  # Not even one byte is left.
    with open(os.path.join(folder, 'probe'), 'wb', buffering=0) as f:
      f.write(b'x')


def _leftovers(folder):
  return [
      p for p in glob.glob(os.path.join(folder, '**', '*tmp*'), recursive=True)
  ]


def _state(k):
  rng = np.random.RandomState(k)
  tree = {
      'step': np.int32(k),
      'params': {
          'w': rng.randn(20000).astype(np.float32)
      }
  }
  return jax.device_put(tree, sharding.replicated(sharding.make_mesh()))


def test_checkpoint_write_on_a_full_disk(tmp_path):
  with tmpfs(tmp_path / 'disk', '1m') as disk:
    ckpt = checkpointing.Checkpointer(os.path.join(disk, 'run'))
    ckpt.save(1, _state(1))
    fill(disk)
    with pytest.raises(checkpointing.CheckpointError) as err:
      ckpt.save(2, _state(2))
    message = str(err.value)
    assert '\n' not in message
    assert message.startswith('cannot write the checkpoint at step 2 in ')
    assert '(No space left on device)' in message
    assert 'the last good checkpoint is step 1 in ' in message
    assert _leftovers(ckpt.directory) == []
    os.remove(os.path.join(disk, 'filler'))  # Space again: step 1 is intact.
    restored, step = ckpt.restore_latest(_state(0))
    assert step == 1
    np.testing.assert_array_equal(restored['params']['w'],
                                  _state(1)['params']['w'])
    ckpt.close()


def test_history_eval_json_and_config_on_a_full_disk(tmp_path):
  with tmpfs(tmp_path / 'disk', '256k') as disk:
    record = {'step': 10, 'epoch': 1, 'ensemble': {'top1': 0.5}}
    wd.append_history(disk, record)
    eval_json = os.path.join(disk, wd.EVAL)
    wd.write_json({'step': 10}, eval_json)
    before = {
        n: _read_bytes(os.path.join(disk, n)) for n in (wd.HISTORY, wd.EVAL)
    }
    fill(disk)
    big = dict(record, step=20, padding='x' * 8192)  # Over a page.
    for write in (lambda: wd.append_history(disk, big),
                  lambda: wd.write_json({'step': 20}, eval_json),
                  lambda: wd.record_config_changes(disk, ['a: 1 -> 2'], True)):
      with pytest.raises(wd.WorkdirError) as err:
        write()
      assert '\n' not in str(err.value)
      assert '(No space left on device)' in str(err.value)
    for name, content in before.items():  # All or nothing: no partial line.
      assert _read_bytes(os.path.join(disk, name)) == content, name
    assert wd.read_history(disk) == [record]
    assert _leftovers(disk) == []


def test_start_on_a_full_disk_is_one_line(tmp_path):
  with tmpfs(tmp_path / 'disk', '64k') as disk:
    os.makedirs(os.path.join(disk, 'run'))
    fill(disk)
    with pytest.raises(wd.WorkdirError) as err:
      with locking.trainer_lock(os.path.join(disk, 'run')):
        pass
    assert '\n' not in str(err.value)
    assert 'No space left on device' in str(err.value)


def _train(workdir, timeout=600, fill=None):
  """main on `workdir` (with `fill`, 'STEP:BYTES:FOLDER', the disk is
  filled after the save of STEP: tests/fault_main.py); (exit code, error
  lines, stderr)."""
  command = [sys.executable, '-m', 'mixmo_jax.main']
  env = dict(os.environ)
  if fill is not None:
    command = [sys.executable, os.path.join(REPO, 'tests', 'fault_main.py')]
    env['MIXMO_TEST_FILL_DISK'] = fill
  out = subprocess.run([*command, *TINY, f'--workdir={workdir}'], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=timeout)
  errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  return out.returncode, errors, out.stderr


def _final_digest(workdir):
  steps = wd.available_steps(workdir)
  with open(
      os.path.join(workdir, wd.CHECKPOINTS, str(steps[-1]), 'digest',
                   'metadata')) as f:
    return steps[-1], json.load(f)['sha256']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """(final step, digest) of the run that meets no fault."""
  workdir = str(tmp_path_factory.mktemp('clean') / 'run')
  code, errors, stderr = _train(workdir)
  assert code == 0 and not errors, stderr[-3000:]
  return _final_digest(workdir)


def test_full_disk_during_training_loses_only_the_unsaved_epoch(
    tmp_path, uninterrupted):
  """The disk fills up right after the first checkpoint (a real tmpfs,
  256 KB left: the history line and the events fit, the second checkpoint
  does not): exit 1, one line, no temporary folder, the first checkpoint
  intact; once there is space again, the same command resumes and ends on
  the uninterrupted run's bits."""
  digest = uninterrupted
  with tmpfs(tmp_path / 'disk', '16m') as disk:
    workdir = os.path.join(disk, 'run')
    code, errors, stderr = _train(workdir, fill=f'10:262144:{disk}')
    assert code == 1, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith('error: cannot write the checkpoint at step '
                                '20 in '), errors
    assert '(No space left on device)' in errors[0]
    assert 'the last good checkpoint is step 10 in ' in errors[0]
    assert stderr.splitlines()[-1] == errors[0]  # Whole, and said last.
    # No traceback at all: neither ours nor tensorstore's "Event loop is
    # closed" reports for writes still in flight when orbax gives up.
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert _leftovers(workdir) == []
    assert wd.available_steps(workdir) == [10]
    os.remove(os.path.join(disk, 'filler'))  # Space again.
    code, errors, stderr = _train(workdir)
    assert code == 0 and not errors, stderr[-3000:]
    assert _final_digest(workdir) == digest


def test_unwritable_history_saves_the_epoch_first(tmp_path, uninterrupted):
  """eval_history.jsonl read-only (a bind mount): the first evaluation's
  line cannot be written; its epoch is saved before the one-line error, and
  the resume ends on the uninterrupted run's bits."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  history = str(workdir / wd.HISTORY)
  open(history, 'w').close()
  mount_or_skip('--bind', history, history)
  try:
    subprocess.run(['mount', '-o', 'remount,bind,ro', history], check=True)
    code, errors, stderr = _train(str(workdir))
  finally:
    subprocess.run(['umount', history], check=True)
  assert code == 1, stderr[-3000:]
  assert len(errors) == 1, stderr[-3000:]
  assert errors[0] == (f'error: cannot write {history} (Read-only file '
                       'system); nothing of it was written: free space (or '
                       'fix the folder) and rerun (the checkpoint of step 10 '
                       'was saved first)')
  assert 'Traceback' not in stderr
  assert wd.available_steps(str(workdir)) == [10]
  code, errors, stderr = _train(str(workdir))
  assert code == 0 and not errors, stderr[-3000:]
  assert _final_digest(str(workdir)) == uninterrupted


def _train_two_processes(workdir, *args):
  """The TINY run as two processes of one device each; (exit codes, error
  lines, stderr) per process."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(1),
             JAX_ENABLE_COMPILATION_CACHE='false')
  procs = [
      subprocess.Popen([
          sys.executable, '-m', 'mixmo_jax.main', *TINY, *args,
          f'--workdir={workdir}', '--multihost',
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
          f'--process_id={i}'
      ], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True) for i in range(2)
  ]
  results = []
  for proc in procs:
    _, stderr = proc.communicate(timeout=600)
    errors = [l for l in stderr.splitlines() if l.startswith('error:')]
    results.append((proc.returncode, errors, stderr))
  return results


def test_unwritable_history_with_two_processes(tmp_path):
  """Process 0 alone writes the history; when it cannot, both processes
  save the epoch together and stop with one line each (the other process
  says why it stops), and both resume from that checkpoint."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  history = str(workdir / wd.HISTORY)
  open(history, 'w').close()
  mount_or_skip('--bind', history, history)
  try:
    subprocess.run(['mount', '-o', 'remount,bind,ro', history], check=True)
    # Saves only at the end: the step-10 checkpoint is the failure's.
    first = _train_two_processes(workdir, '--config.checkpoint_every_epochs=3')
  finally:
    subprocess.run(['umount', history], check=True)
  for code, errors, stderr in first:
    assert code == 1 and len(errors) == 1, stderr[-3000:]
    assert 'Traceback' not in stderr, stderr[-3000:]
  assert first[0][1][0].startswith(f'error: cannot write {history} (')
  assert first[1][1][0] == (
      'error: another process failed to evaluate or record step 10 (see its '
      'log); the checkpoint of step 10 was saved first')
  assert wd.available_steps(str(workdir)) == [10]
  for code, errors, stderr in _train_two_processes(workdir):
    assert code == 0 and not errors, stderr[-3000:]
    assert 'Resumed from the checkpoint at step 10.' in stderr
  assert wd.available_steps(str(workdir))[-1] == 30

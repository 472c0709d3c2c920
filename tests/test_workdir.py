"""The workdir's lock and the cheap readers of its checkpoints (issue 14.3).

In-process: a second `locking.trainer_lock` on the same file from a new open file
description conflicts exactly as another process's would (flock locks belong
to the open file, not to the process).
"""
import json
import os
import subprocess
import sys

import pytest

from mixmo_jax import locking
from mixmo_jax import workdir as wd


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_second_trainer_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path / 'run')
  with locking.trainer_lock(workdir):
    with pytest.raises(locking.WorkdirBusyError) as err:
      with locking.trainer_lock(workdir):
        pass
    message = str(err.value)
    assert '\n' not in message
    assert f'"pid": {os.getpid()}' in message
    assert 'in use by another trainer' in message
  with locking.trainer_lock(workdir):  # Released on exit: free again.
    holder = _json(os.path.join(workdir, wd.LOCK))
    assert holder['pid'] == os.getpid() and holder['host']


def test_lock_of_a_killed_process_is_free(tmp_path):
  workdir = str(tmp_path / 'run')
  code = ('import os, signal, sys; from mixmo_jax import locking\n'
          f'with locking.trainer_lock({workdir!r}):\n'
          '  print("locked", flush=True); os.kill(os.getpid(), signal.SIGKILL)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == -9 and 'locked' in out.stdout
  assert os.path.exists(os.path.join(workdir, wd.LOCK))  # Stale file left.
  with locking.trainer_lock(workdir):  # But free.
    pass


def _lock_error(workdir):
  with pytest.raises(wd.WorkdirError) as err:
    with locking.trainer_lock(workdir):
      pass
  message = str(err.value)
  assert '\n' not in message
  return message


def test_a_symlink_at_the_lock_is_refused_never_followed(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  precious = tmp_path / 'precious.txt'
  precious.write_text('keep me')
  os.symlink(precious, workdir / wd.LOCK)
  assert 'is a symbolic link' in _lock_error(str(workdir))
  assert precious.read_text() == 'keep me'


def test_a_folder_at_the_lock_is_refused(tmp_path):
  (tmp_path / 'run' / wd.LOCK).mkdir(parents=True)
  assert 'is a folder, not the lock file' in _lock_error(str(tmp_path / 'run'))


def test_a_workdir_that_is_or_lies_under_a_file_is_refused(tmp_path):
  (tmp_path / 'file').write_text('x')
  for workdir in (tmp_path / 'file', tmp_path / 'file' / 'run'):
    message = _lock_error(str(workdir))
    assert 'cannot be opened for writing' in message, message
  assert (tmp_path / 'file').read_text() == 'x'


def test_a_name_over_255_characters_is_refused(tmp_path):
  message = _lock_error(str(tmp_path / ('r' * 300)))
  assert 'File name too long' in message


def test_a_read_only_workdir_is_refused(tmp_path):
  source, workdir = tmp_path / 'source', tmp_path / 'run'
  source.mkdir()
  workdir.mkdir()
  if os.geteuid() != 0:
    pytest.skip('a read-only bind mount needs root')
  mounted = subprocess.run(
      ['mount', '--bind', str(source),
       str(workdir)], capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'mount --bind refused here: {mounted.stderr.strip()}')
  try:
    subprocess.run(['mount', '-o', 'remount,bind,ro', str(workdir)], check=True)
    assert 'Read-only file system' in _lock_error(str(workdir))
  finally:
    subprocess.run(['umount', str(workdir)], check=True)
  assert os.listdir(source) == []


def test_refusal_names_the_live_holder_not_the_recorded_one(tmp_path):
  """The lock file still names a dead trainer; an unrelated live process
  holds the lock: the refusal names that process."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  lock = workdir / wd.LOCK
  lock.write_text(json.dumps({'pid': 999999999, 'host': 'gone'}))
  holder = subprocess.Popen([
      sys.executable, '-c', 'import fcntl, os, sys, time\n'
      f'fd = os.open({str(lock)!r}, os.O_RDWR)\n'
      'fcntl.flock(fd, fcntl.LOCK_EX)\n'
      'print("held", flush=True)\ntime.sleep(60)'
  ], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(locking.WorkdirBusyError) as err:
      with locking.trainer_lock(str(workdir)):
        pass
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  message = str(err.value)
  assert '\n' not in message
  assert f'pid {holder.pid} (' in message, message
  assert f'({sys.executable[:60]}' in message  # Its command line.
  assert '999999999' in message  # The stale record, as what the file says.
  with locking.trainer_lock(str(workdir)):  # Free once that process is gone.
    pass


def test_owned_inputs_are_named_outputs_are_free(tmp_path):
  run = tmp_path / 'run'
  (run / wd.CHECKPOINTS / '10').mkdir(parents=True)
  (run / wd.CONFIG).write_text('{}')
  (run / 'events.out.tfevents.1.host.0').write_text('')
  other = tmp_path / 'elsewhere'
  other.mkdir()
  os.symlink(run / wd.CONFIG, other / 'link.json')
  owned = {
      str(run / wd.CONFIG):
          str(run / wd.CONFIG),
      str(other / 'link.json'):
          str(run / wd.CONFIG),  # Through a link.
      str(run / wd.HISTORY):
          str(run / wd.HISTORY),
      str(run / wd.CHECKPOINTS / 'eval.json'):
          str(run / wd.CHECKPOINTS),
      str(run / wd.CHECKPOINTS / '10' / 'x'):
          str(run / wd.CHECKPOINTS),
      str(run / 'events.out.tfevents.1.host.0'):
          str(run / 'events.out.tfevents.1.host.0'),
  }
  for target, expected in owned.items():
    assert wd.owned_input([str(tmp_path / 'x'), str(run)], target) == expected
  for free in (run / wd.EVAL, run / 'reliability.png', other / 'eval.json',
               tmp_path / 'checkpoints_x'):
    assert wd.owned_input([str(run)], str(free)) is None


def test_analysis_refuses_to_overwrite_a_workdir_input(tmp_path, capsys):
  from mixmo_jax import analysis
  run = tmp_path / 'run'
  run.mkdir()
  (run / wd.CONFIG).write_text('{"keep": true}')
  for flag in ('--output', '--plot'):
    code = analysis.main([f'--workdir={run}', f'{flag}={run / wd.CONFIG}'])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f'error: {flag}={run / wd.CONFIG} would overwrite '
        f'{run / wd.CONFIG}, which the workdir reads; write it '
        'elsewhere'
    ]
  assert (run / wd.CONFIG).read_text() == '{"keep": true}'


def test_check_writable(tmp_path):
  folder = tmp_path / 'a' / 'checkpoints'
  wd.check_writable(str(folder))
  assert os.listdir(tmp_path) == []  # Nothing created, the probe removed.
  (tmp_path / 'file').write_text('x')
  with pytest.raises(OSError):
    wd.check_writable(str(tmp_path / 'file' / 'checkpoints'))


def _step(workdir, step, *, digest=True, state=True, commit=True, config=None):
  folder = os.path.join(workdir, wd.CHECKPOINTS, str(step))
  os.makedirs(folder)
  if digest:
    os.makedirs(os.path.join(folder, 'digest'))
    _write(os.path.join(folder, 'digest', 'metadata'), '{}')
  if state:
    os.makedirs(os.path.join(folder, 'state'))
  if commit:
    _write(os.path.join(folder, 'commit_success.txt'), 'ok')
  if config is not None:
    os.makedirs(os.path.join(folder, 'config'))
    _write(os.path.join(folder, 'config', 'metadata'), json.dumps(config))


def test_available_steps_and_stored_config(tmp_path):
  workdir = str(tmp_path)
  assert wd.available_steps(workdir) == [] and wd.stored_config(workdir) is None
  _step(workdir, 10, config={'seed': 1})
  _step(workdir, 20, config={'seed': 2})
  _step(workdir, 30, digest=False)
  _step(workdir, 40, state=False, commit=False)
  os.makedirs(os.path.join(workdir, wd.CHECKPOINTS, '50.orbax-checkpoint-tmp'))
  assert wd.checkpoint_steps(workdir) == [10, 20, 30, 40]
  assert wd.available_steps(workdir) == [10, 20]
  assert wd.stored_config(workdir) == {'seed': 2}  # The newest that has one.

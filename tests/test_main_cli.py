"""`python -m mixmo_jax.main` failures: one line on stderr, the right exit code.

Config errors exit with 2 before anything heavy is imported and leave the
workdir untouched; a missing dataset exits with 1 in seconds. Subprocesses
(a few seconds each): conftest's environment (8 fake CPU devices) is
inherited.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_config, tiny_digits_config
from mixmo_jax import locking
from mixmo_jax import workdir as workdir_lib

HEAVY = ('tensorflow', 'tensorflow_datasets', 'clu', 'orbax')


def _main(workdir, *args, python_args=(), timeout=120):
  """Runs main on configs/digits.py; returns (exit code, stderr lines)."""
  cmd = [
      sys.executable, *python_args, '-m', 'mixmo_jax.main',
      '--config=configs/digits.py', f'--workdir={workdir}', *args
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
  return out.returncode, out.stderr.splitlines()


def test_mistyped_field_is_one_line_exit_2(tmp_path):
  workdir = tmp_path / 'run'
  code, lines = _main(workdir, '--config.mixing.pp=0.6')
  assert code == 2
  assert len(lines) == 1, lines
  assert lines[0].startswith('error: unknown config field: '
                             '--config.mixing.pp=0.6: config.mixing has no '
                             "field 'pp' (fields: alpha,"), lines
  assert not workdir.exists()


def test_a_config_file_setting_an_unknown_field_is_one_line_exit_2(tmp_path):
  """The base config is locked: ml_collections refuses the typo where the
  file makes it, and main says so in one line with its "did you mean"."""
  path = tmp_path / 'exp.py'
  path.write_text('from mixmo_jax.configs import digits\n'
                  'def get_config(arg=None):\n'
                  '  config = digits.get_config(arg)\n'
                  '  config.optimizer.base_learing_rate = 0.2\n'
                  '  return config\n')
  workdir = tmp_path / 'run'
  cmd = [
      sys.executable, '-m', 'mixmo_jax.main', f'--config={path}:mimo',
      f'--workdir={workdir}'
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2
  assert out.stderr.splitlines() == [
      f"error: --config={path}:mimo: the config file sets config field "
      "'base_learing_rate', which does not exist (did you mean "
      "'base_learning_rate'?); every field must exist in "
      "mixmo_jax/configs/base.py"
  ]
  assert not workdir.exists()


def test_wrong_type_is_one_line_exit_2(tmp_path):
  workdir = tmp_path / 'run'
  code, lines = _main(workdir, '--config.mixing.p=abc')
  assert code == 2
  assert len(lines) == 1, lines
  assert lines[0].startswith('error: '), lines
  assert '--config.mixing.p=abc' in lines[0]
  assert 'config.mixing.p takes a float' in lines[0]
  assert not workdir.exists()


def test_bad_value_fails_before_heavy_imports(tmp_path):
  """-X importtime lists every import on stderr: none of TF, TFDS, clu, orbax."""
  workdir = tmp_path / 'run'
  code, lines = _main(workdir, '--config.mixing.p=1.5',
                      python_args=('-X', 'importtime'))
  imports = [
      l.split('|')[-1].strip() for l in lines if l.startswith('import time:')
  ]
  others = [l for l in lines if not l.startswith('import time:')]
  assert code == 2
  assert others == ['error: config.mixing.p=1.5: must be in [0.0, 1.0]']
  assert 'mixmo_jax.config_validation' in imports  # The listing works.
  loaded = {name.split('.')[0] for name in imports}
  assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
  assert not workdir.exists()


def test_changed_config_is_refused_exit_2(tmp_path):
  """A workdir of configs/digits.py resumed with another mixing.p."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  old = workdir_lib.config_to_dict(load_config('digits'))
  (workdir / 'config.json').write_text(json.dumps(old))
  (workdir / 'checkpoints' / '10').mkdir(parents=True)  # It has trained.
  code, lines = _main(workdir, '--config.mixing.p=0.6',
                      '--config.eval_every_epochs=2')
  assert code == 2
  assert len(lines) == 1, lines
  assert lines[0].startswith('error: config differs from ')
  assert 'mixing.p: 0.5 -> 0.6' in lines[0]
  assert 'eval_every_epochs' not in lines[0]  # Allowed: not a blocker.
  # Only the trainer's lock file is new.
  assert sorted(os.listdir(workdir)) == ['.lock', 'checkpoints', 'config.json']
  assert json.loads((workdir / 'config.json').read_text()) == old


def test_missing_dataset_offline_exit_1(tmp_path):
  """CIFAR-10 with empty data_dir / manual_dir and the probe forced off."""
  data_dir, manual_dir = tmp_path / 'data', tmp_path / 'manual'
  data_dir.mkdir()
  manual_dir.mkdir()
  workdir = tmp_path / 'run'
  argv = [
      'main', '--config=configs/cifar10.py', f'--workdir={workdir}',
      f'--config.data_dir={data_dir}', f'--config.manual_dir={manual_dir}'
  ]
  code = ('import sys\n'
          'from absl import app\n'
          'from mixmo_jax.data import cifar\n'
          'cifar.host_reachable = lambda *a, **k: False  # No network.\n'
          'from mixmo_jax import main\n'
          f'sys.argv = {argv!r}\n'
          'app.run(main.main, flags_parser=main.parse_flags)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                       capture_output=True, text=True, timeout=180)
  lines = out.stderr.splitlines()
  assert out.returncode == 1, out.stderr[-3000:]
  errors = [l for l in lines if l.startswith('error:')]
  assert errors == [lines[-1]], lines[-5:]
  assert 'Traceback' not in out.stderr
  assert 'cifar-10-python.tar.gz' in lines[-1]
  assert f'manual_dir={manual_dir}' in lines[-1]
  assert os.path.join(str(data_dir), 'cifar10') in lines[-1]
  assert not (workdir / 'checkpoints').exists()


def test_every_bad_field_one_line_each_exit_2(tmp_path):
  """Issue 14.2: nan / inf and bad seeds, all reported in one pass."""
  workdir = tmp_path / 'run'
  code, lines = _main(workdir, '--config.optimizer.base_learning_rate=inf',
                      '--config.mixing.p=nan', '--config.seed=-1',
                      '--config.eval_batch_size=-1')
  assert code == 2
  errors = [l for l in lines if l.startswith('error: ')]
  assert errors == [
      'error: config.mixing.p=nan: must be a finite number (no nan or inf)',
      'error: config.optimizer.base_learning_rate=inf: must be a finite '
      'number (no nan or inf)',
      'error: config.eval_batch_size=-1: must be an integer >= 1',
      'error: config.seed=-1: must be an integer in [0, 4294967295]'
  ], lines
  assert not workdir.exists()


def test_second_trainer_is_refused_exit_2(tmp_path):
  """Issue 14.3: the lock's holder is named; nothing is written."""
  workdir = tmp_path / 'run'
  with locking.trainer_lock(str(workdir)):
    code, lines = _main(workdir, '--config.model.width=1')
  assert code == 2
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'error: {workdir} is in use by another trainer: '
                             f'pid {os.getpid()} (')
  assert f'its lock file says {{"pid": {os.getpid()}, ' in lines[0]
  assert os.listdir(workdir) == ['.lock']


def test_symlinked_lock_is_refused_exit_1(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  precious = tmp_path / 'precious.txt'
  precious.write_text('keep me')
  os.symlink(precious, workdir / workdir_lib.LOCK)
  code, lines = _main(workdir, '--config.model.width=1')
  assert code == 1
  assert len(lines) == 1, lines
  assert lines[0] == (f'error: {workdir / workdir_lib.LOCK} is a symbolic link '
                      f'(never followed: remove it); the workdir {workdir} '
                      'cannot be used for training')
  assert precious.read_text() == 'keep me'
  assert os.listdir(workdir) == [workdir_lib.LOCK]


def test_missing_platform_is_one_line_exit_1(tmp_path):
  """JAX_PLATFORMS naming a platform this machine lacks (jax fails with a
  bare AssertionError): one line, exit 1, nothing written."""
  workdir = tmp_path / 'run'
  out = subprocess.run([
      sys.executable, '-m', 'mixmo_jax.main', '--config=configs/digits.py',
      f'--workdir={workdir}'
  ], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS='cuda'))
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith('error: jax cannot start a backend with '
                             'JAX_PLATFORMS=cuda (')
  assert not workdir.exists()


def test_two_quick_ctrl_c_are_one_line_exit_130(tmp_path):
  """The second Ctrl-C stops at once: one line naming what happened, the
  shell's SIGINT exit code, no traceback. (Two sent within microseconds
  may reach the process as one, which then saves and stops cleanly.)"""
  import signal
  workdir = tmp_path / 'run'
  proc = subprocess.Popen([
      sys.executable, '-m', 'mixmo_jax.main', '--config=configs/digits.py',
      f'--workdir={workdir}', '--config.model.width=1',
      '--config.num_train_examples=320', '--config.num_epochs=50',
      '--config.optimizer.decay_epochs=()'
  ], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:  # The progress lines: until the steps run.
    if line.startswith('epoch 1/'):
      break
  proc.send_signal(signal.SIGINT)
  lines = []
  for line in proc.stderr:  # The first one is handled: the run will save.
    lines.append(line.rstrip('\n'))
    if 'SIGINT received' in line:
      break
  proc.send_signal(signal.SIGINT)  # While it still trains or saves.
  _, stderr = proc.communicate(timeout=120)
  lines += stderr.splitlines()
  assert proc.returncode == 130, lines[-20:]
  errors = [l for l in lines if l.startswith('error:')]
  assert errors == [
      'error: stopped at once by a second Ctrl-C, without '
      'saving the current step; the checkpoints already '
      'written are kept: rerun the same command to resume'
  ]
  assert not any(
      'Traceback' in l or 'KeyboardInterrupt' in l for l in lines), lines[-20:]


def test_an_unsupported_url_workdir_is_refused_and_nothing_is_created(tmp_path):
  """s3:// (a URL of a store other than gs://) is not a local path: every
  program says so in one line instead of writing into a local folder named
  's3:'."""
  from mixmo_jax import analysis, predict
  from mixmo_jax import workdir as wd
  url = 's3://bucket/mixmo/run'
  expected = wd.url_problem(url)
  assert expected and 's3:// is not supported' in expected
  assert wd.url_problem('/a/b') is None
  assert wd.url_problem('relative/s3:/x') is None
  for module in ('mixmo_jax.main', 'mixmo_jax.evaluate'):
    args = [f'--workdir={url}']
    if module == 'mixmo_jax.main':
      args.append(f'--config={REPO}/configs/digits.py')
    out = subprocess.run([sys.executable, '-m', module, *args], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith('error: ')
    assert expected in out.stderr
  assert analysis.main([f'--workdir={url}']) == 2
  with pytest.raises(ValueError, match='not supported'):
    predict.load(url)
  import mixmo_jax
  with pytest.raises(ValueError, match='not supported'):
    mixmo_jax.train(tiny_digits_config(), url)
  assert os.listdir(tmp_path) == []
  assert not os.path.exists(os.path.join(REPO, 's3:'))


def test_the_config_is_validated_once_per_start(tmp_path):
  """`python -m mixmo_jax.main` validates the config once (in
  training.train_and_evaluate,
  before the workdir is touched), counted in a real start."""
  code = ('import runpy, sys\n'
          'from mixmo_jax import config_validation as cv\n'
          'calls = []\n'
          'original = cv.validate\n'
          'def counted(*args, **kwargs):\n'
          '  calls.append(1)\n'
          '  return original(*args, **kwargs)\n'
          'cv.validate = counted\n'
          'sys.argv = ["main"] + sys.argv[1:]\n'
          'try:\n'
          '  runpy.run_module("mixmo_jax.main", run_name="__main__")\n'
          'finally:\n'
          '  print("VALIDATED", len(calls), file=sys.stderr)\n')
  out = subprocess.run([
      sys.executable, '-c', code, f'--config={REPO}/configs/digits.py',
      '--config.model.width=1', '--config.num_epochs=1',
      '--config.num_train_examples=320', '--config.optimizer.decay_epochs=()',
      f'--workdir={tmp_path / "run"}'
  ], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'VALIDATED 1' in out.stderr.splitlines()[-1], out.stderr[-2000:]

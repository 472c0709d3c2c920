"""Faults (issue 14): each says what happened in one line and loses at most
the work since the last checkpoint; no NaN model is ever saved or scored.

In-process on copies of the shared 2-epoch digits workdir (conftest,
checkpoints at steps 10 and 20), except the fault-injection chain at the
end, which SIGKILLs `python -m mixmo_jax.main` subprocesses.  Every test
that damages or refuses something checks the digests of the surviving
checkpoints before and after.
"""
import errno
import glob
import json
import os
import shutil

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_digits_config
from mixmo_jax import checkpointing, predict, progress, sharding, training
from mixmo_jax import locking
from mixmo_jax import workdir as wd
from mixmo_jax.evaluation import metrics
from mixmo_jax.evaluation import runs as runs_lib

pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


def _json(path):
  with open(path) as f:
    return json.load(f)


def _digests(workdir):
  """{step: stored sha256} of every checkpoint, plus each file's bytes."""
  out = {}
  for step in wd.checkpoint_steps(workdir):
    folder = os.path.join(workdir, wd.CHECKPOINTS, str(step))
    files = {}
    for path in sorted(glob.glob(os.path.join(folder, '**'), recursive=True)):
      if os.path.isfile(path):
        with open(path, 'rb') as f:
          files[os.path.relpath(path, folder)] = f.read()
    out[step] = files
  return out


@pytest.fixture
def run(digits_workdir, tmp_path):
  """A private copy of the trained workdir."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(digits_workdir, workdir)
  assert wd.checkpoint_steps(workdir) == [10, 20]
  return workdir


def _state(value=1.0):
  mesh = sharding.make_mesh()
  tree = {
      'step': jnp.int32(1),
      'params': {
          'w': jnp.full((5,), value)
      },
      'opt_state': {
          'm': jnp.zeros(3)
      }
  }
  return jax.device_put(tree, sharding.replicated(mesh))


# ---------------------------------------------------------------- NaN


def test_non_finite_state_is_never_saved(tmp_path):
  workdir = str(tmp_path)
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    ckpt.save(1, _state())
    before = _digests(workdir)
    with pytest.raises(checkpointing.NonFiniteStateError) as err:
      ckpt.save(2, _state(float('nan')))
    message = str(err.value)
    assert '\n' not in message
    assert "['params']['w'] at step 2" in message
    assert (f'last good checkpoint is step 1 in '
            f'{os.path.join(workdir, "checkpoints")}') in message
    assert ckpt.all_steps() == [1]
  finally:
    ckpt.close()
  assert _digests(workdir) == before


def test_top_k_counts_nan_rows_wrong():
  scores = np.array([[np.nan] * 3, [0.0, np.nan, 1.0], [0.0, 2.0, 1.0]])
  labels = np.array([0, 2, 1])
  for k in (1, 3):
    assert metrics.top_k_correct(scores, labels,
                                 k).tolist() == [False, False, True]


def test_nan_parameters_are_not_scored(run):
  """evaluate's and predict's path refuse NaN logits, naming the step."""
  restored = runs_lib.restore_run(run)
  nan = jax.tree.map(lambda x: x * jnp.nan, restored.variables)
  bad = runs_lib.Run(run, restored.config, nan, restored.step)
  images = np.zeros((4, 16, 16, 3), np.uint8)
  mesh = sharding.local_mesh()
  with pytest.raises(runs_lib.NonFiniteOutputError) as err:
    runs_lib.predict_members([bad], images, mesh)
  assert f'at step 20 in {run} predicts NaN or inf logits for 4 of 4' in str(
      err.value)
  predictor = predict.Predictor(restored.config, nan, 20)
  predictor.source = f'at step 20 in {run}'
  with pytest.raises(ValueError, match='at step 20 in .* NaN or inf'):
    predictor(images)


def test_diverging_run_saves_nothing_after_the_last_good(run):
  """A huge finite learning rate passes validation but diverges."""
  config = tiny_digits_config()
  config.num_epochs = 3
  config.optimizer.base_learning_rate = 1e30
  before = _digests(run)
  with pytest.raises(
      (progress.NonFiniteLossError, checkpointing.NonFiniteStateError)) as err:
    training.train_and_evaluate(config, run, allow_config_change=True)
  assert '\n' not in str(err.value)
  assert 'step 20 in' in str(err.value)  # The last good checkpoint.
  assert _digests(run) == before
  # The failed run closed its event file (this process's open files).
  fds = '/proc/self/fd'
  open_files = [
      os.readlink(os.path.join(fds, fd))
      for fd in os.listdir(fds)
      if os.path.exists(os.path.join(fds, fd))
  ]
  assert not [f for f in open_files if 'tfevents' in f], open_files


# ---------------------------------------------------------------- disk full


def test_disk_full_during_checkpoint_write(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    ckpt.save(1, _state())
    before = _digests(workdir)

    def full(self, *args, **kwargs):
      raise OSError(errno.ENOSPC, 'No space left on device', str(self))

    monkeypatch.setattr(epath.Path, 'write_text', full)
    with pytest.raises(checkpointing.CheckpointError) as err:
      ckpt.save(2, _state(2.0))
    monkeypatch.undo()
    message = str(err.value)
    assert '\n' not in message
    assert message.startswith('cannot write the checkpoint at step 2 in ')
    assert '(No space left on device)' in message
    assert 'the last good checkpoint is step 1 in' in message
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']  # No tmp.
    assert ckpt.all_steps() == [1]
    restored, step = ckpt.restore_latest(_state())
    assert step == 1 and float(restored['params']['w'][0]) == 1.0
  finally:
    ckpt.close()
  assert _digests(workdir) == before


def test_read_only_checkpoint_folder_is_refused_at_start(run, monkeypatch):
  """A real read-only bind mount of checkpoints/: refused before training."""
  import subprocess
  from conftest import mount_or_skip
  before = _digests(run)
  folder = os.path.join(run, 'checkpoints')
  mount_or_skip('--bind', folder, folder)
  try:
    subprocess.run(['mount', '-o', 'remount,bind,ro', folder], check=True)
    config = tiny_digits_config()
    config.num_epochs = 3  # There would be work left.
    monkeypatch.setattr(training, '_train', None)  # Never reached.
    with pytest.raises(checkpointing.CheckpointError) as err:
      training.train_and_evaluate(config, run, allow_config_change=True)
  finally:
    subprocess.run(['umount', folder], check=True)
  assert str(err.value) == (
      f'cannot write checkpoints in {folder} (Read-only file system); make '
      'it writable or use another --workdir')
  assert _digests(run) == before


# ---------------------------------------------------------------- restarts


def test_finished_run_says_so(run, caplog):
  before = _digests(run)
  history = wd.read_history(run)
  result = training.train_and_evaluate(tiny_digits_config(), run)
  assert result == {'step': 20, 'finished': True}
  assert any('already finished (step 20 of 20): nothing to do' in r.message
             for r in caplog.records)
  assert _digests(run) == before and wd.read_history(run) == history


def test_failed_start_leaves_the_workdir_fresh(tmp_path, monkeypatch):
  """A start without data leaves config.json, which then blocks nothing."""
  from mixmo_jax import data
  from mixmo_jax.data import cifar
  monkeypatch.setattr(cifar, 'host_reachable', lambda *a, **k: False)
  workdir = str(tmp_path / 'run')
  config = tiny_digits_config()
  config.dataset, config.num_classes = 'cifar10', 10
  config.image_size, config.augment.crop_padding = 32, 4
  config.manual_dir = str(tmp_path / 'nowhere')
  with pytest.raises(data.DatasetUnavailableError):
    training.train_and_evaluate(config, workdir)
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  other = tiny_digits_config()
  other.model.width = 2
  training.prepare_workdir(other, workdir)  # Not refused as a "changed resume".
  assert wd.read_config(workdir).model.width == 2


def test_busy_workdir_is_refused_before_anything(run):
  before = _digests(run)
  with locking.trainer_lock(run):
    with pytest.raises(locking.WorkdirBusyError,
                       match='in use by another trainer'):
      training.train_and_evaluate(tiny_digits_config(), run)
  assert _digests(run) == before


def test_deleted_config_json_lets_no_changed_config_through(run):
  from mixmo_jax import config_validation
  os.remove(os.path.join(run, 'config.json'))
  config = tiny_digits_config()
  config.mixing.p = 0.6
  with pytest.raises(
      config_validation.ConfigError,
      match=r'stored with the checkpoints.*mixing\.p: 0\.5 -> '
      r'0\.6'):
    training.train_and_evaluate(config, run)
  assert not os.path.exists(os.path.join(run, 'config.json'))


# ---------------------------------------------------------------- archives


@pytest.mark.parametrize('damage', ['not_gzip', 'truncated', 'bad_pickle'])
def test_corrupt_cifar_archive_is_one_line(tmp_path, monkeypatch, damage):
  import io, pickle, tarfile
  from mixmo_jax import data
  from mixmo_jax.data import cifar
  monkeypatch.setattr(cifar, '_try_prepared', lambda *a: None)
  manual = tmp_path / 'manual'
  manual.mkdir()
  archive = manual / 'cifar-10-python.tar.gz'
  if damage == 'not_gzip':
    archive.write_bytes(b'this is not an archive')
  else:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
      payload = (b'garbage' if damage == 'bad_pickle' else
                 pickle.dumps({b'data': np.zeros((1, 3072), np.uint8)}) * 200)
      for name in ('data_batch_1', 'test_batch'):
        info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    blob = buffer.getvalue()
    archive.write_bytes(blob[:len(blob) //
                             2] if damage == 'truncated' else blob)
  config = tiny_digits_config()
  config.dataset, config.num_classes = 'cifar10', 10
  config.image_size, config.augment.crop_padding = 32, 4
  config.manual_dir = str(manual)
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load_split(config, 'test')
  message = str(err.value)
  assert '\n' not in message
  assert message.startswith(f'cifar10 test: a file in {manual} is damaged (')
  assert 'download it again' in message


def test_offline_message_shows_the_flag(tmp_path, monkeypatch):
  from mixmo_jax import data
  from mixmo_jax.data import cifar
  monkeypatch.setattr(cifar, 'host_reachable', lambda *a, **k: False)
  monkeypatch.setattr(cifar, '_try_prepared', lambda *a: None)
  config = tiny_digits_config()
  config.dataset, config.num_classes = 'cifar10', 10
  config.image_size, config.augment.crop_padding = 32, 4
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load_split(config, 'test')
  assert '--config.manual_dir=FOLDER' in str(err.value)


# ---------------------------------------------------------------- readers


def _damage(workdir, step, how):
  folder = os.path.join(workdir, wd.CHECKPOINTS, str(step))
  if how == 'truncated_blob':  # Every array file, the parameters' too.
    for blob in glob.glob(
        os.path.join(folder, 'state', '**', 'd', '*'), recursive=True):
      with open(blob, 'r+b') as f:
        f.truncate(os.path.getsize(blob) // 2)
  elif how == 'missing_digest':
    shutil.rmtree(os.path.join(folder, 'digest'))
  elif how == 'empty_step_folder':
    shutil.rmtree(folder)
    os.makedirs(folder)


@pytest.mark.parametrize(
    'how', ['truncated_blob', 'missing_digest', 'empty_step_folder'])
def test_evaluate_and_predict_fall_back(run, how, caplog):
  _damage(run, 20, how)
  before = _digests(run)
  restored = runs_lib.restore_run(run)
  assert restored.step == 10
  warnings = [r.message for r in caplog.records if 'skipped' in r.message]
  assert len(warnings) == 1 and 'using step 10' in warnings[0]
  assert '\n' not in warnings[0]
  assert predict.load(run).step == 10
  with pytest.raises(checkpointing.CheckpointError) as err:
    predict.load(run, step=20)
  assert '\n' not in str(err.value)
  assert str(err.value).startswith('the checkpoint at step 20 in ') or (
      'no checkpoint at step 20' in str(err.value))
  assert _digests(run) == before  # Readers move nothing.


def test_ensemble_refuses_the_same_run_twice(run):
  with pytest.raises(runs_lib.EvaluationError, match='given twice'):
    runs_lib.read_configs([run, os.path.join(run, '')])


# ---------------------------------------------------------------- kill chain

ARGS = ('--config=configs/digits.py', '--config.model.width=1',
        '--config.num_train_examples=64', '--config.num_epochs=3',
        '--config.optimizer.warmup_epochs=0.5',
        '--config.optimizer.decay_epochs=()', '--config.eval_every_epochs=1',
        '--config.checkpoint_every_epochs=1', '--config.eval_batch_size=200')
# 64 examples / 32 unique per step: 2 steps per epoch, 6 steps, a
# checkpoint and an evaluation at steps 2, 4 and 6 (evaluation first). Ten
# SIGKILLs, each at a point the run reaches from where the previous one left
# it: between steps, right after an evaluation (before its history line) and
# inside a checkpoint write (its temporary folder exists), then a clean
# finish.
KILLS = (('step', 1), ('eval', 2), ('save', 2), ('step', 3), ('eval', 4),
         ('save', 4), ('step', 4), ('step', 5), ('eval', 6), ('save', 6))
EXPECTED_STEPS = ([], [], [], [2], [2], [2], [2], [2, 4], [2, 4], [2, 4])


def _start(workdir, log_path, *extra, kill=None):
  """main on `workdir`, SIGKILLed at `kill` ((point, step), see
  tests/fault_main.py) when given."""
  import subprocess
  from conftest import REPO, killed_main
  argv, env = killed_main(None if kill is None else f'{kill[0]}:{kill[1]}')
  with open(log_path, 'w') as log:  # The child keeps its own descriptor.
    proc = subprocess.Popen([*argv, f'--workdir={workdir}', *ARGS, *extra],
                            cwd=REPO, env=env, stdout=log, stderr=log)
  proc.log_path = log_path
  return proc


def _finish(proc):
  code = proc.wait(timeout=600)
  with open(proc.log_path) as f:
    return code, f.read()


def _final_digest(workdir, step):
  with open(
      os.path.join(workdir, wd.CHECKPOINTS, str(step), 'digest',
                   'metadata')) as f:
    return json.load(f)['sha256']


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  root = tmp_path_factory.mktemp('faults')
  base, killed = str(root / 'base'), str(root / 'killed')
  out = {'base': base, 'killed': killed, 'codes': [], 'steps': [], 'logs': []}
  baseline = None
  try:
    for i, kill in enumerate(KILLS):
      code, log = _finish(_start(killed, str(root / f'kill{i}.log'), kill=kill))
      out['codes'].append(code)
      out['logs'].append(log)
      out['steps'].append(wd.checkpoint_steps(killed))
      if baseline is None:  # Once the first run has filled the compile cache.
        baseline = _start(base, str(root / 'base.log'))
    out['final_code'], out['final_log'] = _finish(
        _start(killed, str(root / 'final.log')))
    out['base_code'], out['base_log'] = _finish(baseline)
  finally:
    if baseline is not None and baseline.poll() is None:
      baseline.kill()
  return out


def test_ten_kills_end_bit_identical_to_an_uninterrupted_run(chain):
  assert chain['base_code'] == 0, chain['base_log'][-3000:]
  for kill, code, steps, log in zip(KILLS, chain['codes'], chain['steps'],
                                    chain['logs']):
    assert code == -9, (kill, log[-3000:])
  assert chain['steps'] == list(EXPECTED_STEPS)
  assert chain['final_code'] == 0, chain['final_log'][-3000:]
  base, killed = chain['base'], chain['killed']
  assert wd.checkpoint_steps(killed) == wd.checkpoint_steps(base) == [2, 4, 6]
  assert not glob.glob(os.path.join(killed, wd.CHECKPOINTS, '*tmp*'))
  # The digest covers step, parameters, batch statistics, optimizer state.
  for step in (2, 4, 6):
    assert _final_digest(killed, step) == _final_digest(base, step)
  with open(os.path.join(base, wd.HISTORY)) as a, open(
      os.path.join(killed, wd.HISTORY)) as b:
    assert a.read() == b.read()  # No duplicate or orphan evaluation line.


def test_close_waits_for_the_temporary_folder_cleanup(tmp_path):
  """orbax removes leftover `<step>.orbax-checkpoint-tmp` folders in a
  thread; a Checkpointer closed before any save (a run stopped during
  start-up) waits for it, so the process never exits under that thread
  (a traceback at shutdown) and the leftover is gone."""
  workdir = str(tmp_path / 'run')
  tmp = os.path.join(workdir, wd.CHECKPOINTS, '4.orbax-checkpoint-tmp')
  os.makedirs(os.path.join(tmp, 'state'))
  for _ in range(3):
    ckpt = checkpointing.Checkpointer(workdir)
    ckpt.close()
    assert not os.path.exists(tmp)
    os.makedirs(os.path.join(tmp, 'state'))


def test_sigint_saves_and_exits_0(tmp_path):
  """Ctrl-C is handled like SIGTERM: a checkpoint of the current step."""
  import signal, time
  workdir = str(tmp_path / 'run')
  proc = _start(workdir, str(tmp_path / 'log'), '--config.num_epochs=40',
                '--config.eval_every_epochs=40',
                '--config.checkpoint_every_epochs=40')
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(workdir, wd.CONFIG)):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.1)
  time.sleep(2)  # In the start-up or the loop: both stop cleanly.
  proc.send_signal(signal.SIGINT)
  code, log = _finish(proc)
  assert code == 0, log[-3000:]
  assert 'SIGINT received: saving a checkpoint and stopping.' in log
  assert 'Traceback' not in log and 'KeyboardInterrupt' not in log
  steps = wd.checkpoint_steps(workdir)
  if 'Stopped by SIGINT before step' not in log:
    assert len(steps) == 1 and 0 < steps[0] < 80
    assert f'Stopped by SIGINT after step {steps[0]} (checkpoint saved).' in log


def test_evaluate_cli_falls_back_or_refuses_the_step(run):
  import subprocess, sys
  from conftest import REPO
  workdir = run
  _damage(workdir, 20, 'truncated_blob')
  before = _digests(workdir)

  def evaluate(*args):
    out = subprocess.run([
        sys.executable, '-m', 'mixmo_jax.evaluate', f'--workdir={workdir}',
        *args
    ], cwd=REPO, capture_output=True, text=True, timeout=600)
    return out.returncode, out.stderr

  code, err = evaluate('--step=20', f'--ensemble={workdir}')
  assert code == 2, err[-3000:]
  assert err.strip().splitlines()[-1].startswith(
      f'error: {workdir} is given twice')
  code, err = evaluate('--step=20')
  assert code == 2, err[-3000:]
  # Our one error line; orbax's restore thread may write its noise on the
  # same line first (seen once in a cold CI run), hence from 'error:' on.
  errors = [l[l.index('error:'):] for l in err.splitlines() if 'error:' in l]
  assert len(errors) == 1, err[-3000:]
  (last,) = errors
  assert last.startswith(f'error: the checkpoint at step 20 in '
                         f'{os.path.join(workdir, "checkpoints")} does not '
                         'restore or verify'), err[-3000:]
  # No traceback of ours (orbax's restore thread may print its own asyncio
  # 'Event loop is closed' noise as the process exits).
  assert not [
      l for l in err.splitlines() if 'File "' in l and 'mixmo_jax' in l
  ], err[-3000:]
  code, err = evaluate()
  assert code == 0, err[-3000:]
  warnings = [l for l in err.splitlines() if 'skipped' in l]
  assert len(warnings) == 1 and 'using step 10' in warnings[0], err[-3000:]
  assert _json(os.path.join(workdir, wd.EVAL))['step'] == 10
  assert _digests(workdir) == before

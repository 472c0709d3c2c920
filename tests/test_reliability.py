"""Preemption, exact resume, verified checkpoints, non-finite loss, offline data.

The `runs` fixture trains the tiny digits recipe (WRN-10-1, 320 examples:
10 steps per epoch, 20 steps, checkpoints at 10 and 20) with
`python -m mixmo_jax.main` subprocesses, once per module:

  A    uninterrupted;
  B    sent SIGTERM as soon as its training loop starts (it saves the step
       it is at, inside the warm-up epoch, and exits 0); rerun and SIGKILLed
       after step 5 (between that checkpoint and the one at 10); rerun and
       SIGKILLed after step 15 (between checkpoints 10 and 20); then, with a
       partial checkpoint planted as orbax leaves it after a SIGKILL inside a
       write (`20.orbax-checkpoint-tmp`) and the evaluation that precedes
       that write appended to the history, rerun to the end with an
       allow-listed change (log_every_steps);
  NaN  a copy of B after its checkpoint at step 10, resumed with
       --allow_config_change and an absurd learning rate.

Kills are deterministic (tests/fault_main.py), not timed; the SIGTERM
is handled at the next step boundary, whenever it comes. The runs share a
JAX compilation cache; A and NaN run beside the B chain once the first run
has compiled the train step.
The digest tests run in-process on small states; the offline-data test too.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, killed_main, tiny_digits_config
from mixmo_jax import checkpointing, sharding, training
from mixmo_jax import workdir as workdir_lib
from mixmo_jax.evaluation import runs as runs_lib

# Orbax leaves un-awaited coroutines behind after a failed restore (the
# corrupt checkpoints here); they surface at garbage collection.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')

ARGS = ('--config=configs/digits.py', '--config.model.width=1',
        '--config.num_train_examples=320', '--config.num_epochs=2',
        '--config.optimizer.decay_epochs=(1,)', '--config.eval_every_epochs=1',
        '--config.checkpoint_every_epochs=1', '--config.eval_batch_size=200')
TIMEOUT_S = 900

# ---------------------------------------------------------------- subprocesses


def _start(workdir, *extra, env, log_path, kill_after=None):
  """Starts main on `workdir` (SIGKILLed right after step `kill_after` when
  given); stdout and stderr go to `log_path`."""
  argv, env = killed_main(None if kill_after is None else f'step:{kill_after}',
                          env)
  with open(log_path, 'w') as log:
    proc = subprocess.Popen([*argv, f'--workdir={workdir}', *ARGS, *extra],
                            cwd=REPO, env=env, stdout=log, stderr=log)
  proc.log_path = log_path
  return proc


def _finish(proc):
  """Waits for `proc`; returns its exit code and its log."""
  code = proc.wait(timeout=TIMEOUT_S)
  with open(proc.log_path) as f:
    return code, f.read()


def _wait_for(proc, text):
  """Polls the run's log until `text` appears (the run must still be alive)."""
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline:
    with open(proc.log_path) as f:
      if text in f.read():
        return
    assert proc.poll() is None, f'run ended before logging {text!r}'
    time.sleep(0.2)
  raise AssertionError(f'timed out waiting for {text!r}')


def _steps(workdir):
  return sorted(
      int(d)
      for d in os.listdir(os.path.join(workdir, 'checkpoints'))
      if d.isdigit())


def _history(workdir):
  path = os.path.join(workdir, workdir_lib.HISTORY)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return f.readlines()


def _snapshot(workdir):
  return types.SimpleNamespace(
      steps=_steps(workdir),
      history=[json.loads(l)['step'] for l in _history(workdir)],
      files=sorted(os.listdir(workdir)))


def _plant_partial_checkpoint(workdir, step):
  """What a SIGKILL inside orbax's write of `step` leaves (orbax 0.12.8).

  Orbax writes into `<step>.orbax-checkpoint-tmp`, adds commit_success.txt
  and renames it to `<step>` only at the end. The evaluation of that step
  already went into the history (it runs before the save).
  """
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  tmp = os.path.join(ckpt_dir, f'{step}.orbax-checkpoint-tmp')
  shutil.copytree(os.path.join(ckpt_dir, str(_steps(workdir)[-1])), tmp)
  for path in glob.glob(
      os.path.join(tmp, '**', 'commit_success.txt'), recursive=True):
    os.remove(path)
  data = sorted(
      glob.glob(os.path.join(tmp, 'state', 'ocdbt.process_0', 'd', '*')),
      key=os.path.getsize)
  with open(data[-1], 'r+b') as f:  # Half written.
    f.truncate(os.path.getsize(data[-1]) // 2)
  with open(os.path.join(workdir, workdir_lib.HISTORY), 'a') as f:
    f.write(json.dumps({'step': step, 'epoch': 2, 'planted': True}) + '\n')
    f.write('{"step": 20, "epoch": 2, "ensem')  # Cut by the kill.
  return tmp


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('reliability')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  r = types.SimpleNamespace(
      a=str(root / 'a'), b=str(root / 'b'), nan=str(root / 'nan'))
  procs = []

  def start(*args, **kwargs):
    log_path = str(root / f'run{len(procs)}.log')
    procs.append(_start(*args, env=env, log_path=log_path, **kwargs))
    return procs[-1]

  try:
    # B1 alone fills the compilation cache; then A runs beside the chain.
    b1 = start(r.b)
    _wait_for(b1, 'steps per epoch')  # Logged when the training loop starts.
    b1.send_signal(signal.SIGTERM)
    r.b1_code, r.b1_log = _finish(b1)
    r.b1 = _snapshot(r.b)
    a = start(r.a)
    r.b2_code, r.b2_log = _finish(start(r.b, kill_after=5))
    r.b2 = _snapshot(r.b)
    r.b3_code, r.b3_log = _finish(start(r.b, kill_after=15))
    r.b3 = _snapshot(r.b)

    shutil.copytree(r.b, r.nan)
    nan = start(r.nan, '--allow_config_change', '--config.log_every_steps=1',
                '--config.optimizer.base_learning_rate=1e8')

    r.partial = _plant_partial_checkpoint(r.b, 20)
    r.b4_code, r.b4_log = _finish(start(r.b, '--config.log_every_steps=5'))
    r.b4 = _snapshot(r.b)

    r.a_code, r.a_log = _finish(a)
    r.nan_code, r.nan_log = _finish(nan)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return r


def _check_code(code, log, expected):
  assert code == expected, log[-3000:]


def test_uninterrupted_run(runs):
  _check_code(runs.a_code, runs.a_log, 0)
  assert _steps(runs.a) == [10, 20]
  assert [json.loads(l)['step'] for l in _history(runs.a)] == [10, 20]


def test_sigterm_saves_the_current_step_and_exits_0(runs):
  _check_code(runs.b1_code, runs.b1_log, 0)
  stopped = runs.b1.steps[-1]
  assert runs.b1.steps == [stopped] and 0 < stopped < 10  # In the warm-up.
  assert f'Stopped by SIGTERM after step {stopped} (checkpoint saved).' in (
      runs.b1_log)
  assert runs.b1.history == [] and 'config.json' in runs.b1.files
  assert f'Resumed from the checkpoint at step {stopped}.' in runs.b2_log


def test_sigkill_between_checkpoints_resumes_from_the_last(runs):
  stopped = runs.b1.steps[-1]
  _check_code(runs.b2_code, runs.b2_log, -signal.SIGKILL)
  assert runs.b2.steps == [stopped] and runs.b2.history == []
  assert f'Resumed from the checkpoint at step {stopped}.' in runs.b3_log
  _check_code(runs.b3_code, runs.b3_log, -signal.SIGKILL)
  assert runs.b3.steps == [stopped, 10] and runs.b3.history == [10]
  assert 'Resumed from the checkpoint at step 10.' in runs.b4_log


def test_partial_checkpoint_write_is_ignored_and_cleaned(runs):
  _check_code(runs.b4_code, runs.b4_log, 0)
  assert not os.path.exists(runs.partial)
  assert not glob.glob(os.path.join(runs.b, 'checkpoints', '*tmp*'))
  assert runs.b4.steps[-1] == 20 and 'checkpoints_corrupt' not in runs.b4.files
  assert runs.b4.history == [10, 20]  # Planted and cut lines dropped.


def test_resumed_run_is_bit_identical(runs):
  """B (preempted, killed twice, partial write) ends exactly as A."""
  _, params_a, step_a = _restore(runs.a)
  _, params_b, step_b = _restore(runs.b)
  assert step_a == step_b == 20
  leaves_a, tree_a = jax.tree_util.tree_flatten(params_a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(params_b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x, y)
  # The stored digests cover the whole state (step, optimizer state too).
  digests = []
  for workdir in (runs.a, runs.b):
    with open(os.path.join(workdir, 'checkpoints', '20', 'digest',
                           'metadata')) as f:
      digests.append(json.load(f)['sha256'])
  assert digests[0] == digests[1]
  assert _history(runs.a) == _history(runs.b)


def test_allow_listed_change_is_logged_and_recorded(runs):
  assert 'Config changed since the last run' in runs.b4_log
  with open(os.path.join(runs.b, 'config_changes.jsonl')) as f:
    records = [json.loads(l) for l in f]
  assert [r['changes'] for r in records] == [['log_every_steps: 50 -> 5']]
  assert records[0]['allow_config_change'] is False
  with open(os.path.join(runs.b, 'config.json')) as f:
    assert json.load(f)['log_every_steps'] == 5


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_checkpoint(runs):
  _check_code(runs.nan_code, runs.nan_log, 3)
  last = runs.nan_log.strip().splitlines()[-1]
  assert last.startswith('error: non-finite loss ')
  step = int(last.split(' at step ')[1].split(';')[0])
  assert 10 < step <= 20
  ckpt_dir = os.path.join(runs.nan, 'checkpoints')
  assert f'last good checkpoint: step 10 in {ckpt_dir}' in last
  assert _steps(runs.nan) == runs.b3.steps  # Nothing saved after the NaN.
  assert [json.loads(l)['step'] for l in _history(runs.nan)] == [10]
  with open(os.path.join(runs.nan, 'config_changes.jsonl')) as f:
    (record,) = [json.loads(l) for l in f]
  assert record['allow_config_change'] is True
  (lr_change,) = [
      c for c in record['changes']
      if c.startswith('optimizer.base_learning_rate: ')
  ]
  assert lr_change.endswith(' -> 100000000.0')
  # The kept checkpoint is B's step 10, still verified.
  _, kept, _ = _restore(runs.nan, step=10)
  assert all(
      np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(kept))


# ---------------------------------------------------------------- digests


def _state(k):
  """A small replicated pytree standing for a train state at step k."""
  rng = np.random.RandomState(k)
  mesh = sharding.make_mesh()
  tree = {
      'step': jnp.int32(k),
      'params': {
          'w': rng.randn(20000).astype(np.float32),
          'b': np.full((7, 3), k, np.float32)
      }
  }
  return jax.device_put(tree, sharding.replicated(mesh))


@pytest.fixture
def checkpointer():
  """Opens Checkpointers that are closed after the test."""
  opened = []

  def open_checkpointer(workdir):
    opened.append(checkpointing.Checkpointer(str(workdir)))
    return opened[-1]

  yield open_checkpointer
  for ckpt in opened:
    ckpt.close()


@pytest.fixture
def saved(tmp_path):
  """A workdir with verified checkpoints at steps 1, 2, 3."""
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
  for k in (1, 2, 3):
    ckpt.save(k, _state(k))
  ckpt.close()
  return str(tmp_path)


def test_best_checkpoint_survives_rotation_latest_on_ties(tmp_path):
  """Orbax's BestN keeps the checkpoint of best top-1 beyond the newest two;
  checkpoints saved without metrics rotate as before."""
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  scores = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.9, 5: 0.6, 6: None, 7: 0.8}
  for k, top1 in scores.items():
    ckpt.save(k, _state(k), metrics=None if top1 is None else {'top1': top1})
  assert ckpt.all_steps() == [4, 6,
                              7]  # Best (4: latest of the 0.9s), newest 2.
  assert ckpt.best() == (0.9, 4)
  ckpt.close()
  # A new manager reads the metrics back from disk (a resumed run).
  again = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  assert again.best() == (0.9, 4)
  again.save(8, _state(8), metrics={'top1': 0.95})
  assert again.all_steps() == [7, 8]
  again.close()
  restored, step = checkpointing.restore_variables(
      str(tmp_path), {
          'params':
              jax.tree.map(
                  lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.
                                                 sharding),
                  _state(8)['params'])
      }, step=checkpointing.BEST)
  assert step == 8
  _assert_equal_trees(restored['params'], _state(8)['params'])


def test_step_best_without_ranked_checkpoints_is_one_line(saved):
  abstract = {
      'params':
          jax.tree.map(
              lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.
                                             sharding),
              _state(1)['params'])
  }
  with pytest.raises(
      checkpointing.CheckpointError,
      match=r'^no checkpoint in .* was saved with its test '
      r'top-1 \(steps \[1, 2, 3\]\)'):
    checkpointing.restore_variables(saved, abstract, step='best')


def _data_files(workdir, step):
  """The array data files of a checkpoint, largest last."""
  return sorted(
      glob.glob(
          os.path.join(workdir, 'checkpoints', str(step), 'state',
                       'ocdbt.process_0', 'd', '*')), key=os.path.getsize)


def _flip_bytes(path, count=16):
  """Inverts `count` bytes in the middle of `path`; the size is unchanged."""
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    data = f.read(count)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  assert os.path.getsize(path) == size


def _assert_equal_trees(x, y):
  assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
  for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def _warnings(caplog):
  return ' '.join(r.getMessage()
                  for r in caplog.records
                  if r.levelname in ('WARNING', 'ERROR'))


def test_restore_verified(saved, checkpointer):
  ckpt = checkpointer(saved)
  state, step = ckpt.restore_latest(_state(0))
  assert step == 3
  _assert_equal_trees(state, _state(3))
  state, step = ckpt.restore_latest(_state(0), step=1)
  assert step == 1
  _assert_equal_trees(state, _state(1))


def test_no_checkpoint_gives_none(tmp_path, checkpointer):
  ckpt = checkpointer(tmp_path)
  assert ckpt.restore_latest(_state(0)) == (None, 0)


def test_overwritten_bytes_fall_back_to_previous(saved, caplog, checkpointer):
  _flip_bytes(_data_files(saved, 3)[-1])
  # Orbax alone restores the damaged array without noticing.
  manager = ocp.CheckpointManager(os.path.join(saved, 'checkpoints'))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      _state(0))
  raw = manager.restore(
      3, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))['state']
  manager.close()
  assert not np.array_equal(
      np.asarray(raw['params']['w']), np.asarray(_state(3)['params']['w']))
  # The digest does: warning, quarantine, previous checkpoint.
  ckpt = checkpointer(saved)
  with caplog.at_level('WARNING'):
    state, step = ckpt.restore_latest(_state(0))
  assert step == 2
  _assert_equal_trees(state, _state(2))
  assert 'step 3 is unusable (digest mismatch' in _warnings(caplog)
  assert ckpt.all_steps() == [1, 2]
  (moved,) = os.listdir(os.path.join(saved, checkpointing.CORRUPT_DIR))
  assert moved.startswith('3-')


def test_truncated_file_falls_back_to_previous(saved, caplog, checkpointer):
  path = _data_files(saved, 3)[-1]
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  ckpt = checkpointer(saved)
  with caplog.at_level('WARNING'):
    state, step = ckpt.restore_latest(_state(0))
  assert step == 2
  _assert_equal_trees(state, _state(2))
  assert 'step 3 is unusable' in _warnings(caplog)


def test_all_corrupt_is_an_error_and_nothing_is_moved(saved, checkpointer):
  for step in (1, 2, 3):
    _flip_bytes(_data_files(saved, step)[-1])
  ckpt = checkpointer(saved)
  with pytest.raises(checkpointing.CheckpointError,
                     match='refusing to start from scratch') as err:
    ckpt.restore_latest(_state(0))
  assert str(err.value).count('digest mismatch') == 3
  assert '\n' not in str(err.value)
  assert ckpt.all_steps() == [1, 2, 3]  # Left in place for inspection.
  assert not os.path.exists(os.path.join(saved, checkpointing.CORRUPT_DIR))


def test_target_that_fits_no_checkpoint_moves_nothing(saved, checkpointer):
  """E.g. a model changed with --allow_config_change: an error, no quarantine."""
  other = dict(_state(0), params={'w': jnp.zeros((5,)), 'b': jnp.zeros((7, 3))})
  ckpt = checkpointer(saved)
  with pytest.raises(checkpointing.CheckpointError):
    ckpt.restore_latest(other)
  assert ckpt.all_steps() == [1, 2, 3]
  assert not os.path.exists(os.path.join(saved, checkpointing.CORRUPT_DIR))


def test_corrupt_latest_of_a_real_run_falls_back(runs, tmp_path, caplog,
                                                 checkpointer):
  """The trainer's own state tree (optax state, batch stats) on A's copy."""
  from mixmo_jax import models, training
  workdir = str(tmp_path / 'a')
  shutil.copytree(runs.a, workdir)
  for path in _data_files(workdir, 20):
    _flip_bytes(path, count=4)
  config = tiny_digits_config()
  state = jax.eval_shape(lambda: training.create_train_state(
      config, models.get_model(config), 10, sharding.make_mesh()))
  ckpt = checkpointer(workdir)
  with caplog.at_level('WARNING'):
    restored, step = ckpt.restore_latest(training.state_to_tree(state))
  assert step == 10
  assert 'step 20 is unusable' in _warnings(caplog)
  with open(os.path.join(runs.a, 'checkpoints', '10', 'digest',
                         'metadata')) as f:
    assert checkpointing.tree_digest(restored) == json.load(f)['sha256']


# Lines a user or a damaged disk can append to eval_history.jsonl.
GARBAGE = [
    b'{"step": 1e999}\n', b'\xff\xfe\x00 not utf-8 \x80\n',
    b'{"step": -5, "epoch": 1}\n', b'[1, 2]\n', b'NaN\n',
    b'{"step": 3, "epoch": 1, "ensemble": {"top1": 7}}\n', b'{"step": "10"}\n',
    b'{"step": 10, "ensemble": "x"}\n', b'{"step": 10' + b'[' * 100000 + b'\n'
]


def test_garbage_in_the_history_is_skipped_and_the_run_resumes(
    digits_workdir, tmp_path, caplog):
  """Every reader skips lines that are not records (one warning), and a
  resume drops them and continues bit for bit."""
  from mixmo_jax.evaluation import report
  work = str(shutil.copytree(digits_workdir, tmp_path / 'run'))
  clean = workdir_lib.read_history(work)
  with open(workdir_lib.path(work, workdir_lib.HISTORY), 'ab') as f:
    f.write(b''.join(GARBAGE))
  with caplog.at_level('WARNING'):
    assert workdir_lib.read_history(work) == clean
  warned = [
      r.getMessage()
      for r in caplog.records
      if 'not evaluation records' in r.getMessage()
  ]
  assert len(warned) == 1 and f'skipped {len(GARBAGE)} line(s)' in warned[0]
  assert report.best_on_test(
      workdir_lib.read_history(work)) == report.best_on_test(clean)
  # Resume from the first checkpoint: the newer record and the garbage go,
  # the same last epoch is trained and evaluated again.
  last = clean[-1]['step']
  shutil.rmtree(os.path.join(work, workdir_lib.CHECKPOINTS, str(last)))
  training.train_and_evaluate(workdir_lib.read_config(work), work)
  with open(workdir_lib.path(work, workdir_lib.HISTORY), 'rb') as f:
    lines = f.read().splitlines()
  assert [json.loads(line) for line in lines] == clean


def test_history_truncation_drops_newer_and_cut_lines(tmp_path):
  path = tmp_path / workdir_lib.HISTORY
  path.write_text('{"step": 10}\n{"step": 20}\n{"step": 30, "ens')
  workdir_lib.truncate_history(str(tmp_path), 10)
  assert path.read_text() == '{"step": 10}\n'


def _restore(workdir, step=None):
  run = runs_lib.restore_run(workdir, step=step)
  return run.config, run.variables, run.step


# ---------------------------------------------------------------- offline data


def test_missing_dataset_fails_fast_before_training(tmp_path, monkeypatch):
  import tensorflow_datasets  # noqa: F401  (import time is not the check)
  from mixmo_jax import data
  from mixmo_jax.data import cifar
  monkeypatch.setattr(cifar, 'host_reachable', lambda *a, **k: False)
  data_dir, manual_dir = tmp_path / 'data', tmp_path / 'manual'
  data_dir.mkdir()
  manual_dir.mkdir()
  config = tiny_digits_config()
  config.dataset, config.num_classes = 'cifar10', 10
  config.image_size, config.augment.crop_padding = 32, 4
  config.data_dir, config.manual_dir = str(data_dir), str(manual_dir)
  workdir = tmp_path / 'run'
  start = time.time()
  with pytest.raises(data.DatasetUnavailableError) as err:
    training.train_and_evaluate(config, str(workdir))
  assert time.time() - start < 10
  message = str(err.value)
  assert '\n' not in message
  assert 'put cifar-10-python.tar.gz' in message
  assert f'manual_dir={manual_dir}' in message
  assert not (workdir / 'checkpoints').exists()

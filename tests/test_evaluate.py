"""Tests for mixmo_jax.evaluate and mixmo_jax.corruptions.

The trained network is the session fixture `digits_workdir` (conftest.py);
copies of its workdir (shutil.copytree) stand in for a second run. Expected
numbers are recomputed here independently from the predicted logits.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import xla_flags
from mixmo_jax import checkpointing, data, evaluate, predict, sharding
from mixmo_jax import workdir as workdir_lib
from mixmo_jax.data import cifar_c as cifar_c_lib
from mixmo_jax.evaluation import corruptions as eval_corruptions
from mixmo_jax.evaluation import registry, report, runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TEST = 360  # Digits test split .
EVAL_BATCH = 48  # 360 = 7 * 48 + 24: the last batch is padded.
PER_SEVERITY = 40
FOG_CORRECT = (40, 30, 20, 10, 0)  # Correct images per severity (of 40).


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _latest_step(workdir):
  ckpt_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  return max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _copy_run(src, dst, **config_changes):
  shutil.copytree(src, dst)
  path = os.path.join(dst, 'config.json')
  with open(path) as f:
    config = json.load(f)
  for dotted, value in config_changes.items():
    node = config
    *parents, leaf = dotted.split('__')
    for p in parents:
      node = node[p]
    node[leaf] = value
  with open(path, 'w') as f:
    json.dump(config, f)
  return str(dst)


def _resaved_run(src, dst, **config_changes):
  """A run whose checkpoint was saved with a changed config: a copy of `src`
  whose latest state is saved again through `Checkpointer` with config.json
  changed as in `_copy_run` (same weights; the config stored with the
  checkpoint and bound by its digest is the changed one)."""
  import orbax.checkpoint as ocp
  dst = _copy_run(src, dst, **config_changes)
  shutil.rmtree(os.path.join(dst, 'checkpoints'))
  os.remove(os.path.join(dst, workdir_lib.RUN))
  source = checkpointing.Checkpointer(src, read_only=True)
  step = source.all_steps()[-1]
  state = source.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  source.close()
  workdir_lib.ensure_run_id(dst)
  ckpt = checkpointing.Checkpointer(dst, config=workdir_lib.read_config(dst))
  ckpt.save(step, state)
  ckpt.close()
  return dst


def _cli_env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(8)
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  return env


@pytest.fixture(scope='module')
def evaluated(digits_workdir):
  """(result, logits [N, M, C], labels [N]) with a non-dividing batch size."""
  return evaluate.run_evaluation([digits_workdir], eval_batch_size=EVAL_BATCH)


@pytest.fixture(scope='module')
def evaluated_as_trained(digits_workdir):
  """eval.json of the latest checkpoint at config.eval_batch_size, the batch
  of the training-time evaluations: the same program as the history's, so
  the same bits (another batch size may round differently on some CPUs)."""
  return evaluate.evaluate_workdirs([digits_workdir])


@pytest.fixture(scope='module')
def reference(digits_workdir):
  """Independent predictions on the test set through `predict`."""
  predictor = predict.load(digits_workdir)
  images, labels = data.load_split(predictor.config, 'test')
  return predictor, images, labels, predictor(images)['logits']


# ---------------------------------------------------------------- test set


def test_eval_json_schema(digits_workdir, evaluated):
  result, logits, labels = evaluated
  assert result['step'] == _latest_step(digits_workdir) == 20
  assert result['workdirs'] == [os.path.abspath(digits_workdir)]
  ens = result['ensemble']
  for key in ('top1', 'top5', 'nll', 'ece', 'brier', 'nll_c', 'ece_c', 'top1_c',
              'temperature'):
    assert isinstance(ens[key], float), key
  for key in ('top1', 'top5', 'ece', 'ece_c', 'top1_c'):
    assert 0.0 <= ens[key] <= 1.0, key
  assert ens['top1'] <= ens['top5']
  assert ens['nll'] > 0 and ens['temperature'] > 0
  assert len(result['members']) == result['num_members'] == 2
  for member in result['members']:
    assert set(member) >= {'top1', 'nll'}
    assert 0.0 <= member['top1'] <= 1.0
  assert set(result['diversity']) >= {'ratio_error', 'disagreement'}
  assert 0.0 <= result['diversity']['disagreement'] <= 1.0
  # The whole test set, although 48 does not divide 360.
  assert result['num_examples'] == NUM_TEST == len(labels)
  assert logits.shape == (NUM_TEST, 2, 10)
  json.loads(workdir_lib.to_json(result))  # Strict JSON.


def test_metrics_match_independent_recomputation(evaluated, reference):
  result, logits, labels = evaluated
  _, _, ref_labels, ref_logits = reference
  np.testing.assert_array_equal(labels, ref_labels)
  # Batch size 48 (evaluate) and 16-padded chunks of 200 (predict) agree.
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  lp = _log_softmax(ref_logits.astype(np.float64).mean(1))  # 'logits' mode.
  correct = int(np.sum(lp.argmax(-1) == ref_labels))
  assert result['ensemble']['top1'] == correct / NUM_TEST
  np.testing.assert_allclose(result['ensemble']['nll'],
                             -np.mean(lp[np.arange(NUM_TEST), ref_labels]),
                             rtol=1e-5)
  for i, member in enumerate(result['members']):
    member_correct = np.sum(ref_logits[:, i].argmax(-1) == ref_labels)
    assert member['top1'] == member_correct / NUM_TEST


def _latest_best(history):
  """Independent rule: max top-1, the last record among the maxima."""
  top = max(r['ensemble']['top1'] for r in history)
  return [r for r in history if r['ensemble']['top1'] == top][-1]


def test_best_on_test_from_history(digits_workdir, evaluated_as_trained):
  result = evaluated_as_trained
  with open(os.path.join(digits_workdir, 'eval_history.jsonl')) as f:
    history = [json.loads(line) for line in f if line.strip()]
  assert len(history) >= 2  # Evaluated after every epoch.
  best = _latest_best(history)
  got = result['best_on_test']
  assert got['epoch'] == best['epoch'] and got['step'] == best['step']
  for k in ('top1', 'nll', 'nll_c', 'ece', 'ece_c'):
    assert got[k] == best['ensemble'][k], k
  assert 'optimistic' in got['note']
  # Headline numbers are the final checkpoint's, not the best epoch's.
  final = history[-1]['ensemble']
  for k in ('top1', 'nll', 'nll_c', 'ece', 'ece_c'):
    assert result['ensemble'][k] == final[k], k
  assert result['step'] == history[-1]['step']


def _record(step, top1, nll):
  return {
      'step': step,
      'epoch': step // 10,
      'ensemble': {
          'top1': top1,
          'nll': nll,
          'nll_c': nll / 2,
          'ece': step / 1000,
          'ece_c': step / 2000
      }
  }


def test_step_best_reproduces_best_on_test(digits_workdir,
                                           evaluated_as_trained):
  """--step=best evaluates the checkpoint of best ensemble top-1 and gives
  exactly the numbers best_on_test quotes from the history."""
  best = evaluated_as_trained['best_on_test']
  result = evaluate.evaluate_workdirs([digits_workdir], step='best')
  assert result['step'] == best['step']
  for key in ('top1', 'nll', 'nll_c', 'ece', 'ece_c'):
    assert result['ensemble'][key] == best[key], key
  model = predict.load(digits_workdir, step='best')
  assert model.step == best['step']
  assert evaluate.parse_step('best') == 'best'
  assert evaluate.parse_step('20') == 20


def test_eval_json_counts_the_parameters(digits_workdir, evaluated_as_trained):
  """num_params: the parameters of the network of config.json, counted from
  its abstract initialisation (not from the restored checkpoint)."""
  import jax
  import jax.numpy as jnp
  from mixmo_jax import models
  config = runs.read_config(digits_workdir)
  size = config.image_size
  init = functools.partial(models.get_model(config).init, train=False)
  shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros(
      (1, size, size, 3)))
  expected = sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert evaluated_as_trained['num_params'] == expected > 0
  assert f'{expected:,} parameters' in report.format_table(
      evaluated_as_trained).splitlines()[0]


def test_best_checkpoint_is_saved_off_the_checkpoint_epochs(tmp_path):
  """With checkpoint_every_epochs past the run's end, the saves are the
  evaluated epochs that reach a new best top-1 (>=, latest on ties) and the
  last step; rotation keeps the newest keep_checkpoints of them and the
  best."""
  from conftest import tiny_digits_config
  from mixmo_jax import training
  config = tiny_digits_config()
  config.num_epochs, config.checkpoint_every_epochs = 4, 10
  config.keep_checkpoints = 2
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(config, workdir)
  history = workdir_lib.read_history(workdir)
  assert [r['epoch'] for r in history] == [1, 2, 3, 4]
  saved, best = [], -1.0
  for record in history:
    if record['ensemble']['top1'] >= best:
      best = record['ensemble']['top1']
      saved.append(record['step'])
  saved = sorted(set(saved) | {history[-1]['step']})
  best_step = report.best_on_test(history)['step']
  assert workdir_lib.available_steps(workdir) == sorted(
      set(saved[-2:]) | {best_step})
  assert history[0]['step'] in saved  # Epoch 1 is no checkpoint epoch.


def test_best_on_test_takes_latest_of_ties():
  history = [
      _record(10, 0.5, 1.0),
      _record(20, 0.7, 0.9),
      _record(30, 0.6, 0.8),
      _record(40, 0.7, 0.7),
      _record(50, float('nan'), 0.1),
      _record(60, 0.65, 0.6)
  ]
  got = report.best_on_test(history)
  assert (got['step'], got['epoch']) == (40, 4)
  assert got['nll'] == 0.7 and got['nll_c'] == 0.35
  assert got['ece'] == 0.04 and got['ece_c'] == 0.02
  # Order of the records does not matter (sorted by step).
  assert report.best_on_test(history[::-1])['step'] == 40
  assert report.best_on_test([]) is None
  assert report.best_on_test([{'step': 1, 'epoch': 0}]) is None


def test_rerun_is_byte_identical(tmp_path, digits_workdir, evaluated):
  first = workdir_lib.write_json(evaluated[0], str(tmp_path / 'a.json'))
  again = evaluate.evaluate_workdirs([digits_workdir],
                                     eval_batch_size=EVAL_BATCH)
  second = workdir_lib.write_json(again, str(tmp_path / 'b.json'))
  with open(first, 'rb') as a, open(second, 'rb') as b:
    assert a.read() == b.read()


def test_ensemble_of_runs(tmp_path, digits_workdir, evaluated, reference):
  single = evaluated[0]
  copy = _copy_run(digits_workdir, tmp_path / 'copy')
  result = evaluate.evaluate_workdirs([digits_workdir, copy],
                                      eval_batch_size=EVAL_BATCH)
  assert result['num_members'] == 4 and len(result['members']) == 4
  assert result['members'] == single['members'] * 2
  assert result['ensemble']['top1'] == single['ensemble']['top1']
  assert result['steps'] == [20, 20] and result['members_per_run'] == [2, 2]
  assert result['workdirs'] == [
      os.path.abspath(digits_workdir),
      os.path.abspath(copy)
  ]
  assert 'best_on_test' not in result
  # The first run's ensemble mode rules: a 'probs' run first.
  probs_run = _resaved_run(digits_workdir, tmp_path / 'probs',
                           evaluation__ensemble='probs')
  result = evaluate.evaluate_workdirs([probs_run, digits_workdir])
  assert result['ensemble_mode'] == 'probs'
  _, _, labels, logits = reference
  p = np.exp(_log_softmax(logits)).mean(1)  # Mean of member probabilities.
  assert result['ensemble']['top1'] == np.mean(p.argmax(-1) == labels)


def test_incompatible_runs_are_refused(tmp_path, digits_workdir):
  other = _resaved_run(digits_workdir, tmp_path / 'other', data_seed=7)
  with pytest.raises(runs.EvaluationError, match='data_seed.*0.*7'):
    evaluate.evaluate_workdirs([digits_workdir, other])


def test_missing_inputs(tmp_path, digits_workdir):
  with pytest.raises(runs.EvaluationError, match='does not exist'):
    evaluate.evaluate_workdirs([str(tmp_path / 'nope')])
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(runs.EvaluationError, match='no checkpoint'):
    evaluate.evaluate_workdirs([str(empty)])
  shutil.copy(os.path.join(digits_workdir, 'config.json'), empty)
  with pytest.raises(runs.EvaluationError, match='no checkpoint'):
    evaluate.evaluate_workdirs([str(empty)])
  assert sorted(os.listdir(empty)) == ['config.json']  # Nothing created.


def test_the_checkpoints_config_is_the_source_of_truth(tmp_path, digits_workdir,
                                                       evaluated_as_trained,
                                                       caplog):
  """An edited config.json (a test-set field, the normalisation) changes
  nothing but a warning naming the fields; a deleted one is written back."""
  edited = _copy_run(digits_workdir, tmp_path / 'edited', data_seed=7,
                     image_std=[1.0, 1.0, 1.0])
  with caplog.at_level('WARNING'):
    result = evaluate.evaluate_workdirs([edited])
  assert result['ensemble'] == evaluated_as_trained['ensemble']
  warned = [
      r.getMessage()
      for r in caplog.records
      if 'differs from the config stored' in r.getMessage()
  ]
  assert len(warned) == 1 and 'data_seed: 0 -> 7' in warned[0]
  assert 'image_std' in warned[0]
  deleted = _copy_run(digits_workdir, tmp_path / 'deleted')
  os.remove(os.path.join(deleted, 'config.json'))
  assert evaluate.evaluate_workdirs([deleted])['ensemble'] == (
      evaluated_as_trained['ensemble'])
  with open(os.path.join(deleted, 'config.json')) as f, open(
      os.path.join(digits_workdir, 'config.json')) as g:
    assert json.load(f) == json.load(g)
  assert predict.load(edited).config.data_seed == 0
  with pytest.raises(checkpointing.CheckpointError, match='999'):
    evaluate.evaluate_workdirs([digits_workdir], step=999)


def test_a_config_json_nothing_vouches_for_is_checked(tmp_path, digits_workdir,
                                                      capsys):
  """Checkpoints of an older version store no config: config.json is the
  only source, so a hand-edited wrong type in it is one line naming the
  field, in evaluate and in analysis, before anything is built."""
  from mixmo_jax import analysis
  old = _copy_run(digits_workdir, tmp_path / 'old', num_members='2')
  for step in workdir_lib.checkpoint_steps(old):
    folder = os.path.join(old, workdir_lib.CHECKPOINTS, str(step))
    shutil.rmtree(os.path.join(folder, 'config'))
    with open(os.path.join(folder, 'digest', 'metadata')) as f:
      record = json.load(f)
    del record['config_sha256']
    with open(os.path.join(folder, 'digest', 'metadata'), 'w') as f:
      json.dump(record, f)
  assert workdir_lib.stored_config(old) is None
  with pytest.raises(runs.EvaluationError) as err:
    evaluate.evaluate_workdirs([old])
  assert str(err.value) == (
      f"{os.path.join(old, 'config.json')}: config.num_members='2': must be "
      'an integer; restore the file the run wrote')
  capsys.readouterr()
  assert analysis.main([f'--workdir={old}']) == 1
  assert capsys.readouterr().err == f'error: {old}: {err.value}\n'
  assert not os.path.exists(os.path.join(old, 'utilisation.json'))


def test_output_path(tmp_path):
  assert evaluate.output_path(None, 'w') == os.path.join('w', 'eval.json')
  assert evaluate.output_path(str(tmp_path), 'w') == str(tmp_path / 'eval.json')
  assert evaluate.output_path('x/r.json', 'w') == 'x/r.json'


# ---------------------------------------------------------------- CIFAR-C


def _margin_images(images, logits):
  """Indices of test images whose ensemble top-2 margin is safely > 0."""
  lp = np.sort(_log_softmax(logits.astype(np.float64).mean(1)), axis=-1)
  return np.flatnonzero(lp[:, -1] - lp[:, -2] > 1e-3)


@pytest.fixture(scope='module')
def cifar_c(tmp_path_factory, reference):
  """A miniature CIFAR-C folder with known per-severity accuracies.

  fog: severity s holds block X_s of 40 images; labels.npy gives the model's
  own prediction for FOG_CORRECT[s] of them (at shuffled positions) and a
  wrong class for the rest, so top-1 is exactly FOG_CORRECT[s] / 40.
  contrast: the same blocks in reverse severity order (its accuracy is
  recomputed from the predictions). A stray .npy file is ignored.
  """
  _, images, _, logits = reference
  rng = np.random.default_rng(0)
  usable = _margin_images(images, logits)
  idx = rng.choice(usable, 5 * PER_SEVERITY, replace=len(usable)
                   < 5 * PER_SEVERITY)
  preds = logits[idx].astype(np.float64).mean(1).argmax(-1)
  labels = (preds + 1) % 10
  for s, k in enumerate(FOG_CORRECT):
    rows = s * PER_SEVERITY + rng.permutation(PER_SEVERITY)[:k]
    labels[rows] = preds[rows]
  blocks = idx.reshape(5, PER_SEVERITY)
  folder = tmp_path_factory.mktemp('cifar_c')
  np.save(folder / 'labels.npy', labels.astype(np.int64))
  np.save(folder / 'fog.npy', images[blocks.reshape(-1)])
  np.save(folder / 'contrast.npy', images[blocks[::-1].reshape(-1)])
  np.save(folder / 'not_a_corruption.npy', np.zeros(3))
  contrast_logits = logits[blocks[::-1].reshape(-1)]
  return str(folder), labels, {'fog': logits[idx], 'contrast': contrast_logits}


@pytest.fixture(scope='module')
def corruption_result(digits_workdir, cifar_c):
  restored = runs.load_runs([digits_workdir])
  return eval_corruptions.evaluate_corruptions(restored, cifar_c[0],
                                               sharding.local_mesh(),
                                               eval_batch_size=EVAL_BATCH)


def test_corruption_severities_are_indexed_right(corruption_result, cifar_c):
  res = corruption_result
  _, labels, logits = cifar_c
  assert res['evaluated'] == ['fog', 'contrast']  # CORRUPTIONS order.
  assert res['num_images_per_severity'] == PER_SEVERITY
  assert res['severities'] == [1, 2, 3, 4, 5]
  assert res['temperature_scaling'] is False
  fog = [res['per_corruption']['fog'][str(s)]['top1'] for s in range(1, 6)]
  assert fog == [k / PER_SEVERITY for k in FOG_CORRECT]
  for name in ('fog', 'contrast'):
    lp = _log_softmax(logits[name].astype(np.float64).mean(1))
    for s in range(5):
      rows = slice(s * PER_SEVERITY, (s + 1) * PER_SEVERITY)
      cell = res['per_corruption'][name][str(s + 1)]
      y = labels[rows]
      assert cell['top1'] == np.mean(lp[rows].argmax(-1) == y)
      np.testing.assert_allclose(cell['nll'],
                                 -np.mean(lp[rows][np.arange(PER_SEVERITY), y]),
                                 rtol=1e-5)
      assert cell['top1'] <= cell['top5'] <= 1.0 and 0 <= cell['ece'] <= 1


def test_corruption_summaries(corruption_result, cifar_c):
  from mixmo_jax.evaluation import metrics
  res = corruption_result
  _, labels, logits = cifar_c
  cells = [
      res['per_corruption'][c][str(s)]
      for c in ('fog', 'contrast')
      for s in range(1, 6)
  ]
  for key in eval_corruptions.CORRUPTION_METRICS:
    np.testing.assert_allclose(res['mean'][key],
                               np.mean([c[key] for c in cells]), rtol=1e-12)
    np.testing.assert_allclose(
        res['per_severity']['2'][key],
        np.mean(
            [res['per_corruption'][c]['2'][key] for c in ('fog', 'contrast')]),
        rtol=1e-12)
  # Pooled: all 400 corrupted images at once (ECE is not a mean of cells).
  all_lp = np.concatenate([
      _log_softmax(logits[c].astype(np.float64).mean(1))
      for c in ('fog', 'contrast')
  ])
  all_y = np.concatenate([labels, labels])
  np.testing.assert_allclose(res['pooled']['ece'],
                             float(metrics.ece(all_lp, all_y)), atol=1e-6)
  assert res['pooled']['top1'] == np.mean(all_lp.argmax(-1) == all_y)
  assert res['missing_corruptions'] == [
      c for c in cifar_c_lib.CORRUPTIONS if c not in ('fog', 'contrast')
  ]
  assert len(res['missing_corruptions']) == 17
  assert res['ignored_files'] == ['not_a_corruption.npy']


def test_pooled_statistics_on_synthetic_cells():
  """Pooled ECE from additive per-cell statistics equals the ECE of all
  samples at once, with bins both over- and under-confident."""
  from mixmo_jax.evaluation import metrics
  rng = np.random.default_rng(1)
  lp = _log_softmax(3.0 * rng.normal(size=(300, 5)))
  labels = np.where(
      rng.random(300) < 0.6, lp.argmax(-1), rng.integers(0, 5, 300))
  acc, conf, count = (
      np.asarray(x) for x in metrics.calibration_bins(lp, labels, 15))
  gaps = (acc - conf)[count > 0]
  assert np.any(gaps > 0.02) and np.any(gaps < -0.02)  # Guard: mixed signs.
  total = None
  for rows in (slice(0, 100), slice(100, 300)):
    stats = eval_corruptions.cell_statistics(lp[rows], labels[rows], 15)
    total = stats if total is None else {k: total[k] + stats[k] for k in total}
  pooled = eval_corruptions.scores_from_statistics(total)
  np.testing.assert_allclose(pooled['ece'], float(metrics.ece(lp, labels)),
                             rtol=1e-12)
  np.testing.assert_allclose(pooled['nll'], float(metrics.nll(lp, labels)),
                             rtol=1e-12)
  assert pooled['top1'] == np.mean(lp.argmax(-1) == labels)
  top5 = np.mean((-lp).argsort(-1)[:, :5] == labels[:, None]) * 5
  np.testing.assert_allclose(pooled['top5'], top5, rtol=1e-12)


def test_corruption_folder_errors(tmp_path, digits_workdir, monkeypatch):
  err = cifar_c_lib.CorruptionDataError
  with pytest.raises(err, match='does not exist'):
    cifar_c_lib.find_corruptions(str(tmp_path / 'nope'))
  with pytest.raises(err, match='none of the 19'):
    cifar_c_lib.find_corruptions(str(tmp_path))
  np.save(tmp_path / 'fog.npy', np.zeros((10, 32, 32, 3), np.uint8))
  with pytest.raises(err, match='labels.npy is missing'):
    cifar_c_lib.check_folder(str(tmp_path), 10, 32, ['fog'])
  # Through evaluate: refused before any checkpoint is restored.
  def no_restore(*args, **kwargs):
    raise AssertionError('restored before checking the corruption folder')

  with monkeypatch.context() as patch:
    patch.setattr(checkpointing, 'restore_variables', no_restore)
    with pytest.raises(err, match='labels.npy is missing'):
      evaluate.evaluate_workdirs([digits_workdir],
                                 corruptions_dir=str(tmp_path))
  np.save(tmp_path / 'labels.npy', np.zeros(12, np.int64))
  with pytest.raises(err, match='not a positive multiple of 5'):
    cifar_c_lib.check_folder(str(tmp_path), 10, 32, ['fog'])
  np.save(tmp_path / 'labels.npy', np.zeros(15, np.int64))
  with pytest.raises(err, match=r'expected uint8 \[15, 32, 32, 3\].*\[10, 32'):
    cifar_c_lib.check_folder(str(tmp_path), 10, 32, ['fog'])
  for bad in (np.zeros(
      (15, 32, 32), np.uint8), np.zeros(
          (15, 28, 28, 3), np.uint8), np.zeros((15, 32, 32, 3), np.float32)):
    np.save(tmp_path / 'fog.npy', bad)
    with pytest.raises(err, match='fog.npy: expected uint8') as info:
      cifar_c_lib.check_folder(str(tmp_path), 10, 32, ['fog'])
    assert '\n' not in str(info.value)
  np.save(tmp_path / 'labels.npy', np.full(15, 10, np.int64))
  with pytest.raises(err, match='10 classes'):
    cifar_c_lib.read_labels(str(tmp_path), 10)
  np.save(tmp_path / 'labels.npy', np.zeros(15, np.float32))
  with pytest.raises(err, match='integer'):
    cifar_c_lib.read_labels(str(tmp_path), 10)
  assert cifar_c_lib.severity_slices(15) == [
      slice(0, 3),
      slice(3, 6),
      slice(6, 9),
      slice(9, 12),
      slice(12, 15)
  ]


def test_corruption_names():
  assert len(cifar_c_lib.CORRUPTIONS) == len(set(cifar_c_lib.CORRUPTIONS)) == 19


# ---------------------------------------------------------------- registry


def mean_confidence(log_probs, labels):
  """A metric from outside the package: the mean max probability."""
  del labels
  return float(np.mean(np.exp(np.max(log_probs, axis=-1))))


@pytest.fixture
def outside_metric(monkeypatch):
  """'mean_confidence' registered for one test (the table is restored)."""
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
  registry.register_metric('mean_confidence', mean_confidence, title='meanconf',
                           fmt='.5f', higher_is_better=True, per_cell=True)


def test_registered_metric_reaches_eval_json_table_and_cifar_c(
    outside_metric, digits_workdir, evaluated, cifar_c):
  result = evaluate.evaluate_workdirs([digits_workdir],
                                      eval_batch_size=EVAL_BATCH)
  lp = _log_softmax(evaluated[1].astype(np.float64).mean(1))
  expected = np.mean(np.exp(lp.max(-1)))
  assert result['ensemble']['mean_confidence'] == pytest.approx(
      expected, rel=1e-12)
  others = dict(result['ensemble'])
  del others['mean_confidence']
  assert others == evaluated[0]['ensemble']  # Nothing else moved.
  # The printed table: its own column, last, in its own format.
  header, row = report.format_table(result).splitlines()[1:3]
  assert header.split()[-1] == 'meanconf'
  assert row.split()[0] == 'ensemble'
  assert row.split()[-1] == format(result['ensemble']['mean_confidence'], '.5f')
  # CIFAR-C: per cell (fog block s holds severity s), per severity, mean.
  res = eval_corruptions.evaluate_corruptions(
      runs.load_runs([digits_workdir]), cifar_c[0], sharding.local_mesh(),
      eval_batch_size=EVAL_BATCH)
  fog_lp = _log_softmax(cifar_c[2]['fog'].astype(np.float64).mean(1))
  cells = []
  for s in range(5):
    rows = slice(s * PER_SEVERITY, (s + 1) * PER_SEVERITY)
    want = np.mean(np.exp(fog_lp[rows].max(-1)))
    got = res['per_corruption']['fog'][str(s + 1)]['mean_confidence']
    assert got == pytest.approx(want, rel=1e-4), s
    cells += [
        got, res['per_corruption']['contrast'][str(5 - s)]['mean_confidence']
    ]
  assert res['per_corruption']['contrast']['1']['mean_confidence'] == (
      res['per_corruption']['fog']['5']['mean_confidence'])
  assert res['mean']['mean_confidence'] == pytest.approx(np.mean(cells))
  assert 'mean_confidence' not in res['pooled']  # Additive built-ins only.
  table = report.format_table(dict(result, corruptions=res))
  mean_line = [l for l in table.splitlines() if l.startswith('  mean ')][0]
  assert f'meanconf {res["mean"]["mean_confidence"]:7.4f}' in mean_line


def test_table_prints_both_temperatures(evaluated):
  result = evaluated[0]
  t_a, t_b = result['calibration']['temperatures']
  lines = report.format_table(result).splitlines()
  ts_line = [l for l in lines if l.startswith('  (TS)')][0]
  assert f'temperature {result["ensemble"]["temperature"]:.4g}' in ts_line
  halves = [l for l in lines if 'cross-fitted halves' in l][0]
  assert f'A {t_a:.4g}' in halves and f'B {t_b:.4g}' in halves
  header = report.format_table(result).splitlines()[1].split()
  assert header == [
      'top1', 'top5', 'nll', 'ece', 'brier', 'auc', 'tace_mm', 'tace_um'
  ]


# ---------------------------------------------------------------- CLI


def test_cli_plots_and_corruptions(tmp_path, digits_workdir, evaluated,
                                   corruption_result, cifar_c):
  workdir = _copy_run(digits_workdir, tmp_path / 'run')
  proc = subprocess.run([
      sys.executable, '-m', 'mixmo_jax.evaluate', f'--workdir={workdir}',
      '--plots', '--plot_formats=png,pdf', f'--corruptions={cifar_c[0]}',
      f'--eval_batch_size={EVAL_BATCH}'
  ], cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ensemble' in proc.stdout and 'member 1' in proc.stdout
  with open(os.path.join(workdir, 'eval.json')) as f:
    result = json.load(f)
  for name in ('reliability.png', 'member_vs_ensemble.png',
               'training_curves.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000, name
    with open(os.path.join(workdir, name[:-4] + '.pdf'), 'rb') as f:
      assert f.read(5) == b'%PDF-', name  # The vector copy beside the PNG.
  # Same numbers as in process (the workdir path differs).
  expected = dict(evaluated[0], workdirs=[os.path.abspath(workdir)],
                  corruptions=corruption_result)
  assert result == json.loads(workdir_lib.to_json(expected))


def test_cli_bad_plot_format_exits_2_before_any_work(tmp_path):
  missing = str(tmp_path / 'no_such_run')
  proc = subprocess.run([
      sys.executable, '-m', 'mixmo_jax.evaluate', f'--workdir={missing}',
      '--plots', '--plot_formats=png,jpg'
  ], cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1] == ("error: --plot_formats=png,jpg: ['jpg'] not allowed; "
                       'allowed: png, pdf, svg')
  assert not os.path.exists(missing)


@pytest.mark.parametrize(
    'extra,expected',
    [([], 'error: workdir {missing} does not exist'),
     (['--step=-3'], 'error: --step=-3: must be a checkpoint step (an '
      'integer >= 0) or best'),
     (['--eval_batch_size=-5'], 'error: --eval_batch_size=-5: must be an '
      'integer >= 1'),
     (['--output={missing}/config.json'], 'error: --output={missing}/'
      'config.json: {missing}/config.json would overwrite {missing}/'
      'config.json, which the workdir reads; write eval.json elsewhere')])
def test_cli_missing_workdir_or_bad_step_exits_2(tmp_path, extra, expected):
  missing = str(tmp_path / 'no_such_run')
  proc = subprocess.run(
      [sys.executable, '-m', 'mixmo_jax.evaluate', f'--workdir={missing}'] +
      [e.format(missing=missing) for e in extra], cwd=REPO, env=_cli_env(),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1] == expected.format(missing=missing)
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(missing)


def test_eval_batch_is_capped_at_the_padded_test_set():
  """A huge eval batch (1,048,576: an out-of-memory error before) is only
  padding: the batch is capped at N rounded up to the device count, with
  the same logits."""
  import jax.numpy as jnp
  from mixmo_jax.evaluation import inference
  mesh = sharding.make_mesh()
  images = np.arange(37 * 2 * 2 * 3, dtype=np.uint8).reshape(37, 2, 2, 3)
  shapes = []

  def predict_fn(variables, batch):
    shapes.append(batch.shape)
    return jnp.broadcast_to(
        batch.astype(jnp.float32).sum((1, 2, 3))[:, None, None],
        (batch.shape[0], 2, 3))

  huge = inference.predict_member_logits(predict_fn, {}, images, 1 << 20, mesh)
  assert shapes == [(40, 2, 2, 3)]  # 37 rounded up to 8 devices.
  small = inference.predict_member_logits(predict_fn, {}, images, 8, mesh)
  np.testing.assert_array_equal(huge, small)
  assert huge.shape == (37, 2, 3)


def _evaluated_step(workdir, caplog, step=None):
  caplog.clear()
  with caplog.at_level('WARNING'):
    result = evaluate.evaluate_workdirs([workdir], step=step)
  skipped = [
      r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()
  ]
  return result['step'], skipped


def test_a_renamed_step_folder_is_not_believed(tmp_path, digits_workdir,
                                               caplog):
  """The digest binds the step: a folder renamed 20 -> 60 is skipped with a
  warning (the newest that verifies is used), and asked for, it is one
  line."""
  run = _copy_run(digits_workdir, tmp_path / 'renamed')
  ckpts = os.path.join(run, 'checkpoints')
  os.rename(os.path.join(ckpts, '20'), os.path.join(ckpts, '60'))
  step, skipped = _evaluated_step(run, caplog)
  assert step == 10
  assert len(skipped) == 1 and ('the folder 60 holds the checkpoint saved at '
                                'step 20') in skipped[0]
  with pytest.raises(
      checkpointing.CheckpointError,
      match=r'^the checkpoint at step 60 .*\(the folder 60 '
      r'holds the checkpoint saved at step 20'):
    evaluate.evaluate_workdirs([run], step=60)


def test_another_runs_checkpoint_is_not_used(tmp_path, digits_workdir, caplog):
  """A checkpoint of another run (its own run id) copied in under this run's
  step is skipped with a warning naming both run ids."""
  other = _resaved_run(digits_workdir, tmp_path / 'other')
  run = _copy_run(digits_workdir, tmp_path / 'run')
  target = os.path.join(run, 'checkpoints', '20')
  shutil.rmtree(target)
  shutil.copytree(os.path.join(other, 'checkpoints', '20'), target)
  step, skipped = _evaluated_step(run, caplog)
  assert step == 10
  assert len(skipped) == 1 and 'belongs to another run' in skipped[0]


def test_training_quarantines_a_renamed_folder_and_resumes(
    tmp_path, digits_workdir):
  """A folder renamed to a huge step no longer makes the run 'finished':
  it is quarantined and the run resumes from its real latest checkpoint to
  the same bits."""
  from mixmo_jax import training
  run = _copy_run(digits_workdir, tmp_path / 'run')
  ckpts = os.path.join(run, 'checkpoints')
  with open(os.path.join(ckpts, '20', 'digest', 'metadata')) as f:
    final = json.load(f)['sha256']
  os.rename(
      os.path.join(ckpts, '20'), os.path.join(ckpts, '99999999999999999999'))
  training.train_and_evaluate(workdir_lib.read_config(run), run)
  assert workdir_lib.available_steps(run) == [10, 20]
  with open(os.path.join(ckpts, '20', 'digest', 'metadata')) as f:
    assert json.load(f)['sha256'] == final
  quarantined = os.listdir(os.path.join(run, 'checkpoints_corrupt'))
  assert [n.split('-')[0] for n in quarantined] == ['99999999999999999999']

"""Tests for out-of-distribution detection: the OOD datasets and --ood.

SVHN runs under `tfds.testing.mock_data` or from a small .mat file; the
end-to-end checks use the digits run of conftest.py against inverted digits
(offline), recomputed independently with `predict` and scikit-learn.
"""
import json
import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from conftest import xla_flags
from mixmo_jax import data, evaluate, predict
from mixmo_jax.data import cifar, svhn
from mixmo_jax.evaluation import report
from mixmo_jax.evaluation import runs as runs_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_BATCH = 48


def make_config(**overrides):
  config = ml_collections.ConfigDict(
      dict(dataset='svhn_cropped', image_size=32, data_seed=0, data_dir='',
           manual_dir=''))
  config.update(overrides)
  return config


@pytest.fixture
def offline(monkeypatch):
  """The download hosts are unreachable (no test touches the network)."""
  monkeypatch.setattr(cifar, 'host_reachable', lambda *a, **k: False)


# ---------------------------------------------------------------- datasets


def test_svhn_mock_data(offline, tmp_path):
  import tensorflow_datasets as tfds
  config = make_config(data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=6):
    images, labels = data.load_split(config, 'test')
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (6,) and 0 <= labels.min() and labels.max() < 10


def test_svhn_from_the_authors_mat_file(offline, tmp_path):
  from scipy import io as sio
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
  y = np.array([[10], [1], [2], [9], [10]], np.uint8)  # 10 is the digit 0.
  sio.savemat(str(tmp_path / 'test_32x32.mat'), {'X': x, 'y': y})
  config = make_config(
      data_dir=str(tmp_path / 'empty'), manual_dir=str(tmp_path))
  images, labels = data.load_split(config, 'test')
  np.testing.assert_array_equal(labels, [0, 1, 2, 9, 0])
  np.testing.assert_array_equal(images[3], x[..., 3])  # [N, H, W, 3].


def test_svhn_offline_fails_fast_naming_the_file(offline, tmp_path):
  import tensorflow_datasets  # noqa: F401  (import time is not the check)
  config = make_config(
      data_dir=str(tmp_path / 'data'), manual_dir=str(tmp_path / 'manual'))
  start = time.time()
  with pytest.raises(data.DatasetUnavailableError) as e:
    data.load_split(config, 'test')
  assert time.time() - start < 30
  message = str(e.value)
  assert 'test_32x32.mat' in message and str(tmp_path / 'manual') in message
  assert svhn.DOWNLOAD_URL in message and '\n' not in message


def test_digits_inverted_is_255_minus_digits():
  config = make_config(dataset='digits', image_size=16, data_seed=3)
  images, labels = data.load_split(config, 'test')
  config.dataset = 'digits_inverted'
  inverted, inv_labels = data.load_split(config, 'test')
  np.testing.assert_array_equal(inverted, 255 - images)
  np.testing.assert_array_equal(inv_labels, labels)


# ---------------------------------------------------------------- --ood


@pytest.fixture(scope='module')
def ood_result(digits_workdir):
  return evaluate.evaluate_workdirs([digits_workdir],
                                    eval_batch_size=EVAL_BATCH,
                                    ood=['digits_inverted'])


def test_ood_on_inverted_digits_matches_sklearn(digits_workdir, ood_result):
  from sklearn import metrics as sk
  predictor = predict.load(digits_workdir)
  images, _ = data.load_split(predictor.config, 'test')
  z_in = predictor(images)['logits'].astype(np.float64)
  z_ood = predictor(255 - images)['logits'].astype(np.float64)
  members = np.concatenate([z_in, z_ood])  # Shape: [N, M, C].
  z = members.mean(1)  # 'logits' ensemble.
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  is_ood = np.r_[np.zeros(len(z_in), bool), np.ones(len(z_ood), bool)]
  u = {
      'msp':
          -p.max(-1),
      'entropy':
          -np.sum(p * np.log(p), -1),
      'dempster_shafer_mean_logits':
          10 / (10 + np.exp(z).sum(-1)),
      'dempster_shafer_members':
          np.mean(10 / (10 + np.exp(members).sum(-1)), axis=1)
  }
  res = ood_result['ood']['digits_inverted']
  assert (res['num_in'], res['num_ood'], res['split']) == (360, 360, 'test')
  for name, score in u.items():
    assert res[f'auroc_{name}'] == pytest.approx(
        sk.roc_auc_score(is_ood, score), abs=1e-4), name
    assert res[f'aupr_out_{name}'] == pytest.approx(
        sk.average_precision_score(is_ood, score), abs=1e-4), name
    assert res[f'aupr_in_{name}'] == pytest.approx(
        sk.average_precision_score(~is_ood, -score), abs=1e-4), name
  table = report.format_table(ood_result)
  assert 'ood digits_inverted (360 images vs 360):' in table
  assert f'auroc {res["auroc_entropy"]:7.4f}' in table


def test_bad_ood_name_fails_before_restoring(digits_workdir, monkeypatch):

  def no_restore(*args, **kwargs):
    raise AssertionError('restored before checking --ood')

  monkeypatch.setattr(runs_lib, 'load_runs', no_restore)
  with pytest.raises(runs_lib.EvaluationError,
                     match="unknown dataset 'mnist'; allowed: .*svhn_cropped"):
    evaluate.evaluate_workdirs([digits_workdir], ood=['mnist'])
  with pytest.raises(runs_lib.EvaluationError, match='in-distribution'):
    evaluate.evaluate_workdirs([digits_workdir], ood=['digits'])


def test_cli_ood_flag(tmp_path, digits_workdir, ood_result):
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3')
  output = str(tmp_path / 'eval.json')
  proc = subprocess.run([
      sys.executable, '-m', 'mixmo_jax.evaluate', f'--workdir={digits_workdir}',
      '--ood=digits_inverted', f'--eval_batch_size={EVAL_BATCH}',
      f'--output={output}'
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ood digits_inverted' in proc.stdout
  with open(output) as f:
    result = json.load(f)
  assert result['ood'] == ood_result['ood']
  assert result['ensemble'] == ood_result['ensemble']

"""Tests for mixmo_jax.predict on the trained session fixture `digits_workdir`.

Every output is checked against an independent float64 NumPy computation
from the returned member logits, and the logits against the evaluate path.
"""
import numpy as np
import pytest

from mixmo_jax import data, predict, sharding
from mixmo_jax.evaluation import runs

B = 13  # Not a multiple of the 8 devices: padded to 16 and stripped.


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _entropy(p):
  p = np.asarray(p, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


@pytest.fixture(scope='module')
def predictor(digits_workdir):
  return predict.load(digits_workdir)


@pytest.fixture(scope='module')
def images(predictor):
  return data.load_split(predictor.config, 'test')[0][:B]


@pytest.fixture(scope='module')
def out(predictor, images):
  return predictor(images)


@pytest.fixture
def mode(predictor):
  """Restores the configured ensemble mode after a test changes it."""
  saved = predictor.config.evaluation.ensemble
  yield
  predictor.config.evaluation.ensemble = saved


def test_shapes_and_attributes(predictor, out):
  m, c = predictor.config.num_members, predictor.config.num_classes
  assert (m, c) == (2, 10)
  assert predictor.step == 20 and predictor.config.dataset == 'digits'
  assert out['logits'].shape == out['member_probs'].shape == (B, m, c)
  assert out['probs'].shape == (B, c)
  for key in ('entropy', 'expected_entropy', 'mutual_information'):
    assert out[key].shape == (B,)
  for value in out.values():
    assert value.dtype == np.float32 and np.all(np.isfinite(value))


def test_probabilities_sum_to_one(out):
  np.testing.assert_allclose(out['probs'].sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(out['member_probs'].sum(-1), 1.0, atol=1e-5)
  assert np.all(out['probs'] >= 0) and np.all(out['member_probs'] >= 0)
  np.testing.assert_allclose(out['member_probs'],
                             np.exp(_log_softmax(out['logits'])), atol=1e-6)


@pytest.mark.parametrize('ensemble', ['logits', 'probs'])
def test_ensemble_is_the_configured_average(predictor, images, ensemble, mode):
  del mode
  predictor.config.evaluation.ensemble = ensemble
  result = predictor(images)
  z = result['logits'].astype(np.float64)
  if ensemble == 'logits':
    expected = np.exp(_log_softmax(z.mean(1)))
  else:
    expected = np.exp(_log_softmax(z)).mean(1)
  np.testing.assert_allclose(result['probs'], expected, atol=1e-6)
  np.testing.assert_allclose(result['entropy'], _entropy(expected), atol=1e-5)


def test_modes_differ(predictor, images, mode):
  """Guards the previous test: the two averages are really different here."""
  del mode
  predictor.config.evaluation.ensemble = 'logits'
  a = predictor(images)['probs']
  predictor.config.evaluation.ensemble = 'probs'
  b = predictor(images)['probs']
  assert np.max(np.abs(a - b)) > 1e-6


def test_uncertainty_decomposition(out):
  p = np.exp(_log_softmax(out['logits']))  # [B, M, C].
  expected_entropy = _entropy(p).mean(1)
  mi = _entropy(p.mean(1)) - expected_entropy
  np.testing.assert_allclose(out['expected_entropy'], expected_entropy,
                             atol=1e-5)
  np.testing.assert_allclose(out['mutual_information'], np.maximum(mi, 0),
                             atol=1e-5)
  assert np.all(out['mutual_information'] >= 0)
  assert np.all(out['entropy'] >= -1e-6)
  assert np.all(out['entropy'] <= np.log(10) + 1e-5)
  assert np.any(out['mutual_information'] > 1e-6)  # The members differ.


def test_agrees_with_evaluate_path(digits_workdir, images, out):
  restored = runs.load_runs([digits_workdir])
  logits = runs.predict_members(restored, images, sharding.local_mesh())
  np.testing.assert_allclose(out['logits'], logits, rtol=1e-5, atol=1e-5)


def test_uint8_and_unit_float_agree(predictor, images, out):
  as_float = predictor(images.astype(np.float32) / 255.0)
  for key in out:
    np.testing.assert_allclose(as_float[key], out[key], atol=1e-5, err_msg=key)
  as_float64 = predictor(images.astype(np.float64) / 255.0)
  np.testing.assert_allclose(as_float64['probs'], out['probs'], atol=1e-5)


def test_chunking_matches_one_batch(predictor, images, out):
  saved = predictor.config.eval_batch_size
  predictor.config.eval_batch_size = 8  # Chunks of 8 + 5 (padded to 8).
  try:
    chunked = predictor(images)
  finally:
    predictor.config.eval_batch_size = saved
  np.testing.assert_allclose(chunked['logits'], out['logits'], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('shape,dtype,match', [
    ((2, 28, 28, 3), np.uint8, r'expected images of shape \[B, 16, 16, 3\], '
     r'got \[2, 28, 28, 3\]'),
    ((2, 16, 16, 1), np.uint8, r'got \[2, 16, 16, 1\]'),
    ((16, 16, 3), np.uint8, r'got \[16, 16, 3\]'),
    ((2, 16, 16, 3), np.int32, 'dtype int32'),
])
def test_wrong_inputs(predictor, shape, dtype, match):
  with pytest.raises(ValueError, match=match) as info:
    predictor(np.zeros(shape, dtype))
  assert '\n' not in str(info.value)


def test_float_images_outside_unit_range(predictor, images):
  with pytest.raises(ValueError, match=r'in \[0, 1\].*uint8'):
    predictor(images.astype(np.float32))  # [0, 255] floats.


def test_empty_batch(predictor):
  result = predictor(np.zeros((0, 16, 16, 3), np.uint8))
  assert result['probs'].shape == (0, 10)
  assert result['logits'].shape == (0, 2, 10)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope does not exist'):
    predict.load(str(tmp_path / 'nope'))


def test_load_logs_no_read_only_notes(digits_workdir, caplog):
  """orbax's notes on read-only managers say nothing to a reader."""
  with caplog.at_level('WARNING'):
    predict.load(digits_workdir)
  notes = [
      r.getMessage()
      for r in caplog.records
      if 'read only' in r.getMessage() or 'read_only' in r.getMessage()
  ]
  assert notes == []

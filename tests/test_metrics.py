"""Tests for mixmo_jax.metrics: formulas checked against direct NumPy loops."""
import json
import math
from unittest import mock

import jax
import numpy as np
import pytest

from mixmo_jax.evaluation import calibration, metrics

NUM_BINS = 15


def _logits(seed, n=400, c=10, signal=2.0, scale=1.0, m=None):
  """Random logits with some signal on the label; [N, C] or [N, M, C]."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  shape = (n, c) if m is None else (n, m, c)
  z = rng.normal(size=shape)
  onehot = np.eye(c)[labels]
  z = z + signal * (onehot if m is None else onehot[:, None, :])
  return (scale * z).astype(np.float32), labels


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# --- independent loop references -------------------------------------------


def loop_top_k(z, labels, k):
  hits = 0
  for n in range(len(labels)):
    order = np.argsort(-np.asarray(z[n], np.float64), kind='stable')
    hits += int(labels[n] in order[:k])
  return hits / len(labels)


def loop_nll(z, labels):
  z = np.asarray(z, np.float64)
  total = 0.0
  for n in range(len(labels)):
    top = z[n].max()
    total += top + np.log(np.sum(np.exp(z[n] - top))) - z[n, labels[n]]
  return total / len(labels)


def loop_brier(z, labels):
  p = _softmax64(z)
  total = 0.0
  for n in range(len(labels)):
    for c in range(p.shape[1]):
      total += (p[n, c] - (1.0 if c == labels[n] else 0.0))**2
  return total / len(labels)


def loop_bins(z, labels, num_bins):
  p = _softmax64(z)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  acc, conf, count = np.zeros(num_bins), np.zeros(num_bins), np.zeros(num_bins)
  for n in range(len(labels)):
    c = p[n].max()
    for b in range(num_bins):
      if edges[b] < c <= edges[b + 1]:
        count[b] += 1
        conf[b] += c
        acc[b] += float(np.argmax(p[n]) == labels[n])
        break
  safe = np.maximum(count, 1)
  return acc / safe, conf / safe, count


def loop_ece(z, labels, num_bins):
  acc, conf, count = loop_bins(z, labels, num_bins)
  return sum(
      count[b] / len(labels) * abs(acc[b] - conf[b]) for b in range(num_bins))


def nll_at_temperature(z, labels, temperatures):
  """NLL of softmax(z / T) for each T (vectorised over samples): [T] float64."""
  z = np.asarray(z, np.float64)
  z_y = z[np.arange(len(labels)), labels]
  out = []
  for t in temperatures:
    s = z / t
    top = s.max(-1)
    lse = top + np.log(np.exp(s - top[:, None]).sum(-1))
    out.append(np.mean(lse - z_y / t))
  return np.array(out)


# --- basic metrics -----------------------------------------------------------


@pytest.mark.parametrize('scale', [1.0, 4.0])
def test_scalar_metrics_match_loops(scale):
  z, labels = _logits(0, n=300, c=10, scale=scale)
  lp = np.log(_softmax64(z)).astype(np.float32)
  for k in (1, 2, 5):
    assert float(metrics.top_k_accuracy(lp, labels, k)) == pytest.approx(
        loop_top_k(z, labels, k), abs=1e-6)
  np.testing.assert_allclose(
      float(metrics.nll(lp, labels)), loop_nll(z, labels), rtol=1e-5)
  np.testing.assert_allclose(
      float(metrics.brier(lp, labels)), loop_brier(z, labels), rtol=1e-5)
  np.testing.assert_allclose(
      float(metrics.ece(lp, labels, NUM_BINS)), loop_ece(z, labels, NUM_BINS),
      rtol=1e-4, atol=1e-6)
  # Raw logits are accepted (re-normalised internally).
  np.testing.assert_allclose(
      float(metrics.nll(z, labels)), loop_nll(z, labels), rtol=1e-5)


@pytest.mark.parametrize('num_bins', [15, 7])
def test_calibration_bins_match_loop(num_bins):
  z, labels = _logits(1, n=300, c=10, scale=1.5)
  acc, conf, count = (
      np.asarray(x) for x in metrics.calibration_bins(z, labels, num_bins))
  ref_acc, ref_conf, ref_count = loop_bins(z, labels, num_bins)
  np.testing.assert_array_equal(count, ref_count)
  np.testing.assert_allclose(acc, ref_acc, atol=1e-6)
  np.testing.assert_allclose(conf, ref_conf, atol=1e-6)
  assert count.sum() == len(labels)
  # ECE is exactly the count-weighted gap of these bins.
  ece = float(metrics.ece(z, labels, num_bins))
  np.testing.assert_allclose(ece,
                             np.sum(count / count.sum() * np.abs(acc - conf)),
                             rtol=1e-6)


def test_bin_edges_are_left_open_right_closed():
  # Confidence exactly 0.5 (two tied classes) lies in the bin (0.4, 0.5]
  # when B = 10; confidence 1 lies in the last bin.
  z = np.array([[0.0, 0.0], [0.0, -1e4]], np.float32)
  labels = np.array([0, 0])
  _, conf, count = (
      np.asarray(x) for x in metrics.calibration_bins(z, labels, 10))
  assert count[4] == 1 and count[9] == 1 and count.sum() == 2
  np.testing.assert_allclose(conf[[4, 9]], [0.5, 1.0])


def test_primitives_are_jittable():
  z, labels = _logits(2, n=64, c=10, m=2)
  lp = metrics.ensemble_log_probs(z, 'probs')
  jitted = jax.jit(metrics.ece, static_argnames='num_bins')
  ece = jitted(lp, labels, num_bins=NUM_BINS)
  assert isinstance(ece, jax.Array)
  np.testing.assert_allclose(ece, metrics.ece(np.asarray(lp), labels, NUM_BINS),
                             rtol=1e-5)
  jitted_ens = jax.jit(metrics.ensemble_log_probs, static_argnames='mode')
  np.testing.assert_allclose(
      jitted_ens(z, mode='logits'), metrics.ensemble_log_probs(z, 'logits'),
      rtol=1e-5, atol=1e-5)
  jitted_topk = jax.jit(metrics.top_k_accuracy, static_argnames='k')
  assert float(jitted_topk(lp, labels, k=5)) == float(
      metrics.top_k_accuracy(lp, labels, 5))


def test_top_k_ties_break_towards_lower_index():
  z = np.zeros((4, 3), np.float32)
  labels = np.array([0, 1, 2, 0])
  assert float(metrics.top_k_accuracy(z, labels, 1)) == 0.5
  assert float(metrics.top_k_accuracy(z, labels, 2)) == 0.75
  assert float(metrics.top_k_accuracy(z, labels, 5)) == 1.0  # k clipped to C.


def test_ensemble_log_probs_modes():
  z, _ = _logits(3, n=50, c=7, m=3, scale=3.0)
  z64 = z.astype(np.float64)
  probs_ref = np.log(np.mean(_softmax64(z64), axis=1))
  logits_ref = np.log(_softmax64(np.mean(z64, axis=1)))
  np.testing.assert_allclose(
      metrics.ensemble_log_probs(z, 'probs'), probs_ref, atol=2e-5)
  np.testing.assert_allclose(
      metrics.ensemble_log_probs(z, 'logits'), logits_ref, atol=2e-5)
  np.testing.assert_allclose(
      metrics.ensemble_log_probs(z), logits_ref, atol=2e-5)
  # The two modes differ in general.
  assert np.abs(probs_ref - logits_ref).max() > 1e-2
  with pytest.raises(ValueError):
    metrics.ensemble_log_probs(z, 'median')


# --- temperature scaling -----------------------------------------------------


def brute_force_temperature(z, labels, lo=metrics.T_MIN, hi=metrics.T_MAX):
  """Coarse-to-fine grid search of argmin_{T in [lo, hi]} NLL(softmax(z / T))."""
  coarse = np.geomspace(lo, hi, 241)
  best = coarse[np.argmin(nll_at_temperature(z, labels, coarse))]
  ratio = coarse[1] / coarse[0]
  fine = np.geomspace(max(best / ratio**2, lo), min(best * ratio**2, hi), 801)
  values = nll_at_temperature(z, labels, fine)
  return fine[np.argmin(values)], values.min()


@pytest.mark.parametrize('scale', [1.0, 6.0, 0.3])
def test_fit_temperature_matches_grid_search(scale):
  z, labels = _logits(4, n=200, c=10, signal=1.5, scale=scale)
  t_fit = metrics.fit_temperature(z, labels)
  t_grid, nll_grid = brute_force_temperature(z, labels)
  assert isinstance(t_fit, float)
  assert metrics.T_MIN < t_fit < metrics.T_MAX
  assert abs(t_fit - t_grid) / t_grid < 1e-3
  assert nll_at_temperature(z, labels, [t_fit])[0] <= nll_grid + 1e-12
  # T scales with the logits: T(s z) = s T(z).
  t_scaled = metrics.fit_temperature(3.0 * z, labels)
  assert t_scaled == pytest.approx(3.0 * t_fit, rel=1e-6)


def test_fit_temperature_degenerate_cases_clamp_to_bracket():
  c = 5
  labels = np.arange(20) % c
  onehot = np.eye(c, dtype=np.float32)[labels]
  # All correct: sharpening always helps, optimum beta -> inf.
  assert metrics.is_separable(4.0 * onehot, labels)
  assert metrics.fit_temperature(4.0 * onehot,
                                 labels) == pytest.approx(metrics.T_MIN)
  # Every label is the least likely class: optimum beta -> 0.
  assert not metrics.is_separable(-4.0 * onehot, labels)
  assert metrics.fit_temperature(-4.0 * onehot,
                                 labels) == pytest.approx(metrics.T_MAX)


def _one_error_logits(n=360, c=10, seed=0):
  """The label's logit +6; sample 0 has a wrong class at +12 (the issue's
  repro): [N, C] float64, labels [N]."""
  labels = np.random.default_rng(seed).integers(0, c, n)
  z = np.zeros((n, c))
  z[np.arange(n), labels] = 6.0
  z[0, (labels[0] + 1) % c] = 12.0
  return z, labels


def test_one_error_fit_is_finite_and_matches_grid():
  z, labels = _one_error_logits(n=180)
  assert not metrics.is_separable(z, labels)
  t_fit = metrics.fit_temperature(z, labels)
  t_grid, _ = brute_force_temperature(z, labels)
  assert metrics.T_MIN < t_fit < 1.0  # Sharper, but a real optimum.
  assert abs(t_fit - t_grid) / t_grid < 1e-3


def test_separable_half_keeps_unit_temperature_and_warns():
  z, labels = _one_error_logits()
  lp = np.asarray(metrics.ensemble_log_probs(z[:, None, :]))
  perm = np.random.default_rng(0).permutation(len(labels))
  half_a, half_b = perm[:180], perm[180:]
  in_a = 0 in half_a  # The half holding the one error is not separable.
  with mock.patch.object(calibration.logging, 'warning') as warn:
    result = metrics.calibrated_metrics(lp, labels, seed=0)
  assert result['separable'] == [not in_a, in_a]
  assert warn.call_count == 1
  t_err = metrics.fit_temperature(lp[half_a if in_a else half_b],
                                  labels[half_a if in_a else half_b])
  assert result['temperatures'] == ([t_err, 1.0] if in_a else [1.0, t_err])
  assert result['temperature'] == pytest.approx(t_err)
  # NLL_c does not collapse: independent cross-fit with the applied T.
  t_a, t_b = result['temperatures']
  expected = 0.5 * (
      loop_nll(lp[half_b] / t_a, labels[half_b]) +
      loop_nll(lp[half_a] / t_b, labels[half_a]))
  assert result['nll_c'] == pytest.approx(expected, rel=1e-6)
  assert result['nll_c'] < 2.0 * float(metrics.nll(lp, labels))
  full = metrics.evaluation_metrics(z[:, None, :], labels, ensemble='logits',
                                    calibration_seed=0)
  assert full['calibration']['separable'] == result['separable']
  assert full['ensemble']['nll_c'] == pytest.approx(result['nll_c'])


def test_both_halves_separable():
  c = 4
  labels = np.arange(40) % c
  lp = np.log(_softmax64(5.0 * np.eye(c)[labels]))
  result = metrics.calibrated_metrics(lp, labels, seed=1)
  assert result['separable'] == [True, True]
  assert result['temperatures'] == [1.0, 1.0]
  assert result['temperature'] is None
  assert result['nll_c'] == pytest.approx(float(metrics.nll(lp, labels)))


def test_calibrated_metrics_improve_overconfident_nll():
  # The paper's case: an over-confident network, T > 1 on both halves.
  z, labels = _logits(5, n=2001, c=10, signal=1.0, scale=6.0)
  lp = np.asarray(metrics.ensemble_log_probs(z[:, None, :]))
  result = metrics.calibrated_metrics(lp, labels, seed=7)
  assert result['seed'] == 7
  assert result['split_sizes'] == [1000, 1001]
  assert result['separable'] == [False, False]
  assert result['nll_c'] < float(metrics.nll(lp, labels))
  assert result['ece_c'] < float(metrics.ece(lp, labels))
  assert result['top1_c'] == pytest.approx(
      float(metrics.top_k_accuracy(lp, labels, 1)), abs=1e-3)
  t_a, t_b = result['temperatures']
  assert t_a > 1.5 and t_b > 1.5  # Over-confident: T > 1 softens.
  assert result['temperature'] == pytest.approx(np.sqrt(t_a * t_b))
  # Cross-fitting: T fitted on half A is evaluated on half B, and swapped;
  # each T is the brute-force grid optimum of its own half.
  perm = np.random.default_rng(7).permutation(len(labels))
  half_a, half_b = perm[:1000], perm[1000:]
  for t, half in ((t_a, half_a), (t_b, half_b)):
    t_grid, _ = brute_force_temperature(lp[half], labels[half])
    assert abs(t - t_grid) / t_grid < 1e-3
  nll_b = loop_nll(lp[half_b] / t_a, labels[half_b])
  nll_a = loop_nll(lp[half_a] / t_b, labels[half_a])
  assert result['nll_c'] == pytest.approx(0.5 * (nll_a + nll_b), rel=1e-5)
  other = metrics.calibrated_metrics(lp, labels, seed=8)
  assert other['temperatures'] != result['temperatures']


# --- diversity ----------------------------------------------------------------


def _member_logits_from_preds(preds, c=3):
  """preds [M][N] -> logits [N, M, C] whose argmax is preds."""
  preds = np.asarray(preds).T  # Shape: [N, M].
  return 5.0 * np.eye(c, dtype=np.float32)[preds]


def test_diversity_two_members_hand_counted():
  labels = np.zeros(6, int)
  z = _member_logits_from_preds([[0, 1, 1, 2, 0, 0], [0, 1, 2, 0, 1, 0]])
  # Both wrong: samples 1, 2; exactly one wrong: 3, 4; predictions differ: 2, 3, 4.
  d = metrics.diversity(z, labels)
  assert d['ratio_error'] == pytest.approx(2 / 2)
  assert d['disagreement'] == pytest.approx(3 / 6)


def test_diversity_without_common_errors_uses_twice_the_count():
  labels = np.zeros(4, int)
  z = _member_logits_from_preds([[1, 0, 0, 0], [0, 2, 0, 0]])
  d = metrics.diversity(z, labels)
  assert d['ratio_error'] == pytest.approx(2 * 2)
  assert d['disagreement'] == pytest.approx(2 / 4)


def test_diversity_three_members_averages_pairs():
  labels = np.zeros(4, int)
  z = _member_logits_from_preds([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 0]])
  # Pair (0,1): both 1, one 1 -> 1; pair (0,2): both 0, one 3 -> 6;
  # pair (1,2): both 0, one 2 -> 4. Disagreements: 1/4, 3/4, 2/4.
  both, one, disagree = (
      np.asarray(x) for x in metrics.pairwise_error_counts(z, labels))
  np.testing.assert_array_equal(both, [1, 0, 0])
  np.testing.assert_array_equal(one, [1, 3, 2])
  np.testing.assert_array_equal(disagree, [1, 3, 2])
  d = metrics.diversity(z, labels)
  assert d['ratio_error'] == pytest.approx((1 + 6 + 4) / 3)
  assert d['disagreement'] == pytest.approx(0.5)


def test_diversity_single_member_is_none():
  z, labels = _logits(6, n=20, c=4, m=1)
  assert metrics.diversity(z, labels) == {
      'ratio_error': None,
      'disagreement': None,
      'average_kl': None,
      'cosine_similarity': None
  }


@pytest.mark.parametrize('m', [2, 3])
def test_kl_and_cosine_diversity_match_pair_loops(m):
  z, labels = _logits(7, n=40, c=5, m=m, signal=1.0)
  p = _softmax64(z)  # Shape: [N, M, C].
  kls, cosines = [], []
  for i in range(m):
    for j in range(i + 1, m):
      kl = cos = 0.0
      for n in range(p.shape[0]):
        kl += sum(p[n, i, c] * math.log(p[n, i, c] / p[n, j, c])
                  for c in range(p.shape[2]))
        cos += (p[n, i] @ p[n, j]) / math.sqrt(
            (p[n, i] @ p[n, i]) * (p[n, j] @ p[n, j]))
      kls.append(kl / p.shape[0])
      cosines.append(cos / p.shape[0])
  d = metrics.diversity(z, labels)
  assert d['average_kl'] == pytest.approx(np.mean(kls), rel=1e-10)
  assert d['cosine_similarity'] == pytest.approx(np.mean(cosines), rel=1e-10)
  # Identical members: no divergence, cosine 1.
  same = np.repeat(z[:, :1], m, axis=1)
  d = metrics.diversity(same, labels)
  assert d['average_kl'] == pytest.approx(0.0, abs=1e-12)
  assert d['cosine_similarity'] == pytest.approx(1.0, abs=1e-12)


# --- eval.json ------------------------------------------------------------------

SCHEMA = {
    'ensemble': {
        'top1', 'top5', 'nll', 'ece', 'brier', 'nll_c', 'ece_c', 'top1_c',
        'temperature'
    },
    'members': {'top1', 'nll'},
    'diversity': {'ratio_error', 'disagreement'},
}


@pytest.mark.parametrize('mode', ['logits', 'probs'])
def test_evaluation_metrics_schema_and_values(mode):
  z, labels = _logits(7, n=120, c=10, m=2, scale=2.0)
  result = metrics.evaluation_metrics(z, labels, ensemble=mode,
                                      calibration_seed=3)
  json.loads(json.dumps(result, allow_nan=False))
  assert SCHEMA['ensemble'] <= set(result['ensemble'])
  assert len(result['members']) == 2
  for member in result['members']:
    assert SCHEMA['members'] <= set(member)
  assert SCHEMA['diversity'] <= set(result['diversity'])
  assert result['num_examples'] == 120
  assert result['calibration']['seed'] == 3
  for key, value in result['ensemble'].items():
    assert type(value) is float, key
  lp = np.asarray(metrics.ensemble_log_probs(z, mode))
  assert result['ensemble']['top1'] == pytest.approx(loop_top_k(lp, labels, 1))
  assert result['ensemble']['top5'] == pytest.approx(loop_top_k(lp, labels, 5))
  assert result['ensemble']['nll'] == pytest.approx(
      loop_nll(lp, labels), rel=1e-5)
  for i, member in enumerate(result['members']):
    assert member['top1'] == pytest.approx(loop_top_k(z[:, i], labels, 1))
    assert member['nll'] == pytest.approx(loop_nll(z[:, i], labels), rel=1e-5)
    assert 0.0 <= member['top1'] <= 1.0


def test_evaluation_metrics_edge_cases_stay_valid_json():
  # M = 1, C = 3 < 5 (top5 = top-3 = 1), and NaN logits (diverged run).
  z, labels = _logits(8, n=10, c=3, m=1)
  result = metrics.evaluation_metrics(z, labels)
  assert result['ensemble']['top5'] == 1.0
  assert set(result['diversity'].values()) == {None}
  json.dumps(result, allow_nan=False)
  z_nan = np.full((6, 2, 4), np.nan, np.float32)
  result = metrics.evaluation_metrics(z_nan, np.zeros(6, int))
  assert result['ensemble']['nll'] is None
  assert result['ensemble']['temperature'] is None
  json.dumps(result, allow_nan=False)


def test_flatten_metrics():
  nested = {
      'step': 5,
      'ensemble': {
          'top1': 0.5,
          'temperature': None
      },
      'members': [{
          'top1': 0.25
      }, {
          'top1': 0.75
      }],
      'ensemble_mode': 'x',
      'calibration': {
          'temperatures': [1.5, 2.5]
      }
  }
  flat = metrics.flatten_metrics(nested)
  assert flat == {
      'step': 5,
      'ensemble/top1': 0.5,
      'members/0/top1': 0.25,
      'members/1/top1': 0.75,
      'calibration/temperatures/0': 1.5,
      'calibration/temperatures/1': 2.5
  }
  assert metrics.flatten_metrics(flat) == flat


# --- ranking metrics, TACE, Dempster-Shafer, OOD, the registry --------------


def _tied_scores(seed, n=300):
  """Scores with many ties (rounded to 1 decimal) and random binary labels."""
  rng = np.random.default_rng(seed)
  positive = rng.random(n) < 0.4
  scores = np.round(rng.normal(size=n) + 0.8 * positive, 1)
  return scores, positive


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_auroc_and_average_precision_match_sklearn(seed):
  from sklearn import metrics as sk
  scores, positive = _tied_scores(seed)
  assert metrics.auroc(scores, positive) == pytest.approx(
      sk.roc_auc_score(positive, scores), abs=1e-12)
  assert metrics.average_precision(scores, positive) == pytest.approx(
      sk.average_precision_score(positive, scores), abs=1e-12)
  # Perfect separation and its reverse.
  assert metrics.auroc(positive * 1.0, positive) == 1.0
  assert metrics.auroc(-1.0 * positive, positive) == 0.0
  assert metrics.average_precision(positive * 1.0, positive) == 1.0
  assert np.isnan(metrics.auroc(scores, np.ones_like(positive)))


@pytest.mark.parametrize('seed', [0, 3])
def test_confidence_auc_matches_sklearn(seed):
  from sklearn import metrics as sk
  z, labels = _logits(seed, signal=1.0)
  p = _softmax64(z)
  correct = p.argmax(-1) == labels
  assert 0 < correct.sum() < len(labels)
  assert metrics.confidence_auc(z, labels) == pytest.approx(
      sk.roc_auc_score(correct, p.max(-1)), abs=1e-12)
  # Undefined when every prediction is right.
  assert np.isnan(metrics.confidence_auc(z, p.argmax(-1)))


def loop_tace_um(z, labels, num_bins, threshold):
  """uncertainty-metrics' TACE by explicit loops over classes, samples and
  bins."""
  p = _softmax64(z)
  n, c = p.shape
  total = 0.0
  for k in range(c):
    kept = [(p[i, k], float(labels[i] == k))
            for i in range(n)
            if p[i, k] > threshold]
    if not kept:
      continue
    values = sorted(v for v, _ in kept)
    m = len(values)
    edges = []
    for b in range(1, num_bins):
      pos = min(int(np.round(b * m / num_bins)), m - 1)
      edges.append(values[pos])
    gap = [0.0] * num_bins
    for v, hit in kept:
      b = sum(1 for e in edges if e <= v)
      gap[b] += hit - v
    total += sum(abs(g) for g in gap) / m
  return total / c


def loop_tace_mixmo(z, labels, num_bins, threshold):
  """The official MixMo code's TACE by its own recipe: per class, sort the
  kept probabilities, cut floor(n / B)-long slices with the remainder in
  the last, add |mean conf - mean acc| * slice length / (N C); an empty
  slice adds 0."""
  p = _softmax64(z)
  n, c = p.shape
  total = 0.0
  for k in range(c):
    kept = sorted((p[i, k], float(labels[i] == k))
                  for i in range(n)
                  if p[i, k] > threshold)
    size = len(kept) // num_bins
    for b in range(num_bins):
      start = b * size
      end = start + size if b < num_bins - 1 else len(kept)
      chunk = kept[start:end]
      if chunk:
        conf = sum(v for v, _ in chunk) / len(chunk)
        acc = sum(h for _, h in chunk) / len(chunk)
        total += abs(conf - acc) * len(chunk) / (n * c)
  return total


@pytest.mark.parametrize('seed,num_bins', [(0, 15), (1, 7), (2, 1)])
def test_tace_um_matches_loop(seed, num_bins):
  z, labels = _logits(seed, n=150, c=4, signal=1.5)
  assert metrics.tace_um(z, labels, num_bins, 0.01) == pytest.approx(
      loop_tace_um(z, labels, num_bins, 0.01), abs=1e-12)


@pytest.mark.parametrize('seed,n,c,num_bins', [(0, 150, 4, 15), (1, 97, 6, 7),
                                               (2, 40, 10, 15), (3, 60, 3, 1)])
def test_tace_mixmo_matches_the_official_recipe(seed, n, c, num_bins):
  z, labels = _logits(seed, n=n, c=c, signal=1.5)
  for threshold in (1e-3, 0.2):
    assert metrics.tace_mixmo(z, labels, num_bins, threshold) == (
        pytest.approx(
            loop_tace_mixmo(z, labels, num_bins, threshold), abs=1e-12))


def test_the_two_taces_agree_without_threshold_and_differ_with_it():
  # Threshold 0 and N a multiple of B: both cut every class into the same
  # equal-count bins and weigh it n_c / N = 1 / C, so they agree.
  z, labels = _logits(8, n=150, c=5, signal=1.0)
  assert metrics.tace_mixmo(z, labels, 15, 0.0) == pytest.approx(
      metrics.tace_um(z, labels, 15, 0.0), abs=1e-12)
  # With C = 100 classes and a confident network most classes pass the
  # threshold on few samples: the official 1 / (N C) weighting makes its
  # TACE several times smaller than the mean over classes (the reference
  # figures: 0.0036 against 0.0325).
  z, labels = _logits(9, n=1000, c=100, signal=4.0)
  official, adaptive = metrics.tace_mixmo(z, labels), metrics.tace_um(z, labels)
  assert 0 < official < adaptive / 3


def test_tace_closed_forms():
  z, labels = _logits(5, n=120, c=3, signal=1.0)
  p = _softmax64(z)
  # One bin, no threshold: (1/C) sum_c |mean 1[y = c] - mean p_c|.
  one_bin = np.mean(
      [abs(np.mean(labels == k) - p[:, k].mean()) for k in range(3)])
  assert metrics.tace_um(z, labels, 1, 0.0) == pytest.approx(one_bin, abs=1e-12)
  # 120 distinct values in 4 bins: the bins are the sorted quarters.
  quarters = 0.0
  for k in range(3):
    order = np.argsort(p[:, k])
    for chunk in np.split(order, 4):
      quarters += abs(np.sum(labels[chunk] == k) - p[chunk, k].sum()) / 120
  assert metrics.tace_um(z, labels, 4,
                         0.0) == pytest.approx(quarters / 3, abs=1e-12)
  # The threshold drops small probabilities: a class never above it adds 0.
  # Class 0 keeps 0.99 (wrong) and 0.995 (right), in two bins:
  # (|0 - 0.99| + |1 - 0.995|) / 2; classes 1 and 2 add 0.
  z2 = np.log(np.array([[0.995, 0.004, 0.001], [0.99, 0.009, 0.001]]))
  assert metrics.tace_um(z2, np.array([0, 1]), 15, 0.01) == pytest.approx(
      ((0.99 + 0.005) / 2) / 3, abs=1e-12)


def test_dempster_shafer_forms_differ_only_when_members_do():
  z_in, _ = _logits(2, n=60, c=10, m=3, signal=2.0)
  scores = metrics.ood_scores(z_in)
  # The mean of per-member scores is not the score of the mean logits.
  gap = np.abs(scores['dempster_shafer_members'] -
               scores['dempster_shafer_mean_logits'])
  assert np.all(gap > 1e-6)
  same = metrics.ood_scores(np.repeat(z_in[:, :1], 3, axis=1))
  np.testing.assert_allclose(same['dempster_shafer_members'],
                             same['dempster_shafer_mean_logits'], rtol=1e-12)


def test_tnr_at_tpr_by_hand():
  # OOD scores 4, 3, 2, 1 (positive) and in-distribution 3.5, 0.5:
  # TPR reaches 1 >= 0.95 at threshold 1, where one negative (3.5) is above.
  scores = np.array([4, 3, 2, 1, 3.5, 0.5])
  positive = np.array([1, 1, 1, 1, 0, 0], bool)
  assert metrics.tnr_at_tpr(scores, positive, 0.95) == pytest.approx(0.5)
  assert metrics.tnr_at_tpr(scores, positive, 0.25) == pytest.approx(1.0)
  assert metrics.tnr_at_tpr(-scores, positive, 0.95) == pytest.approx(0.0)
  assert np.isnan(metrics.tnr_at_tpr(scores, np.ones(6, bool)))


def test_dempster_shafer_by_hand():
  z = np.array([[0.0, 0.0], [np.log(3.0), 0.0], [1000.0, 0.0]])
  # C / (C + sum_c exp z_c): 2 / (2 + 2), 2 / (2 + 4), ~0 without overflow.
  np.testing.assert_allclose(
      metrics.dempster_shafer(z), [0.5, 2 / 6, 0.0], atol=1e-15)
  z3 = np.array([[np.log(3.0), 0.0, 0.0]])
  np.testing.assert_allclose(metrics.dempster_shafer(z3), [3 / 8], rtol=1e-12)


@pytest.mark.parametrize('mode', ['logits', 'probs'])
def test_ood_metrics_match_sklearn(mode):
  from sklearn import metrics as sk
  z_in, _ = _logits(0, n=80, c=5, m=3, signal=3.0)
  z_ood, _ = _logits(1, n=50, c=5, m=3, signal=0.5)
  res = metrics.ood_metrics(z_in, z_ood, mode)
  assert (res['num_in'], res['num_ood']) == (80, 50)
  z = np.concatenate([z_in, z_ood]).astype(np.float64)
  is_ood = np.r_[np.zeros(80, bool), np.ones(50, bool)]
  if mode == 'logits':
    p = _softmax64(z.mean(1))
  else:
    p = _softmax64(z).mean(1)
  mean_z = z.mean(1)
  uncertainty = {
      'msp': -p.max(-1),
      'entropy': -np.sum(p * np.log(p), -1),
      'dempster_shafer_mean_logits': 5 / (5 + np.exp(mean_z).sum(-1)),
      'dempster_shafer_members': np.mean(5 / (5 + np.exp(z).sum(-1)), 1),
  }
  assert set(uncertainty) == set(metrics.OOD_SCORES)
  for name, u in uncertainty.items():
    fpr, tpr, _ = sk.roc_curve(is_ood, u, drop_intermediate=False)
    assert res[f'tnr_at_tpr95_{name}'] == pytest.approx(
        1 - fpr[np.argmax(tpr >= 0.95)], abs=1e-12), name
    assert res[f'auroc_{name}'] == pytest.approx(
        sk.roc_auc_score(is_ood, u), abs=1e-9), name
    assert res[f'aupr_out_{name}'] == pytest.approx(
        sk.average_precision_score(is_ood, u), abs=1e-9), name
    assert res[f'aupr_in_{name}'] == pytest.approx(
        sk.average_precision_score(~is_ood, -u), abs=1e-9), name
  assert res['auroc_msp'] > 0.8  # Confident in-distribution, vague OOD.
  json.dumps(res)


def test_evaluation_metrics_has_registered_auc_and_tace():
  z, labels = _logits(4, m=2)
  res = metrics.evaluation_metrics(z, labels)
  lp = metrics.ensemble_log_probs(np.asarray(z, np.float64))
  assert res['ensemble']['auc'] == metrics.confidence_auc(lp, labels)
  assert res['ensemble']['tace_um'] == metrics.tace_um(lp, labels)
  assert res['ensemble']['tace_mixmo'] == metrics.tace_mixmo(lp, labels)


def test_register_metric_rejects_bad_registrations(monkeypatch):
  from mixmo_jax.evaluation import registry
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
  fn = lambda lp, y: 0.0
  with pytest.raises(ValueError, match="'top1' is already registered"):
    registry.register_metric('top1', fn)
  with pytest.raises(ValueError, match='reserved'):
    registry.register_metric('nll_c', fn)
  with pytest.raises(ValueError, match='must match'):
    registry.register_metric('Bad Name', fn)
  with pytest.raises(ValueError, match="fmt must look like '.4f'"):
    registry.register_metric('ok', fn, fmt='4')
  with pytest.raises(ValueError, match='title must be 1 to 10'):
    registry.register_metric('ok', fn, title='a very long title')
  with pytest.raises(ValueError, match="unknown metric 'nope'"):
    registry.get_metric('nope')
  spec = registry.register_metric('ok', fn, percent=True, fmt='.4f')
  assert registry.summary_metrics()['ok'] is spec
  assert spec.summary_decimals() == 2
  assert registry.summary_metrics()['nll'].summary_decimals() == 3
  assert [s.name for s in registry.metric_specs()][:8] == [
      'top1', 'top5', 'nll', 'ece', 'brier', 'auc', 'tace_mixmo', 'tace_um'
  ]

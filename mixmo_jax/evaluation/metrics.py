"""Evaluation metrics: accuracy, NLL, Brier, ECE, temperature scaling, diversity.

Shapes: N examples, M members, C classes, B bins, P member pairs.

Two kinds of functions live here:

* Array primitives (`ensemble_log_probs`, `top_k_correct`, `top_k_accuracy`,
  `nll`, `brier`, `calibration_bins`, `ece`, `temperature_scale`,
  `pairwise_error_counts`). One formula, two array namespaces: given jax
  arrays (or tracers, i.e. under `jax.jit`, with `mode`, `k` and `num_bins`
  static) they run in `jnp` float32 and return jax arrays; given NumPy arrays
  or lists they run in NumPy float64 and return NumPy values (exact on the
  host, and no XLA compilation per test-set shape).
* Summaries (`fit_temperature`, `calibrated_metrics`, `diversity`,
  `evaluation_metrics`): host-side NumPy float64, returning plain Python
  floats / ints / None, so that their results go straight into `json.dumps`
  (eval.json).

Every primitive that takes `log_probs` first re-normalises them with
`log_softmax` (the identity on log-probabilities, up to rounding), so raw
logits are accepted too.
"""
import itertools
import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mixmo_jax.evaluation import registry

# Temperature bracket: T in [T_MIN, T_MAX], i.e. beta = 1 / T in
# [1 / T_MAX, 1 / T_MIN]. Real networks are fitted well inside it (Guo et al.
# 2017 report T in about [1, 4]; the paper's over-confident members and
# ensembles give T in about [1, 2]; an under-confident MIMO ensemble
# of mean probabilities gives T < 1 but well above 0.3). T = 0.05 multiplies
# every logit by 20 and T = 20 divides them by 20: the fit only reaches these
# bounds when the optimum does not exist (a half without any error, the
# separable case handled by `calibrated_metrics`) or the logits are
# degenerate, never for a usable network.
T_MIN = 0.05
T_MAX = 20.0
BETA_MIN = 1.0 / T_MAX
BETA_MAX = 1.0 / T_MIN


# ----------------------------------------------------------------------------
# Array primitives (NumPy or jnp; jit-able).
# ----------------------------------------------------------------------------


def _namespace(*arrays):
  """jnp if any input is a jax array or tracer, else np."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _floats(xp, x):
  """Floating array: float64 in NumPy, float32 in jnp."""
  return xp.asarray(x, np.float64 if xp is np else jnp.float32)


def _ints(xp, x):
  return xp.asarray(x, np.int64 if xp is np else jnp.int32)


def _logsumexp(xp, z, axis, keepdims=False):
  """log sum exp z along axis, shifted by the max (finite z)."""
  top = xp.max(z, axis=axis, keepdims=True)
  out = top + xp.log(xp.sum(xp.exp(z - top), axis=axis, keepdims=True))
  return out if keepdims else xp.squeeze(out, axis=axis)


def _log_softmax(xp, z, axis=-1):
  return z - _logsumexp(xp, z, axis, keepdims=True)


def log_softmax(z, axis=-1):
  """log softmax along `axis` (NumPy float64 or jnp float32, see the module
  docstring)."""
  xp = _namespace(z)
  return _log_softmax(xp, _floats(xp, z), axis)


def _one_hot(xp, index, depth, dtype):
  return (index[..., None] == xp.arange(depth)).astype(dtype)


def _label_values(xp, values, labels):
  """values [N, C], labels [N] int -> values[n, labels[n]] [N]."""
  return xp.take_along_axis(values, labels[:, None], axis=-1)[:, 0]


def _normalise(log_probs):
  xp = _namespace(log_probs)
  return xp, _log_softmax(xp, _floats(xp, log_probs))


# How the members' outputs form the ensemble (`ensemble_log_probs`): the
# mean of their logits, or of their probabilities.
ENSEMBLE_MODES = ('logits', 'probs')


def ensemble_log_probs(member_logits, mode='logits'):
  """Ensemble prediction from the M members' logits.

  'logits' (MixMo reference, default): log softmax((1/M) sum_i z_i).
  'probs' (MIMO reference): log((1/M) sum_i softmax(z_i)), computed stably as
    logsumexp_i(log_softmax(z_i)) - log M.

  Args:
    member_logits: [N, M, C] float.
    mode: 'logits' or 'probs' (static).

  Returns:
    [N, C] log-probabilities.
  """
  xp = _namespace(member_logits)
  z = _floats(xp, member_logits)
  if mode == ENSEMBLE_MODES[0]:  # 'logits'
    return _log_softmax(xp, xp.mean(z, axis=1))
  if mode == ENSEMBLE_MODES[1]:  # 'probs'
    member_lp = _log_softmax(xp, z)  # Shape: [N, M, C].
    return _logsumexp(xp, member_lp, axis=1) - math.log(z.shape[1])
  raise ValueError(f'ensemble mode must be one of {ENSEMBLE_MODES}, got '
                   f'{mode!r}')


def top_k_correct(log_probs, labels, k=1):
  """Whether each sample's label is among its k most probable classes.

  correct_n = [rank_n < min(k, C)], rank_n = #{c : s_c > s_y} +
  #{c < y : s_c = s_y}: ties are broken towards the lower class index, as
  `argmax` and `lax.top_k` do (so all-equal scores are not counted correct
  for every class).

  Args:
    log_probs: [N, C] log-probabilities (or logits).
    labels: [N] int.
    k: static int; clipped to C (top-5 with C < 5 is top-C).

  Returns:
    [N] bool; False for a row with a NaN score.
  """
  xp = _namespace(log_probs, labels)
  s = _floats(xp, log_probs)
  labels = _ints(xp, labels)
  num_classes = s.shape[-1]
  s_y = _label_values(xp, s, labels)[:, None]
  lower = xp.arange(num_classes)[None, :] < labels[:, None]
  rank = xp.sum(s > s_y, axis=-1) + xp.sum((s == s_y) & lower, axis=-1)
  # A NaN score compares False with everything, which would give rank 0:
  # a row with any NaN is counted wrong, never correct.
  finite = ~xp.any(xp.isnan(s), axis=-1)
  return (rank < min(k, num_classes)) & finite


def top_k_accuracy(log_probs, labels, k=1):
  """Top-k accuracy (1/N) sum_n correct_n, see `top_k_correct`.

  Args:
    log_probs: [N, C]; labels: [N] int; k: static int (clipped to C).

  Returns:
    scalar in [0, 1].
  """
  correct = top_k_correct(log_probs, labels, k)
  xp = _namespace(correct)
  return xp.mean(_floats(xp, correct))


def nll(log_probs, labels):
  """Negative log-likelihood: -(1/N) sum_n log p_n(y_n).

  Args:
    log_probs: [N, C]; labels: [N] int.

  Returns:
    scalar.
  """
  xp, lp = _normalise(log_probs)
  return -xp.mean(_label_values(xp, lp, _ints(xp, labels)))


def brier(log_probs, labels):
  """Brier score: (1/N) sum_n sum_c (p_nc - 1[c = y_n])^2, in [0, 2].

  This is the usual per-sample sum over classes. The MixMo reference code
  divides it further by C (its values are C times smaller).

  Args:
    log_probs: [N, C]; labels: [N] int.

  Returns:
    scalar.
  """
  xp, lp = _normalise(log_probs)
  onehot = _one_hot(xp, _ints(xp, labels), lp.shape[-1], lp.dtype)
  return xp.mean(xp.sum((xp.exp(lp) - onehot) ** 2, axis=-1))


def bin_edges(num_bins=15):
  """The B + 1 equal-width confidence bin edges linspace(0, 1, B + 1) [B + 1]."""
  return np.linspace(0.0, 1.0, num_bins + 1)


def calibration_bins(log_probs, labels, num_bins=15):
  """Per-bin statistics of the top-1 prediction (reliability diagram, ECE).

  conf_n = max_c p_nc, pred_n = argmax_c p_nc. Bin b covers the half-open
  interval (e_b, e_{b+1}] with e = linspace(0, 1, B + 1) (`bin_edges`), i.e.
  b_n = #{interior edges e_1..e_{B-1} strictly below conf_n}. Confidence 0 is
  impossible (conf_n >= 1/C > 0), so every sample falls in exactly one bin.

  Args:
    log_probs: [N, C]; labels: [N] int; num_bins: static int B.

  Returns:
    (accuracy [B], confidence [B], count [B]) floats: mean of 1[pred = y] and
    mean confidence over each bin's samples (0 for empty bins), and the number
    of samples per bin (sums to N).
  """
  xp, lp = _normalise(log_probs)
  conf = xp.exp(xp.max(lp, axis=-1))  # Shape: [N].
  correct = xp.argmax(lp, axis=-1) == _ints(xp, labels)
  inner = xp.asarray(bin_edges(num_bins)[1:-1], conf.dtype)  # Shape: [B-1].
  bin_index = xp.sum(conf[:, None] > inner[None, :], axis=-1)
  member = _one_hot(xp, bin_index, num_bins, conf.dtype)  # Shape: [N, B].
  count = xp.sum(member, axis=0)
  safe = xp.maximum(count, 1.0)
  accuracy = (correct.astype(conf.dtype) @ member) / safe
  confidence = (conf @ member) / safe
  return accuracy, confidence, count


def ece(log_probs, labels, num_bins=15):
  """Expected calibration error (Naeini et al. 2015; paper Appendix 6.5).

  ECE = sum_b (|B_b| / N) * |acc_b - conf_b|, with the B equal-width bins of
  `calibration_bins` (15 by default, as in the paper).

  Args:
    log_probs: [N, C]; labels: [N] int; num_bins: static int.

  Returns:
    scalar in [0, 1].
  """
  accuracy, confidence, count = calibration_bins(log_probs, labels, num_bins)
  xp = _namespace(count)
  return xp.sum(count * xp.abs(accuracy - confidence)) / xp.sum(count)


def temperature_scale(log_probs, temperature):
  """Temperature-scaled log-probabilities log softmax(log_probs / T) [N, C]."""
  xp = _namespace(log_probs, temperature)
  return _log_softmax(xp, _floats(xp, log_probs) / temperature)


def pairwise_error_counts(member_logits, labels):
  """Error counts for every pair of members (i < j).

  err_in = 1[argmax_c z_inc != y_n].

  Args:
    member_logits: [N, M, C]; labels: [N] int.

  Returns:
    (both [P], one [P], disagree [P]) ints with P = M (M - 1) / 2 pairs in
    `itertools.combinations(range(M), 2)` order: #{n: both members err},
    #{n: exactly one errs}, #{n: top-1 predictions differ}.
  """
  xp = _namespace(member_logits, labels)
  preds = xp.argmax(_floats(xp, member_logits), axis=-1)  # Shape: [N, M].
  err = preds != _ints(xp, labels)[:, None]
  pairs = list(itertools.combinations(range(preds.shape[1]), 2))
  if not pairs:
    empty = xp.zeros((0,), preds.dtype)
    return empty, empty, empty
  i, j = (np.array(x) for x in zip(*pairs))
  both = xp.sum(err[:, i] & err[:, j], axis=0)
  one = xp.sum(err[:, i] ^ err[:, j], axis=0)
  disagree = xp.sum(preds[:, i] != preds[:, j], axis=0)
  return both, one, disagree


# ----------------------------------------------------------------------------
# Temperature scaling (host side, float64 NumPy).
# ----------------------------------------------------------------------------


def _nll_derivatives(beta, z, labels):
  """f(beta) = (1/N) sum_n [logsumexp_c(beta z_nc) - beta z_ny], and f', f''.

  f'(beta) = (1/N) sum_n (E_q[z_n] - z_ny), f''(beta) = (1/N) sum_n Var_q[z_n]
  >= 0 with q = softmax(beta z_n): f is convex in beta.
  """
  bz = beta * z
  shift = np.max(bz, axis=-1, keepdims=True)
  w = np.exp(bz - shift)
  total = np.sum(w, axis=-1, keepdims=True)
  q = w / total
  z_y = z[np.arange(z.shape[0]), labels]
  mean_z = np.sum(q * z, axis=-1)
  var_z = np.maximum(np.sum(q * z * z, axis=-1) - mean_z**2, 0.0)
  f = np.mean(np.log(total[:, 0]) + shift[:, 0] - beta * z_y)
  return f, np.mean(mean_z - z_y), np.mean(var_z)


def fit_temperature(log_probs, labels, *, beta_min=BETA_MIN, beta_max=BETA_MAX,
                    max_iter=200, rtol=1e-12):
  """Temperature T minimising the NLL of softmax(log_probs / T) (Guo et al.).

  With beta = 1/T, f(beta) = (1/N) sum_n [logsumexp(beta z_n) - beta z_ny] is
  convex in beta (f'' = mean variance of z under softmax(beta z) >= 0), though
  not in log T. We find the root of the increasing f' in [beta_min, beta_max]
  by safeguarded Newton in float64: a Newton step is taken when it stays
  strictly inside the current sign bracket and |f'| at least halves, otherwise
  the bracket is bisected geometrically (sqrt(lo * hi)), so the search always
  converges (no stall), to ~1e-12 relative precision in beta.

  Degenerate cases: if f' <= 0 on the whole bracket (e.g. every sample
  correct, "separable": sharpening always lowers the NLL, optimum beta ->
  inf) beta is clamped to beta_max (T = T_MIN = 0.05); if f' >= 0
  everywhere (e.g. every sample's label is its least likely class, optimum
  beta -> 0) beta is clamped to beta_min (T = T_MAX = 20). See
  `is_separable` and `calibrated_metrics` for how the separable case is
  used.

  Args:
    log_probs: [N, C] finite log-probabilities (logits are fine too); N >= 1.
    labels: [N] int.

  Returns:
    T as a Python float in [1/beta_max, 1/beta_min] (default [0.05, 20]);
    NaN if log_probs has a NaN or infinite entry (e.g. a diverged run).
  """
  z = np.asarray(log_probs, np.float64)
  if not np.all(np.isfinite(z)):
    return math.nan
  z = z - np.max(z, axis=-1, keepdims=True)  # Softmax-invariant; finite.
  labels = np.asarray(labels, np.int64)
  lo, hi = float(beta_min), float(beta_max)
  if _nll_derivatives(lo, z, labels)[1] >= 0.0:
    return 1.0 / lo
  if _nll_derivatives(hi, z, labels)[1] <= 0.0:
    return 1.0 / hi
  beta = min(max(1.0, lo), hi)
  prev_abs_g = math.inf
  for _ in range(max_iter):
    _, g, h = _nll_derivatives(beta, z, labels)
    if g == 0.0:
      return 1.0 / beta
    if g < 0.0:
      lo = beta
    else:
      hi = beta
    if hi - lo <= rtol * hi:
      break
    newton = beta - g / h if h > 0.0 else math.nan
    if lo < newton < hi and abs(g) <= 0.5 * prev_abs_g:
      step = newton
    else:
      step = math.sqrt(lo * hi)
    prev_abs_g = abs(g)
    if abs(step - beta) <= rtol * beta:
      beta = step
      break
    beta = step
  return 1.0 / beta


def _accuracy(log_probs, labels, k=1):
  """Host-side exact top-k accuracy: Python int count / N."""
  correct = np.asarray(top_k_correct(np.asarray(log_probs), labels, k))
  return int(correct.sum()) / max(correct.shape[0], 1)


def _scores(log_probs, labels, num_bins=15):
  return {
      'nll': float(nll(log_probs, labels)),
      'ece': float(ece(log_probs, labels, num_bins)),
      'top1': _accuracy(log_probs, labels, 1),
      'brier': float(brier(log_probs, labels)),
  }


def is_separable(log_probs, labels):
  """True when every sample's label has the largest log-probability.

  Then the NLL of softmax(z / T) decreases all the way to T -> 0 (f' < 0
  for every beta in `fit_temperature`): the maximum-likelihood temperature
  does not exist and a fit only returns its lower bound.

  Args:
    log_probs: [N, C]; labels: [N] int.
  """
  z = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels, np.int64)
  z_y = z[np.arange(z.shape[0]), labels]
  return bool(np.all(z_y >= np.max(z, axis=-1)))


def calibrated_metrics(log_probs, labels, seed=0, num_bins=15):
  """Metrics after temperature scaling by cross-fitting (paper Section 4).

  The test set is split into two halves A (first N // 2 of a permutation from
  `np.random.default_rng(seed)`) and B (the rest). T_A is fitted on A and the
  metrics of softmax(z / T_A) are computed on B; T_B is fitted on B and used
  on A. Each reported `*_c` metric is the plain mean of the two halves'
  values. Top-1 is unchanged by T (up to exact ties) and is reported as the
  mean of the two halves' accuracies.

  A separable half (no error, `is_separable`; common on easy data such as
  the digits) has no maximum-likelihood temperature: the fit would run to
  T -> 0 and, applied to the other half, turn its few errors into huge
  losses (NLL_c >> NLL). Such a half keeps T = 1 (the network's own
  probabilities: a half without errors gives no evidence of over- or
  under-confidence), is flagged in `separable` and logged as a warning.

  Args:
    log_probs: [N, C] ensemble log-probabilities; labels: [N] int.
    seed: int seed of the split permutation.

  Returns:
    dict: nll_c, ece_c, top1_c, brier_c (Python floats); temperatures
    [T_A, T_B] (the ones applied); separable [bool, bool]; temperature, the
    geometric mean of the temperatures of the non-separable halves (T scales
    the logits multiplicatively; None when both halves are separable): the
    one number to quote; seed; split_sizes [|A|, |B|]. With N < 2 no split is
    possible and the metric values are None.
  """
  log_probs = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels, np.int64)
  n = labels.shape[0]
  result = {'seed': int(seed), 'split_sizes': [n // 2, n - n // 2]}
  if n < 2:
    result.update(nll_c=None, ece_c=None, top1_c=None, brier_c=None,
                  temperature=None, temperatures=[None, None],
                  separable=[False, False])
    return result
  perm = np.random.default_rng(seed).permutation(n)
  halves = (perm[:n // 2], perm[n // 2:])
  separable = [is_separable(log_probs[h], labels[h]) for h in halves]
  temps = [1.0 if sep else fit_temperature(log_probs[h], labels[h])
           for h, sep in zip(halves, separable)]
  for name, sep, h in zip('AB', separable, halves):
    if sep:
      logging.warning(
          'Temperature scaling: calibration half %s (%d samples) has no '
          'error, so no temperature can be fitted on it (the NLL falls as '
          'T -> 0); it keeps T = 1 for the other half.', name, len(h))
  scores = [
      _scores(temperature_scale(log_probs[other], t), labels[other], num_bins)
      for t, other in zip(temps, halves[::-1])
  ]
  for key in ('nll', 'ece', 'top1', 'brier'):
    result[key + '_c'] = 0.5 * (scores[0][key] + scores[1][key])
  fitted = [t for t, sep in zip(temps, separable) if not sep]
  result['temperature'] = (float(np.exp(np.mean(np.log(fitted))))
                           if fitted else None)
  result['temperatures'] = temps
  result['separable'] = separable
  return result


def cross_fitted_log_probs(log_probs, labels, seed=0, temperatures=None):
  """The temperature-scaled predictions behind `calibrated_metrics`.

  Half A scaled by T_B and half B by T_A (the same halves, the same
  separable rule), so e.g. a reliability diagram of them shows what NLL_c
  and ECE_c measure. (ECE of the pooled halves can differ slightly from
  ece_c, the mean of the halves' ECEs.)

  Args:
    log_probs: [N, C]; labels: [N] int; seed: the split's seed.
    temperatures: [T_A, T_B] of `calibrated_metrics` (fitted when None).

  Returns:
    [N, C] float64 log-probabilities (log_probs unchanged when N < 2).
  """
  log_probs = np.asarray(log_probs, np.float64)
  n = log_probs.shape[0]
  if n < 2:
    return _log_softmax(np, log_probs)
  temps = temperatures
  if temps is None or None in temps:
    temps = calibrated_metrics(log_probs, labels, seed)['temperatures']
  perm = np.random.default_rng(seed).permutation(n)
  out = np.empty_like(log_probs)
  for t, half in zip(temps[::-1], (perm[:n // 2], perm[n // 2:])):
    out[half] = temperature_scale(log_probs[half], t)
  return out


# ----------------------------------------------------------------------------
# Diversity and the eval.json summary.
# ----------------------------------------------------------------------------


def pairwise_probability_diversity(member_logits):
  """KL divergence and cosine similarity of the members' probabilities.

  For each pair (i, j), i < j, with p_in = softmax(z_in):
    kl_ij     = (1/N) sum_n sum_c p_inc log(p_inc / p_jnc)   (KL(p_i || p_j)),
    cosine_ij = (1/N) sum_n <p_in, p_jn> / (|p_in| |p_jn|),
  averaged over the M (M - 1) / 2 pairs in `itertools.combinations` order:
  uncertainty-baselines' `average_kl` and `cosine_similarity`
  (robustness-metrics' `AveragePairwiseDiversity`, which sums the same
  ordered pairs, not both directions).

  Args:
    member_logits: [N, M, C].

  Returns:
    (average_kl, cosine_similarity) Python floats; (None, None) when M = 1.
  """
  z = np.asarray(member_logits, np.float64)
  pairs = list(itertools.combinations(range(z.shape[1]), 2))
  if not pairs:
    return None, None
  log_p = _log_softmax(np, z)  # Shape: [N, M, C].
  p = np.exp(log_p)
  i, j = (np.array(x) for x in zip(*pairs))
  kl = np.sum(p[:, i] * (log_p[:, i] - log_p[:, j]), axis=-1)  # [N, P].
  norm = np.linalg.norm(p, axis=-1)  # Shape: [N, M].
  cosine = np.sum(p[:, i] * p[:, j], axis=-1) / (norm[:, i] * norm[:, j])
  return float(np.mean(kl)), float(np.mean(cosine))


def diversity(member_logits, labels):
  """Pairwise diversity of the members (paper 4.3.2, 6.6; uncertainty-
  baselines).

  For each pair (i, j), i < j: ratio-error d_re = one_ij / both_ij with
  one_ij = #{n: exactly one of i, j errs} and both_ij = #{n: both err}
  (Aksela 2003); when both_ij = 0 the MixMo reference uses 2 * one_ij
  instead, and so do we. Disagreement = (1/N) #{n: pred_in != pred_jn}.
  All are averaged over the M (M - 1) / 2 pairs; `average_kl` and
  `cosine_similarity` of the members' probabilities come from
  `pairwise_probability_diversity`.

  Args:
    member_logits: [N, M, C]; labels: [N] int.

  Returns:
    {'ratio_error', 'disagreement', 'average_kl', 'cosine_similarity'}
    floats; all None when M = 1 (no pair; None keeps eval.json valid JSON).
  """
  num_examples = np.shape(member_logits)[0]
  both, one, disagree = (np.asarray(x) for x in
                         pairwise_error_counts(member_logits, labels))
  kl, cosine = pairwise_probability_diversity(member_logits)
  if both.size == 0:
    return {'ratio_error': None, 'disagreement': None, 'average_kl': None,
            'cosine_similarity': None}
  ratios = np.where(both > 0, one / np.maximum(both, 1), 2.0 * one)
  return {
      'ratio_error': float(np.mean(ratios)),
      'disagreement': float(np.mean(disagree / max(num_examples, 1))),
      'average_kl': kl,
      'cosine_similarity': cosine,
  }


def _json_safe(value):
  """Python float, or None for NaN / inf (strict JSON has neither)."""
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def _clean(tree):
  if isinstance(tree, dict):
    return {k: _clean(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_clean(v) for v in tree]
  if isinstance(tree, (bool, int, str)) or tree is None:
    return tree
  return _json_safe(tree)


def evaluation_metrics(member_logits, labels, *, ensemble='logits',
                       calibration_seed=0, num_bins=15):
  """All test metrics of a multi-output network, in the eval.json schema.

  Args:
    member_logits: [N, M, C] logits of the M members on the N test samples.
    labels: [N] int.
    ensemble: 'logits' (mean logits, MixMo) or 'probs' (mean probabilities,
      MIMO); see `ensemble_log_probs`.
    calibration_seed: seed of the two-halves split of `calibrated_metrics`.
    num_bins: ECE bins of the temperature-scaled metrics (the registered
      'ece' uses 15, the paper's).

  Returns:
    {'ensemble': {every registered metric (`registry`: top1, top5, nll, ece,
                  brier, auc, tace_mixmo, tace_um, ...), nll_c, ece_c, top1_c, brier_c,
                  temperature},
     'members': [{top1, nll}, ...] (M entries),
     'diversity': {ratio_error, disagreement, average_kl,
                   cosine_similarity},
     'calibration': {seed, split_sizes, temperatures, separable},
     'num_examples', 'num_members', 'num_classes', 'ensemble_mode'}
    Accuracies are fractions in [0, 1]; top5 is top-min(5, C). Values are
    plain Python floats / ints / str / None (NaN and inf become None), so
    `json.dumps` gives strict JSON.
  """
  member_logits = np.asarray(member_logits, np.float64)
  labels = np.asarray(labels, np.int64)
  num_examples, num_members, num_classes = member_logits.shape
  lp = ensemble_log_probs(member_logits, ensemble)
  cal = calibrated_metrics(lp, labels, calibration_seed, num_bins)
  ens = registry.compute(lp, labels)
  for key in ('nll_c', 'ece_c', 'top1_c', 'brier_c', 'temperature'):
    ens[key] = cal[key]
  members = []
  for i in range(num_members):
    member_lp = _log_softmax(np, member_logits[:, i])
    members.append({'top1': _accuracy(member_lp, labels, 1),
                    'nll': float(nll(member_lp, labels))})
  result = {
      'num_examples': int(num_examples),
      'num_members': int(num_members),
      'num_classes': int(num_classes),
      'ensemble_mode': ensemble,
      'ensemble': ens,
      'members': members,
      'diversity': diversity(member_logits, labels),
      'calibration': {'seed': cal['seed'], 'split_sizes': cal['split_sizes'],
                      'temperatures': cal['temperatures'],
                      'separable': cal['separable']},
  }
  return _clean(result)


def flatten_metrics(tree, prefix='', sep='/'):
  """Nested metrics -> {'ensemble/top1': v, 'members/0/top1': v, ...}.

  Dict keys and list indices are joined with `sep`. Only numeric leaves
  (int, float, NumPy / jax scalars; ints stay int, others become float) are
  kept; None, strings and booleans are
  dropped, so the result can go straight to an event writer's `write_scalars`.
  Already flat dicts pass through unchanged.
  """
  flat = {}
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    items = None
  if items is not None:
    for key, value in items:
      name = f'{prefix}{sep}{key}' if prefix else str(key)
      flat.update(flatten_metrics(value, name, sep))
    return flat
  if tree is None or isinstance(tree, (bool, str, np.bool_)):
    return flat
  if isinstance(tree, (int, np.integer)):
    flat[prefix] = int(tree)
    return flat
  try:
    flat[prefix] = float(tree)
  except (TypeError, ValueError):
    pass
  return flat


# ----------------------------------------------------------------------------
# Ranking metrics, TACE and OOD scores (host side, float64 NumPy).
# ----------------------------------------------------------------------------

TACE_BINS = 15  # Adaptive bins per class (both definitions; as for ECE).
# Only probabilities p_nc above the threshold are binned: uncertainty-metrics
# (Nixon et al. 2019) use 0.01, the official MixMo code 1e-3.
TACE_UM_THRESHOLD = 0.01
TACE_MIXMO_THRESHOLD = 1e-3


def _binary_inputs(scores, positive):
  scores = np.asarray(scores, np.float64).reshape(-1)
  positive = np.asarray(positive, bool).reshape(-1)
  if scores.shape != positive.shape:
    raise ValueError(f'scores {scores.shape} and positive {positive.shape} '
                     'must have the same length')
  return scores, positive


def _class_counts(scores, positive):
  """`_binary_inputs`, and the numbers of positives and negatives."""
  scores, positive = _binary_inputs(scores, positive)
  n_pos = int(positive.sum())
  return scores, positive, n_pos, positive.size - n_pos


def auroc(scores, positive):
  """Area under the ROC curve of `scores` separating positives from negatives.

  AUROC = P(s+ > s-) + P(s+ = s-) / 2 over all (positive, negative) pairs
  (Mann-Whitney U / (n+ n-), ties counted one half; equal to the trapezoidal
  area under the ROC curve), computed from mid-ranks.

  Args:
    scores: [N] float, higher = more likely positive.
    positive: [N] bool.

  Returns:
    float in [0, 1]; NaN without both classes.
  """
  scores, positive, n_pos, n_neg = _class_counts(scores, positive)
  if n_pos == 0 or n_neg == 0:
    return math.nan
  order = np.argsort(scores, kind='stable')
  sorted_scores = scores[order]
  # Mid-rank (1-based) of every group of equal scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], scores.size]
  group_rank = 0.5 * (starts + 1 + ends)
  ranks = np.empty(scores.size)
  ranks[order] = np.repeat(group_rank, ends - starts)
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def _threshold_counts(scores, positive):
  """(TP, FP) [T] at each distinct score t, highest first: the positives and
  negatives among the samples with s >= t."""
  order = np.argsort(-scores, kind='stable')
  s, pos = scores[order], positive[order]
  last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # End of each group.
  tp = np.cumsum(pos)[last]
  return tp, (last + 1) - tp


def average_precision(scores, positive):
  """Average precision (area under the precision-recall curve, step rule).

  Thresholds t run over the distinct scores, highest first; at each,
  P(t) = TP / (TP + FP) and R(t) = TP / n+ over the samples with s >= t, and
  AP = sum_t (R(t) - R(t_prev)) P(t) with R = 0 before the first threshold
  (the definition of scikit-learn's `average_precision_score`).

  Args:
    scores: [N] float, higher = more likely positive.
    positive: [N] bool.

  Returns:
    float in [0, 1]; NaN without positives.
  """
  scores, positive = _binary_inputs(scores, positive)
  n_pos = int(positive.sum())
  if n_pos == 0:
    return math.nan
  tp, fp = _threshold_counts(scores, positive)
  precision = tp / (tp + fp)
  recall = tp / n_pos
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def max_probability(log_probs):
  """Confidence max_c p_nc [N] of log-probabilities (or logits) [N, C]."""
  _, lp = _normalise(np.asarray(log_probs, np.float64))
  return np.exp(np.max(lp, axis=-1))


def entropy(log_probs):
  """Predictive entropy H_n = -sum_c p_nc log p_nc [N] (nats), from [N, C]."""
  _, lp = _normalise(np.asarray(log_probs, np.float64))
  return -np.sum(np.exp(lp) * lp, axis=-1)


def dempster_shafer(logits):
  """Dempster-Shafer uncertainty u_n = C / (C + sum_c exp(z_nc)) [N].

  The evidential uncertainty of Sensoy et al. (2018), as uncertainty-
  baselines scores OOD with it: z are logits (not log-probabilities: the
  total evidence sum_c exp(z_c) is not shift-invariant); u in (0, 1), higher
  = less evidence = more uncertain. Computed stably as
  sigmoid(log C - logsumexp_c z_nc).

  Args:
    logits: [N, C].
  """
  z = np.asarray(logits, np.float64)
  x = math.log(z.shape[-1]) - _logsumexp(np, z, axis=-1)
  return np.exp(-np.logaddexp(0.0, -x))  # sigmoid(x), stable both ways.


def confidence_auc(log_probs, labels):
  """AUROC of the max probability separating correct from wrong top-1
  predictions (`auroc` with the correct ones positive); NaN when every
  prediction is correct or every one wrong.

  Args:
    log_probs: [N, C]; labels: [N] int.
  """
  correct = np.asarray(top_k_correct(np.asarray(log_probs, np.float64),
                                     labels, 1))
  return auroc(max_probability(log_probs), correct)


def adaptive_bin_index(values, num_bins):
  """Adaptive (equal-mass) bins of `values` [n]: the bin of each value [n].

  With v sorted ascending, the bin edges are v[i_b] for the positions
  i_b = min(round(b n / B), n - 1), b = 1..B-1 (round half to even, as
  `np.round`), and a value x falls in bin #{b : v[i_b] <= x} (so equal values
  share a bin and a value equal to an edge opens the next bin). This is the
  binning of uncertainty-baselines' / robustness-metrics' adaptive
  calibration errors.
  """
  values = np.asarray(values, np.float64)
  n = values.size
  if n == 0:
    return np.zeros((0,), np.int64)
  pos = np.round(np.linspace(0, n, num_bins, endpoint=False)).astype(np.int64)
  edges = np.sort(values)[np.minimum(pos, n - 1)][1:]  # Shape: [B-1].
  return np.searchsorted(edges, values, side='right')


def _class_probabilities(log_probs, labels):
  _, lp = _normalise(np.asarray(log_probs, np.float64))
  return np.exp(lp), np.asarray(labels, np.int64)


def tace_um(log_probs, labels, num_bins=TACE_BINS,
            threshold=TACE_UM_THRESHOLD):
  """Thresholded adaptive calibration error of uncertainty-metrics.

  For every class c separately, over the samples with p_nc > threshold
  (n_c of them), the adaptive bins of `adaptive_bin_index` (num_bins of
  about n_c / B samples each) give
    TACE_c = sum_b |sum_{n in b} (1[y_n = c] - p_nc)| / n_c
  (= sum_b |B_b| / n_c |acc_b - conf_b|), and TACE = (1/C) sum_c TACE_c,
  with TACE_c = 0 when no probability of class c passes the threshold. This
  is `GeneralCalibrationError(binning_scheme='adaptive',
  class_conditional=True, max_prob=False, norm='l1', threshold=0.01)` of
  uncertainty-metrics (Nixon et al. 2019's code), with 15 bins as for ECE.
  Each class weighs 1/C whatever its n_c: compare with `tace_mixmo`.

  Args:
    log_probs: [N, C]; labels: [N] int.

  Returns:
    float in [0, 1].
  """
  probs, labels = _class_probabilities(log_probs, labels)
  total = 0.0
  for c in range(probs.shape[-1]):
    keep = probs[:, c] > threshold
    p = probs[keep, c]
    if p.size == 0:
      continue
    hit = (labels[keep] == c).astype(np.float64)
    bins = adaptive_bin_index(p, num_bins)
    gap = np.bincount(bins, weights=hit - p, minlength=num_bins)
    total += np.sum(np.abs(gap)) / p.size
  return total / probs.shape[-1]


def tace_mixmo(log_probs, labels, num_bins=TACE_BINS,
               threshold=TACE_MIXMO_THRESHOLD):
  """TACE as the official MixMo code computes it (`get_tace_bayesgroup`).

  For every class c, the n_c probabilities p_nc > threshold (1e-3) are
  sorted ascending and cut into B equal-count bins of s_c = floor(n_c / B)
  consecutive values, the last bin taking the remainder (positions
  k in [b s_c, (b + 1) s_c) for b < B - 1, [(B - 1) s_c, n_c) for the last);
  then
    TACE = 1 / (N C) sum_c sum_b |sum_{n in b} (1[y_n = c] - p_nc)|
  (= sum_c sum_b |B_b| / (N C) |acc_b - conf_b|): every class weighs by
  n_c / N, unlike `tace_um`'s 1/C, so on C = 100 classes, where most
  classes pass the threshold on few samples, it is several times smaller.
  Ties are sorted stably (by sample order). With n_c < B the first B - 1
  bins are empty and contribute 0 (the reference's mean of an empty bin
  gives NaN there).

  Args:
    log_probs: [N, C]; labels: [N] int.

  Returns:
    float in [0, 1].
  """
  probs, labels = _class_probabilities(log_probs, labels)
  num_examples, num_classes = probs.shape
  total = 0.0
  for c in range(num_classes):
    keep = probs[:, c] > threshold
    order = np.argsort(probs[keep, c], kind='stable')
    p = probs[keep, c][order]
    hit = (labels[keep][order] == c).astype(np.float64)
    size = p.size // num_bins
    position = np.arange(p.size)
    bins = (np.minimum(position // size, num_bins - 1) if size
            else np.full(p.size, num_bins - 1))
    gap = np.bincount(bins, weights=hit - p, minlength=num_bins)
    total += np.sum(np.abs(gap))
  return total / (num_examples * num_classes)


def tnr_at_tpr(scores, positive, tpr=0.95):
  """(1 - FPR) at the first threshold whose TPR reaches `tpr`.

  Thresholds t run over the distinct scores, highest first; the samples with
  s >= t are called positive, TPR(t) = TP / n+ and FPR(t) = FP / n-. With t*
  the highest threshold with TPR(t*) >= tpr (FPR grows as t falls, so the
  lowest FPR at that recall), the result is 1 - FPR(t*): the OOD metric
  "(1 - FPR) at 95% TPR" of uncertainty-baselines with OOD positive.

  Args:
    scores: [N] float, higher = more likely positive.
    positive: [N] bool.
    tpr: the recall to reach, in (0, 1].

  Returns:
    float in [0, 1]; NaN without both classes.
  """
  scores, positive, n_pos, n_neg = _class_counts(scores, positive)
  if n_pos == 0 or n_neg == 0:
    return math.nan
  tp, fp = _threshold_counts(scores, positive)
  first = int(np.argmax(tp / n_pos >= tpr))
  return float(1.0 - fp[first] / n_neg)


OOD_SCORES = ('msp', 'entropy', 'dempster_shafer_mean_logits',
              'dempster_shafer_members')


def ood_scores(member_logits, ensemble='logits'):
  """The uncertainty scores u [N] of every name in OOD_SCORES.

  'msp': -max_c p_nc and 'entropy': H(p_n), both of the ensemble prediction
  p = `ensemble_log_probs(., ensemble)`; the Dempster-Shafer score in its
  two forms: 'dempster_shafer_mean_logits' = `dempster_shafer` of the
  members' mean logits (1/M) sum_i z_in, and 'dempster_shafer_members' =
  (1/M) sum_i `dempster_shafer`(z_in), the mean of the per-member scores, as
  uncertainty-baselines' MIMO scores OOD (its published numbers use this
  one).

  Args:
    member_logits: [N, M, C].
    ensemble: 'logits' or 'probs'.

  Returns:
    {name: [N] float64}.
  """
  z = np.asarray(member_logits, np.float64)
  lp = ensemble_log_probs(z, ensemble)
  per_member = np.stack([dempster_shafer(z[:, i]) for i in range(z.shape[1])],
                        axis=1)  # Shape: [N, M].
  return {'msp': -max_probability(lp), 'entropy': entropy(lp),
          'dempster_shafer_mean_logits': dempster_shafer(z.mean(axis=1)),
          'dempster_shafer_members': per_member.mean(axis=1)}


def ood_metrics(in_member_logits, ood_member_logits, ensemble='logits'):
  """Out-of-distribution detection: in-distribution test set vs an OOD set.

  For each uncertainty score u of `ood_scores` (OOD_SCORES): auroc_s = AUROC
  of u with OOD samples positive; aupr_out_s = AP of u with OOD positive;
  aupr_in_s = AP of -u with in-distribution positive; tnr_at_tpr95_s =
  (1 - FPR) at 95% TPR of u with OOD positive (`tnr_at_tpr`).

  Args:
    in_member_logits: [N, M, C]; ood_member_logits: [N', M, C].
    ensemble: 'logits' or 'probs' (`ensemble_log_probs`).

  Returns:
    {auroc_msp, aupr_in_msp, aupr_out_msp, tnr_at_tpr95_msp, auroc_entropy,
     ..., tnr_at_tpr95_dempster_shafer_members, num_in, num_ood}; JSON-safe
    (NaN -> None).
  """
  parts = [ood_scores(x, ensemble) for x in (in_member_logits,
                                             ood_member_logits)]
  num_in, num_ood = (len(p['msp']) for p in parts)
  is_ood = np.r_[np.zeros(num_in, bool), np.ones(num_ood, bool)]
  result = {'num_in': num_in, 'num_ood': num_ood}
  for name in OOD_SCORES:
    score = np.concatenate([p[name] for p in parts])
    result[f'auroc_{name}'] = auroc(score, is_ood)
    result[f'aupr_in_{name}'] = average_precision(-score, ~is_ood)
    result[f'aupr_out_{name}'] = average_precision(score, is_ood)
    result[f'tnr_at_tpr95_{name}'] = tnr_at_tpr(score, is_ood, 0.95)
  return _clean(result)


# ----------------------------------------------------------------------------
# The built-in metrics of eval.json['ensemble'] (see `registry`).
# ----------------------------------------------------------------------------

registry.register_metric(
    'top1', lambda lp, y: _accuracy(lp, y, 1), title='top1',
    higher_is_better=True, per_cell=True, percent=True)
registry.register_metric(
    'top5', lambda lp, y: _accuracy(lp, y, 5), title='top5',
    higher_is_better=True, per_cell=True, percent=True)
registry.register_metric('nll', nll, title='nll', per_cell=True,
                         decimals=3)
registry.register_metric('ece', ece, title='ece', per_cell=True)
registry.register_metric('brier', brier, title='brier')
registry.register_metric('auc', confidence_auc, title='auc',
                         higher_is_better=True, per_cell=True)
# The two TACE definitions, named for their sources (see their docstrings).
registry.register_metric('tace_mixmo', tace_mixmo, title='tace_mm',
                         per_cell=True)
registry.register_metric('tace_um', tace_um, title='tace_um', per_cell=True)

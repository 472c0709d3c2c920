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

import jax
import jax.numpy as jnp
import numpy as np

# Temperature search bracket on beta = 1 / T.
BETA_MIN = 1e-3
BETA_MAX = 1e3


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
  if mode == 'logits':
    return _log_softmax(xp, xp.mean(z, axis=1))
  if mode == 'probs':
    member_lp = _log_softmax(xp, z)  # Shape: [N, M, C].
    return _logsumexp(xp, member_lp, axis=1) - math.log(z.shape[1])
  raise ValueError(f"ensemble mode must be 'logits' or 'probs', got {mode!r}")


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
  correct: sharpening always lowers the NLL, optimum beta -> inf) beta is
  clamped to beta_max (T = 1/beta_max = 1e-3); if f' >= 0 everywhere (e.g.
  every sample's label is its least likely class, optimum beta -> 0) beta is
  clamped to beta_min (T = 1e3).

  Args:
    log_probs: [N, C] finite log-probabilities (logits are fine too); N >= 1.
    labels: [N] int.

  Returns:
    T as a Python float in [1/beta_max, 1/beta_min]; NaN if log_probs has a
    NaN or infinite entry (e.g. a diverged run).
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


def calibrated_metrics(log_probs, labels, seed=0, num_bins=15):
  """Metrics after temperature scaling by cross-fitting (paper Section 4).

  The test set is split into two halves A (first N // 2 of a permutation from
  `np.random.default_rng(seed)`) and B (the rest). T_A is fitted on A and the
  metrics of softmax(z / T_A) are computed on B; T_B is fitted on B and used
  on A. Each reported `*_c` metric is the plain mean of the two halves'
  values; `temperature` is (T_A + T_B) / 2. Top-1 is unchanged by T (up to
  exact ties) and is reported as the mean of the two halves' accuracies.

  Args:
    log_probs: [N, C] ensemble log-probabilities; labels: [N] int.
    seed: int seed of the split permutation.

  Returns:
    dict of Python floats: nll_c, ece_c, top1_c, brier_c, temperature,
    temperatures [T_A, T_B], seed, split_sizes [|A|, |B|]. With N < 2 no split
    is possible and the metric values are None.
  """
  log_probs = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels, np.int64)
  n = labels.shape[0]
  result = {'seed': int(seed), 'split_sizes': [n // 2, n - n // 2]}
  if n < 2:
    result.update(nll_c=None, ece_c=None, top1_c=None, brier_c=None,
                  temperature=None, temperatures=[None, None])
    return result
  perm = np.random.default_rng(seed).permutation(n)
  halves = (perm[:n // 2], perm[n // 2:])
  temps = [fit_temperature(log_probs[h], labels[h]) for h in halves]
  scores = [
      _scores(temperature_scale(log_probs[other], t), labels[other], num_bins)
      for t, other in zip(temps, halves[::-1])
  ]
  for key in ('nll', 'ece', 'top1', 'brier'):
    result[key + '_c'] = 0.5 * (scores[0][key] + scores[1][key])
  result['temperature'] = 0.5 * (temps[0] + temps[1])
  result['temperatures'] = temps
  return result


# ----------------------------------------------------------------------------
# Diversity and the eval.json summary.
# ----------------------------------------------------------------------------


def diversity(member_logits, labels):
  """Pairwise diversity of the members' top-1 predictions (paper 4.3.2, 6.6).

  For each pair (i, j), i < j: ratio-error d_re = one_ij / both_ij with
  one_ij = #{n: exactly one of i, j errs} and both_ij = #{n: both err}
  (Aksela 2003); when both_ij = 0 the MixMo reference uses 2 * one_ij
  instead, and so do we. Disagreement = (1/N) #{n: pred_in != pred_jn}.
  Both are averaged over the M (M - 1) / 2 pairs.

  Args:
    member_logits: [N, M, C]; labels: [N] int.

  Returns:
    {'ratio_error': float, 'disagreement': float}; both None when M = 1 (no
    pair; None keeps eval.json valid JSON).
  """
  num_examples = np.shape(member_logits)[0]
  both, one, disagree = (np.asarray(x) for x in
                         pairwise_error_counts(member_logits, labels))
  if both.size == 0:
    return {'ratio_error': None, 'disagreement': None}
  ratios = np.where(both > 0, one / np.maximum(both, 1), 2.0 * one)
  return {
      'ratio_error': float(np.mean(ratios)),
      'disagreement': float(np.mean(disagree / max(num_examples, 1))),
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

  Returns:
    {'ensemble': {top1, top5, nll, ece, brier, nll_c, ece_c, top1_c, brier_c,
                  temperature},
     'members': [{top1, nll}, ...] (M entries),
     'diversity': {ratio_error, disagreement},
     'calibration': {seed, split_sizes, temperatures},
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
  ens = _scores(lp, labels, num_bins)
  ens['top5'] = _accuracy(lp, labels, 5)
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
                      'temperatures': cal['temperatures']},
  }
  return _clean(result)


def flatten_metrics(tree, prefix='', sep='/'):
  """Nested metrics -> {'ensemble/top1': v, 'members/0/top1': v, ...}.

  Dict keys and list indices are joined with `sep`. Only numeric leaves
  (int, float, NumPy / jax scalars; ints stay int, others become float) are
  kept; None, strings and booleans are
  dropped, so the result can go straight to a clu writer's `write_scalars`.
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

"""Array primitives of the evaluation metrics: ensemble, top-k, NLL,
Brier, calibration bins and ECE, temperature scaling, pairwise errors.

Shapes: N examples, M members, C classes, B bins.

One formula, two array namespaces: given jax arrays (or tracers, i.e.
under `jax.jit`, with `mode`, `k` and `num_bins` static) they run in `jnp`
float32 and return jax arrays; given NumPy arrays or lists they run in
NumPy float64 and return NumPy values (exact on the host, and no XLA
compilation per test-set shape). Every function that takes `log_probs`
first re-normalises them with `log_softmax` (the identity on
log-probabilities, up to rounding), so raw logits are accepted too.
`accuracy` and `clean_json` are the host-side helpers of the summaries.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np


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


def logsumexp(z, axis=-1):
  """log sum exp along `axis` (NumPy float64 or jnp float32)."""
  xp = _namespace(z)
  return _logsumexp(xp, _floats(xp, z), axis)


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
  return xp.mean(xp.sum((xp.exp(lp) - onehot)**2, axis=-1))


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


def accuracy(log_probs, labels, k=1):
  """Host-side exact top-k accuracy: a Python float, the int count / N."""
  correct = np.asarray(top_k_correct(np.asarray(log_probs), labels, k))
  return int(correct.sum()) / max(correct.shape[0], 1)


def _json_safe(value):
  """Python float, or None for NaN / inf (strict JSON has neither)."""
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def clean_json(tree):
  """`tree` with every number a Python float (None for NaN / inf: strict JSON
  has neither); bools, ints, strings and None kept."""
  if isinstance(tree, dict):
    return {k: clean_json(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [clean_json(v) for v in tree]
  if isinstance(tree, (bool, int, str)) or tree is None:
    return tree
  return _json_safe(tree)

"""Temperature scaling (host side, float64 NumPy): the fit, and the
paper's cross-fitted calibrated metrics (NLL_c, ECE_c; Section 4.1).

Shapes: N examples, C classes.
"""
import math

from absl import logging
import numpy as np

from mixmo_jax.evaluation.primitives import (accuracy, brier, ece, log_softmax,
                                             nll, temperature_scale)

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


def _scores(log_probs, labels, num_bins=15):
  return {
      'nll': float(nll(log_probs, labels)),
      'ece': float(ece(log_probs, labels, num_bins)),
      'top1': accuracy(log_probs, labels, 1),
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
  temps = [
      1.0 if sep else fit_temperature(log_probs[h], labels[h])
      for h, sep in zip(halves, separable)
  ]
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
  result['temperature'] = (
      float(np.exp(np.mean(np.log(fitted)))) if fitted else None)
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
    return log_softmax(log_probs)
  temps = temperatures
  if temps is None or None in temps:
    temps = calibrated_metrics(log_probs, labels, seed)['temperatures']
  perm = np.random.default_rng(seed).permutation(n)
  out = np.empty_like(log_probs)
  for t, half in zip(temps[::-1], (perm[:n // 2], perm[n // 2:])):
    out[half] = temperature_scale(log_probs[half], t)
  return out

"""Ranking metrics, TACE and out-of-distribution scores (host side,
float64 NumPy): AUROC, average precision, (1 - FPR) at a TPR, confidence
AUC, both TACE definitions, and the MSP / entropy / Dempster-Shafer OOD
scores with their detection metrics.

Shapes: N examples, M members, C classes.
"""
import math

import numpy as np

from mixmo_jax.evaluation.primitives import (clean_json, ensemble_log_probs,
                                             log_softmax, logsumexp,
                                             top_k_correct)

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
  lp = log_softmax(np.asarray(log_probs, np.float64))
  return np.exp(np.max(lp, axis=-1))


def entropy(log_probs):
  """Predictive entropy H_n = -sum_c p_nc log p_nc [N] (nats), from [N, C]."""
  lp = log_softmax(np.asarray(log_probs, np.float64))
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
  x = math.log(z.shape[-1]) - logsumexp(z, axis=-1)
  return np.exp(-np.logaddexp(0.0, -x))  # sigmoid(x), stable both ways.


def confidence_auc(log_probs, labels):
  """AUROC of the max probability separating correct from wrong top-1
  predictions (`auroc` with the correct ones positive); NaN when every
  prediction is correct or every one wrong.

  Args:
    log_probs: [N, C]; labels: [N] int.
  """
  correct = np.asarray(
      top_k_correct(np.asarray(log_probs, np.float64), labels, 1))
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
  lp = log_softmax(np.asarray(log_probs, np.float64))
  return np.exp(lp), np.asarray(labels, np.int64)


def tace_um(log_probs, labels, num_bins=TACE_BINS, threshold=TACE_UM_THRESHOLD):
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
    bins = (
        np.minimum(position // size, num_bins -
                   1) if size else np.full(p.size, num_bins - 1))
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
  return {
      'msp': -max_probability(lp),
      'entropy': entropy(lp),
      'dempster_shafer_mean_logits': dempster_shafer(z.mean(axis=1)),
      'dempster_shafer_members': per_member.mean(axis=1)
  }


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
  parts = [
      ood_scores(x, ensemble) for x in (in_member_logits, ood_member_logits)
  ]
  num_in, num_ood = (len(p['msp']) for p in parts)
  is_ood = np.r_[np.zeros(num_in, bool), np.ones(num_ood, bool)]
  result = {'num_in': num_in, 'num_ood': num_ood}
  for name in OOD_SCORES:
    score = np.concatenate([p[name] for p in parts])
    result[f'auroc_{name}'] = auroc(score, is_ood)
    result[f'aupr_in_{name}'] = average_precision(-score, ~is_ood)
    result[f'aupr_out_{name}'] = average_precision(score, is_ood)
    result[f'tnr_at_tpr95_{name}'] = tnr_at_tpr(score, is_ood, 0.95)
  return clean_json(result)

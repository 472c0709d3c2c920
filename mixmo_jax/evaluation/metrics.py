"""Evaluation metrics: what eval.json holds, and every metric by name.

Shapes: N examples, M members, C classes.

    metrics.evaluation_metrics(member_logits, labels)   # eval.json's record

The metrics live in three files about one idea each, and are all
reachable from here (`metrics.ece`, `metrics.fit_temperature`, ...):

  primitives.py   array primitives, NumPy float64 or jnp float32 (jit-able):
                  ensemble, top-k, NLL, Brier, calibration bins, ECE,
                  temperature scaling, pairwise errors
  calibration.py  temperature fitting and the paper's cross-fitted NLL_c,
                  ECE_c (host side)
  ranking.py      AUROC, average precision, TNR at a TPR, confidence AUC,
                  both TACEs, OOD scores and their detection metrics

This file holds the members' diversity, the eval.json summary
(`evaluation_metrics`, `flatten_metrics`) and the registration of the
built-in metrics of eval.json['ensemble'] (`registry`). Summaries are
host-side NumPy float64 returning plain Python floats / ints / None, so
that they go straight into `json.dumps`.
"""
import itertools

import numpy as np

from mixmo_jax.evaluation import registry
from mixmo_jax.evaluation.calibration import (  # noqa: F401  Re-exported.
    BETA_MAX, BETA_MIN, T_MAX, T_MIN, calibrated_metrics,
    cross_fitted_log_probs, fit_temperature, is_separable)
from mixmo_jax.evaluation.primitives import (  # noqa: F401  Re-exported.
    ENSEMBLE_MODES, accuracy, bin_edges, brier, calibration_bins, clean_json,
    ece, ensemble_log_probs, log_softmax, logsumexp, nll, pairwise_error_counts,
    temperature_scale, top_k_accuracy, top_k_correct)
from mixmo_jax.evaluation.ranking import (  # noqa: F401  Re-exported.
    OOD_SCORES, TACE_BINS, TACE_MIXMO_THRESHOLD, TACE_UM_THRESHOLD,
    adaptive_bin_index, auroc, average_precision, confidence_auc,
    dempster_shafer, entropy, max_probability, ood_metrics, ood_scores,
    tace_mixmo, tace_um, tnr_at_tpr)


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
  log_p = log_softmax(z)  # Shape: [N, M, C].
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
  both, one, disagree = (
      np.asarray(x) for x in pairwise_error_counts(member_logits, labels))
  kl, cosine = pairwise_probability_diversity(member_logits)
  if both.size == 0:
    return {
        'ratio_error': None,
        'disagreement': None,
        'average_kl': None,
        'cosine_similarity': None
    }
  ratios = np.where(both > 0, one / np.maximum(both, 1), 2.0 * one)
  return {
      'ratio_error': float(np.mean(ratios)),
      'disagreement': float(np.mean(disagree / max(num_examples, 1))),
      'average_kl': kl,
      'cosine_similarity': cosine,
  }


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
    member_lp = log_softmax(member_logits[:, i])
    members.append({
        'top1': accuracy(member_lp, labels, 1),
        'nll': float(nll(member_lp, labels))
    })
  result = {
      'num_examples': int(num_examples),
      'num_members': int(num_members),
      'num_classes': int(num_classes),
      'ensemble_mode': ensemble,
      'ensemble': ens,
      'members': members,
      'diversity': diversity(member_logits, labels),
      'calibration': {
          'seed': cal['seed'],
          'split_sizes': cal['split_sizes'],
          'temperatures': cal['temperatures'],
          'separable': cal['separable']
      },
  }
  return clean_json(result)


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
# The built-in metrics of eval.json['ensemble'] (see `registry`).
# ----------------------------------------------------------------------------

registry.register_metric('top1', lambda lp, y: accuracy(lp, y, 1), title='top1',
                         higher_is_better=True, per_cell=True, percent=True)
registry.register_metric('top5', lambda lp, y: accuracy(lp, y, 5), title='top5',
                         higher_is_better=True, per_cell=True, percent=True)
registry.register_metric('nll', nll, title='nll', per_cell=True, decimals=3)
registry.register_metric('ece', ece, title='ece', per_cell=True)
registry.register_metric('brier', brier, title='brier')
registry.register_metric('auc', confidence_auc, title='auc',
                         higher_is_better=True, per_cell=True)
# The two TACE definitions, named for their sources (see their docstrings).
registry.register_metric('tace_mixmo', tace_mixmo, title='tace_mm',
                         per_cell=True)
registry.register_metric('tace_um', tace_um, title='tace_um', per_cell=True)

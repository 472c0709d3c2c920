"""CIFAR-10-C / CIFAR-100-C evaluation: 19 corruptions x 5 severities.

Per (corruption, severity) cell the ensemble's top-1, top-5, NLL (without
temperature scaling: out-of-domain, paper Appendix 6.4), ECE and every other
metric registered with `per_cell=True` (`registry`: auc, tace_mixmo, tace_um, ...), their
means per corruption, per severity and over all cells, and the additive
ones (top-1, top-5, NLL, ECE) of all corrupted images pooled (from additive
per-cell statistics, exact).
"""
import math
import os
from typing import Any
from collections.abc import Sequence

from absl import logging
import numpy as np

from mixmo_jax.data import cifar_c as corruptions
from mixmo_jax.evaluation import metrics, registry
from mixmo_jax.evaluation.runs import Run, predict_members

# The additive metrics, exact from summed cell statistics ('pooled').
CORRUPTION_METRICS = ('top1', 'top5', 'nll', 'ece')
CORRUPTION_NOTES = {
    'nll': 'without temperature scaling (out-of-domain, paper Appendix 6.4)',
    'per_corruption': 'per severity "1".."5" and "mean" over the 5 severities',
    'per_severity': 'mean over the evaluated corruptions',
    'mean': 'unweighted mean over all (corruption, severity) cells: the '
            'usual CIFAR-C summary',
    'pooled': 'metrics of all corrupted images taken together (top1, top5, '
              'nll and ece only); top1, top5 and nll equal "mean" when every '
              'cell has the same number of images, ECE does not',
}


def _json_float(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def cell_statistics(log_probs: np.ndarray, labels: np.ndarray,
                    num_bins: int = 15) -> dict[str, np.ndarray]:
  """Additive statistics of one (corruption, severity) cell.

  Args:
    log_probs: [n, C] ensemble log-probabilities; labels: [n] int.

  Returns:
    n, the correct top-1 / top-5 counts, the summed NLL, and per confidence
    bin b (`metrics.calibration_bins`) the accuracy mass acc_b |B_b|, the
    confidence mass conf_b |B_b| and the count |B_b| ([B] each). Summed over
    any union of cells they give that union's metrics exactly
    (`scores_from_statistics`).
  """
  n = len(labels)
  acc, conf, count = (
      np.asarray(x)
      for x in metrics.calibration_bins(log_probs, labels, num_bins))
  return {
      'n': np.float64(n),
      'top1': np.sum(metrics.top_k_correct(log_probs, labels, 1)),
      'top5': np.sum(metrics.top_k_correct(log_probs, labels, 5)),
      'nll': float(metrics.nll(log_probs, labels)) * n,
      'acc_mass': acc * count,
      'conf_mass': conf * count,
      'count': count,
  }


def scores_from_statistics(
    sums: dict[str, np.ndarray]) -> dict[str, float | None]:
  """{top1, top5, nll, ece} from (summed) `cell_statistics`:
  top-k = correct_k / n, NLL = summed NLL / n and
  ECE = sum_b |acc mass_b - conf mass_b| / n (= sum_b |B_b|/n |acc_b - conf_b|).
  """
  n = sums['n']
  return {
      'top1':
          _json_float(sums['top1'] / n),
      'top5':
          _json_float(sums['top5'] / n),
      'nll':
          _json_float(sums['nll'] / n),
      'ece':
          _json_float(np.sum(np.abs(sums['acc_mass'] - sums['conf_mass'])) / n),
  }


def _add(total, sums):
  return sums if total is None else {k: total[k] + sums[k] for k in total}


def cell_scores(log_probs: np.ndarray, labels: np.ndarray, num_bins: int = 15):
  """(metrics of one cell, its additive statistics): the additive metrics
  from `cell_statistics` and every other `registry.cell_metrics()` metric
  from its function."""
  sums = cell_statistics(log_probs, labels, num_bins)
  scores = scores_from_statistics(sums)
  others = tuple(
      m for m in registry.cell_metrics() if m.name not in CORRUPTION_METRICS)
  scores.update(registry.compute(log_probs, labels, others))
  return scores, sums


def _mean(cells: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
  """Unweighted mean over cells of each metric (None if any cell's is)."""
  out: dict[str, float | None] = {}
  for k in cells[0]:
    values = [c[k] for c in cells]
    known = [v for v in values if v is not None]
    out[k] = (None if len(known) < len(values) else _json_float(np.mean(known)))
  return out


def evaluate_corruptions(runs: Sequence[Run], folder: str, mesh,
                         eval_batch_size: int | None = None,
                         num_bins: int = 15) -> dict[str, Any]:
  """Top-1, top-5, NLL (no temperature scaling), ECE and the other per-cell
  registered metrics on CIFAR-10/100-C.

  Reads the folder as distributed (see `corruptions`), checks every file
  before predicting, and ensembles the members as for the test set (first
  run's evaluation.ensemble).

  Returns:
    {'folder', 'num_images_per_severity', 'severities' [1..5],
     'evaluated' [names], 'missing_corruptions' [names of the 19 absent; a
     warning when not empty], 'ignored_files', 'ensemble_mode',
     'temperature_scaling': False,
     'per_corruption': {name: {'1'..'5', 'mean': {top1, top5, nll, ece,
                                                   auc, tace_mixmo, ...}}},
     'per_severity': {'1'..'5': mean over corruptions},
     'mean': mean over the (corruption, severity) cells,
     'pooled': {top1, top5, nll, ece} over all corrupted images at once,
     'notes': {...}}.

  Raises:
    corruptions.CorruptionDataError: a missing or malformed file.
  """
  config = runs[0].config
  mode = config.evaluation.ensemble
  present, missing, ignored = corruptions.find_corruptions(folder)
  labels = corruptions.check_folder(folder, config.num_classes,
                                    config.image_size, present)
  slices = corruptions.severity_slices(len(labels))
  if missing:
    logging.warning('%d of the %d CIFAR-C corruptions are missing from %s: %s',
                    len(missing), len(corruptions.CORRUPTIONS), folder,
                    ', '.join(missing))
  per_corruption: dict[str, Any] = {}
  cells: list[dict[str, float | None]] = []
  total: Any = None
  for name in present:
    images = corruptions.open_corruption(folder, name, len(labels),
                                         config.image_size)
    log_probs = metrics.ensemble_log_probs(
        predict_members(runs, images, mesh, eval_batch_size), mode)
    table = {}
    for severity, rows in enumerate(slices, start=1):
      scores, sums = cell_scores(log_probs[rows], labels[rows], num_bins)
      total = _add(total, sums)
      table[str(severity)] = scores
      cells.append(table[str(severity)])
    table['mean'] = _mean([table[str(s)] for s in range(1, len(slices) + 1)])
    per_corruption[name] = table
    logging.info('%s: top1 per severity %s', name,
                 [round(table[str(s)]['top1'], 4) for s in range(1, 6)])
  per_severity = {
      str(s): _mean([per_corruption[c][str(s)] for c in present])
      for s in range(1,
                     len(slices) + 1)
  }
  return {
      'folder': os.path.abspath(folder),
      'num_images_per_severity': len(labels) // corruptions.NUM_SEVERITIES,
      'severities': list(range(1, corruptions.NUM_SEVERITIES + 1)),
      'evaluated': present,
      'missing_corruptions': missing,
      'ignored_files': ignored,
      'ensemble_mode': mode,
      'temperature_scaling': False,
      'per_corruption': per_corruption,
      'per_severity': per_severity,
      'mean': _mean(cells),
      'pooled': scores_from_statistics(total),
      'notes': CORRUPTION_NOTES,
  }

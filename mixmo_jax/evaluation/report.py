"""The eval.json result of a test-set evaluation, and its printed table.

`evaluate_test_set` predicts the whole test set with one or more runs and
returns the eval.json dict (`metrics.evaluation_metrics` plus the run's
identity and, for a single run, `best_on_test`: the paper's best-epoch
protocol read from eval_history.jsonl); `format_table` prints it.
"""
import math
from typing import Any
from collections.abc import Sequence

import numpy as np

from mixmo_jax import data, models, storage, workdir as wd
from mixmo_jax.data import cifar_c as corruptions
from mixmo_jax.evaluation import metrics, registry
from mixmo_jax.evaluation.runs import Run, predict_members

BEST_EPOCH_NOTE = ('paper protocol (Appendix 6.5): epoch of best test top-1, '
                   'latest on ties; optimistic')
BEST_FIELDS = ('top1', 'nll', 'nll_c', 'ece', 'ece_c')


def best_on_test(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """The paper's selection (Appendix 6.5) over eval_history.jsonl records.

  The authors evaluate the test set after every epoch and report the epoch
  of best ensemble test top-1; on ties the LATEST such epoch is taken.

  Args:
    history: records as `workdir.read_history` returns them, in step order
      (each {'step', 'epoch', 'ensemble': {...}, ...}).

  Returns:
    {'epoch', 'step', 'top1', 'nll', 'nll_c', 'ece', 'ece_c', 'note'} of the
    selected record (ensemble metrics; a missing metric is None), or None
    when no record has a finite ensemble top-1.
  """
  best, best_top1 = None, -math.inf
  for record in sorted(history, key=lambda r: r['step']):
    ensemble = record.get('ensemble') or {}
    try:
      top1 = float(ensemble['top1'])
    except (KeyError, TypeError, ValueError):
      continue
    if math.isfinite(top1) and top1 >= best_top1:  # >=: latest on ties.
      best_top1 = top1
      best = {
          'epoch': record.get('epoch'),
          'step': record['step'],
          **{
              k: ensemble.get(k) for k in BEST_FIELDS
          }
      }
      best['top1'] = top1
  if best is not None:
    best['note'] = BEST_EPOCH_NOTE
  return best


def best_epoch_on_test(workdir: str) -> dict[str, Any] | None:
  """Deprecated: `best_on_test(workdir.read_history(workdir))`."""
  return best_on_test(wd.read_history(workdir))


def evaluate_test_set(
    runs: Sequence[Run], mesh, eval_batch_size: int | None = None
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Metrics of the runs' (ensembled) members on the whole test set.

  Returns:
    (result in the eval.json schema, member logits float32 [N, sum M, C],
    labels int32 [N]).
  """
  config = runs[0].config
  images, labels = data.load_split(config, 'test')
  logits = predict_members(runs, images, mesh, eval_batch_size)
  result = metrics.evaluation_metrics(
      logits, labels, ensemble=config.evaluation.ensemble,
      calibration_seed=config.evaluation.calibration_seed)
  result['step'] = runs[0].step
  result['num_params'] = sum(
      models.num_params(r.variables['params']) for r in runs)
  result['workdirs'] = [storage.absolute(r.workdir) for r in runs]
  if len(runs) > 1:
    result['steps'] = [r.step for r in runs]
    result['members_per_run'] = [r.config.num_members for r in runs]
  else:
    best = best_on_test(wd.read_history(runs[0].workdir))
    if best is not None:
      result['best_on_test'] = best
  return result, logits, labels


def _f(value, spec='7.4f'):
  return f'{"-":>7s}' if value is None else format(value, spec)


def _columns(ens: dict[str, Any]):
  """(title, key, fmt, width) of every registered metric present in `ens`,
  and of a present key nobody registers (e.g. a metric registered when the
  file was written), in registration order."""
  specs = [s for s in registry.metric_specs() if s.name in ens]
  cols = [(s.title, s.name, s.fmt, max(7, len(s.title))) for s in specs]
  known = {s.name for s in specs} | set(registry.RESERVED)
  cols += [(k[:10], k, '.4f', max(7, len(k[:10])))
           for k in ens
           if k not in known and isinstance(ens[k], (int, float, type(None)))]
  return cols


def _row(label: str, cols, values: dict[str, Any]) -> str:
  cells = []
  for _, key, fmt, width in cols:
    if key in values:
      cells.append(_f(values[key], f'{width}{fmt}').rjust(width))
    else:
      cells.append(' ' * width)
  return f'{label:10s} ' + ' '.join(cells).rstrip()


def format_table(result: dict[str, Any]) -> str:
  """A readable summary of an eval.json dict: one column per registered
  metric (`registry`), the temperature-scaled row, the members, diversity,
  best epoch, CIFAR-C and OOD detection."""
  ens, lines = result['ensemble'], []
  runs = result.get('workdirs', [])
  steps = result.get('steps', result['step'])
  lines.append(f'{", ".join(runs)} (step {steps}): '
               f'{result["num_members"]} members, {result["num_examples"]} '
               f'test images, ensemble = mean of member '
               f'{result["ensemble_mode"]}' +
               (f', {result["num_params"]:,} parameters' if result
                .get('num_params') else ''))
  cols = _columns(ens)
  lines.append(f'{"":10s} ' + ' '.join(f'{t:>{w}s}' for t, _, _, w in cols))
  lines.append(_row('ensemble', cols, ens))
  scaled = {k[:-2]: v for k, v in ens.items() if k.endswith('_c')}
  lines.append(f'{_row("  (TS)", cols, scaled)}   temperature '
               f'{_f(ens["temperature"], ".4g")}')
  cal = result.get('calibration') or {}
  if cal.get('temperatures'):
    halves = [
        f'{name} {_f(t, ".4g").strip()}' +
        (' (no error: not fitted)' if sep else '') for name, t, sep in zip(
            'AB', cal['temperatures'], cal.get('separable', [False] * 2))
    ]
    lines.append(f'{"":10s} temperatures of the cross-fitted halves: '
                 f'{", ".join(halves)}')
  for i, member in enumerate(result['members']):
    lines.append(_row(f'member {i}', cols, member))
  div = result['diversity']
  lines.append(f'diversity: ratio-error {_f(div["ratio_error"], ".4f")}, '
               f'disagreement {_f(div["disagreement"], ".4f")}, average KL '
               f'{_f(div.get("average_kl"), ".4f")}, cosine similarity '
               f'{_f(div.get("cosine_similarity"), ".4f")}')
  if 'tace_mixmo' in ens or 'tace_um' in ens:
    lines.append('tace_mm: TACE of the official MixMo code (threshold 1e-3, '
                 '/ N C); tace_um: of uncertainty-metrics (threshold 0.01, '
                 'mean over classes)')
  best = result.get('best_on_test')
  if best:
    lines.append(f'best epoch on test (optimistic, paper protocol, latest on '
                 f'ties): epoch {best["epoch"]} (step {best["step"]}) top1 '
                 f'{_f(best["top1"], ".4f")} nll {_f(best.get("nll"), ".4f")} '
                 f'nll_c {_f(best.get("nll_c"), ".4f")} ece '
                 f'{_f(best.get("ece"), ".4f")}')
  corr = result.get('corruptions')
  if corr:
    lines.append(f'corruptions ({len(corr["evaluated"])} of '
                 f'{len(corruptions.CORRUPTIONS)}, '
                 f'{corr["num_images_per_severity"]} images per severity, '
                 'nll without temperature scaling):')
    for name, row in [('mean', corr['mean']), ('pooled', corr['pooled'])] + [
        (f'severity {s}', v) for s, v in corr['per_severity'].items()
    ]:
      cells = ' '.join(f'{t} {_f(row[k])}' for t, k, _, _ in _columns(row))
      lines.append(f'  {name:12s} {cells}')
    if corr['missing_corruptions']:
      missing = ', '.join(corr['missing_corruptions'])
      lines.append(f'  warning: missing {missing}')
  for name, row in (result.get('ood') or {}).items():
    lines.append(f'ood {name} ({row["num_ood"]} images vs {row["num_in"]}):')
    for score in metrics.OOD_SCORES:
      lines.append(f'  {score:27s} auroc {_f(row[f"auroc_{score}"])} '
                   f'aupr-in {_f(row[f"aupr_in_{score}"])} aupr-out '
                   f'{_f(row[f"aupr_out_{score}"])} 1-fpr@95tpr '
                   f'{_f(row.get(f"tnr_at_tpr95_{score}"))}')
  return '\n'.join(lines)

"""Our results beside the paper's, one markdown table per paper table.

    python -m experiments.summarize --root=runs [--table=1,8] [--output=summary.md]

On a root where no paper row has results (any runs of yours), it prints one
line per eval JSON found instead (`render_runs`): name, method, M, b, final
and best-on-test metrics, ratio-error.

For every row of the selected tables (experiments/tables.py) and repetition
k, reads the eval JSON that `experiments.run` writes (eval.json, or
eval_ensemble<N>.json for ensembles; schema in mixmo_jax/evaluate.py's
docstring, accuracies as fractions) and reports mean +- std over the repetitions found, beside the
paper's numbers from `experiments/paper_results.csv` (the paper's Tables 1,
2, 5, 6, 8 and 9 transcribed; `--results_csv` overrides).

Units: top-1 / top-5 in percent (ours are converted from fractions); NLL,
NLL_c and ECE in natural units as results.csv stores them (the paper prints
several of them x100). The paper's Tables 1, 2, 5, 6 and 9 report the epoch
of best test accuracy (Appendix 6.5); ours beside them ("ours (best epoch)")
is eval.json's `best_on_test` (the test set evaluated after every epoch, the
best ensemble top-1, latest on ties), falling back to the final checkpoint,
marked "(f)", where it is absent. Table 8 reports the final epoch, and so do
ours beside it ("ours (final)"); every row whose key also appears in Table 8
shows that final-epoch paper number too ("paper (final, T8)"). std is the sample standard deviation (ddof = 1);
with one repetition only the value is shown. Rows without results show "-".
"""
import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence

from experiments import run as run_lib
from experiments import tables
from mixmo_jax import workdir as wd
from mixmo_jax.evaluation import registry as metric_registry

DEFAULT_RESULTS_CSV = os.path.join(tables.REPO, 'experiments',
                                   'paper_results.csv')
# Every metric registered in mixmo_jax.evaluation.registry has a column
# (shown where paper_results.csv has its values), after the paper's own.
_REGISTERED = metric_registry.summary_metrics()
METRIC_ORDER = ('top1', 'top5', 'nll_c', 'nll', 'ece') + tuple(
    n for n in _REGISTERED if n not in ('top1', 'top5', 'nll', 'ece')) + (
        'member_top1',)
PERCENT = ('member_top1',) + tuple(
    n for n, m in _REGISTERED.items() if m.percent)
DECIMALS = {
    'member_top1': 2,
    'nll_c': 3,
    **{
        n: m.summary_decimals() for n, m in _REGISTERED.items()
    }
}
TITLES = {
    **{
        n: m.title for n, m in _REGISTERED.items()
    },
    'top1': 'Top-1 %',
    'top5': 'Top-5 %',
    'nll_c': 'NLL_c',
    'nll': 'NLL',
    'ece': 'ECE',
    'member_top1': 'member Top-1 %',
    # The two TACE definitions, named for their sources.
    'tace_mixmo': 'TACE (MixMo code)',
    'tace_um': 'TACE (uncertainty-metrics)'
}
TABLE_TITLES = {
    '1': 'Table 1: WRN-28-10 on CIFAR (paper: best epoch)',
    '2': 'Table 2: mixing blocks, Cut-MixMo b=2, WRN-28-10 CIFAR-100 '
         '(paper: best epoch)',
    '4': 'Table 4: WRN-28-10 trained on CIFAR-100, tested on CIFAR-100-C, '
         'with and without AugMix (paper: best epoch; ours: final '
         'checkpoint, mean over the corruption x severity cells)',
    '5': 'Table 5: PreActResNet-18-w on Tiny ImageNet (paper: best epoch)',
    '6': 'Table 6: ensembles of N Cut-MixMo + CutMix, b=4, WRN-28-10 '
         'CIFAR-100 (paper: best epoch)',
    '8': 'Table 8: WRN-28-10 on CIFAR without early stopping (paper: final '
         'epoch)',
    '9': 'Table 9: WRN-28-w on CIFAR-100, b=4 (paper: best epoch)',
    'ub': 'uncertainty-baselines MIMO (baselines/cifar/mimo.py defaults: '
          'M=3, b=4, WRN-28-10; published: final epoch)',
    'fig9': 'Figure 9: M >= 2 members, WRN-28-10 CIFAR-100, b=2 (paper: '
            'numbers quoted in Section 4.3.4)',
}

FINAL_MARK = ' (f)'  # Best-epoch column, value of the final checkpoint.

PaperValue = tuple[float, str, int]  # (value, text as in the csv, best_epoch)


def read_paper(path: str) -> dict[tuple, dict[str, PaperValue]]:
  """results.csv -> {(table, *row_key): {metric: (value, text, best_epoch)}}."""
  out: dict[tuple, dict[str, PaperValue]] = {}
  with open(path, newline='') as f:
    for r in csv.DictReader(f):
      key = (r['table'], r['dataset'], r['network'], int(r['width']),
             r['method'], int(r['cutmix']), int(r['b']), int(r['n_networks']))
      out.setdefault(key, {})[r['metric']] = (float(r['value']), r['value'],
                                              int(r['best_epoch']))
  return out


def _read_json(path: str) -> dict | None:
  """The JSON at a local path or URL (gs://, via tf.io.gfile); None if absent."""
  if '://' in path:
    import tensorflow as tf
    if not tf.io.gfile.exists(path):
      return None
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def our_value(result: dict, metric: str, best: bool = False,
              corruptions: bool = False) -> tuple[float | None, bool]:
  """One metric of an eval.json in the paper's units, and whether it is the
  final checkpoint's (value None if absent).

  best=True reads `result['best_on_test']` (the paper's selection, Appendix
  6.5: epoch of best test top-1, latest on ties) and falls back to the final
  checkpoint's value where it lacks the metric (ensembles of N networks,
  runs without eval_history.jsonl, top-5, members). member_top1 is the mean
  of the members' top-1 (Figure 9's "individual"). corruptions=True (a
  CIFAR-100-C row, eval_cifar_c.json) reads result['corruptions']['mean'],
  the final checkpoint's mean over the corruption x severity cells.
  """
  chosen = result.get('best_on_test') if best else None
  if corruptions:
    mean = (result.get('corruptions') or {}).get('mean') or {}
    value, final = mean.get(metric), True
  elif chosen is not None and chosen.get(metric) is not None:
    value, final = chosen[metric], False
  elif metric == 'member_top1':
    members = [m.get('top1') for m in result.get('members') or []]
    members = [m for m in members if m is not None]
    value, final = (sum(members) / len(members) if members else None), True
  else:
    value, final = (result.get('ensemble') or {}).get(metric), True
  if value is None:
    return None, final
  return (100.0 * value if metric in PERCENT else float(value)), final


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (ddof = 1; None for one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, None
  return mean, math.sqrt(sum((v - mean)**2 for v in values) / (n - 1))


def table_metrics(table: str, paper) -> list[str]:
  """The metrics results.csv has for a table, in METRIC_ORDER."""
  if table == 'fig9':
    return ['top1', 'member_top1']
  found = {
      m for key, metrics in paper.items() if key[0] == table for m in metrics
  }
  return [m for m in METRIC_ORDER if m in found] or ['top1', 'nll_c']


def collect(entry: tables.Entry, root: str, metrics: Sequence[str],
            best: bool = False):
  """({metric: [value per repetition found]}, repetitions found,
  {metrics where some value is the final checkpoint's although best=True})."""
  values: dict[str, list[float]] = {m: [] for m in metrics}
  found, fallback = 0, set()
  for k in entry.seeds:
    result = _read_json(run_lib.eval_path(root, entry, k))
    if result is None:
      continue
    found += 1
    for m in metrics:
      v, final = our_value(result, m, best, entry.corruptions)
      if v is not None:
        values[m].append(v)
        if best and final:
          fallback.add(m)
  return values, found, fallback


def _fmt(value: float, metric: str, text: str | None = None) -> str:
  """Fixed decimals per metric; a paper value keeps its own extra digits."""
  decimals = DECIMALS[metric]
  if text is not None and '.' in text:
    decimals = max(decimals, len(text.split('.')[1]))
  return f'{value:.{decimals}f}'


def format_ours(values: Sequence[float], metric: str) -> str:
  if not values:
    return '-'
  mean, std = mean_std(values)
  if std is None:
    return _fmt(mean, metric)
  return f'{_fmt(mean, metric)} ± {_fmt(std, metric)}'


def _paper_cell(paper, key, metric) -> str:
  value = paper.get(key, {}).get(metric)
  return '-' if value is None else _fmt(value[0], metric, value[1])


def _row_label(entry: tables.Entry) -> list[str]:
  net = ('WRN-28' if entry.network == 'wrn28' else 'PreActResNet-18')
  method = entry.method
  if entry.table == 'fig9':
    method += f' (M={entry.num_members})'
  return [
      entry.dataset, f'{net}-{entry.width}', method,
      'yes' if entry.cutmix else '-',
      str(entry.b),
      str(entry.n_networks)
  ]


def _fig9_paper(entry: tables.Entry, metric: str) -> str:
  value = tables.FIG9_PAPER_TEXT.get((entry.method, entry.num_members))
  return '-' if metric != 'member_top1' or value is None else f'{value:.1f}'


def render_table(table: str, entries: Sequence[tables.Entry], root: str,
                 paper) -> str:
  """The markdown section of one paper table."""
  metrics = table_metrics(table, paper)
  with_t8 = table not in ('8', 'fig9', 'ub') and any(
      ('8',) + e.row_key in paper for e in entries)
  best = table not in ('8', 'fig9', 'ub')
  header = ['dataset', 'network', 'method', 'CutMix', 'b', 'N', 'runs']
  for m in metrics:
    header.append(f'{TITLES[m]} ours (' + ('best epoch' if best else 'final') +
                  ')')
    if table == 'fig9':
      header.append(f'{TITLES[m]} paper (text)')
      continue
    header.append(f'{TITLES[m]} paper (' + ('best epoch' if best else 'final') +
                  ')')
    if with_t8:
      header.append(f'{TITLES[m]} paper (final, T8)')
  lines = [
      f'## {TABLE_TITLES[table]}', '', '| ' + ' | '.join(header) + ' |',
      '|' + '|'.join(['---'] * len(header)) + '|'
  ]
  footer = []
  for entry in entries:
    values, found, fallback = collect(entry, root, metrics, best)
    cells = _row_label(entry) + [f'{found}/{len(entry.seeds)}']
    for m in metrics:
      cells.append(
          format_ours(values[m], m) + (FINAL_MARK if m in fallback else ''))
      if table == 'fig9':
        cells.append(_fig9_paper(entry, m))
        continue
      cells.append(_paper_cell(paper, entry.key, m))
      if with_t8:
        cells.append(_paper_cell(paper, ('8',) + entry.row_key, m))
    lines.append('| ' + ' | '.join(cells) + ' |')
    if any(FINAL_MARK in c for c in cells) and not footer:
      footer = [
          '', f'{FINAL_MARK.strip()} final checkpoint (no best_on_test '
          'for this metric: ensembles of N networks, top-5, members, '
          'CIFAR-100-C, or runs without eval_history.jsonl).'
      ]
  return '\n'.join(lines + footer) + '\n'


def find_eval_files(root: str) -> list[str]:
  """Every eval.json / eval_ensemble<N>.json under a local root, sorted
  (a URL root: none, the paper rows are still read)."""
  if '://' in root or not os.path.isdir(root):
    return []
  found = []
  for folder, _, names in os.walk(root):
    for name in names:
      if name == wd.EVAL or (
          name.startswith('eval_ensemble') and name.endswith('.json') and
          not name.endswith(run_lib.CORRUPTIONS_SUFFIX + '.json')):
        found.append(os.path.join(folder, name))
  return sorted(found)


RUN_COLUMNS = ('top1', 'nll', 'nll_c', 'ece')


def _run_cells(result: dict | None, metric_source: dict | None):
  cells = []
  for m in RUN_COLUMNS:
    value = None if metric_source is None else metric_source.get(m)
    cells.append('-' if value is
                 None else _fmt(100.0 *
                                value if m in PERCENT else float(value), m))
  return cells


def render_runs(root: str, paths: Sequence[str]) -> str:
  """A table of arbitrary runs (no paper row): one line per eval JSON.

  name = the eval file's folder relative to root (with the file name for an
  ensemble); method, M and b from the run's config.json; ensemble top-1 (%),
  NLL, NLL_c, ECE and ratio-error of the final checkpoint, then the same
  metrics of `best_on_test` (the paper's selection, Appendix 6.5) when the
  eval JSON has it.
  """
  results = [(p, _read_json(p)) for p in paths]
  with_best = any(r and r.get('best_on_test') for _, r in results)
  header = ['run', 'method', 'M', 'b'
           ] + [f'{TITLES[m]} (final)' for m in RUN_COLUMNS] + ['ratio-error']
  if with_best:
    header += ['best epoch'
              ] + [f'{TITLES[m]} (best epoch)' for m in RUN_COLUMNS]
  lines = [
      f'## Runs under `{root}` (no paper row matched)', '',
      '| ' + ' | '.join(header) + ' |',
      '|' + '|'.join(['---'] * len(header)) + '|'
  ]
  for path, result in results:
    if result is None:
      continue
    folder = os.path.dirname(path)
    name = os.path.relpath(folder, root)
    if os.path.basename(path) != wd.EVAL:
      name = os.path.join(name, os.path.basename(path))
    try:
      config = wd.read_config_dict(folder) or {}
    except ValueError:
      config = {}
    mixing = (config.get('mixing') or {}).get('method')
    method = config.get('variant') or mixing or '-'
    members = result.get('num_members', config.get('num_members', '-'))
    ratio = (result.get('diversity') or {}).get('ratio_error')
    cells = [
        name,
        str(method),
        str(members),
        str(config.get('batch_repetitions', '-'))
    ]
    cells += _run_cells(result, result.get('ensemble'))
    cells.append('-' if ratio is None else f'{ratio:.3f}')
    if with_best:
      best = result.get('best_on_test')
      cells.append('-' if not best else str(best.get('epoch')))
      cells += _run_cells(result, best)
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def summarize(root: str, table_ids: Sequence[str] | None = None,
              results_csv: str = DEFAULT_RESULTS_CSV) -> str:
  """The whole markdown summary for the selected tables (default: all).

  When no eval JSON of a selected paper row exists under root, the paper
  rows are replaced by a table of the runs found there (`render_runs`), or
  by a line saying that nothing was found.
  """
  paper = read_paper(results_csv) if os.path.exists(results_csv) else {}
  root = run_lib.resolve_root(root)
  ids = tables.TABLES if not table_ids else [
      tables.normalize_table(t) for t in table_ids
  ]
  selected = [e for t in ids for e in tables.ENTRIES if e.table == t]
  matched = any(
      _read_json(run_lib.eval_path(root, e, k)) is not None
      for e in selected
      for k in e.seeds)
  if not matched:
    found = find_eval_files(root)
    parts = [
        '# MixMo runs', '',
        f'No run under `{root}` matches a row of the paper tables '
        f'{", ".join(ids)} (experiments/tables.py names).', ''
    ]
    if found:
      parts.append(render_runs(root, found))
    else:
      parts += [
          f'No eval.json or eval_ensemble<N>.json found under '
          f'`{root}`.', ''
      ]
    return '\n'.join(parts)
  parts = [
      '# MixMo reproduction: ours vs the paper', '',
      f'Runs under `{root}`. Ours: best epoch on test (paper protocol, '
      'Appendix 6.5) beside best-epoch tables, final checkpoint beside '
      'Table 8; mean ± sample std '
      '(ddof=1) over the repetitions found ("runs"). Top-1/Top-5 in %, '
      'NLL, NLL_c and ECE in natural units (results.csv units; the paper '
      'prints several x100).', ''
  ]
  if not paper:
    parts += [f'(paper numbers unavailable: {results_csv} not found)', '']
  for t in ids:
    entries = [e for e in tables.ENTRIES if e.table == t]
    parts.append(render_table(t, entries, root, paper))
  return '\n'.join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.summarize',
      description="Markdown tables of our results beside the paper's.")
  parser.add_argument('--root', default=run_lib.DEFAULT_ROOT)
  parser.add_argument('--table', default='all',
                      help='1,2,5,6,8,9,fig9 (comma-separated) or all')
  parser.add_argument('--output', default=None, help='also write it here')
  parser.add_argument('--results_csv', default=DEFAULT_RESULTS_CSV)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  ids = None if args.table in (
      '', 'all') else [t for t in args.table.split(',') if t]
  try:
    text = summarize(args.root, ids, args.results_csv)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  sys.stdout.write(text)
  if args.output:
    folder = os.path.dirname(args.output)
    if folder:
      os.makedirs(folder, exist_ok=True)
    with open(args.output, 'w') as f:
      f.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Network utilisation (paper Section 3.4, Figure 4, Appendix 6.2, Table 7).

    python -m mixmo_jax.analysis --workdir=DIR [--step=N] \
        [--thresholds=0.2,0.3,0.4,0.5] [--plot=DIR/utilisation.png] \
        [--output=DIR/utilisation.json]

Two measures of how a trained network uses its filters, from its parameters
only:

(a) Encoder separation (Figure 4a). The M stems c_i are one parameter
    `params['stems']['kernel']` of shape [M, 3, 3, 3, C0]; the l1 norm of
    output filter c of member i is

        s[i, c] = sum_{kh, kw, in} |K[i, kh, kw, in, c]|           [M, C0]

    With MixMo each filter is large in one encoder and near zero in the
    others: the members' inputs live in separate channels.

(b) Active filters in the core (Figure 4b, Table 7). A filter of a core conv
    kernel [kh, kw, n_in, n_out] is one of its n_out 3-D slices
    (n_in x k x k); its l1 norm is

        f_j = sum_{kh, kw, in} |W[kh, kw, in, j]|

    and it is *active* for threshold t_a if f_j >= t_a * max_l f_l, the max
    over the filters of its layer. The core is every 4-D 'kernel' leaf outside
    the stems (all 3x3 convs and the 1x1 shortcut convs; the dense heads are
    3-D and not filters). As in the paper ("the average percentage of active
    filters across all filters in the core network"), the headline share is
    pooled over filters:

        share(t_a) = 100 * #active filters / #filters             ('filter')

    so wide layers weigh more; the mean of the per-layer percentages
    ('layer') is reported beside it. A layer whose filters are all zero has
    no active filter.

`stem_filter_norms` and `active_filter_share` are pure NumPy functions of a
parameter tree (nested dicts, FrozenDicts or flax params); the CLI restores a
checkpoint with `evaluation.runs.restore_run`, prints the numbers,
writes JSON and a PNG (Agg backend, no display needed).
"""
import argparse
import os
import sys
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)
STEMS = 'stems'


def stem_filter_norms(params) -> np.ndarray:
  """l1 norm of each stem output filter per member (Figure 4a).

  Args:
    params: the parameter tree, with params['stems']['kernel'] [M,3,3,3,C0].

  Returns:
    float64 [M, C0]: s[i, c] = sum_{kh,kw,in} |K[i, kh, kw, in, c]|.
  """
  kernel = np.asarray(params[STEMS]['kernel'], dtype=np.float64)
  if kernel.ndim != 5:
    raise ValueError(
        f'stems kernel must be [M,kh,kw,in,C0], got {kernel.shape}')
  return np.abs(kernel).sum(axis=(1, 2, 3))


def core_kernels(params) -> dict[str, np.ndarray]:
  """Every 4-D 'kernel' leaf outside the stems, by '/'-joined path.

  Returns:
    {path: float64 [kh, kw, n_in, n_out]} in tree order.
  """
  found: dict[str, np.ndarray] = {}

  def walk(node, path: tuple[str, ...]):
    for name, child in node.items():
      if isinstance(child, Mapping):
        if not (not path and name == STEMS):
          walk(child, path + (str(name),))
      elif name == 'kernel' and np.ndim(child) == 4:
        found['/'.join(path + (name,))] = np.asarray(child, dtype=np.float64)

  walk(params, ())
  return found


def filter_l1_norms(kernel) -> np.ndarray:
  """[kh, kw, n_in, n_out] -> [n_out]: f_j = sum |W[..., j]|."""
  return np.abs(np.asarray(kernel, dtype=np.float64)).sum(axis=(0, 1, 2))


def active_mask(norms: np.ndarray, threshold: float) -> np.ndarray:
  """bool [n_out]: f_j >= t_a * max f (False everywhere if max f == 0)."""
  top = norms.max()
  if top <= 0:
    return np.zeros(norms.shape, bool)
  return norms >= threshold * top


def active_filter_share(params,
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                        average: str = 'filter') -> dict[float, float]:
  """Percentage of active core filters per threshold (Figure 4b, Table 7).

  Args:
    params: the parameter tree.
    thresholds: the t_a values.
    average: 'filter' (pooled over all core filters, the paper's definition)
      or 'layer' (mean of the per-layer percentages).

  Returns:
    {t_a: percentage in [0, 100]}.
  """
  if average not in ('filter', 'layer'):
    raise ValueError(f"average must be 'filter' or 'layer', got {average!r}")
  norms = [filter_l1_norms(k) for k in core_kernels(params).values()]
  if not norms:
    raise ValueError('no core conv kernel (4-D "kernel" leaf) in params')
  share = {}
  for t in thresholds:
    masks = [active_mask(n, float(t)) for n in norms]
    if average == 'filter':
      value = sum(m.sum() for m in masks) / sum(m.size for m in masks)
    else:
      value = np.mean([m.mean() for m in masks])
    share[float(t)] = 100.0 * float(value)
  return share


def layer_shares(params, threshold: float = 0.4) -> dict[str, float]:
  """{layer path: percentage of its filters active at t_a}."""
  return {
      path: 100.0 * float(active_mask(filter_l1_norms(k), threshold).mean())
      for path, k in core_kernels(params).items()
  }


def report(params, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
  """All numbers of the analysis, JSON-ready."""
  kernels = core_kernels(params)
  stems = stem_filter_norms(params)
  return {
      'thresholds': [float(t) for t in thresholds],
      'stem_filter_l1': stems.tolist(),  # [M][C0]
      'active_share_percent': {
          'filter': {
              str(t): v for t, v in active_filter_share(params, thresholds,
                                                        'filter').items()
          },
          'layer': {
              str(t): v for t, v in active_filter_share(params, thresholds,
                                                        'layer').items()
          },
      },
      'num_core_layers': len(kernels),
      'num_core_filters': int(sum(k.shape[-1] for k in kernels.values())),
  }


def format_report(rep: dict, title: str = '') -> str:
  """Human-readable lines of a report."""
  stems = np.asarray(rep['stem_filter_l1'])
  lines = [title] if title else []
  lines.append(f'stem filter l1 norms [M={stems.shape[0]}, C0={stems.shape[1]}]'
               ' (Figure 4a):')
  for i, row in enumerate(stems):
    lines.append(f'  member {i}: ' + ' '.join(f'{v:.2f}' for v in row))
  if stems.shape[0] > 1:
    # Separation: per filter, the share of the largest member's norm.
    dominant = stems.max(0) / np.maximum(stems.sum(0), 1e-12)
    lines.append(
        f'  dominant member share per filter: mean {dominant.mean():.3f}'
        f' (1/M = {1 / stems.shape[0]:.3f} if not separated)')
  lines.append(f'active core filters, % of {rep["num_core_filters"]} filters in'
               f' {rep["num_core_layers"]} layers (Figure 4b, Table 7):')
  for t in rep['thresholds']:
    lines.append(
        f'  t_a={t:.2f}: {rep["active_share_percent"]["filter"][str(t)]:6.2f}'
        f' % of filters, {rep["active_share_percent"]["layer"][str(t)]:6.2f}'
        ' % per-layer mean')
  return '\n'.join(lines)


def plot(reports: Sequence[dict], labels: Sequence[str], path: str) -> str:
  """PNG: (a) stem filter norms of the first report, (b) share vs t_a."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11.0, 4.0), dpi=100)
  FigureCanvasAgg(fig)
  ax_a, ax_b = fig.subplots(1, 2, gridspec_kw={'width_ratios': [1.6, 1.0]})
  stems = np.asarray(reports[0]['stem_filter_l1'])
  m, c0 = stems.shape
  # As the paper's Figure 4a: filters grouped by the encoder where their
  # norm is largest, each group by that norm, descending.
  order = np.lexsort((-stems.max(axis=0), stems.argmax(axis=0)))
  stems = stems[:, order]
  width = 0.8 / m
  x = np.arange(c0)
  for i in range(m):
    ax_a.bar(x + (i - (m - 1) / 2) * width, stems[i], width=width,
             label=f'encoder c{i}')
  ax_a.set_xlabel('stem filter (grouped by dominant encoder, by norm)')
  ax_a.set_ylabel('l1 norm')
  ax_a.set_title(f'(a) encoder filter l1 norms: {labels[0]}')
  ax_a.set_xticks(x if c0 <= 32 else x[::max(1, c0 // 16)])
  ax_a.legend(fontsize=8)
  for rep, label in zip(reports, labels):
    ts = rep['thresholds']
    ax_b.plot(ts, [rep['active_share_percent']['filter'][str(t)] for t in ts],
              marker='o', label=label)
  ax_b.set_xlabel('activity threshold t_a')
  ax_b.set_ylabel('active core filters (%)')
  ax_b.set_title('(b) active filters in the core')
  ax_b.set_ylim(0, 101)
  ax_b.legend(fontsize=8, loc='lower left')
  fig.tight_layout()
  from mixmo_jax import storage
  storage.save_figure(fig, os.fspath(path), 'png')
  return os.fspath(path)


def _label(config, workdir: str) -> str:
  """'WORKDIR_NAME (variant net-depth-width)': runs differ by their name."""
  name = os.path.basename(os.path.normpath(workdir)) or workdir
  try:
    detail = (
        f'{config.get("variant", "")} {config.model.name}-'
        f'{config.model.depth if config.model.name == "wide_resnet" else 18}'
        f'-{config.model.width}').strip()
  except (AttributeError, KeyError):
    return name
  return f'{name} ({detail})'


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m mixmo_jax.analysis',
      description='Network utilisation: stem filter norms and active core '
      'filters (MixMo Figure 4, Table 7).')
  parser.add_argument('--workdir', required=True,
                      help='training workdir(s), comma-separated')
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step (default: the latest)')
  parser.add_argument('--thresholds', default='0.2,0.3,0.4,0.5')
  parser.add_argument('--plot', default=None, help='PNG path')
  parser.add_argument(
      '--output', default=None,
      help='JSON path (default: <first workdir>/utilisation.json)')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    thresholds = [float(t) for t in args.thresholds.split(',') if t]
  except ValueError:
    print(f'error: --thresholds={args.thresholds!r}: comma-separated numbers',
          file=sys.stderr)
    return 2
  from mixmo_jax import checkpointing
  from mixmo_jax import workdir as wd
  from mixmo_jax.evaluation import runs
  workdirs = [w for w in args.workdir.split(',') if w]
  for workdir in workdirs:
    if wd.url_problem(workdir):
      print(f'error: {wd.url_problem(workdir)}', file=sys.stderr)
      return 2
  output = args.output or os.path.join(workdirs[0], 'utilisation.json')
  for flag, target in (('--output', output), ('--plot', args.plot)):
    owned = target and wd.owned_input(workdirs, target)
    if owned:  # Before any work: never replace what runs read.
      print(
          f'error: {flag}={target} would overwrite {owned}, which the '
          'workdir reads; write it elsewhere', file=sys.stderr)
      return 2
  reports: list[dict] = []
  labels: list[str] = []
  for workdir in workdirs:
    try:
      run = runs.restore_run(workdir, step=args.step)
      config, variables, step = run.config, run.variables, run.step
    except (OSError, checkpointing.CheckpointError, runs.EvaluationError) as e:
      print(f'error: {workdir}: {e}', file=sys.stderr)
      return 1
    params = _to_numpy(variables['params'])
    rep = report(params, thresholds)
    rep.update(workdir=workdir, step=int(step))
    reports.append(rep)
    labels.append(_label(config, workdir))
    print(format_report(rep, f'{workdir} (step {step}, {labels[-1]})'))
  try:
    wd.write_json(reports[0] if len(reports) == 1 else reports, output)
  except wd.WorkdirError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {output}')
  if args.plot:
    print(f'wrote {plot(reports, labels, args.plot)}')
  return 0


def _to_numpy(tree):
  """Nested mapping of arrays (jax, replicated) -> nested dict of NumPy."""
  if isinstance(tree, Mapping):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


if __name__ == '__main__':
  sys.exit(main())

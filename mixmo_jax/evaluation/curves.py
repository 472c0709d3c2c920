"""The training curves of a run (PNG): ensemble and member top-1 and NLL
against epoch from its eval_history.jsonl, and the train loss and learning
rate from its TensorBoard event files. Drawn and written like every figure of
`plots` (its size, DPI and extra formats)."""
import os

import numpy as np

from mixmo_jax import events, workdir as wd
from mixmo_jax.evaluation import metrics, plots


def flat_history(records):
  """History records (`workdir.read_history`) flattened and sorted by epoch.

  Metrics may be nested ({"ensemble": {...}, "members": [...]}) or flat
  ("ensemble/top1"). A record without "epoch" falls back to "step".

  Returns:
    list of (epoch float, {flat key: float}).
  """
  out = []
  for record in records:
    flat = metrics.flatten_metrics(record)
    out.append((float(flat.get('epoch', flat.get('step', 0))), flat))
  out.sort(key=lambda r: r[0])
  return out


def _series(records, key, scale=1.0):
  xs = [e for e, flat in records if key in flat]
  ys = [scale * flat[key] for e, flat in records if key in flat]
  return xs, ys


def train_scalars(run_workdir, tags):
  """{tag: ([step], [value])} of the run's TensorBoard scalars (the train/*
  lines `progress.Reporter` writes, read by `events`); {} without event
  files."""
  return events.read_scalars(os.fspath(run_workdir), tags)


def training_curves(run_workdir, path):
  """Ensemble and member top-1 (%) and NLL against epoch, and the training.

  Left: ensemble top-1 (solid) and member top-1 (dashed); middle: ensemble
  NLL, ensemble NLL_c when present, member NLL; right: the train loss
  (cross-entropy of the train step) and the learning rate from the
  TensorBoard event files. Curves whose key is missing from a line simply
  skip that line.

  Args:
    run_workdir: the run's workdir (its eval_history.jsonl is read).
    path: output PNG path.

  Returns:
    path.
  """
  records = flat_history(wd.read_history(run_workdir))
  num_members = 0
  for _, flat in records:
    while f'members/{num_members}/top1' in flat or (f'members/{num_members}/nll'
                                                    in flat):
      num_members += 1
  fig = plots.new_figure(plots.FIGSIZES['training_curves'])
  panels = [('top1', 100.0, 'top-1 (%)'), ('nll', 1.0, 'NLL')]
  for col, (metric, scale, ylabel) in enumerate(panels):
    ax = fig.add_subplot(1, 3, col + 1)
    xs, ys = _series(records, f'ensemble/{metric}', scale)
    ax.plot(xs, ys, '-o', ms=3, color='black', label='ensemble')
    if metric == 'nll':
      xs, ys = _series(records, 'ensemble/nll_c')
      if xs:
        ax.plot(xs, ys, '-', color='tab:gray', label='ensemble NLL$_c$')
    for i in range(num_members):
      xs, ys = _series(records, f'members/{i}/{metric}', scale)
      if xs:
        ax.plot(xs, ys, '--', color=f'C{i % 10}', label=f'member {i}')
    if not records:
      ax.text(0.5, 0.5, 'no evaluations yet', ha='center', va='center',
              transform=ax.transAxes)
    ax.set_xlabel('epoch')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='best')
  _train_panel(fig.add_subplot(1, 3, 3), run_workdir)
  fig.suptitle(
      os.path.basename(os.path.normpath(os.fspath(run_workdir))), fontsize=9)
  fig.tight_layout()
  return plots.save(fig, path)


def _train_panel(ax, run_workdir):
  """Train cross-entropy (left axis) and learning rate (right) vs epoch."""
  history = wd.read_history(run_workdir)
  spe = next((r['step'] / r['epoch'] for r in history if r.get('epoch')), None)
  tags = ('train/cross_entropy', 'train/learning_rate')
  scalars = train_scalars(run_workdir, tags)
  scale = (1.0 / spe) if spe else 1.0
  ax.set_xlabel('epoch' if spe else 'step')
  ax.set_title('training', fontsize=10)
  if tags[0] not in scalars:
    ax.text(0.5, 0.5, 'no train scalars (TensorBoard events)', ha='center',
            va='center', transform=ax.transAxes)
    return
  steps, values = scalars[tags[0]]
  ax.plot(
      np.asarray(steps) * scale, values, '-', color='tab:blue',
      label='train loss (cross-entropy)')
  ax.set_ylabel('train loss')
  ax.grid(alpha=0.3)
  lines = ax.get_legend_handles_labels()
  if tags[1] in scalars:
    twin = ax.twinx()
    steps, values = scalars[tags[1]]
    twin.plot(
        np.asarray(steps) * scale, values, '-', color='tab:orange',
        label='learning rate')
    twin.set_ylabel('learning rate')
    more = twin.get_legend_handles_labels()
    lines = (lines[0] + more[0], lines[1] + more[1])
  ax.legend(*lines, fontsize=8, loc='best')

"""Evaluation figures (PNG): reliability, members vs ensemble, diversity, masks
(the training curves: `curves`).

Every function draws on a fresh `matplotlib.figure.Figure` rendered by the Agg
canvas (no pyplot, no global backend switch, safe in scripts and tests),
writes one PNG of exactly figsize * DPI pixels at `path` (parent folders are
created; inside `extra_formats(['pdf'])` also a PDF of the same name) and
returns `path` as a str.

Shapes: N examples, M members, C classes, K gallery rows, H, W image size,
h, w mask size.
"""
import contextlib
import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mixmo_jax import storage
from mixmo_jax.evaluation import metrics

DPI = 100
FIGSIZES = {
    'reliability_diagram': (4.5, 4.5),
    'member_vs_ensemble': (8.0, 3.5),
    'diversity_accuracy': (5.5, 4.5),
    'training_curves': (14.0, 3.8),
}
GALLERY_CELL_INCHES = 1.5


def new_figure(figsize):
  """An empty figure of `figsize` inches at DPI, drawn by the Agg canvas."""
  fig = Figure(figsize=figsize, dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


# Formats written beside each PNG (same name, other suffix); `extra_formats`.
_EXTRA_FORMATS: list[str] = []
EXTRA_FORMATS_ALLOWED = ('pdf', 'svg')


def check_formats(names):
  """The formats of `names` besides 'png'.

  Raises:
    ValueError: a format that is not png or in EXTRA_FORMATS_ALLOWED.
  """
  bad = [n for n in names if n != 'png' and n not in EXTRA_FORMATS_ALLOWED]
  if bad:
    raise ValueError(f'{bad} not allowed; allowed: png, '
                     f'{", ".join(EXTRA_FORMATS_ALLOWED)}')
  return [n for n in names if n != 'png']


@contextlib.contextmanager
def extra_formats(names):
  """Within the block, every figure is also written as each of `names`
  ('pdf', 'svg': vector copies for a paper), beside its PNG.

  Raises:
    ValueError: a format outside EXTRA_FORMATS_ALLOWED.
  """
  names = check_formats(names)
  saved = list(_EXTRA_FORMATS)
  _EXTRA_FORMATS[:] = names
  try:
    yield
  finally:
    _EXTRA_FORMATS[:] = saved


def save(fig, path):
  """Writes `fig` at `path` (PNG) and each extra format beside it; `path`."""
  path = os.fspath(path)
  storage.save_figure(fig, path, 'png', dpi=DPI)
  for extension in _EXTRA_FORMATS:
    storage.save_figure(fig, f'{os.path.splitext(path)[0]}.{extension}',
                        extension)
  return path


def _percent(value):
  return math.nan if value is None else 100.0 * value


def _num(value):
  return math.nan if value is None else float(value)


def run_title(eval_result):
  """'RUN (step S)' of an eval.json-like dict, '' when it names no run."""
  runs = eval_result.get('workdirs') or []
  names = ', '.join(os.path.basename(os.path.normpath(r)) or r for r in runs)
  step = eval_result.get('steps', eval_result.get('step'))
  if step is not None:
    names = f'{names} (step {step})' if names else f'step {step}'
  return names


def reliability_diagram(log_probs, labels, path, num_bins=15, title=None):
  """Reliability diagram: per-bin accuracy vs confidence, with ECE.

  Bars of acc_b over the B equal-width confidence bins (e_b, e_{b+1}], the
  gap drawn from acc_b to conf_b (red above the bar where the bin is
  over-confident, conf_b > acc_b; green below its top where under-confident),
  the diagonal, and the share of samples per bin. Bins and ECE come from
  `metrics.calibration_bins` and `metrics.ece`, so the figure and eval.json
  agree.

  Args:
    log_probs: [N, C] (ensemble) log-probabilities; labels: [N] int.
    path: output PNG path.
    num_bins: B.
    title: optional prefix of the title.

  Returns:
    path.
  """
  acc, conf, count = (
      np.asarray(x)
      for x in metrics.calibration_bins(log_probs, labels, num_bins))
  ece = float(metrics.ece(log_probs, labels, num_bins))
  edges = metrics.bin_edges(num_bins)
  centers = 0.5 * (edges[:-1] + edges[1:])
  width = 1.0 / num_bins
  filled = count > 0
  fig = new_figure(FIGSIZES['reliability_diagram'])
  ax = fig.add_subplot(1, 1, 1)
  ax.bar(centers[filled], acc[filled], width=width, edgecolor='black',
         color='tab:blue', label='accuracy of the bin')
  gap = conf - acc  # > 0: over-confident; < 0: under-confident.
  for sign, color, label in ((1, 'tab:red', 'over-confident (conf > acc)'),
                             (-1, 'tab:green', 'under-confident (conf < acc)')):
    sel = filled & (sign * gap > 0)
    if sel.any():
      ax.bar(centers[sel], gap[sel], bottom=acc[sel], width=width,
             edgecolor=color, color=color, alpha=0.35, hatch='//', label=label)
  ax.plot([0, 1], [0, 1], '--', color='gray', lw=1, label='perfect calibration')
  share = count / max(count.sum(), 1)
  ax.plot(centers[filled], share[filled], 'k.', ms=4, label='share of samples')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel('confidence')
  ax.set_ylabel('accuracy')
  ax.legend(loc='best', fontsize=7)
  prefix = f'{title}: ' if title else ''
  ax.set_title(f'{prefix}ECE = {ece:.4f} ({num_bins} bins)', fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def member_vs_ensemble(eval_result, path):
  """Bars of each member's and the ensemble's top-1 (%) and NLL.

  Args:
    eval_result: a `metrics.evaluation_metrics` dict.
    path: output PNG path.

  Returns:
    path.
  """
  members = eval_result.get('members', [])
  ens = eval_result.get('ensemble', {})
  names = [f'member {i}' for i in range(len(members))] + ['ensemble']
  colors = ['tab:blue'] * len(members) + ['tab:orange']
  top1 = [_percent(m.get('top1')) for m in members
         ] + [_percent(ens.get('top1'))]
  nll_names = names + (['ensemble\n(TS)']
                       if ens.get('nll_c') is not None else [])
  nll = [_num(m.get('nll')) for m in members] + [_num(ens.get('nll'))]
  if ens.get('nll_c') is not None:
    nll.append(_num(ens['nll_c']))
  fig = new_figure(FIGSIZES['member_vs_ensemble'])
  for col, (label, values, xs, title) in enumerate([
      ('top-1 (%)', top1, names, 'Top-1 accuracy'),
      ('NLL', nll, nll_names, 'Negative log-likelihood')
  ]):
    ax = fig.add_subplot(1, 2, col + 1)
    bars = ax.bar(
        range(len(values)), values,
        color=(colors + ['tab:green'])[:len(values)])
    ax.bar_label(bars, fmt='%.3g', fontsize=7)
    ax.set_xticks(range(len(values)))
    many = len(values) > 4
    ax.set_xticklabels(xs, fontsize=8, rotation=45 if many else 0,
                       ha='right' if many else 'center')
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    if col == 0:
      ax.set_ylim(0.0, 105.0)  # Bars start at 0: heights compare honestly.
  fig.suptitle(run_title(eval_result), fontsize=9)
  fig.tight_layout()
  return save(fig, path)


def diversity_accuracy(results, path):
  """Diversity / accuracy trade-off, one point per run (paper Figs. 7-8).

  x = ratio-error d_re (diversity/ratio_error), y = mean member top-1 (%)
  (circles) and ensemble top-1 (%) (triangles), each labelled with its run
  name. Runs without a ratio-error (M = 1) are left out.

  Args:
    results: dict run name -> `metrics.evaluation_metrics` dict.
    path: output PNG path.

  Returns:
    path.
  """
  fig = new_figure(FIGSIZES['diversity_accuracy'])
  ax = fig.add_subplot(1, 1, 1)
  for i, (name, res) in enumerate(results.items()):
    d_re = res.get('diversity', {}).get('ratio_error')
    member_top1 = [
        m.get('top1')
        for m in res.get('members', [])
        if m.get('top1') is not None
    ]
    if d_re is None or not member_top1:
      continue
    color = f'C{i % 10}'
    y = _percent(float(np.mean(member_top1)))
    y_ens = _percent(res.get('ensemble', {}).get('top1'))
    ax.plot([d_re], [y], 'o', color=color)
    ax.plot([d_re], [y_ens], '^', color=color)
    ax.plot([d_re, d_re], [y, y_ens], ':', color=color, lw=1)
    ax.annotate(
        str(name), (d_re, y), textcoords='offset points', xytext=(4, -10),
        fontsize=8, color=color)
  ax.plot([], [], 'ko', label='mean member top-1')
  ax.plot([], [], 'k^', label='ensemble top-1')
  ax.legend(fontsize=8, loc='best')
  ax.set_xlabel('ratio-error diversity $d_{re}$')
  ax.set_ylabel('top-1 (%)')
  ax.set_title('Diversity / accuracy', fontsize=10)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return save(fig, path)


def upsample_nearest(weights, height, width):
  """Nearest-neighbour resize of masks [..., h, w] -> [..., H, W].

  Output pixel (r, c) reads input (floor((r + 0.5) h / H),
  floor((c + 0.5) w / W)); for H = s h this is np.repeat by s.
  """
  weights = np.asarray(weights)
  h, w = weights.shape[-2:]
  rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
  cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
  return weights[..., rows, :][..., cols]


def _as_unit_float(images):
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return np.clip(images.astype(np.float32), 0.0, 1.0)


def mix_images(member_images, weights):
  """Pixel-space illustration of the mixing block: sum_i w_i * x_i.

  MixMo mixes stem features (M * sum_i w_i l_i, paper eq. 2); in pixels we
  show the partition-of-unity mix sum_i up(w_i) * x_i, which is a valid image.

  Args:
    member_images: [K, M, H, W, 3] uint8 or float in [0, 1].
    weights: [K, M, h, w] (sum_i w_i = 1).

  Returns:
    [K, H, W, 3] float32 in [0, 1].
  """
  x = _as_unit_float(member_images)
  up = upsample_nearest(weights, x.shape[2], x.shape[3]).astype(np.float32)
  return np.clip(np.sum(up[..., None] * x, axis=1), 0.0, 1.0)


def mask_gallery_figsize(num_rows, num_members):
  """(width, height) inches: K rows of M inputs + mask_0 + mixed image."""
  return (GALLERY_CELL_INCHES * (num_members + 2),
          GALLERY_CELL_INCHES * num_rows)


def mask_gallery(member_images, weights, path):
  """Member inputs, member 0's mask and the mixed image (paper Figs. 3, 13).

  Args:
    member_images: [K, M, H, W, 3] uint8 or float in [0, 1].
    weights: [K, M, h, w] mixing weights (masks at the stem resolution,
      resized to H x W by nearest neighbour).
    path: output PNG path.

  Returns:
    path.
  """
  x = _as_unit_float(member_images)
  weights = np.asarray(weights, np.float32)
  num_rows, num_members = x.shape[:2]
  mask0 = upsample_nearest(weights[:, 0], x.shape[2], x.shape[3])
  mixed = mix_images(x, weights)
  fig = new_figure(mask_gallery_figsize(num_rows, num_members))
  cols = num_members + 2
  for k in range(num_rows):
    panels = [(x[k, i], f'input {i}', None) for i in range(num_members)]
    panels += [(mask0[k], 'mask 0', 'gray'), (mixed[k], 'mixed', None)]
    for c, (image, name, cmap) in enumerate(panels):
      ax = fig.add_subplot(num_rows, cols, k * cols + c + 1)
      ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if k == 0:
        ax.set_title(name, fontsize=8)
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92, wspace=0.05,
                      hspace=0.05)
  return save(fig, path)


def write_evaluation_plots(eval_result, log_probs, labels, out_dir,
                           num_bins=15):
  """The figures of `evaluate --plots`.

  Writes out_dir/reliability.png (ensemble, before temperature scaling; its
  ECE is eval.json's ensemble.ece), out_dir/reliability_ts.png (after the
  cross-fitted temperature scaling of NLL_c / ECE_c,
  `metrics.cross_fitted_log_probs`) and out_dir/member_vs_ensemble.png.

  Args:
    eval_result: `metrics.evaluation_metrics` dict.
    log_probs: [N, C] ensemble log-probabilities; labels: [N] int.
    out_dir: folder (created if missing).

  Returns:
    list of the written paths.
  """
  storage.makedirs(out_dir)
  run = run_title(eval_result)
  cal = eval_result.get('calibration', {})
  scaled = metrics.cross_fitted_log_probs(log_probs, labels, cal.get('seed', 0),
                                          cal.get('temperatures'))
  return [
      reliability_diagram(log_probs, labels,
                          os.path.join(out_dir, 'reliability.png'), num_bins,
                          title=f'{run} ensemble' if run else 'ensemble'),
      reliability_diagram(
          scaled, labels, os.path.join(out_dir, 'reliability_ts.png'), num_bins,
          title=(f'{run} ensemble, TS' if run else 'ensemble, TS')),
      member_vs_ensemble(eval_result,
                         os.path.join(out_dir, 'member_vs_ensemble.png')),
  ]

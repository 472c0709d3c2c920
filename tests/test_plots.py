"""Tests for mixmo_jax.plots: files, pixel sizes, and the shared bin logic."""
import json

import numpy as np
import pytest
from PIL import Image

from mixmo_jax.evaluation import metrics
from mixmo_jax import workdir as workdir_lib
from mixmo_jax.evaluation import curves, plots


def _check_png(path, figsize):
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert image.size == (round(figsize[0] * plots.DPI),
                          round(figsize[1] * plots.DPI))
    pixels = np.asarray(image.convert('L'))
  assert pixels.std() > 0  # Something was drawn.


def _fake_run(seed, n=80, m=2, c=5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  z = rng.normal(size=(n, m, c)) + 2.0 * np.eye(c)[labels][:, None]
  return z.astype(np.float32), labels


@pytest.fixture(scope='module')
def run():
  z, labels = _fake_run(0)
  return z, labels, metrics.evaluation_metrics(z, labels)


def test_reliability_bins_are_the_ece_bins():
  # The diagram draws metrics.calibration_bins; ECE is their weighted gap.
  z, labels = _fake_run(1, n=200, m=1, c=10)
  lp = metrics.ensemble_log_probs(z)
  acc, conf, count = (
      np.asarray(x) for x in metrics.calibration_bins(lp, labels, 15))
  assert count.sum() == len(labels)
  assert np.all((acc >= 0) & (acc <= 1))
  # Non-empty bins' mean confidence lies inside their (lo, hi] interval.
  edges = metrics.bin_edges(15)
  filled = count > 0
  assert np.all(conf[filled] > edges[:-1][filled] - 1e-6)
  assert np.all(conf[filled] <= edges[1:][filled] + 1e-6)
  np.testing.assert_allclose(
      float(metrics.ece(lp, labels, 15)),
      np.sum(count / len(labels) * np.abs(acc - conf)), rtol=1e-6)


def test_reliability_diagram(tmp_path, run):
  z, labels, _ = run
  path = plots.reliability_diagram(
      metrics.ensemble_log_probs(z), labels, tmp_path / 'sub' / 'rel.png')
  assert path == str(tmp_path / 'sub' / 'rel.png')
  _check_png(path, plots.FIGSIZES['reliability_diagram'])


def test_extra_formats_write_vector_copies_beside_the_png(tmp_path, run):
  z, labels, _ = run
  log_probs = metrics.ensemble_log_probs(z)
  with plots.extra_formats(['png', 'pdf', 'svg']):
    path = plots.reliability_diagram(log_probs, labels, tmp_path / 'rel.png')
  _check_png(path, plots.FIGSIZES['reliability_diagram'])
  assert (tmp_path / 'rel.pdf').read_bytes()[:5] == b'%PDF-'
  assert b'<svg' in (tmp_path / 'rel.svg').read_bytes()[:2000]
  plots.reliability_diagram(log_probs, labels, tmp_path / 'after.png')
  assert not (tmp_path / 'after.pdf').exists()  # Only inside the block.
  with pytest.raises(ValueError, match="'jpg'"):
    with plots.extra_formats(['jpg']):
      pass


def test_member_vs_ensemble_and_write_evaluation_plots(tmp_path, run):
  z, labels, result = run
  path = plots.member_vs_ensemble(result, tmp_path / 'm.png')
  _check_png(path, plots.FIGSIZES['member_vs_ensemble'])
  paths = plots.write_evaluation_plots(result, metrics.ensemble_log_probs(z),
                                       labels, tmp_path / 'plots')
  assert [p.rsplit('/', 1)[1] for p in paths] == [
      'reliability.png', 'reliability_ts.png', 'member_vs_ensemble.png'
  ]
  _check_png(paths[0], plots.FIGSIZES['reliability_diagram'])
  _check_png(paths[1], plots.FIGSIZES['reliability_diagram'])
  _check_png(paths[2], plots.FIGSIZES['member_vs_ensemble'])


@pytest.mark.parametrize('m', [1, 2, 5])
def test_evaluation_figures_for_1_2_5_members(tmp_path, m):
  z, labels = _fake_run(3, n=80, m=m)
  result = metrics.evaluation_metrics(z, labels)
  result.update(workdirs=['/runs/digits_cut_mixmo'], step=880)
  assert plots.run_title(result) == 'digits_cut_mixmo (step 880)'
  paths = plots.write_evaluation_plots(result, metrics.ensemble_log_probs(z),
                                       labels, tmp_path / f'm{m}')
  for path, name in zip(paths,
                        ['reliability_diagram'] * 2 + ['member_vs_ensemble']):
    _check_png(path, plots.FIGSIZES[name])


def test_cross_fitted_log_probs_give_nll_c():
  z, labels = _fake_run(4, n=200, m=1, c=10)
  lp = np.asarray(metrics.ensemble_log_probs(3.0 * z))
  scaled = metrics.cross_fitted_log_probs(lp, labels, seed=5)
  cal = metrics.calibrated_metrics(lp, labels, seed=5)
  # Equal halves: the pooled NLL is the mean of the halves' NLLs.
  assert float(metrics.nll(scaled, labels)) == pytest.approx(cal['nll_c'])
  np.testing.assert_array_equal(np.argmax(scaled, -1), np.argmax(lp, -1))


def test_diversity_accuracy(tmp_path, run):
  _, _, result = run
  z1, labels1 = _fake_run(2, m=1)
  results = {
      'cut-mixmo': result,
      'linear': metrics.evaluation_metrics(*_fake_run(3)),
      'vanilla (M=1, skipped)': metrics.evaluation_metrics(z1, labels1)
  }
  path = plots.diversity_accuracy(results, tmp_path / 'div.png')
  _check_png(path, plots.FIGSIZES['diversity_accuracy'])


def test_training_curves_nested_flat_and_broken_lines(tmp_path, run):
  _, _, result = run
  lines = []
  for epoch in range(1, 4):
    lines.append(json.dumps({'step': 10 * epoch, 'epoch': epoch, **result}))
  lines.append('')
  lines.append('{not json')
  lines.append(
      json.dumps({
          'step': 40,
          'epoch': 4,
          'ensemble/top1': 0.7,
          'members/0/top1': 0.6
      }))  # Flat, no NLL.
  lines.append(json.dumps({'step': 50}))  # No metrics at all.
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  (run_dir / 'eval_history.jsonl').write_text('\n'.join(lines) + '\n')
  records = curves.flat_history(workdir_lib.read_history(str(run_dir)))
  assert [e for e, _ in records] == [1.0, 2.0, 3.0, 4.0, 50.0]
  assert records[3][1]['ensemble/top1'] == 0.7
  assert records[0][1]['members/1/top1'] == result['members'][1]['top1']
  path = curves.training_curves(str(run_dir), tmp_path / 'curves.png')
  _check_png(path, plots.FIGSIZES['training_curves'])
  empty = tmp_path / 'empty'
  empty.mkdir()
  _check_png(
      curves.training_curves(str(empty), tmp_path / 'empty.png'),
      plots.FIGSIZES['training_curves'])


def test_upsample_nearest_and_pixel_mix():
  rng = np.random.default_rng(4)
  w = rng.uniform(size=(2, 3, 4, 4))
  np.testing.assert_array_equal(
      plots.upsample_nearest(w, 8, 12),
      w.repeat(2, axis=-2).repeat(3, axis=-1))
  assert plots.upsample_nearest(w, 5, 7).shape == (2, 3, 5, 7)
  # Partition of unity: identical member images mix back to the image.
  image = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
  same = np.repeat(image[:, None], 3, axis=1)
  w = w / w.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(plots.mix_images(same, w), image, atol=1e-6)
  # A binary mask selects pixels: member 0 inside the mask, member 1 outside.
  mask = np.zeros((1, 4, 4))
  mask[0, :2] = 1.0
  weights = np.stack([mask, 1.0 - mask], axis=1)
  a = np.zeros((1, 8, 8, 3), np.uint8)
  b = np.full((1, 8, 8, 3), 255, np.uint8)
  mixed = plots.mix_images(np.stack([a, b], axis=1), weights)
  np.testing.assert_array_equal(mixed[0, :4], 0.0)
  np.testing.assert_array_equal(mixed[0, 4:], 1.0)


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_mask_gallery(tmp_path, dtype):
  rng = np.random.default_rng(5)
  k, m, size = 3, 2, 16
  images = rng.uniform(size=(k, m, size, size, 3))
  if dtype == np.uint8:
    images = (255 * images).astype(np.uint8)
  mask = np.zeros((k, 1, 8, 8))  # Stem resolution 8x8 < image 16x16.
  mask[:, :, 2:6, 2:6] = 1.0
  weights = np.concatenate([mask, 1.0 - mask], axis=1)  # Shape: [K, M, h, w].
  path = plots.mask_gallery(images, weights, tmp_path / 'masks.png')
  _check_png(path, plots.mask_gallery_figsize(k, m))
  assert plots.mask_gallery_figsize(k, m) == (plots.GALLERY_CELL_INCHES * 4,
                                              plots.GALLERY_CELL_INCHES * 3)

"""Tests for mixmo_jax.augmix (host-side AugMix, NumPy + PIL)."""
import numpy as np
import pytest
from PIL import Image

from mixmo_jax import augmix

PAPER_OPERATIONS = ['equalize', 'posterize', 'rotate', 'solarize', 'shear_x',
                    'shear_y', 'translate_x', 'translate_y']


def _images(n=4, size=30, seed=0):
  """uint8 [n, size, size, 3] smooth-ish random images."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (n, size // 3, size // 3, 3), dtype=np.uint8)
  return base.repeat(3, axis=1).repeat(3, axis=2)


def test_operations_are_exactly_the_paper_list():
  assert list(augmix.OPERATIONS) == PAPER_OPERATIONS


@pytest.mark.parametrize('name', PAPER_OPERATIONS)
def test_each_operation_runs(name):
  image = _images(1)[0]
  out = augmix.OPERATIONS[name](Image.fromarray(image), 3.0,
                                np.random.default_rng(0))
  array = np.asarray(out)
  assert array.shape == image.shape and array.dtype == np.uint8


def test_solarize_and_posterize_magnitudes():
  image = _images(1)[0]
  rng = np.random.default_rng(0)
  # level 3: solarize threshold 256 - int(3 * 256 / 10) = 180.
  out = np.asarray(augmix.solarize(Image.fromarray(image), 3.0, rng))
  np.testing.assert_array_equal(out, np.where(image >= 180, 255 - image, image))
  # level 3: posterize keeps 4 - int(3 * 4 / 10) = 3 bits.
  out = np.asarray(augmix.posterize(Image.fromarray(image), 3.0, rng))
  np.testing.assert_array_equal(out, image & 0b11100000)


@pytest.mark.parametrize('axis', [0, 1])
def test_translate_shifts_by_level(axis):
  # level 3 on a 30 x 30 image: int(3 * (30 / 3) / 10) = 3 pixels, either sign.
  image = _images(1)[0]
  op = augmix.translate_x if axis == 1 else augmix.translate_y
  out = np.asarray(op(Image.fromarray(image), 3.0, np.random.default_rng(0)))
  candidates = []
  for shift in (3, -3):
    shifted = np.zeros_like(image)
    src = [slice(None)] * 2
    dst = [slice(None)] * 2
    src[axis] = slice(shift, None) if shift > 0 else slice(None, shift)
    dst[axis] = slice(None, -shift) if shift > 0 else slice(-shift, None)
    shifted[tuple(dst)] = image[tuple(src)]
    candidates.append(shifted)
  assert any(np.array_equal(out, c) for c in candidates)


def test_augmix_shape_dtype_and_changes_image():
  image = _images(1)[0]
  out = augmix.augmix(image, np.random.default_rng(0))
  assert out.shape == image.shape and out.dtype == np.uint8
  assert 0 <= out.min() and out.max() <= 255
  assert not np.array_equal(out, image)


def test_augmix_batch_deterministic_from_seed_and_step():
  images = _images(3)
  first = augmix.augmix_batch(images, seed=1, step=5)
  assert first.shape == images.shape and first.dtype == np.uint8
  np.testing.assert_array_equal(first, augmix.augmix_batch(images, 1, 5))
  assert not np.array_equal(first, augmix.augmix_batch(images, 2, 5))
  assert not np.array_equal(first, augmix.augmix_batch(images, 1, 6))


def test_augmix_batch_slices_agree_with_whole_batch():
  """Two hosts augmenting halves give what one host gives for the batch."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  whole = augmix.augmix_batch(images, seed=3, step=7)
  halves = np.concatenate([
      augmix.augmix_batch(images[:2], 3, 7, first_index=0),
      augmix.augmix_batch(images[2:], 3, 7, first_index=2)])
  np.testing.assert_array_equal(whole, halves)


def _patch_operations(monkeypatch, operation):
  monkeypatch.setattr(augmix, '_OPERATION_LIST', (operation,))


def test_chain_lengths(monkeypatch):
  calls = []

  def counting(img, level, rng):
    del rng
    calls.append(level)
    return img

  _patch_operations(monkeypatch, counting)
  image = _images(1)[0]
  augmix.augmix(image, np.random.default_rng(0), severity=3, width=3, depth=4)
  assert len(calls) == 12  # width 3 x depth 4.
  assert all(0.1 <= level <= 3 for level in calls)
  counts = []
  for seed in range(20):
    calls.clear()
    augmix.augmix(image, np.random.default_rng(seed), width=3, depth=-1)
    counts.append(len(calls))
  assert min(counts) >= 3 and max(counts) <= 9 and len(set(counts)) > 1


def test_mixing_formula(monkeypatch):
  image = _images(1)[0]
  # Identity operations: m x + (1 - m) sum_j w_j x = x (weights sum to 1).
  _patch_operations(monkeypatch, lambda img, level, rng: img)
  np.testing.assert_array_equal(
      augmix.augmix(image, np.random.default_rng(3)), image)
  # Black operations: output = round(m x), m ~ Beta drawn after the weights.
  _patch_operations(monkeypatch,
                    lambda img, level, rng: Image.new('RGB', img.size))
  out = augmix.augmix(image, np.random.default_rng(4), width=3)
  replay = np.random.default_rng(4)
  replay.dirichlet([1.0] * 3)
  m = replay.beta(1.0, 1.0)
  np.testing.assert_array_equal(out, np.round(m * image.astype(np.float64)))

"""Tests for mixmo_jax.augment: formulas checked against NumPy, properties."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixmo_jax.data import augment
from mixmo_jax.mixmo import pixel_mix
from mixmo_jax.mixmo import masks

MEAN = (0.4914, 0.4824, 0.4467)
STD = (0.2023, 0.1994, 0.2010)


def _random_images(seed, n, size=8):
  """uint8 [n, size, size, 3] with values in [1, 255] (never the zero pad)."""
  rng = np.random.default_rng(seed)
  return rng.integers(1, 256, (n, size, size, 3), dtype=np.uint8)


def _constant_images(values, size=8):
  """float32 [n, size, size, 3], image n filled with values[n]."""
  values = np.asarray(values, np.float32)
  return np.broadcast_to(values[:, None, None, None],
                         (len(values), size, size, 3)).copy()


# ----------------------------------------------------------------- normalize


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_normalize_matches_numpy(dtype):
  x = _random_images(0, 3).astype(dtype)
  expected = (x.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
  out = augment.normalize(jnp.asarray(x), MEAN, STD)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ crop and flip


def _find_crop(original, output, padding):
  """All (dy, dx, flipped) such that output is that crop of padded original."""
  size = original.shape[0]
  padded = np.pad(original, ((padding, padding), (padding, padding), (0, 0)))
  found = []
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy:dy + size, dx:dx + size]
      for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
        if np.array_equal(candidate, output):
          found.append((dy, dx, flipped))
  return found


def _crops_of_batch(images, outputs, padding):
  """The unique (dy, dx, flipped) of every image; fails if not unique."""
  result = []
  for original, output in zip(images, outputs):
    found = _find_crop(original, output, padding)
    assert len(found) == 1, found
    result.append(found[0])
  return result


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_crop_flip_is_a_shift_of_the_padded_input(dtype):
  images = _random_images(1, 6).astype(dtype)
  out = augment.random_crop_flip(jax.random.key(0), jnp.asarray(images), 4)
  assert out.shape == images.shape and out.dtype == images.dtype
  _crops_of_batch(images, np.asarray(out), 4)


def test_crop_flip_covers_offsets_and_flips_half_the_time():
  images = _random_images(2, 600)
  out = np.asarray(augment.random_crop_flip(jax.random.key(3), images, 4))
  crops = _crops_of_batch(images, out, 4)
  dys, dxs, flips = (np.array(c) for c in zip(*crops))
  assert set(dys) == set(range(9)) and set(dxs) == set(range(9))
  assert len(set(zip(dys, dxs))) > 70  # 81 pairs, about 7 draws each.
  assert abs(flips.mean() - 0.5) < 0.08


def test_crop_without_flip_never_flips_and_handles_leading_dims():
  images = _random_images(3, 12).reshape(4, 3, 8, 8, 3)
  out = augment.random_crop_flip(jax.random.key(1), images, 2, flip=False)
  assert out.shape == images.shape
  crops = _crops_of_batch(
      images.reshape(12, 8, 8, 3),
      np.asarray(out).reshape(12, 8, 8, 3), 2)
  assert not any(flipped for _, _, flipped in crops)


def test_crop_flip_deterministic_and_jit_equals_eager():
  images = jnp.asarray(_random_images(4, 16))
  key = jax.random.key(7)
  eager = augment.random_crop_flip(key, images, 4)
  jitted = jax.jit(augment.random_crop_flip,
                   static_argnames=('padding', 'flip'))(key, images, padding=4)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
  again = augment.random_crop_flip(key, images, 4)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(again))
  other = augment.random_crop_flip(jax.random.key(8), images, 4)
  assert not np.array_equal(np.asarray(eager), np.asarray(other))


# --------------------------------------------------------------- box masks


def _numpy_box(lam, cy, cx, height, width):
  """Independent CutMix box (pasted region) written with slicing."""
  cut = np.sqrt(1.0 - lam)
  half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
  mask = np.zeros((height, width), np.float32)
  mask[max(cy - half_h, 0):max(min(cy + half_h, height), 0),
       max(cx - half_w, 0):max(min(cx + half_w, width), 0)] = 1.0
  return mask


def test_box_mask_matches_numpy_rule():
  rng = np.random.default_rng(0)
  lam = rng.uniform(0, 1, 50).astype(np.float32)
  cy = rng.integers(0, 8, 50)
  cx = rng.integers(0, 12, 50)
  out = np.asarray(masks.box_mask(1.0 - lam, cy, cx, 8, 12))
  assert out.shape == (50, 8, 12)
  for n in range(50):
    np.testing.assert_array_equal(out[n], _numpy_box(lam[n], cy[n], cx[n], 8,
                                                     12))


def test_box_mask_hand_worked():
  # lam = 0.75: side floor(8 * 0.5) = 4, half 2; centre (1, 6): rows [0, 3)
  # after clipping, columns [4, 8).
  out = np.asarray(masks.box_mask(0.25, 1, 6, 8, 8))
  expected = np.zeros((8, 8))
  expected[0:3, 4:8] = 1
  np.testing.assert_array_equal(out, expected)


def test_resize_nearest_repeats_cells():
  masks = np.random.default_rng(0).uniform(size=(2, 3, 4, 4)).astype(np.float32)
  out = np.asarray(pixel_mix.resize_nearest(jnp.asarray(masks), 8, 8))
  np.testing.assert_array_equal(out,
                                masks.repeat(2, axis=-2).repeat(2, axis=-1))
  same = np.asarray(pixel_mix.resize_nearest(jnp.asarray(masks), 4, 4))
  np.testing.assert_array_equal(same, masks)


# ------------------------------------------------------------ mixup/cutmix

# Jitted once per (dtype, per_sample), alpha and prob always passed as
# traced scalars: few compilations (each Beta sampler costs seconds).
_mixup = jax.jit(pixel_mix.mixup, static_argnames=('per_sample',))
_cutmix = jax.jit(pixel_mix.cutmix, static_argnames=('per_sample',))


def _pixel_mixing_setup(dtype=np.float32, n=16):
  """Constant images with distinct values 10 * (c + 1); image c has label c."""
  values = 10.0 * (np.arange(n) + 1)
  return values, _constant_images(values).astype(dtype), np.eye(
      n, dtype=np.float32)


@pytest.mark.parametrize('per_sample', [False, True])
def test_mixup_pixels_follow_targets(per_sample):
  values, images, onehot = _pixel_mixing_setup()
  out, targets = _mixup(
      jax.random.key(0), images, onehot, 1.0, 1.0, per_sample=per_sample)
  out, targets = np.asarray(out), np.asarray(targets)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  # Image c is constant values[c] with label c: pixel = sum_c y[c] values[c].
  np.testing.assert_allclose(out[:, 0, 0, 0], targets @ values, rtol=1e-5)
  assert np.allclose(out, out[:, :1, :1, :1])  # Still constant images.
  own = np.diag(targets)
  mixed = own < 1.0
  assert mixed.sum() >= 10  # A random permutation moves most samples.
  if per_sample:
    assert len(np.unique(np.round(own[mixed], 5))) > 1
  else:
    assert len(np.unique(np.round(own[mixed], 5))) == 1


def test_mixup_prob_zero_is_identity():
  _, images, onehot = _pixel_mixing_setup()
  out, targets = _mixup(
      jax.random.key(1), images, onehot, 1.0, 0.0, per_sample=False)
  np.testing.assert_array_equal(np.asarray(out), images)
  np.testing.assert_array_equal(np.asarray(targets), onehot)


@pytest.mark.parametrize('per_sample', [False, True])
def test_cutmix_pixel_shares_equal_targets(per_sample):
  values, images, onehot = _pixel_mixing_setup(np.uint8)
  for seed in range(3):
    out, targets = _cutmix(
        jax.random.key(seed), images, onehot, 1.0, 1.0, per_sample=per_sample)
    assert out.dtype == jnp.uint8
    out, targets = np.asarray(out), np.asarray(targets)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # Share of pixels showing image c equals the target weight of label c.
    shares = (out[..., 0][:, None] == values[None, :, None, None]).mean((2, 3))
    np.testing.assert_allclose(shares, targets, atol=1e-6)
    pasted = out[..., 0] != images[..., 0]  # [B, H, W].
    moved = pasted.any((1, 2))
    if not per_sample and moved.any():
      # One box for the whole batch.
      reference = pasted[moved][0]
      assert all(np.array_equal(p, reference) for p in pasted[moved])


def test_cutmix_prob_zero_is_identity():
  _, images, onehot = _pixel_mixing_setup(np.uint8)
  out, targets = _cutmix(
      jax.random.key(0), images, onehot, 1.0, 0.0, per_sample=False)
  np.testing.assert_array_equal(np.asarray(out), images)
  np.testing.assert_array_equal(np.asarray(targets), onehot)


# ------------------------------------------------------ CutMix with MixMo


def _hand_worked_case():
  """B = 2, M = 2, 8 x 8 images, C = 4: masks and expected results by hand.

  Own images are constant 1.0, other images constant 2.0; own labels 0,
  other labels 3.
    (0, 0): MixMo mask = left half (32 px); box rows 0:4, cols 0:2 pasted
            (8 px, all visible): lam' = 24 / 32 = 0.75, no swap.
    (0, 1): MixMo mask = right half; box rows 0:6, cols 2:8 pasted; visible
            pasted part rows 0:6, cols 4:8 = 24 px: lam' = 8 / 32 = 0.25
            -> swap: own image inside the box, lam' = 0.75
            (mean(1_m) would give 1 - 36 / 64 = 0.4375 -> 0.5625).
    (1, 0): linear weights 0.3 everywhere; box rows 2:6, cols 2:6 pasted
            (16 px): lam' = 48 / 64 = 0.75.
    (1, 1): not applied: unchanged, target one-hot.
  """
  keep = np.ones((2, 2, 8, 8), np.float32)
  keep[0, 0, 0:4, 0:2] = 0
  keep[0, 1, 0:6, 2:8] = 0
  keep[1, 0, 2:6, 2:6] = 0
  keep[1, 1, 0:4, 0:4] = 0
  visible = np.zeros((2, 2, 8, 8), np.float32)
  visible[0, 0, :, :4] = 1
  visible[0, 1, :, 4:] = 1
  visible[1] = 0.3
  apply = np.array([[True, True], [True, False]])
  expected_own = np.array([[0.75, 0.75], [0.75, 1.0]])
  expected_images = np.ones((2, 2, 8, 8), np.float32)
  expected_images[0, 0, 0:4, 0:2] = 2.0
  expected_images[0, 1] = 2.0
  expected_images[0, 1, 0:6, 2:8] = 1.0
  expected_images[1, 0, 2:6, 2:6] = 2.0
  return keep, visible, apply, expected_own, expected_images


def test_apply_cutmix_for_mixmo_hand_worked():
  keep, visible, apply, expected_own, expected_images = _hand_worked_case()
  own_images = np.ones((2, 2, 8, 8, 3), np.float32)
  other_images = 2.0 * own_images
  own_targets = np.broadcast_to(np.eye(4)[0], (2, 2, 4))
  other_targets = np.broadcast_to(np.eye(4)[3], (2, 2, 4))
  images, targets = pixel_mix.apply_cutmix_for_mixmo(own_images, own_targets,
                                                     other_images,
                                                     other_targets, keep,
                                                     visible, apply)
  np.testing.assert_array_equal(np.asarray(images)[..., 0], expected_images)
  np.testing.assert_allclose(
      np.asarray(targets)[..., 0], expected_own, rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(targets)[..., 3], 1 - expected_own, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(targets)[..., 1:3], 0.0)


def test_apply_cutmix_for_mixmo_invisible_member_uses_mask_mean():
  keep = np.ones((1, 1, 8, 8), np.float32)
  keep[..., :2, :] = 0  # lam' = mean(1_m) = 0.75.
  visible = np.zeros((1, 1, 8, 8), np.float32)
  _, targets = pixel_mix.apply_cutmix_for_mixmo(
      np.zeros((1, 1, 8, 8, 3)),
      np.eye(2)[None, None, 0], np.ones((1, 1, 8, 8, 3)),
      np.eye(2)[None, None, 1], keep, visible, np.ones((1, 1), bool))
  np.testing.assert_allclose(np.asarray(targets)[0, 0], [0.75, 0.25])


def _random_cut_weights(rng, batch_size, h):
  """[B, 2, h, h] binary complementary MixMo masks (random clipped boxes)."""
  boxes = [
      _numpy_box(rng.uniform(), rng.integers(h), rng.integers(h), h, h)
      for _ in range(batch_size)
  ]
  box = np.stack(boxes)
  return np.stack([box, 1.0 - box], axis=1)


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _jitted_cutmix_for_mixmo(key, own, own_labels, other, other_labels, weights,
                             num_classes, prob):
  return pixel_mix.cutmix_for_mixmo(key, own, own_labels, other, other_labels,
                                    weights, num_classes, prob=prob, alpha=1.0)


def _statistical_case(prob, seed=0, batch_size=128):
  """Constant images (value = label + 1), MixMo masks at half resolution."""
  rng = np.random.default_rng(seed)
  own_labels = rng.integers(0, 5, (batch_size, 2))
  other_labels = (own_labels + rng.integers(1, 5, (batch_size, 2))) % 5
  own = _constant_images(own_labels.ravel() + 1.0).reshape(
      batch_size, 2, 8, 8, 3)
  other = _constant_images(other_labels.ravel() + 1.0).reshape(
      batch_size, 2, 8, 8, 3)
  weights = _random_cut_weights(rng, batch_size, 4)
  images, targets = _jitted_cutmix_for_mixmo(
      jax.random.key(seed), own, own_labels, other, other_labels, weights, 5,
      np.float32(prob))
  return (np.asarray(images)[..., 0], np.asarray(targets), own[..., 0],
          own_labels, other_labels, weights)


def test_cutmix_for_mixmo_targets_match_visible_pixels():
  images, targets, own, own_labels, other_labels, weights = _statistical_case(
      1.0)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  own_weight = np.take_along_axis(targets, own_labels[..., None], -1)[..., 0]
  other_weight = np.take_along_axis(targets, other_labels[..., None], -1)[...,
                                                                          0]
  np.testing.assert_allclose(own_weight + other_weight, 1.0, rtol=1e-6)
  assert (own_weight >= 0.5).all()
  # Independent lam': share of own pixels among those the upsampled MixMo
  # mask lets through.
  visible = weights.repeat(2, axis=-2).repeat(2, axis=-1)
  is_own = (images == own).astype(np.float64)
  total = visible.sum((-2, -1))
  share = np.where(total > 0, (is_own * visible).sum(
      (-2, -1)) / np.maximum(total, 1e-12), is_own.mean((-2, -1)))
  np.testing.assert_allclose(own_weight, share, atol=1e-5)
  assert (own_weight < 1.0).mean() > 0.5  # CutMix really happened.


def test_cutmix_for_mixmo_probability():
  images, targets, own, own_labels, _, _ = _statistical_case(0.0, seed=1)
  np.testing.assert_array_equal(images, own)
  np.testing.assert_array_equal(targets, np.eye(5)[own_labels])
  images, _, own, _, _, _ = _statistical_case(0.5, seed=2)
  changed = (images != own).any((-2, -1)).mean()
  # 0.5 x P(non-empty box) = 0.5 x 15/16 on 8 x 8 images; 256 draws.
  assert 0.35 < changed < 0.6


def test_cutmix_for_mixmo_deterministic_from_key():
  first = _statistical_case(0.5, seed=3)
  second = _statistical_case(0.5, seed=3)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])

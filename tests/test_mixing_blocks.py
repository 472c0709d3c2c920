"""Tests for mixmo_jax/mixmo/masks.py and the Table 2 blocks of blocks.py."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mixmo_jax import mixmo
from mixmo_jax.mixmo import blocks
from mixmo_jax.mixmo import masks as masks_lib

NAMES = ('horizontal_concat', 'vertical_concat', 'patchup', 'fmix', 'cowmask')
# B, h, w: non-square to catch axis mix-ups, B large enough for statistics.
BINARY_SHAPES = (128, 12, 16)
KEY = jax.random.PRNGKey(3)

# Compiling is the cost here (each Dirichlet sampler takes ~1.5 s of CPU to
# compile alone); all blocks are compiled together, once, in one jit.


@functools.cache
def _all_blocks_jitted():
  """jit of (key, alpha, p) -> {'name/M': (weights, kappa)}.

  Every block for M in 1, 2, 3 at BINARY_SHAPES.
  """
  b, h, w = BINARY_SHAPES

  def run(key, alpha, p):
    return {
        f'{name}/{m}': mixmo.get_mixing(name)(key, b, m, h, w, alpha=alpha, p=p)
        for name in NAMES for m in (1, 2, 3)
    }

  return jax.jit(run)


def _block_outputs(name, num_members, key=KEY, alpha=2.0, p=1.0):
  outputs = _all_blocks_jitted()(key, jnp.float32(alpha), jnp.float32(p))
  return outputs[f'{name}/{num_members}']


def _stats_outputs(name, alpha=2.0):
  return _block_outputs(name, 2, key=jax.random.PRNGKey(9), alpha=alpha)


def _components(mask):
  """Number of 4-connected components of the 1-region plus the 0-region."""
  mask = np.asarray(mask, bool)
  return ndimage.label(mask)[1] + ndimage.label(~mask)[1]


def _components_count(masks):
  """[B] component counts of a batch of masks [B, h, w]."""
  return np.array([_components(m) for m in masks])


def _member_masks(weights):
  """Members whose weights are binary over the whole batch (mask owners)."""
  w = np.asarray(weights)
  binary = np.all((w == 0) | (w == 1), axis=(0, 2, 3))  # Shape: [M].
  return np.flatnonzero(binary)


# ----------------------------------------------------------------------------
# Registry, shapes, partition of unity, kappa.
# ----------------------------------------------------------------------------


def test_registered_under_table2_names():
  for name in NAMES:
    assert name in mixmo.mixing_names()
  assert mixmo.get_mixing('fmix') is blocks.fmix_mixing
  assert mixmo.get_mixing('cowmask') is blocks.cowmask_mixing
  b, h, w = BINARY_SHAPES
  weights, kappa = mixmo.sample_mixing_weights(KEY, b, 2, h, w, method='fmix',
                                               alpha=2.0, p=0.5)
  jit_weights, jit_kappa = _block_outputs('fmix', 2)
  np.testing.assert_array_equal(weights, jit_weights)
  np.testing.assert_allclose(kappa, jit_kappa, atol=1e-7)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('num_members', [1, 2, 3])
def test_partition_binary_and_kappa(name, num_members):
  b, h, w = BINARY_SHAPES
  weights, kappa = _block_outputs(name, num_members)
  assert weights.shape == (b, num_members, h, w)
  assert kappa.shape == (b, num_members)
  assert weights.dtype == jnp.float32 and kappa.dtype == jnp.float32
  weights, kappa = np.asarray(weights), np.asarray(kappa)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(kappa, weights.mean(axis=(2, 3)), atol=1e-6)
  assert np.all(weights >= 0)
  if num_members == 1:
    np.testing.assert_array_equal(weights, 1.0)
    np.testing.assert_array_equal(kappa, 1.0)
    return
  owners = _member_masks(weights)
  if num_members == 2:
    assert set(np.unique(weights)) <= {0.0, 1.0}
    np.testing.assert_array_equal(weights[:, 0], 1.0 - weights[:, 1])
    return
  # M = 3: one member k (the same for the whole batch) owns a binary mask;
  # on its complement the others' weights are constant in space (eq. 7).
  assert len(owners) == 1, owners
  k = owners[0]
  mask = weights[:, k]
  others = [i for i in range(num_members) if i != k]
  for i in others:
    np.testing.assert_array_equal(weights[:, i][mask == 1], 0.0)
    for s in range(b):
      outside = weights[s, i][mask[s] == 0]
      if outside.size:
        np.testing.assert_allclose(outside, outside[0], atol=1e-6)
  mixed = np.abs(weights[:, others] - 0.5) < 0.5 - 1e-4
  assert np.all(mixed | (mask[:, None] == 1))  # Shared, not binary.


def test_complement_shares_follow_kappa_ratio():
  kappa = jnp.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
  mask = jnp.zeros((2, 2, 2)).at[:, 0, 0].set(1.0)
  weights = np.asarray(blocks.mask_weights(mask, kappa, jnp.int32(1)))
  # Member 1 owns the mask; members 0 and 2 split the rest 0.2:0.3, 0.6:0.3.
  np.testing.assert_allclose(weights[0, :, 1, 1], [0.4, 0.0, 0.6], atol=1e-6)
  np.testing.assert_allclose(weights[1, :, 1, 1], [2 / 3, 0.0, 1 / 3],
                             atol=1e-6)
  np.testing.assert_array_equal(weights[:, :, 0, 0], [[0, 1, 0], [0, 1, 0]])


def test_invalid_num_members():
  with pytest.raises(ValueError):
    blocks.fmix_mixing(jax.random.PRNGKey(0), 2, 0, 4, 4, alpha=2.0, p=0.5)


# ----------------------------------------------------------------------------
# Determinism, jit, p.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', NAMES)
def test_deterministic_jit_matches_eager_p_switches_to_linear(name):
  b, h, w = BINARY_SHAPES
  eager_w, eager_k = mixmo.get_mixing(name)(KEY, b, 2, h, w, alpha=2.0, p=1.0)
  jit_w, jit_k = _block_outputs(name, 2)
  np.testing.assert_array_equal(eager_w, jit_w)
  np.testing.assert_allclose(eager_k, jit_k, atol=1e-7)
  # p = 0: Linear-MixMo (weights constant over space, equal to kappa), with
  # the same compiled function (p is traced).
  linear_w, linear_k = _block_outputs(name, 2, p=0.0)
  np.testing.assert_allclose(
      linear_w,
      np.broadcast_to(np.asarray(linear_k)[:, :, None, None], linear_w.shape),
      atol=1e-6)
  assert not np.array_equal(jit_w, linear_w)
  other_w, _ = _block_outputs(name, 2, key=jax.random.PRNGKey(8))
  assert not np.array_equal(jit_w, other_w)


# ----------------------------------------------------------------------------
# Concatenation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('axis', [0, 1])
def test_concat_masks_area_and_split(axis):
  b, h, w = 64, 12, 16
  area = jax.random.uniform(jax.random.PRNGKey(1), (b,))
  masks = np.asarray(
      masks_lib.concat_masks(jax.random.PRNGKey(2), area, h, w, axis=axis))
  length = w if axis == 1 else h
  lines = masks[:, 0, :] if axis == 1 else masks[:, :, 0]  # [B, L]
  # The mask depends only on the column (axis=1) or the row (axis=0).
  expanded = (lines[:, None, :] if axis == 1 else lines[:, :, None])
  np.testing.assert_array_equal(masks, np.broadcast_to(expanded, masks.shape))
  expected = np.round(np.asarray(area) * length)
  np.testing.assert_array_equal(lines.sum(axis=1), expected)
  firsts = lasts = 0
  for row, n in zip(lines, expected.astype(int)):
    prefix = np.r_[np.ones(n), np.zeros(length - n)]
    if np.array_equal(row, prefix):
      firsts += 1
    else:
      np.testing.assert_array_equal(row, prefix[::-1])
      lasts += 1
  assert firsts > 10 and lasts > 10  # Both sides are used.


@pytest.mark.parametrize('name,axis', [('horizontal_concat', 1),
                                       ('vertical_concat', 0)])
def test_concat_block_is_a_straight_split(name, axis):
  b, h, w = BINARY_SHAPES
  weights, kappa = _block_outputs(name, 2)
  mask = np.asarray(weights[:, 0])
  # Vertical line (axis=1): every row equal; horizontal line: every column.
  reference = mask[:, :1, :] if axis == 1 else mask[:, :, :1]
  np.testing.assert_array_equal(mask, np.broadcast_to(reference, mask.shape))
  lines = reference.reshape(b, -1)
  assert np.all(np.abs(np.diff(lines, axis=1)).sum(axis=1) <= 1)  # 1 cut.
  assert np.all(_components_count(mask) <= 2)
  np.testing.assert_allclose(kappa[:, 0], lines.mean(axis=1), atol=1e-6)


# ----------------------------------------------------------------------------
# PatchUp.
# ----------------------------------------------------------------------------


def _opening(mask, size):
  """Union of the (clipped) size x size all-ones squares inside `mask`."""
  square = np.ones((size, size), bool)
  cores = ndimage.binary_erosion(mask, square, border_value=1)
  return ndimage.binary_dilation(cores, square, border_value=0)


PATCHUP_AREA = 0.5


@functools.cache
def _patchup_masks():
  """[256, 32, 32] PatchUp masks of target area 0.5 (a 32 x 32 CIFAR map)."""
  area = jnp.full((256,), PATCHUP_AREA)
  return np.asarray(
      masks_lib.patchup_masks(jax.random.PRNGKey(1), area, 32, 32))


def test_patchup_masks_are_unions_of_blocks():
  s = masks_lib.PATCHUP_BLOCK_SIZE
  masks = _patchup_masks()[:32].astype(bool)
  assert set(np.unique(_patchup_masks())) == {0.0, 1.0}
  for m in masks:
    np.testing.assert_array_equal(_opening(m, s), m)
  # Control: i.i.d. noise of the same area is not made of 7 x 7 blocks.
  noise = np.random.default_rng(0).random((32, 32)) < masks.mean()
  assert not np.array_equal(_opening(noise, s), noise)


def test_patchup_area_matches_dropblock_gamma():
  """Mean mask area = 1 - (1 - gamma)^(seeds covering each pixel)."""
  h, w, s, area = 32, 32, 7, PATCHUP_AREA
  masks = _patchup_masks()
  gamma = area * h * w / (s * s * (h - s + 1) * (w - s + 1))

  def cover(length):  # Number of seed positions whose clipped square hits i.
    i = np.arange(length)
    return np.minimum(i + s // 2, length - 1) - np.maximum(i - s // 2, 0) + 1

  expected = np.mean(1 - (1 - gamma)**np.outer(cover(h), cover(w)))
  assert abs(float(np.mean(masks)) - expected) < 0.02, (float(np.mean(masks)),
                                                        expected)


def test_patchup_block_clipped_on_small_maps():
  masks = masks_lib.patchup_masks(
      jax.random.PRNGKey(2), jnp.full((4,), 0.5), 4, 5)
  assert masks.shape == (4, 4, 5)
  assert set(np.unique(np.asarray(masks))) <= {0.0, 1.0}


# ----------------------------------------------------------------------------
# FMix.
# ----------------------------------------------------------------------------


def test_top_fraction_masks_match_numpy_sort():
  b, h, w = 16, 6, 7
  values = jax.random.normal(jax.random.PRNGKey(0), (b, h, w))
  fraction = jnp.linspace(0.0, 1.0, b)
  masks = np.asarray(masks_lib.top_fraction_masks(values, fraction))
  for v, f, m in zip(np.asarray(values), np.asarray(fraction), masks):
    n = int(np.round(np.float32(f) * np.float32(h * w)))
    expected = np.zeros(h * w)
    expected[np.argsort(-v.ravel(), kind='stable')[:n]] = 1
    np.testing.assert_array_equal(m.ravel(), expected)


def test_low_frequency_maps_spectrum_decays():
  """Power spectrum of G ~ |f|^(-2 delta): a log-log slope of -6."""
  b, h, w = BINARY_SHAPES
  maps = masks_lib.low_frequency_maps(jax.random.PRNGKey(0), b, h, w)
  assert maps.shape == (b, h, w) and maps.dtype == jnp.float32
  power = np.mean(np.abs(np.fft.fft2(np.asarray(maps, np.float64)))**2, 0)
  freq = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
  nonzero = freq > 0
  slope = np.polyfit(np.log(freq[nonzero]), np.log(power[nonzero]), 1)[0]
  assert abs(slope + 2 * masks_lib.FMIX_DECAY_POWER) < 0.3, slope


def test_fmix_masks_exact_area_and_mean():
  b, h, w = BINARY_SHAPES
  area = jax.random.uniform(jax.random.PRNGKey(4), (b,))
  masks = np.asarray(masks_lib.fmix_masks(jax.random.PRNGKey(5), area, h, w))
  np.testing.assert_array_equal(
      masks.sum(axis=(1, 2)), np.round(np.asarray(area) * (h * w)))
  _, kappa = _stats_outputs('fmix')
  # Beta(2, 2) has mean 0.5 and std 0.22: 128 samples give std 0.02.
  assert abs(float(np.mean(kappa[:, 0])) - 0.5) < 0.07
  assert float(np.std(kappa[:, 0])) > 0.15


# ----------------------------------------------------------------------------
# CowMask.
# ----------------------------------------------------------------------------


def test_gaussian_smooth_matches_zero_padded_convolution():
  b, h, w, max_sigma = 3, 10, 13, 4.0
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (b, h, w)))
  sigma = np.array([0.7, 2.0, 4.0], np.float32)
  out = np.asarray(
      masks_lib.gaussian_smooth(
          jnp.asarray(images), jnp.asarray(sigma), max_sigma))
  radius = math.ceil(3 * max_sigma)
  taps = np.arange(-radius, radius + 1)
  for x, s, o in zip(images.astype(np.float64), sigma, out):
    g = np.exp(-taps**2 / (2 * s * s)) / np.sqrt(2 * np.pi * s * s)
    kernel = np.outer(g, g)
    padded = np.pad(x, radius)
    expected = np.zeros_like(x)
    for i in range(h):
      for j in range(w):
        window = padded[i:i + 2 * radius + 1, j:j + 2 * radius + 1]
        expected[i, j] = np.sum(window * kernel)
    np.testing.assert_allclose(o, expected, rtol=1e-4, atol=1e-5)


def test_cowmask_proportion_ignores_kappa():
  _, h, w = BINARY_SHAPES
  for alpha in (0.2, 2.0):
    weights, kappa = _stats_outputs('cowmask', alpha)
    owners = _member_masks(weights)
    assert len(owners) == 2  # M = 2: both members binary.
    area = np.asarray(weights).mean(axis=(2, 3))
    np.testing.assert_allclose(area, kappa, atol=1e-6)
    # The owner's share is q ~ U[0.2, 0.8] whatever alpha (Beta(0.2, 0.2)
    # would put most kappas near 0 or 1); the other member's is 1 - q.
    tol = 1.0 / (h * w)
    assert np.all((kappa >= 0.2 - tol) & (kappa <= 0.8 + tol))
    assert kappa.min() < 0.25 and kappa.max() > 0.75


@pytest.mark.parametrize('name', ['fmix', 'cowmask'])
def test_regions_are_contiguous(name):
  b = 64
  weights, kappa = _stats_outputs(name)
  masks = np.asarray(weights[:b, 0])
  rng = np.random.default_rng(0)
  noise = rng.random(masks.shape) < np.asarray(kappa[:b, :1, None])
  ours = _components_count(masks).mean()
  iid = _components_count(noise).mean()
  assert ours < 0.25 * iid, (ours, iid)
  assert ours < 8

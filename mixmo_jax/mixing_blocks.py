"""The binary mixing blocks of MixMo Table 2 (paper Sec. 4.3.2, Appendix 6.7).

Each block is registered in `mixmo_jax.mixing` under the name given below and
has the mixing-block signature

    fn(key, batch_size, num_members, height, width, *, alpha, p)
        -> (weights [B, M, h, w] float32, kappa [B, M] float32)

(B batch, M members, h x w the mixing map, i.e. the stems' output).

  'horizontal_concat'  left/right split by a vertical line (Summers & Dinneen
                       2019, "Improved mixed-example data augmentation").
  'vertical_concat'    top/bottom split by a horizontal line (same source).
  'patchup'            PatchUp 2D (Faramarzi et al. 2020), a DropBlock
                       (Ghiasi et al. 2018) canvas of square blocks.
  'fmix'               FMix (Harris et al. 2020): top-kappa fraction of a
                       low-pass filtered Gaussian field.
  'cowmask'            CowMask (French et al. 2020, "Milking CowMask for
                       semi-supervised image classification"): a thresholded
                       Gaussian-blurred noise field.

The CutMix block (Yun et al. 2019) is 'cut' in `mixmo_jax.mixing`.

Common construction (all blocks, M >= 2), following paper eq. 2 (M = 2) and
eq. 7 (M > 2):

  kappa ~ Dir_M(alpha) per sample (Beta(alpha, alpha) for M = 2),
  one member k drawn uniformly *per batch* (the reference code shuffles the
  members' roles once per batch) receives a binary mask 1_m [B, h, w] of
  nominal area kappa_k (CowMask: a proportion of its own, see below),

    weights_k = 1_m,
    weights_i = (1 - 1_m) * kappa_i / (1 - kappa_k)      for i != k,

  and the kappa returned to the loss is re-read as the weights' spatial
  means, kappa_i = mean_{h, w} weights_i (the boundary adjustment of the
  reference code).  For M = 2 the weights are binary: member k owns the mask,
  the other member its complement.  For M = 1 weights and kappa are 1.

`p` is the probability, per batch, of applying the block's mask; otherwise
Linear-MixMo is used (`linear_fallback`), exactly like 'cut' (Algorithm 1
line 12) and like the reference configs of Table 2 (a block with probability
p, linear mixing otherwise).  p = 1 applies the mask in every batch.
`alpha` may be a traced scalar; B, M, h, w are static.

Importing this module registers the blocks.  It imports `mixmo_jax.mixing`
at the top, which is safe when `mixing.py` imports this module at its end:
whichever of the two is imported first, `register_mixing` is defined before
the decorators below run.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from mixmo_jax import mixing as _mixing

Array = jax.Array

# PatchUp / DropBlock block side (PatchUp's and the MixMo code's default).  The
# MixMo CIFAR mask lives on the 32 x 32 stem output, where 7 is the reference
# value; on smaller maps the block is clipped to min(7, h, w).
PATCHUP_BLOCK_SIZE = 7
# FMix spectrum decay: the amplitude at frequency f is scaled by 1 / f**delta.
FMIX_DECAY_POWER = 3.0
# CowMask settings of the MixMo reference code (in pixels of the mixing map):
# sigma log-uniform in [4, 16], proportion uniform in [0.2, 0.8].
COWMASK_SIGMA_RANGE = (4.0, 16.0)
COWMASK_PROPORTION_RANGE = (0.2, 0.8)


# ----------------------------------------------------------------------------
# From a binary mask to member weights (eq. 2, eq. 7).
# ----------------------------------------------------------------------------


def _complement_shares(kappa: Array, member: Array) -> Array:
  """Shares of the members other than k on the mask's complement (eq. 7).

  share_i = kappa_i / sum_{j != k} kappa_j  (= kappa_i / (1 - kappa_k)) for
  i != k and 0 for k.  Rows whose other kappas all vanish share equally.

  Args:
    kappa: [B, M] mixing ratios.
    member: int scalar k.

  Returns:
    [B, M] float32, rows summing to 1 (M >= 2).
  """
  num_members = kappa.shape[1]
  is_k = jnp.arange(num_members) == member  # Shape: [M].
  others = jnp.where(is_k[None, :], 0.0, kappa)
  total = jnp.sum(others, axis=-1, keepdims=True)  # Shape: [B, 1].
  safe_total = jnp.where(total > 0, total, 1.0)
  # A sole holder (always for M = 2) gets exactly 1 so that masks stay binary.
  shares = jnp.where(others == total, 1.0, others / safe_total)
  uniform = jnp.where(is_k, 0.0, 1.0 / max(num_members - 1, 1))
  return jnp.where(total > 0, shares, uniform[None, :]).astype(jnp.float32)


def mask_weights(mask: Array, kappa: Array, member: Array) -> Array:
  """Member weights from a binary mask given to member k (eqs. 2 and 7).

    weights_k = mask,   weights_i = (1 - mask) kappa_i / (1 - kappa_k).

  Args:
    mask: [B, h, w] binary float mask of member k.
    kappa: [B, M] mixing ratios (only the ratios among i != k matter).
    member: int scalar k.

  Returns:
    float32 [B, M, h, w], summing to 1 over M at every location.
  """
  num_members = kappa.shape[1]
  mask = mask.astype(jnp.float32)[:, None]  # Shape: [B, 1, h, w].
  is_k = (jnp.arange(num_members) == member).astype(jnp.float32)
  shares = _complement_shares(kappa, member)[:, :, None, None]
  return mask * is_k[None, :, None, None] + (1.0 - mask) * shares


MaskFn = Callable[[Array, Array, int, int], Array]


def _binary_block(key: Array, batch_size: int, num_members: int, height: int,
                  width: int, alpha, make_mask: MaskFn) -> Tuple[Array, Array]:
  """Shared driver: kappa, member k per batch, mask of area kappa_k, weights.

  Args:
    make_mask: `(key, area [B], h, w) -> [B, h, w]` binary float mask.

  Returns:
    weights [B, M, h, w] and kappa [B, M] (the weights' spatial means).
  """
  if num_members < 1:
    raise ValueError(f'num_members must be >= 1, got {num_members}.')
  if num_members == 1:
    ones = jnp.ones((batch_size, 1, height, width), jnp.float32)
    return ones, jnp.ones((batch_size, 1), jnp.float32)
  key_kappa, key_member, key_mask = jax.random.split(key, 3)
  kappa = _mixing.sample_kappa(key_kappa, batch_size, num_members, alpha)
  member = jax.random.randint(key_member, (), 0, num_members)
  area = jnp.take(kappa, member, axis=1)  # Shape: [B].
  mask = make_mask(key_mask, area, height, width)
  weights = mask_weights(mask, kappa, member)
  return weights, jnp.mean(weights, axis=(2, 3))


# ----------------------------------------------------------------------------
# Concatenation masks (Summers & Dinneen 2019).
# ----------------------------------------------------------------------------


def concat_masks(key: Array, area: Array, height: int, width: int, *,
                 axis: int) -> Array:
  """Half-plane masks: a straight cut across the map, one per sample.

  Along `axis` (1: columns, a vertical line; 0: rows, a horizontal line) of
  length L, the first n = round(area * L) lines (ties to even: the integer
  area closest to `area`) are 1; with probability 1/2 per sample the mask is
  mirrored (the last n lines are 1), so a member gets either side.  (The
  reference code uses n = floor(area * L) and mirrors per sample too.)

  Args:
    key: PRNG key.
    area: [B] nominal area ratios in [0, 1].
    height, width: static map size h, w.
    axis: 1 for a left/right split, 0 for a top/bottom split.

  Returns:
    float32 [B, h, w]; every mask has mean n / L.
  """
  if axis not in (0, 1):
    raise ValueError(f'axis must be 0 (rows) or 1 (columns), got {axis}.')
  length = width if axis == 1 else height
  area = jnp.clip(jnp.asarray(area, jnp.float32), 0.0, 1.0)
  num_lines = jnp.round(area * length).astype(jnp.int32)[:, None]  # [B, 1]
  mirror = jax.random.bernoulli(key, 0.5, area.shape)[:, None]  # [B, 1]
  line = jnp.arange(length, dtype=jnp.int32)[None, :]  # Shape: [1, L].
  first = line < num_lines
  last = line >= length - num_lines
  inside = jnp.where(mirror, last, first).astype(jnp.float32)  # [B, L]
  if axis == 1:
    return jnp.broadcast_to(inside[:, None, :], area.shape + (height, width))
  return jnp.broadcast_to(inside[:, :, None], area.shape + (height, width))


# ----------------------------------------------------------------------------
# PatchUp / DropBlock masks (Faramarzi et al. 2020; Ghiasi et al. 2018).
# ----------------------------------------------------------------------------


def patchup_gamma(area, height: int, width: int, block_size: int):
  """DropBlock's seed rate for a target area (Ghiasi et al. 2018, eq. 1).

    gamma = area * h w / (s^2 (h - s + 1) (w - s + 1)),   s = block_size,

  clipped to [0, 1].  (s^2 seeds' worth of pixels per seed, seeds counted
  on the (h - s + 1)(w - s + 1) positions where a block fits; overlaps
  make the realised area smaller than `area`, e.g. about 0.53 in the
  interior for area 0.5 and s = 7.)
  """
  s = block_size
  scale = height * width / (s * s * (height - s + 1) * (width - s + 1))
  return jnp.clip(jnp.asarray(area, jnp.float32) * scale, 0.0, 1.0)


def patchup_masks(key: Array, area: Array, height: int, width: int,
                  block_size: int = PATCHUP_BLOCK_SIZE) -> Array:
  """PatchUp 2D masks: unions of s x s squares around Bernoulli seeds.

  A canvas of seeds ~ Ber(gamma) (`patchup_gamma`) over all h x w positions;
  each seed at (y, x) sets the square [y - s//2, y - s//2 + s) x
  [x - s//2, x - s//2 + s), clipped at the borders, to 1 (a stride-1 max
  pool with padding s//2, as in the PatchUp and MixMo code).  One 2-D mask
  for all channels ("PatchUp 2D": the paper found it better than PatchUp's
  per-channel masks).  s = min(block_size, h, w).

  Args:
    key: PRNG key.
    area: [B] target area ratios (DropBlock's 1 - keep_prob).
    height, width: static map size h, w.
    block_size: static block side s.

  Returns:
    float32 [B, h, w] binary masks.
  """
  s = int(min(block_size, height, width))
  if s < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}.')
  gamma = patchup_gamma(area, height, width, s)  # Shape: [B].
  seeds = jax.random.bernoulli(
      key, gamma[:, None, None], (gamma.shape[0], height, width))
  before, after = s // 2, s - 1 - s // 2
  # Output (y, x) is 1 if a seed lies in [y - after, y + before] (same in x):
  # the seed's square covers [seed - before, seed + after].
  return jax.lax.reduce_window(
      seeds.astype(jnp.float32), 0.0, jax.lax.max,
      window_dimensions=(1, s, s), window_strides=(1, 1, 1),
      padding=((0, 0), (after, before), (after, before)))


# ----------------------------------------------------------------------------
# Quantile thresholding, shared by FMix and CowMask.
# ----------------------------------------------------------------------------


def top_fraction_masks(values: Array, fraction: Array) -> Array:
  """1 on the n = round(fraction * h w) largest values of each map.

  The exact per-sample quantile: pixels are ranked by sorting (ties broken
  by position), so every mask has exactly n ones.

  Args:
    values: [B, h, w] real maps.
    fraction: [B] fractions in [0, 1].

  Returns:
    float32 [B, h, w] binary masks with mean n / (h w).
  """
  batch_size, height, width = values.shape
  size = height * width
  flat = values.reshape(batch_size, size)
  order = jnp.argsort(-flat, axis=-1)  # Descending order, stable.
  ranks = jnp.argsort(order, axis=-1)  # Rank of each pixel, 0 = largest.
  fraction = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
  count = jnp.round(fraction * size).astype(jnp.int32)[:, None]  # [B, 1]
  return (ranks < count).astype(jnp.float32).reshape(values.shape)


# ----------------------------------------------------------------------------
# FMix masks (Harris et al. 2020).
# ----------------------------------------------------------------------------


def low_frequency_maps(key: Array, batch_size: int, height: int, width: int,
                       decay_power: float = FMIX_DECAY_POWER) -> Array:
  """Low-pass filtered Gaussian fields G (FMix, Harris et al. 2020, Sec. 3).

  A complex spectrum Z[f] = (a + i b) / max(|f|, 1 / max(h, w))^delta with
  a, b ~ N(0, 1) i.i.d. on the rfft2 frequency grid |f| = sqrt(fy^2 + fx^2)
  (cycles per pixel), then G = Re(irfft2(Z)).

  Returns:
    float32 [B, h, w].
  """
  freq_y = jnp.fft.fftfreq(height)[:, None]  # Shape: [h, 1].
  freq_x = jnp.fft.rfftfreq(width)[None, :]  # Shape: [1, w // 2 + 1].
  freq = jnp.sqrt(freq_y ** 2 + freq_x ** 2)
  scale = 1.0 / jnp.maximum(freq, 1.0 / max(height, width)) ** decay_power
  shape = (batch_size,) + freq.shape
  key_re, key_im = jax.random.split(key)
  spectrum = scale * jax.lax.complex(
      jax.random.normal(key_re, shape), jax.random.normal(key_im, shape))
  field = jnp.fft.irfft2(spectrum, s=(height, width), axes=(-2, -1))
  return field.astype(jnp.float32)


def fmix_masks(key: Array, area: Array, height: int, width: int,
               decay_power: float = FMIX_DECAY_POWER) -> Array:
  """FMix masks: the top-`area` fraction of a low-frequency field.

  1_m = 1[G >= the (1 - area) quantile of G], with exactly
  round(area * h w) ones (`top_fraction_masks`), G from
  `low_frequency_maps`.

  Args:
    key: PRNG key.
    area: [B] area ratios (kappa_k ~ Beta(alpha, alpha) for M = 2).
    height, width: static map size h, w.

  Returns:
    float32 [B, h, w] binary masks.
  """
  field = low_frequency_maps(key, area.shape[0], height, width, decay_power)
  return top_fraction_masks(field, area)


# ----------------------------------------------------------------------------
# CowMask masks (French et al. 2020).
# ----------------------------------------------------------------------------


def _gaussian_matrices(sigma: Array, size: int, radius: int) -> Array:
  """[B, size, size] Toeplitz matrices of 1-D Gaussians g(i - j).

  g(d) = exp(-d^2 / (2 sigma^2)) / sqrt(2 pi sigma^2) for |d| <= radius, 0
  beyond: multiplying by it is a zero-padded 1-D convolution.
  """
  pos = jnp.arange(size, dtype=jnp.float32)
  offset = pos[:, None] - pos[None, :]  # Shape: [size, size].
  var = (sigma.astype(jnp.float32) ** 2)[:, None, None]  # Shape: [B, 1, 1].
  kernel = jnp.exp(-offset[None] ** 2 / (2.0 * var)) / jnp.sqrt(
      2.0 * jnp.pi * var)
  return jnp.where(jnp.abs(offset)[None] <= radius, kernel, 0.0)


def gaussian_smooth(images: Array, sigma: Array, max_sigma: float) -> Array:
  """Per-sample separable Gaussian blur with zero padding.

    out[b] = K_h(sigma_b) @ images[b] @ K_w(sigma_b)^T,

  K the `_gaussian_matrices`, truncated at radius ceil(3 max_sigma) (the
  reference kernel has 2 ceil(3 sigma_max) + 1 taps).  This equals a 2-D
  convolution of the zero-padded map with the separable kernel g(dy) g(dx).

  Args:
    images: [B, h, w].
    sigma: [B] standard deviations in pixels.
    max_sigma: static upper bound of sigma (sets the truncation radius).

  Returns:
    float32 [B, h, w].
  """
  _, height, width = images.shape
  radius = int(math.ceil(3.0 * max_sigma))
  rows = _gaussian_matrices(sigma, height, radius)  # Shape: [B, h, h].
  cols = _gaussian_matrices(sigma, width, radius)  # Shape: [B, w, w].
  return jnp.einsum('bij,bjk,blk->bil', rows, images.astype(jnp.float32),
                    cols, precision=jax.lax.Precision.HIGHEST)


def cow_masks(key: Array, batch_size: int, height: int, width: int,
              sigma_range=COWMASK_SIGMA_RANGE,
              proportion_range=COWMASK_PROPORTION_RANGE) -> Array:
  """CowMask (French et al. 2020): thresholded Gaussian-blurred noise.

  Per sample: proportion q ~ U[q_min, q_max], sigma = exp(U[log s_min,
  log s_max]), noise ~ N(0, 1)^{h x w}, S = gaussian_smooth(noise, sigma),
  1_m = 1 on the round(q h w) *smallest* values of S (the reference keeps
  S <= threshold).

  The reference codes (MixMo, Milking CowMask) set the threshold to
  mean(S) + sqrt(2) erfinv(2 q - 1) std(S), a Gaussian approximation whose
  realised proportion drifts from q on small maps; here the threshold is the
  exact per-sample quantile, so the mask mean is q up to 1 / (h w).

  Returns:
    float32 [B, h, w] binary masks.
  """
  key_q, key_sigma, key_noise = jax.random.split(key, 3)
  q_min, q_max = proportion_range
  proportion = jax.random.uniform(
      key_q, (batch_size,), minval=q_min, maxval=q_max)
  s_min, s_max = sigma_range
  sigma = jnp.exp(jax.random.uniform(
      key_sigma, (batch_size,), minval=math.log(s_min),
      maxval=math.log(s_max)))
  noise = jax.random.normal(key_noise, (batch_size, height, width))
  smooth = gaussian_smooth(noise, sigma, max_sigma=s_max)
  return top_fraction_masks(-smooth, proportion)


def linear_fallback(block):
  """Applies `block` with probability p per batch, else Linear-MixMo.

  The same switch as 'cut' (Algorithm 1 line 12: 1_binary ~ Ber(p)), which
  the reference code also applies to the Table 2 blocks (their configs
  replace the block by linear mixing with probability 1 - p); p = 1 gives
  the block alone. p is traced (no recompilation when it changes).
  """

  @functools.wraps(block)
  def wrapped(key, batch_size, num_members, height, width, *, alpha, p):
    k_block, k_linear, k_use = jax.random.split(key, 3)
    weights, kappa = block(k_block, batch_size, num_members, height, width,
                           alpha=alpha, p=p)
    if num_members == 1:
      return weights, kappa
    lin_weights, lin_kappa = _mixing.linear_mixing(
        k_linear, batch_size, num_members, height, width, alpha=alpha, p=p)
    use = jax.random.uniform(k_use, ()) < jnp.asarray(p, jnp.float32)
    return (jnp.where(use, weights, lin_weights),
            jnp.where(use, kappa, lin_kappa))

  return wrapped


# ----------------------------------------------------------------------------
# Registered blocks.
# ----------------------------------------------------------------------------


@_mixing.register_mixing('horizontal_concat')
@linear_fallback
def horizontal_concat_mixing(key, batch_size, num_members, height, width, *,
                             alpha, p):
  """Horizontal concatenation (Summers & Dinneen 2019; paper App. 6.7).

  A vertical line splits the map: member k owns the round(kappa_k w)
  leftmost columns, or (per sample, probability 1/2) the rightmost ones
  (`concat_masks`, axis=1); the others share the rest (eq. 7).
  kappa ~ Dir_M(alpha) (Beta(alpha, alpha) for M = 2); the returned kappa
  is the weights' mean.  With probability 1 - p
  (per batch) Linear-MixMo instead (`linear_fallback`).

  Naming follows the paper's text ("draws a vertical line such that every
  pixel to the left belongs to one sample").  The reference code's
  'stackhorizontal' splits dim 1 of a (C, H, W) mask, i.e. rows: there
  the names are the other way round.
  """
  del p
  return _binary_block(
      key, batch_size, num_members, height, width, alpha,
      lambda k, a, h, w: concat_masks(k, a, h, w, axis=1))


@_mixing.register_mixing('vertical_concat')
@linear_fallback
def vertical_concat_mixing(key, batch_size, num_members, height, width, *,
                           alpha, p):
  """Vertical concatenation (Summers & Dinneen 2019; paper App. 6.7).

  A horizontal line splits the map: member k owns the round(kappa_k h)
  top rows, or (per sample, probability 1/2) the bottom ones
  (`concat_masks`, axis=0); the others share the rest (eq. 7).  With
  probability 1 - p (per batch) Linear-MixMo instead.  See `horizontal_concat_mixing` on naming.
  """
  del p
  return _binary_block(
      key, batch_size, num_members, height, width, alpha,
      lambda k, a, h, w: concat_masks(k, a, h, w, axis=0))


@_mixing.register_mixing('patchup')
@linear_fallback
def patchup_mixing(key, batch_size, num_members, height, width, *, alpha,
                   p):
  """PatchUp 2D (Faramarzi et al. 2020) from DropBlock (Ghiasi et al. 2018).

  Member k owns a union of s x s squares (s = PATCHUP_BLOCK_SIZE = 7,
  clipped to the map) grown from seeds ~ Ber(gamma), gamma =
  kappa_k h w / (s^2 (h - s + 1)(w - s + 1)) (`patchup_masks`); the others
  share the rest (eq. 7).  The mask's mean (returned as kappa) is not
  kappa_k: overlaps and borders shrink it.  With probability 1 - p
  (per batch) Linear-MixMo instead (`linear_fallback`).
  """
  del p
  return _binary_block(key, batch_size, num_members, height, width, alpha,
                       patchup_masks)


@_mixing.register_mixing('fmix')
@linear_fallback
def fmix_mixing(key, batch_size, num_members, height, width, *, alpha, p):
  """FMix (Harris et al. 2020).

  Member k owns the top round(kappa_k h w) pixels of a low-pass field with
  spectrum decay 1 / f^3 (`fmix_masks`); the others share the rest (eq. 7).
  With probability 1 - p (per batch) Linear-MixMo instead
  (`linear_fallback`).
  """
  del p
  return _binary_block(key, batch_size, num_members, height, width, alpha,
                       fmix_masks)


@_mixing.register_mixing('cowmask')
@linear_fallback
def cowmask_mixing(key, batch_size, num_members, height, width, *, alpha, p):
  """CowMask (French et al. 2020), with the MixMo reference's settings.

  Member k owns a cow-spotted region (`cow_masks`: sigma log-uniform in
  [4, 16] pixels, proportion q ~ U[0.2, 0.8]); the others share the rest
  with ratios kappa_i / (1 - kappa_k) (eq. 7).

  As in the official MixMo code, the region's proportion is CowMask's own
  q, *not* kappa_k (the paper's App. 6.7 describes binary masks of area
  kappa): kappa ~ Dir_M(alpha) only sets the split of the complement for
  M > 2.  The returned kappa is the weights' mean (q up to 1 / (h w) for
  member k).  With probability 1 - p
  (per batch) Linear-MixMo instead (`linear_fallback`).
  """
  del p
  return _binary_block(
      key, batch_size, num_members, height, width, alpha,
      lambda k, a, h, w: cow_masks(k, a.shape[0], h, w))

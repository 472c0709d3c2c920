"""Binary masks [B, h, w] of the mixing blocks and of in-pixel CutMix.

Every sampler here returns float32 masks, 1 where the mask's owner is kept,
drawn independently per sample from a PRNG key:

  box_mask / random_box_masks  the CutMix box (Yun et al. 2019), the ONE box
                               rule of Cut-MixMo (Algorithm 1 line 21) and of
                               in-pixel CutMix (Appendix 6.4)
  concat_masks                 a straight cut across the map (Summers &
                               Dinneen 2019; Table 2 concatenations)
  patchup_masks                PatchUp 2D / DropBlock canvases (Faramarzi et
                               al. 2020; Ghiasi et al. 2018)
  fmix_masks                   FMix (Harris et al. 2020)
  cow_masks                    CowMask (French et al. 2020)

Settings of the MixMo reference code are module constants.  Shapes: B batch,
h x w the mask (the stem's output for MixMo, the image for in-pixel CutMix).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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
# The box rule (CutMix, Yun et al. 2019), shared by Cut-MixMo and CutMix.
# ----------------------------------------------------------------------------


def box_mask(area, center_y, center_x, height: int, width: int) -> Array:
  """The CutMix box of nominal area ratio `area` around a given centre.

  The reference rule (CutMix code, MixMo code): half sides
  floor(floor(H * sqrt(area)) / 2) and floor(floor(W * sqrt(area)) / 2),
  i.e. sides rounded down to an even number of pixels, the box
  [cy - s_h/2, cy + s_h/2) x [cx - s_w/2, cx + s_w/2) clipped at the borders.
  Clipping makes the box smaller than drawn when the centre is near a border:
  callers re-read the area from the mask (the boundary adjustment).

  Args:
    area: float [...], nominal area ratios in [0, 1].
    center_y: int [...], box centre rows in [0, H).
    center_x: int [...], box centre columns in [0, W).
    height, width: static map size H, W.

  Returns:
    float32 [..., H, W], 1 inside the box and 0 outside.
  """
  side = jnp.sqrt(jnp.clip(jnp.asarray(area, jnp.float32), 0.0, 1.0))
  half_h = (jnp.floor(height * side).astype(jnp.int32) // 2)[..., None]
  half_w = (jnp.floor(width * side).astype(jnp.int32) // 2)[..., None]
  cy = jnp.asarray(center_y, jnp.int32)[..., None]
  cx = jnp.asarray(center_x, jnp.int32)[..., None]
  rows = jnp.arange(height, dtype=jnp.int32)
  cols = jnp.arange(width, dtype=jnp.int32)
  in_rows = ((rows >= jnp.clip(cy - half_h, 0, height))
             & (rows < jnp.clip(cy + half_h, 0, height)))  # [..., H]
  in_cols = ((cols >= jnp.clip(cx - half_w, 0, width))
             & (cols < jnp.clip(cx + half_w, 0, width)))  # [..., W]
  box = in_rows[..., :, None] & in_cols[..., None, :]  # Shape: [..., H, W].
  return box.astype(jnp.float32)


def random_box_masks(key: Array, area, height: int, width: int) -> Array:
  """`box_mask` with integer centres uniform over the whole map.

  cy ~ U{0..H-1}, cx ~ U{0..W-1} per mask, as in the reference codes.  With
  area ~ Beta(2, 2) on 32 x 32 the clipped box's mean is about 0.306
  (variance about 0.0234), not 0.5: that is the published method.

  Args:
    key: PRNG key.
    area: float [...] nominal area ratios (any shape, e.g. [B] or [B, M]).
    height, width: static map size.

  Returns:
    float32 [..., H, W].
  """
  shape = jnp.shape(area)
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, shape, 0, height)
  cx = jax.random.randint(key_x, shape, 0, width)
  return box_mask(area, cy, cx, height, width)


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
  seeds = jax.random.bernoulli(key, gamma[:, None, None],
                               (gamma.shape[0], height, width))
  before, after = s // 2, s - 1 - s // 2
  # Output (y, x) is 1 if a seed lies in [y - after, y + before] (same in x):
  # the seed's square covers [seed - before, seed + after].
  return jax.lax.reduce_window(
      seeds.astype(jnp.float32), 0.0, jax.lax.max, window_dimensions=(1, s, s),
      window_strides=(1, 1, 1),
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
  freq = jnp.sqrt(freq_y**2 + freq_x**2)
  scale = 1.0 / jnp.maximum(freq, 1.0 / max(height, width))**decay_power
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
  var = (sigma.astype(jnp.float32)**2)[:, None, None]  # Shape: [B, 1, 1].
  kernel = jnp.exp(-offset[None]**2 /
                   (2.0 * var)) / jnp.sqrt(2.0 * jnp.pi * var)
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
  return jnp.einsum('bij,bjk,blk->bil', rows, images.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST)


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
  proportion = jax.random.uniform(key_q, (batch_size,), minval=q_min,
                                  maxval=q_max)
  s_min, s_max = sigma_range
  sigma = jnp.exp(
      jax.random.uniform(key_sigma, (batch_size,), minval=math.log(s_min),
                         maxval=math.log(s_max)))
  noise = jax.random.normal(key_noise, (batch_size, height, width))
  smooth = gaussian_smooth(noise, sigma, max_sigma=s_max)
  return top_fraction_masks(-smooth, proportion)

"""The mixing blocks: kappa, mask weights, the linear fallback, the registry.

Every block follows the contract of `registry` (weights [B, M, h, w] summing
to 1 over members, kappa [B, M] their spatial means) and is built from three
pieces:

  sample_kappa   kappa ~ Dir_M(alpha) per sample (Beta(alpha, alpha) for
                 M = 2; paper Appendix 6.3)
  mask_weights   a binary mask given to one member k, its complement shared
                 by the others with ratios kappa_i / (1 - kappa_k) (eq. 2 for
                 M = 2, eq. 7 for M > 2)
  mask_block     the driver of every binary block: per batch a member k drawn
                 uniformly (for M = 2 this is Algorithm 1's 1_outside swap of
                 the mask and its complement), a mask of nominal area kappa_k,
                 and with probability 1 - p the linear mixing of the same
                 kappa instead (Algorithm 1 line 12, 1_binary ~ Ber(p); the
                 reference code applies the same switch to Table 2's blocks).
                 When the mask is used, kappa is re-read as the weights'
                 spatial means (the boundary adjustment of the reference).

Built-in blocks (`config.mixing.method`):
  'sum'                MIMO (Havasi et al. 2021): weights = kappa = 1/M.
  'linear'             Linear-MixMo (eq. 6): weights = kappa, constant in space.
  'cut'                Cut-MixMo (eq. 2, eq. 7, Algorithm 1): the CutMix box.
  'top_bottom_concat'  a horizontal cut line (Table 2 "horizontal concat.", the
                       official code's `stackhorizontal`); alias
                       'vertical_concat' (this package's name before 0.2).
  'left_right_concat'  a vertical cut line (Table 2 "vertical concat.", the
                       official `stackvertical`); alias 'horizontal_concat'.
  'patchup'            PatchUp 2D (Faramarzi et al. 2020).
  'fmix'               FMix (Harris et al. 2020).
  'cowmask'            CowMask (French et al. 2020): the mask's proportion is
                       CowMask's own q ~ U[0.2, 0.8], not kappa_k, as in the
                       official code (the paper's App. 6.7 describes masks of
                       area kappa); kappa only splits the complement (M > 2).

Shapes: B batch, M members, h x w the mixing map.  B, M, h, w are static;
alpha and p may be traced.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mixmo_jax.mixmo import masks
from mixmo_jax.mixmo.registry import register_alias, register_mixing

Array = jax.Array
MaskFn = Callable[[Array, Array, int, int], Array]


def sample_kappa(key: Array, batch_size: int, num_members: int, alpha) -> Array:
  """Mixing ratios kappa[b] ~ Dir_M(alpha) (Beta(alpha, alpha) for M = 2).

  Paper Appendix 6.3.  Returns float32 [B, M], rows summing to 1
  (for M = 1 the degenerate Dir_1 = 1, without sampling).
  """
  if num_members == 1:
    return jnp.ones((batch_size, 1), jnp.float32)
  alpha = jnp.asarray(alpha, jnp.float32)
  concentration = jnp.full((num_members,), alpha, jnp.float32)
  kappa = jax.random.dirichlet(key, concentration, shape=(batch_size,))
  return kappa.astype(jnp.float32)  # Shape: [B, M].


def constant_weights(kappa: Array, height: int, width: int) -> Array:
  """Linear mixing weights: [B, M] -> [B, M, h, w], kappa broadcast."""
  return jnp.broadcast_to(kappa[:, :, None, None],
                          kappa.shape + (height, width)).astype(jnp.float32)


def complement_shares(kappa: Array, member: Array) -> Array:
  """Shares of the members other than k on the mask's complement (eq. 7).

  share_i = kappa_i / sum_{j != k} kappa_j  (= kappa_i / (1 - kappa_k)) for
  i != k and 0 for k.  Rows whose other kappas all vanish (an underflow of
  the Dirichlet sampler) share equally.

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
  # XLA may divide as x * (1 / x): make a sole holder (always for M = 2)
  # exactly 1 so that M = 2 masks stay binary.
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
  shares = complement_shares(kappa, member)[:, :, None, None]
  return mask * is_k[None, :, None, None] + (1.0 - mask) * shares


def mask_block(make_mask: MaskFn):
  """A mixing block from a mask sampler `(key, area [B], h, w) -> [B, h, w]`.

  Per sample kappa ~ Dir_M(alpha); per batch a member k ~ U{0..M-1} and
  1_binary ~ Ber(p).  If 1_binary: weights = `mask_weights` of a mask of
  nominal area kappa_k, and kappa is re-read as the weights' means;
  otherwise Linear-MixMo with the same kappa.  For M = 1 the weights are 1.
  """

  def block(key, batch_size, num_members, height, width, *, alpha, p):
    if num_members < 1:
      raise ValueError(f'num_members must be >= 1, got {num_members}.')
    key_kappa, key_member, key_mask, key_binary = jax.random.split(key, 4)
    kappa = sample_kappa(key_kappa, batch_size, num_members, alpha)
    linear = constant_weights(kappa, height, width)
    if num_members == 1:
      return linear, kappa
    member = jax.random.randint(key_member, (), 0, num_members)
    area = jnp.take(kappa, member, axis=1)  # Shape: [B].
    patched = mask_weights(
        make_mask(key_mask, area, height, width), kappa, member)
    use_mask = jax.random.uniform(key_binary, ()) < jnp.asarray(p, jnp.float32)
    weights = jnp.where(use_mask, patched, linear)
    kappa = jnp.where(use_mask, jnp.mean(patched, axis=(2, 3)), kappa)
    return weights, kappa

  return block


@register_mixing('sum')
def sum_mixing(key, batch_size, num_members, height, width, *, alpha,
               p) -> tuple[Array, Array]:
  """MIMO (Havasi et al.): l = M * sum_i (1/M) l_i = sum_i l_i.

  weights = kappa = 1/M; key, alpha and p are unused.
  """
  del key, alpha, p
  kappa = jnp.full((batch_size, num_members), 1.0 / num_members, jnp.float32)
  return constant_weights(kappa, height, width), kappa


@register_mixing('linear')
def linear_mixing(key, batch_size, num_members, height, width, *, alpha,
                  p) -> tuple[Array, Array]:
  """Linear-MixMo (eq. 6): l = M * sum_i kappa_i l_i, kappa ~ Dir_M(alpha).

  For M = 2, kappa_0 ~ Beta(alpha, alpha) and kappa_1 = 1 - kappa_0.
  Weights are kappa broadcast over space; p is unused.
  """
  del p
  kappa = sample_kappa(key, batch_size, num_members, alpha)
  return constant_weights(kappa, height, width), kappa


cut_mixing = register_mixing('cut')(mask_block(masks.random_box_masks))
top_bottom_concat_mixing = register_mixing('top_bottom_concat')(
    mask_block(lambda k, a, h, w: masks.concat_masks(k, a, h, w, axis=0)))
left_right_concat_mixing = register_mixing('left_right_concat')(
    mask_block(lambda k, a, h, w: masks.concat_masks(k, a, h, w, axis=1)))
patchup_mixing = register_mixing('patchup')(mask_block(masks.patchup_masks))
fmix_mixing = register_mixing('fmix')(mask_block(masks.fmix_masks))
cowmask_mixing = register_mixing('cowmask')(
    mask_block(lambda k, a, h, w: masks.cow_masks(k, a.shape[0], h, w)))

# Names of this package before 0.2, which followed the paper's prose (a
# "horizontal concatenation" puts the images side by side): they keep their
# old geometry.  Table 2's rows were trained with the official code's names,
# the other way round (see `top_bottom_concat` above).
register_alias('horizontal_concat', 'left_right_concat')
register_alias('vertical_concat', 'top_bottom_concat')

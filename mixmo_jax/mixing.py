"""Mixing blocks of MixMo: mixing ratios kappa, masks, batches of member inputs.

A *mixing block* decides, for every sample of a batch, how the M member
encodings l_i = c_i(x_i) are combined into the shared representation

    l = M * sum_i weights_i * l_i                       (paper eqs. 2, 6, 7)

at the stem's output resolution h x w.  It is a function

    fn(key, batch_size, num_members, height, width, *, alpha, p)
        -> (weights [B, M, h, w] float32, kappa [B, M] float32)

with sum_i weights[b, i] == 1 at every location and kappa[b, i] the mean of
weights[b, i] over (h, w) (member i's effective share, the input of the loss
reweighting w_r).  `alpha` is the concentration of the Dirichlet / Beta
mixing ratios and `p` the probability of patch (binary) mixing; both may be
traced scalars: changing them does not recompile a jitted caller.

Built-in blocks (select with `config.mixing.method`):
  'sum'     MIMO: weights = kappa = 1/M.
  'linear'  Linear-MixMo (eq. 6): kappa ~ Dir_M(alpha) (Beta(alpha, alpha) for
            M = 2), weights constant over space.
  'cut'     Cut-MixMo (eq. 2, eq. 7, Algorithm 1): per batch, with
            probability p a box mask, otherwise 'linear'.

A researcher adds a block from their own code, without editing the package:

    @mixing.register_mixing('my_block')
    def my_block(key, batch_size, num_members, height, width, *, alpha, p):
        ...
        return weights, kappa

and selects it with `--config.mixing.method=my_block`.

Shapes: B batch, M members, h x w the mixing map (stem output).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
MixingFn = Callable[..., Tuple[Array, Array]]

_MIXING_REGISTRY: Dict[str, MixingFn] = {}


class UnknownMixingError(KeyError, ValueError):
  """Raised by `get_mixing` for a name that is not registered.

  Subclasses both KeyError and ValueError so either `except` catches it.
  """

  def __str__(self):  # KeyError would quote the whole message.
    return str(self.args[0]) if self.args else ''


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------


def register_mixing(name: str, *, overwrite: bool = False):
  """Decorator registering a mixing block under `name`.

  The block has signature
  `fn(key, batch_size, num_members, height, width, *, alpha, p)
   -> (weights [B, M, h, w], kappa [B, M])`.
  Registering an existing name raises ValueError unless `overwrite=True`
  (useful when a notebook cell is re-run).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'Mixing name must be a non-empty string, got {name!r}.')

  def decorator(fn: MixingFn) -> MixingFn:
    if name in _MIXING_REGISTRY and not overwrite:
      raise ValueError(
          f'Mixing block {name!r} is already registered; pass '
          'overwrite=True to replace it.')
    _MIXING_REGISTRY[name] = fn
    return fn

  return decorator


def mixing_names() -> Tuple[str, ...]:
  """Sorted names of all registered mixing blocks."""
  return tuple(sorted(_MIXING_REGISTRY))


def get_mixing(name: str) -> MixingFn:
  """Returns the mixing block registered as `name`.

  Raises:
    UnknownMixingError (a KeyError and a ValueError) listing the known names.
  """
  try:
    return _MIXING_REGISTRY[name]
  except KeyError:
    raise UnknownMixingError(
        f'Unknown mixing method {name!r}; known: {", ".join(mixing_names())}. '
        'Register new ones with mixmo_jax.mixing.register_mixing(name).'
    ) from None


def sample_mixing_weights(key: Array, batch_size: int, num_members: int,
                          height: int, width: int, *, method: str, alpha,
                          p) -> Tuple[Array, Array]:
  """Samples mixing weights with the block registered as `method`.

  Args:
    key: PRNG key.
    batch_size, num_members, height, width: static ints B, M, h, w.
    method: registered block name (static).
    alpha: Dirichlet / Beta concentration (float or traced scalar).
    p: probability of patch mixing (float or traced scalar).

  Returns:
    weights [B, M, h, w] float32 (sum over M is 1 everywhere) and
    kappa [B, M] float32 (mean of weights over h, w).
  """
  weights, kappa = get_mixing(method)(
      key, batch_size, num_members, height, width, alpha=alpha, p=p)
  expected_w = (batch_size, num_members, height, width)
  if tuple(weights.shape) != expected_w or tuple(kappa.shape) != expected_w[:2]:
    raise ValueError(
        f'Mixing block {method!r} returned weights {tuple(weights.shape)} and '
        f'kappa {tuple(kappa.shape)}; expected {expected_w} and '
        f'{expected_w[:2]}.')
  return weights.astype(jnp.float32), kappa.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------


def sample_kappa(key: Array, batch_size: int, num_members: int,
                 alpha) -> Array:
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


def box_masks(key: Array, area, height: int, width: int) -> Array:
  """Random CutMix boxes of nominal area ratio `area`, one per sample.

  The reference rule (MixMo code, CutMix): box sides
  2 * floor(floor(W * sqrt(area)) / 2) and 2 * floor(floor(H * sqrt(area)) / 2),
  an integer centre (cy, cx) uniform over the whole map (cy in [0, H-1],
  cx in [0, W-1]), the box [cy - s_h/2, cy + s_h/2) x [cx - s_w/2, cx + s_w/2)
  clipped at the borders.  Clipping makes the box usually smaller than
  drawn: with area ~ Beta(2, 2) on 32 x 32 the mean of the mask is about
  0.306 (variance about 0.0234), not 0.5.  That is the published method.

  Args:
    key: PRNG key.
    area: [B] nominal area ratios in [0, 1].
    height, width: static map size h, w.

  Returns:
    float32 [B, h, w], 1 inside the box and 0 outside.
  """
  area = jnp.clip(jnp.asarray(area, jnp.float32), 0.0, 1.0)
  batch_size = area.shape[0]
  side_ratio = jnp.sqrt(area)
  half_h = jnp.floor(height * side_ratio).astype(jnp.int32) // 2  # [B]
  half_w = jnp.floor(width * side_ratio).astype(jnp.int32) // 2
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, (batch_size,), 0, height)
  cx = jax.random.randint(key_x, (batch_size,), 0, width)
  in_rows = _interval_mask(cy - half_h, cy + half_h, height)  # [B, h]
  in_cols = _interval_mask(cx - half_w, cx + half_w, width)  # [B, w]
  box = in_rows[:, :, None] & in_cols[:, None, :]  # Shape: [B, h, w].
  return box.astype(jnp.float32)


def _interval_mask(start: Array, stop: Array, size: int) -> Array:
  """[B, size] bool, True on [clip(start, 0, size), clip(stop, 0, size))."""
  start = jnp.clip(start, 0, size)[:, None]
  stop = jnp.clip(stop, 0, size)[:, None]
  grid = jnp.arange(size, dtype=jnp.int32)[None, :]
  return (grid >= start) & (grid < stop)


def _constant_weights(kappa: Array, height: int, width: int) -> Array:
  """[B, M] -> [B, M, h, w], kappa broadcast over space."""
  return jnp.broadcast_to(kappa[:, :, None, None],
                          kappa.shape + (height, width)).astype(jnp.float32)


def _complement_shares(kappa: Array, box_member: Array) -> Array:
  """Shares of the non-box members on the complement of the box (eq. 7).

  share_i = kappa_i / sum_{j != k} kappa_j = kappa_i / (1 - kappa_k) for
  i != k, 0 for the box member k.  Rows whose non-box kappas all vanish (an
  underflow of the Dirichlet sampler) share equally.

  Args:
    kappa: [B, M] mixing ratios.
    box_member: [M] bool, True at the box member k.

  Returns:
    [B, M] float32, each row summing to 1 (for M >= 2).
  """
  others = jnp.where(box_member[None, :], 0.0, kappa)
  total = jnp.sum(others, axis=-1, keepdims=True)
  uniform = jnp.where(box_member, 0.0, 1.0)
  uniform = uniform / jnp.maximum(jnp.sum(uniform), 1.0)
  safe_total = jnp.where(total > 0, total, 1.0)
  # XLA may divide as x * (1 / x): make a sole holder (always for M = 2)
  # exactly 1 so that M = 2 masks stay binary.
  shares = jnp.where(others == total, 1.0, others / safe_total)
  return jnp.where(total > 0, shares, uniform[None, :])


def patch_weights(key: Array, kappa: Array, height: int,
                  width: int) -> Array:
  """Cut-MixMo weights for M >= 2 (eq. 2; eq. 7; Algorithm 1 lines 14-25).

  One member k, drawn uniformly *per batch* (as the reference code shuffles
  the members' roles once per batch; for M = 2 this is Algorithm 1's
  1_outside swap of the box and its complement), gets a box of nominal area
  kappa_k (`box_masks`); the other members share the complement with
  weights kappa_i / (1 - kappa_k):

    weights_k = 1_box,   weights_i = (1 - 1_box) kappa_i / (1 - kappa_k).

  For M = 2 the weights are binary: the box member's region is the box and
  the other member's region its complement.

  Args:
    key: PRNG key.
    kappa: [B, M] nominal mixing ratios (rows on the simplex).

  Returns:
    float32 [B, M, h, w].
  """
  num_members = kappa.shape[1]
  key_member, key_box = jax.random.split(key)
  k = jax.random.randint(key_member, (), 0, num_members)
  box_member = jnp.arange(num_members) == k  # Shape: [M].
  area = jnp.sum(jnp.where(box_member[None, :], kappa, 0.0), axis=-1)  # [B]
  box = box_masks(key_box, area, height, width)[:, None]  # [B, 1, h, w]
  shares = _complement_shares(kappa, box_member)[:, :, None, None]
  inside = box_member[None, :, None, None].astype(jnp.float32)
  return box * inside + (1.0 - box) * shares  # Shape: [B, M, h, w].


def _mean_over_space(weights: Array) -> Array:
  """kappa re-read as the weights' means: [B, M, h, w] -> [B, M]."""
  return jnp.mean(weights, axis=(2, 3))


# ----------------------------------------------------------------------------
# Built-in blocks.
# ----------------------------------------------------------------------------


@register_mixing('sum')
def sum_mixing(key, batch_size, num_members, height, width, *, alpha, p):
  """MIMO (Havasi et al.): l = M * sum_i (1/M) l_i = sum_i l_i.

  weights = kappa = 1/M; key, alpha and p are unused.
  """
  del key, alpha, p
  kappa = jnp.full((batch_size, num_members), 1.0 / num_members, jnp.float32)
  return _constant_weights(kappa, height, width), kappa


@register_mixing('linear')
def linear_mixing(key, batch_size, num_members, height, width, *, alpha, p):
  """Linear-MixMo (eq. 6): l = M * sum_i kappa_i l_i, kappa ~ Dir_M(alpha).

  For M = 2, kappa_0 ~ Beta(alpha, alpha) and kappa_1 = 1 - kappa_0.
  Weights are kappa broadcast over space; p is unused.
  """
  del p
  kappa = sample_kappa(key, batch_size, num_members, alpha)
  return _constant_weights(kappa, height, width), kappa


@register_mixing('cut')
def cut_mixing(key, batch_size, num_members, height, width, *, alpha, p):
  """Cut-MixMo (eq. 2 for M = 2, eq. 7 for M > 2, Algorithm 1).

  kappa ~ Dir_M(alpha) per sample.  Per batch, 1_binary ~ Ber(p): if set,
  `patch_weights` (box of nominal area kappa_k for a member k drawn per
  batch, the complement shared by the others) and kappa is re-read as the
  weights' spatial means (the boundary adjustment of the reference code);
  otherwise Linear-MixMo with the same kappa.  For M = 1 the weights are 1.
  """
  key_kappa, key_binary, key_patch = jax.random.split(key, 3)
  kappa = sample_kappa(key_kappa, batch_size, num_members, alpha)
  linear = _constant_weights(kappa, height, width)
  if num_members == 1:
    return linear, kappa
  patched = patch_weights(key_patch, kappa, height, width)
  use_patch = jax.random.uniform(key_binary, ()) < jnp.asarray(p, jnp.float32)
  weights = jnp.where(use_patch, patched, linear)
  kappa = jnp.where(use_patch, _mean_over_space(patched), kappa)
  return weights, kappa


# ----------------------------------------------------------------------------
# Schedules and batches.
# ----------------------------------------------------------------------------


def patch_probability(epoch, num_epochs, p, decay_fraction=1.0 / 12.0):
  """Probability of patch mixing at a 1-indexed epoch (Algorithm 1, l. 8-11).

    p_e = p                                   if epoch <= (1 - d) * E,
    p_e = p * (E - epoch) / (d * E)           otherwise,

  with E = num_epochs and d = decay_fraction (1/12: a linear descent to 0
  over the last twelfth).  For E = 300: p up to epoch 275, 0.96 p at 276,
  0 at 300.  Values past E are clipped at 0; d = 0 means no decay.
  All arguments may be traced.  Returns a float32 scalar.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  num_epochs = jnp.asarray(num_epochs, jnp.float32)
  p = jnp.asarray(p, jnp.float32)
  decay_len = jnp.asarray(decay_fraction, jnp.float32) * num_epochs
  remaining = num_epochs - epoch
  safe_len = jnp.where(decay_len > 0, decay_len, 1.0)
  ramp = jnp.clip(p * remaining / safe_len, 0.0, p)
  in_decay = (decay_len > 0) & (remaining < decay_len)
  return jnp.where(in_decay, ramp, p)


def member_indices(key: Array, batch_size: int, num_members: int,
                   input_repetition: float = 0.0) -> Array:
  """Indices of each member's inputs in a (repeated) batch of size B.

  MIMO's input repetition (uncertainty-baselines): a main random
  permutation pi of range(B); member i takes pi with its first
  n = round(B * (1 - rho)) positions shuffled by its own permutation and the
  last B - n kept, so a fraction of about rho of the rows is identical for
  all members.  rho = 0: independent uniform permutations.

  Args:
    key: PRNG key.
    batch_size: B (static).
    num_members: M (static).
    input_repetition: rho in [0, 1], a Python float (static).

  Returns:
    int32 [B, M]; column i is a permutation of range(B), member i's inputs.
  """
  rho = float(input_repetition)
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f'input_repetition must lie in [0, 1], got {rho}.')
  num_shuffled = int(round(batch_size * (1.0 - rho)))
  key_main, key_members = jax.random.split(key)
  main = jax.random.permutation(key_main, batch_size).astype(jnp.int32)
  if num_shuffled <= 1:
    return jnp.tile(main[:, None], (1, num_members))

  def member_permutation(member_key):
    head = main[:num_shuffled]
    head = head[jax.random.permutation(member_key, num_shuffled)]
    return jnp.concatenate([head, main[num_shuffled:]])

  keys = jax.random.split(key_members, num_members)
  perms = jax.vmap(member_permutation)(keys)  # Shape: [M, B].
  return perms.T.astype(jnp.int32)  # Shape: [B, M].


def repeat_batch(x: Array, b: int) -> Array:
  """Batch repetition: [N, ...] -> [N * b, ...], sample n at n, n + N, ...

  (Algorithm 1 line 5; b = config.batch_repetitions.)
  """
  x = jnp.asarray(x)
  return jnp.tile(x, (int(b),) + (1,) * (x.ndim - 1))


from mixmo_jax import mixing_blocks  # noqa: E402,F401  registers Table 2 blocks

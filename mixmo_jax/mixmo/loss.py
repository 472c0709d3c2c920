"""MixMo training loss: w_r-reweighted member cross-entropies and the l2 term.

    L_MixMo = (1/B) sum_b sum_i w_r(kappa_bi) CE(y_bi, yhat_bi)   (eq. 4)
    w_r(kappa_i) = M kappa_i^(1/r) / sum_j kappa_j^(1/r)         (eq. 5)

plus `l2 * l2_penalty(params)` added by the trainer.
Shapes: B batch, M members, C classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def member_weights(kappa: Array, r) -> Array:
  """Loss weights w_r(kappa_i) = M kappa_i^(1/r) / sum_j kappa_j^(1/r).

  Paper eq. 3 (M = 2) and eq. 5 (any M).  r = 1 gives M * kappa (linear
  label interpolation as in MSDA), r -> inf gives 1 for every kappa_i > 0
  (no reweighting); the paper uses r = 3.  Weights sum to M over members.
  Safe at kappa_i = 0: the weight is 0 and its gradient finite (0); a row of
  zeros (never produced by the mixing blocks) gets weights 1.

  Args:
    kappa: [..., M] effective mixing ratios (from the mixing block).
    r: the root, a float > 0 (may be traced; inf allowed).

  Returns:
    float32 [..., M].
  """
  kappa = jnp.asarray(kappa, jnp.float32)
  num_members = kappa.shape[-1]
  exponent = 1.0 / jnp.asarray(r, jnp.float32)
  positive = kappa > 0
  safe_kappa = jnp.where(positive, kappa, 1.0)
  root = jnp.where(positive, safe_kappa**exponent, 0.0)
  total = jnp.sum(root, axis=-1, keepdims=True)
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, num_members * root / safe_total, 1.0)


def cross_entropy(logits: Array, targets: Array) -> Array:
  """CE(y, yhat) = -sum_c y_c log softmax(logits)_c.

  Args:
    logits: [..., C].
    targets: integer labels [...] or soft (probability) targets [..., C].

  Returns:
    float32 [...], one cross-entropy per leading index.
  """
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  targets = jnp.asarray(targets)
  if targets.ndim == log_probs.ndim:
    return -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)
  if targets.ndim == log_probs.ndim - 1:
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise TypeError(
          f'Targets of shape {targets.shape} (one fewer dimension than the '
          f'logits {log_probs.shape}) must be integer labels, got '
          f'{targets.dtype}.')
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)
    return -picked[..., 0]
  raise ValueError(
      f'targets {targets.shape} do not match logits {log_probs.shape}: '
      'expected integer labels [...] or soft targets [..., C].')


def mixmo_loss(logits: Array, targets: Array, weights: Array) -> Array:
  """L_MixMo = (1/B) sum_b sum_i weights_bi CE(targets_bi, logits_bi).

  Paper eq. 4 and Algorithm 1 lines 30-32.  `weights` are usually
  `member_weights(kappa, r)`; they are used as given (the trainer need not
  stop gradients: kappa does not depend on the parameters).

  Args:
    logits: [B, M, C] member logits.
    targets: [B, M] integer labels or [B, M, C] soft targets (e.g. CutMix).
    weights: [B, M] per-member loss weights.

  Returns:
    float32 scalar.
  """
  ce = cross_entropy(logits, targets)  # Shape: [B, M].
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != ce.shape:
    raise ValueError(
        f'weights {weights.shape} must match the per-member losses {ce.shape}.')
  return jnp.mean(jnp.sum(weights * ce, axis=-1))


def l2_penalty(params) -> Array:
  """sum over all leaves of sum(x^2), no 1/2 factor (as the reference).

  The trainer adds `config.optimizer.l2 * l2_penalty(params)` to the loss;
  every parameter counts (convolutions, BN scales and biases, heads).
  Returns a float32 scalar (0 for an empty tree).
  """
  leaves = jax.tree.leaves(params)
  squares = [jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves]
  return sum(squares, jnp.zeros((), jnp.float32))

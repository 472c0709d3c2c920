"""In-pixel mixing: CutMix and Mixup of images and their targets.

  cutmix_for_mixmo    in-pixel CutMix with MixMo: each member input gets a
                      patch of a partner x_k, its target the lambda' rule
                      (Appendix 6.4)
  mixup_for_mixmo     in-pixel Mixup with MixMo (the authors' code)
  mixup, cutmix       the single-network baselines' pixel mixing (Zhang et
                      al. 2018; Yun et al. 2019): the paper's Mixup / CutMix
                      rows, per sample with probability 0.5 (the authors'
                      rule) or one lambda per batch (the original rule)

`batch.member_batch` calls them; everything is vectorised over samples and
jit-able.

Shapes: B batch, M members, C classes, H, W image size, h, w the mixing map.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mixmo_jax.mixmo import masks

PIXEL_MIXES = ('none', 'mixup', 'cutmix')
# 'per_sample': each sample mixed with its own partner and lambda (the
# authors' code); 'batch': one lambda and a permutation of the batch (the
# original single-network rule).
PIXEL_MIX_RULES = ('per_sample', 'batch')


def _draw_lambda(key, alpha, prob, batch_size, per_sample):
  """lambda ~ Beta(alpha, alpha), replaced by 1 (no mixing) with prob 1 - prob.

  Returns float32 [B] (per_sample) or [] (one draw for the whole batch).
  """
  key_beta, key_apply = jax.random.split(key)
  shape = (batch_size,) if per_sample else ()
  lam = jax.random.beta(key_beta, alpha, alpha, shape)
  apply = jax.random.bernoulli(key_apply, prob, shape)
  return jnp.where(apply, lam, 1.0).astype(jnp.float32)


def _mix_targets(lam, onehot, partner_onehot):
  """lam * y_i + (1 - lam) * y_k; lam [] or [B], targets [B, C]."""
  lam = jnp.reshape(lam, jnp.shape(lam) + (1,))
  return lam * onehot + (1.0 - lam) * partner_onehot


def mixup(key, images, onehot, alpha=1.0, prob=1.0, per_sample=False,
          partner_images=None, partner_onehot=None):
  """Mixup in pixels (Zhang et al., ICLR 2018; MixMo paper Appendix 6.7).

    x = lam * x_i + (1 - lam) * x_pi(i),  y = lam * y_i + (1 - lam) * y_pi(i),
    lam ~ Beta(alpha, alpha),

  with pi a random permutation of the batch. As in Zhang et al., one lam is
  drawn for the whole batch (`per_sample=False`); `per_sample=True` draws one
  per sample. With probability 1 - prob (per batch, or per sample) lam = 1,
  i.e. no mixing. `partner_images` / `partner_onehot` ([B, ...], x_k and
  y_k for each sample, e.g. another sample of the training set) replace
  the permutation of the batch.

  Args:
    key: PRNG key.
    images: [B, H, W, 3] float (uint8 is cast to float32, same [0, 255] scale).
    onehot: [B, C] float targets (one-hot or already soft).
    alpha: Beta concentration (may be traced).
    prob: probability of mixing (may be traced).
    per_sample: Python bool.

  Returns:
    (images float [B, H, W, 3], soft targets float32 [B, C]).
  """
  batch_size = images.shape[0]
  key_lam, key_perm = jax.random.split(key)
  lam = _draw_lambda(key_lam, alpha, prob, batch_size, per_sample)
  x = images if jnp.issubdtype(images.dtype, jnp.floating) else images.astype(
      jnp.float32)
  onehot = onehot.astype(jnp.float32)
  other_x, other_y = _partners(key_perm, x, onehot, partner_images,
                               partner_onehot)
  lam_x = jnp.reshape(lam, jnp.shape(lam) + (1, 1, 1)).astype(x.dtype)
  mixed = lam_x * x + (1 - lam_x) * other_x.astype(x.dtype)
  return mixed, _mix_targets(lam, onehot, other_y)


def _partners(key, images, onehot, partner_images, partner_onehot):
  """(x_k, y_k): the given partners, else a random permutation of the batch."""
  if partner_images is not None:
    return partner_images, partner_onehot.astype(jnp.float32)
  perm = jax.random.permutation(key, images.shape[0])
  return images[perm], onehot[perm]


def _paste(keep, own, other):
  """keep * own + (1 - keep) * other for a binary keep [..., H, W].

  Done with a select so that uint8 images stay uint8 and exact.
  """
  return jnp.where(keep[..., None] > 0.5, own, other)


def cutmix(key, images, onehot, alpha=1.0, prob=1.0, per_sample=False,
           partner_images=None, partner_onehot=None):
  """CutMix in pixels (Yun et al., ICCV 2019; MixMo paper Appendix 6.7).

    x = 1_m * x_i + (1 - 1_m) * x_pi(i),  y = lam' y_i + (1 - lam') y_pi(i),

  lam ~ Beta(alpha, alpha), the pasted box from `masks.box_mask` (centre uniform,
  clipped), lam' = mean(1_m) the adjusted share actually kept from x_i, pi a
  random permutation of the batch. As in Yun et al., one lam and one box
  per batch (`per_sample=False`); `per_sample=True` draws them per sample.
  With probability 1 - prob (per batch, or per sample) nothing is pasted.
  `partner_images` / `partner_onehot` replace the batch permutation (as
  in `mixup`).

  Args:
    key: PRNG key.
    images: [B, H, W, 3] uint8 or float (dtype kept).
    onehot: [B, C] float targets.
    alpha: Beta concentration (may be traced).
    prob: probability of applying CutMix (may be traced).
    per_sample: Python bool.

  Returns:
    (images [B, H, W, 3] same dtype, soft targets float32 [B, C]).
  """
  batch_size, height, width = images.shape[:3]
  key_lam, key_box, key_perm = jax.random.split(key, 3)
  lam = _draw_lambda(key_lam, alpha, prob, batch_size, per_sample)
  # Shape: [H, W] (one box per batch) or [B, H, W].
  pasted = masks.random_box_masks(key_box, 1.0 - lam, height, width)
  keep = jnp.broadcast_to(1.0 - pasted, (batch_size, height, width))
  lam_adjusted = jnp.mean(1.0 - pasted, axis=(-2, -1))
  onehot = onehot.astype(jnp.float32)
  other_x, other_y = _partners(key_perm, images, onehot, partner_images,
                               partner_onehot)
  return (_paste(keep, images, other_x.astype(images.dtype)),
          _mix_targets(lam_adjusted, onehot, other_y))


def resize_nearest(weights, height, width):
  """Nearest-neighbour resize of weights [..., h, w] to [..., H, W].

  Output pixel (r, c) reads input (floor(r h / H), floor(c w / W)); for an
  integer factor H = s h this repeats each cell s x s times.
  """
  h, w = weights.shape[-2:]
  rows = (jnp.arange(height) * h) // height
  cols = (jnp.arange(width) * w) // width
  return weights[..., rows, :][..., cols]


def apply_cutmix_for_mixmo(member_images, member_targets, other_images,
                           other_targets, keep_masks, mixmo_masks, apply):
  """The deterministic rule of in-pixel CutMix with MixMo (Appendix 6.4).

  For each member input i, with 1_m the region kept from its own image x_i
  (the rest comes from x_k) and 1_M its MixMo mask at pixel resolution:

    lam' = sum(1_m * 1_M) / sum(1_M)       (mean(1_m) if sum(1_M) = 0),
    x    = 1_m * x_i + (1 - 1_m) * x_k,    y = lam' y_i + (1 - lam') y_k;

  if lam' < 0.5 the roles swap so that x_i stays predominant:
  x = 1_m * x_k + (1 - 1_m) * x_i and lam' -> 1 - lam'. Where `apply` is
  False the input keeps x_i and its own target.

  Args:
    member_images: [B, M, H, W, 3] uint8 or float (x_i per member).
    member_targets: [B, M, C] float (y_i).
    other_images: [B, M, H, W, 3] same dtype (x_k).
    other_targets: [B, M, C] float (y_k).
    keep_masks: [B, M, H, W] binary float, 1_m.
    mixmo_masks: [B, M, H, W] float >= 0, 1_M (for linear mixing a constant
      kappa_i, binary for Cut-MixMo).
    apply: [B, M] bool.

  Returns:
    (images [B, M, H, W, 3] same dtype, soft targets float32 [B, M, C]).
  """
  keep = keep_masks.astype(jnp.float32)
  visible = mixmo_masks.astype(jnp.float32)
  total = jnp.sum(visible, axis=(-2, -1))
  ratio = jnp.sum(keep * visible, axis=(-2, -1)) / jnp.where(
      total > 0, total, 1.0)
  lam = jnp.where(total > 0, ratio, jnp.mean(keep, axis=(-2, -1)))
  swap = lam < 0.5
  keep = jnp.where(swap[..., None, None], 1.0 - keep, keep)
  lam = jnp.where(swap, 1.0 - lam, lam)
  keep = jnp.where(apply[..., None, None], keep, 1.0)
  lam = jnp.where(apply, lam, 1.0)
  targets = _mix_targets(lam, member_targets.astype(jnp.float32),
                         other_targets.astype(jnp.float32))
  return _paste(keep, member_images, other_images), targets


def cutmix_for_mixmo(key, member_images, member_labels, other_images,
                     other_labels, mixmo_weights, num_classes, prob=0.5,
                     alpha=1.0):
  """In-pixel CutMix combined with MixMo (MixMo paper Sec. 4.1, App. 6.4).

  Per member input, independently with probability `prob`: lam ~
  Beta(alpha, alpha) (alpha = 1 in the paper), a standard CutMix box
  (Yun et al., ICCV 2019; `masks.box_mask`, centre uniform, clipped) of x_k is
  pasted on x_i, and the target becomes lam' y_i + (1 - lam') y_k with
  lam' = sum(1_m 1_M) / sum(1_M): the share of x_i among the pixels that
  the MixMo mask 1_M of that member lets through. If lam' < 0.5, x_i and x_k
  swap roles so that x_i stays predominant (see `apply_cutmix_for_mixmo`).
  x_k (`other_images`) is drawn by the caller from the whole training set,
  not only the batch. The MixMo weights must be sampled before this call.

  1_M is mixmo_weights[:, i] upsampled from h x w to H x W by nearest
  neighbour (`resize_nearest`); for an integer factor this equals the
  reference's average pooling of 1_m to h x w. For linear mixing the weights
  are constant, so lam' = mean(1_m).

  Args:
    key: PRNG key.
    member_images: [B, M, H, W, 3] uint8 or float, x_i of each member.
    member_labels: int [B, M], y_i.
    other_images: [B, M, H, W, 3] same dtype, x_k for each member input.
    other_labels: int [B, M], y_k.
    mixmo_weights: float [B, M, h, w], the MixMo mixing weights.
    num_classes: Python int C.
    prob: probability of CutMix per member input (may be traced).
    alpha: Beta concentration of lam (may be traced).

  Returns:
    (member_images [B, M, H, W, 3] same dtype, soft targets f32 [B, M, C]).
  """
  batch_size, num_members, height, width = member_images.shape[:4]
  shape = (batch_size, num_members)
  key_apply, key_lam, key_box = jax.random.split(key, 3)
  apply = jax.random.bernoulli(key_apply, prob, shape)
  lam = jax.random.beta(key_lam, alpha, alpha, shape)
  keep = 1.0 - masks.random_box_masks(key_box, 1.0 - lam, height, width)
  visible = resize_nearest(mixmo_weights, height, width)
  return apply_cutmix_for_mixmo(member_images,
                                jax.nn.one_hot(member_labels,
                                               num_classes), other_images,
                                jax.nn.one_hot(other_labels, num_classes), keep,
                                visible, apply)


def mixup_for_mixmo(key, member_images, member_labels, other_images,
                    other_labels, num_classes, prob=0.5, alpha=1.0):
  """In-pixel Mixup combined with MixMo (the MixMo authors' code).

  Per member input, independently with probability `prob`:
  lam ~ Beta(alpha, alpha), lam <- max(lam, 1 - lam) (the official code
  swaps the roles when the member's own share is below 1/2, so x_i stays
  predominant; for Mixup lam' = lam whatever the MixMo mask), and

    x = lam x_i + (1 - lam) x_k,    y = lam y_i + (1 - lam) y_k.

  Args:
    key: PRNG key.
    member_images: float [B, M, H, W, 3], x_i.  member_labels: int [B, M].
    other_images: float [B, M, H, W, 3], x_k.  other_labels: int [B, M].
    num_classes: Python int C.
    prob: probability of Mixup per member input (may be traced).
    alpha: Beta concentration (may be traced).

  Returns:
    (images float32 [B, M, H, W, 3], soft targets float32 [B, M, C]).
  """
  shape = member_labels.shape
  key_apply, key_lam = jax.random.split(key)
  lam = jax.random.beta(key_lam, alpha, alpha, shape)
  lam = jnp.maximum(lam, 1.0 - lam)
  lam = jnp.where(jax.random.bernoulli(key_apply, prob, shape), lam, 1.0)
  lam_x = lam[..., None, None, None]
  x = lam_x * member_images + (1.0 - lam_x) * other_images
  targets = _mix_targets(lam, jax.nn.one_hot(member_labels, num_classes),
                         jax.nn.one_hot(other_labels, num_classes))
  return x.astype(jnp.float32), targets

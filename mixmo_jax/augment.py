"""On-device pixel augmentations: normalise, pad-crop-flip, Mixup, CutMix.

Everything here is vectorised over samples, jit-able and deterministic from
the PRNG key (DESIGN.md section 1, decision 4). Probabilities and Beta
concentrations (`prob`, `alpha`) may be traced scalars: changing them does
not recompile. Shape letters: B batch, M members, C classes, H, W image size,
h, w the size of the MixMo masks (stem output resolution).

Random draws and deterministic rules are kept apart: `box_mask` and
`apply_cutmix_for_mixmo` are pure functions of explicit lambdas, box centres
and masks; the public augmentations only draw those and call them.
"""
import jax
import jax.numpy as jnp


def normalize(images, mean, std):
  """Returns (x / 255 - mean) / std as float32.

  Args:
    images: uint8 or float [..., H, W, 3], pixel values in [0, 255].
    mean: 3 floats (per channel, on the [0, 1] scale).
    std: 3 floats.

  Returns:
    float32 [..., H, W, 3].
  """
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop_flip(key, images, padding=4, flip=True):
  """Zero-pad, random crop back to H x W, random horizontal flip, per image.

  Each image gets its own integer offset (dy, dx) uniform in
  [0, 2 * padding]^2 into the padded image, and is mirrored left-right with
  probability 1/2 (the standard CIFAR augmentation, He et al. 2016).

  Args:
    key: PRNG key.
    images: [..., H, W, C] any dtype (uint8 or float); every image of the
      leading dimensions (e.g. B, or B x M) is augmented independently.
    padding: Python int, zero padding on each side.
    flip: Python bool, whether to apply random horizontal flips.

  Returns:
    Same shape and dtype as `images`.
  """
  *lead, height, width, channels = images.shape
  x = images.reshape((-1, height, width, channels))  # Shape: [N, H, W, C].
  n = x.shape[0]
  key_crop, key_flip = jax.random.split(key)
  offsets = jax.random.randint(key_crop, (n, 2), 0, 2 * padding + 1)
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def crop(image, offset):
    start = (offset[0], offset[1], 0)
    return jax.lax.dynamic_slice(image, start, (height, width, channels))

  out = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(key_flip, 0.5, (n,))
    out = jnp.where(mirror[:, None, None, None], out[:, :, ::-1], out)
  return out.reshape(images.shape)


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


def mixup(key, images, onehot, alpha=1.0, prob=1.0, per_sample=False):
  """Mixup in pixels (Zhang et al., ICLR 2018; MixMo paper Appendix 6.7).

    x = lam * x_i + (1 - lam) * x_pi(i),  y = lam * y_i + (1 - lam) * y_pi(i),
    lam ~ Beta(alpha, alpha),

  with pi a random permutation of the batch. As in Zhang et al., one lam is
  drawn for the whole batch (`per_sample=False`); `per_sample=True` draws one
  per sample. With probability 1 - prob (per batch, or per sample) lam = 1,
  i.e. no mixing.

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
  perm = jax.random.permutation(key_perm, batch_size)
  x = images if jnp.issubdtype(images.dtype, jnp.floating) else images.astype(
      jnp.float32)
  lam_x = jnp.reshape(lam, jnp.shape(lam) + (1, 1, 1)).astype(x.dtype)
  mixed = lam_x * x + (1 - lam_x) * x[perm]
  onehot = onehot.astype(jnp.float32)
  return mixed, _mix_targets(lam, onehot, onehot[perm])


def box_mask(lam, center_y, center_x, height, width):
  """The standard CutMix box (Yun et al., ICCV 2019): 1 where x_k is pasted.

  Box sides s_h = floor(H * sqrt(1 - lam)), s_w = floor(W * sqrt(1 - lam));
  the box covers rows [cy - s_h // 2, cy + s_h // 2) and columns
  [cx - s_w // 2, cx + s_w // 2), clipped to the image, so its area is
  about (1 - lam) H W (less when clipped at a border: callers recompute lam
  from the mask, the boundary adjustment of Appendix 6.7).

  Args:
    lam: float [...], target share of the own image.
    center_y: int [...], box centre row in [0, H).
    center_x: int [...], box centre column in [0, W).
    height: Python int H.
    width: Python int W.

  Returns:
    float32 [..., H, W] binary mask of the pasted region.
  """
  lam = jnp.asarray(lam, jnp.float32)
  cut = jnp.sqrt(1.0 - lam)
  half_h = jnp.floor(height * cut).astype(jnp.int32) // 2
  half_w = jnp.floor(width * cut).astype(jnp.int32) // 2
  cy = jnp.asarray(center_y, jnp.int32)[..., None]
  cx = jnp.asarray(center_x, jnp.int32)[..., None]
  half_h, half_w = half_h[..., None], half_w[..., None]
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  in_rows = (rows >= jnp.clip(cy - half_h, 0, height)) & (
      rows < jnp.clip(cy + half_h, 0, height))
  in_cols = (cols >= jnp.clip(cx - half_w, 0, width)) & (
      cols < jnp.clip(cx + half_w, 0, width))
  return (in_rows[..., :, None] & in_cols[..., None, :]).astype(jnp.float32)


def _random_box_mask(key, lam, height, width):
  """box_mask with centres uniform over the integer grid; lam [...]."""
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, jnp.shape(lam), 0, height)
  cx = jax.random.randint(key_x, jnp.shape(lam), 0, width)
  return box_mask(lam, cy, cx, height, width)


def _paste(keep, own, other):
  """keep * own + (1 - keep) * other for a binary keep [..., H, W].

  Done with a select so that uint8 images stay uint8 and exact.
  """
  return jnp.where(keep[..., None] > 0.5, own, other)


def cutmix(key, images, onehot, alpha=1.0, prob=1.0, per_sample=False):
  """CutMix in pixels (Yun et al., ICCV 2019; MixMo paper Appendix 6.7).

    x = 1_m * x_i + (1 - 1_m) * x_pi(i),  y = lam' y_i + (1 - lam') y_pi(i),

  lam ~ Beta(alpha, alpha), the pasted box from `box_mask` (centre uniform,
  clipped), lam' = mean(1_m) the adjusted share actually kept from x_i, pi a
  random permutation of the batch. As in Yun et al., one lam and one box
  per batch (`per_sample=False`); `per_sample=True` draws them per sample.
  With probability 1 - prob (per batch, or per sample) nothing is pasted.

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
  pasted = _random_box_mask(key_box, lam, height, width)  # [H,W] or [B,H,W].
  keep = jnp.broadcast_to(1.0 - pasted, (batch_size, height, width))
  perm = jax.random.permutation(key_perm, batch_size)
  lam_adjusted = jnp.mean(1.0 - pasted, axis=(-2, -1))
  onehot = onehot.astype(jnp.float32)
  return (_paste(keep, images, images[perm]),
          _mix_targets(lam_adjusted, onehot, onehot[perm]))


def resize_nearest(masks, height, width):
  """Nearest-neighbour resize of masks [..., h, w] to [..., H, W].

  Output pixel (r, c) reads input (floor(r h / H), floor(c w / W)); for an
  integer factor H = s h this repeats each cell s x s times.
  """
  h, w = masks.shape[-2:]
  rows = (jnp.arange(height) * h) // height
  cols = (jnp.arange(width) * w) // width
  return masks[..., rows, :][..., cols]


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
  (Yun et al., ICCV 2019; `box_mask`, centre uniform, clipped) of x_k is
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
  keep = 1.0 - _random_box_mask(key_box, lam, height, width)
  visible = resize_nearest(mixmo_weights, height, width)
  return apply_cutmix_for_mixmo(
      member_images, jax.nn.one_hot(member_labels, num_classes), other_images,
      jax.nn.one_hot(other_labels, num_classes), keep, visible, apply)

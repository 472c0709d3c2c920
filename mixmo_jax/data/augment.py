"""On-device pixel operations: normalisation and pad-crop-flip.

Vectorised over samples, jit-able and deterministic from the PRNG key; they
run inside the jitted train step like every other random choice.  In-pixel
mixing (Mixup, CutMix, CutMix with MixMo) is part of the method:
`mixmo_jax.mixmo.batch`.  Shape letters: H, W image size.
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

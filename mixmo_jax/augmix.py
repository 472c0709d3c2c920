"""Host-side AugMix (Hendrycks et al., ICLR 2020), NumPy + PIL.

MixMo paper, Appendix 6.4: severity 3, mixture width 3, mixture depth 4,
only the operations that do not overlap with the CIFAR-100-C corruptions:
[equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x,
translate_y] (autocontrast is not in that list, so it is excluded too), and
no Jensen-Shannon consistency loss.

  x_augmix = m * x + (1 - m) * sum_j w_j chain_j(x),
  (w_1..w_width) ~ Dirichlet(alpha), m ~ Beta(alpha, alpha),

computed in float on [0, 1] and rounded back to uint8. Each chain applies
`depth` operations drawn uniformly with replacement from the list.

Depth: `depth > 0` applies exactly `depth` operations per chain (the paper's
"mixture's depth to 4", the default here); `depth <= 0` (e.g. -1) draws the
chain length uniformly in {1, 2, 3} per chain, which is the default of the
AugMix code and of the official MixMo code. Severity-to-magnitude rules are
AugMix's: level ~ U(0.1, severity), int_parameter(level, max) =
int(level * max / 10), float_parameter(level, max) = level * max / 10, and a
random sign for geometric operations.

Randomness comes only from the `np.random.Generator` passed in; no global
RNG is touched.
"""
import numpy as np
from PIL import Image, ImageOps

_AFFINE = Image.Transform.AFFINE
_BILINEAR = Image.Resampling.BILINEAR


def _int_parameter(level, maxval):
  """int(level * maxval / 10): AugMix's magnitude of an integer operation."""
  return int(level * maxval / 10)


def _float_parameter(level, maxval):
  """level * maxval / 10: AugMix's magnitude of a float operation."""
  return float(level) * maxval / 10.0


def _random_sign(rng):
  """-1 with probability 1/2, else 1."""
  return -1 if rng.uniform() > 0.5 else 1


def equalize(img, level, rng):
  """Histogram equalisation (no magnitude)."""
  del level, rng
  return ImageOps.equalize(img)


def posterize(img, level, rng):
  """Keep 4 - int_parameter(level, 4) bits per channel."""
  del rng
  return ImageOps.posterize(img, 4 - _int_parameter(level, 4))


def rotate(img, level, rng):
  """Rotate by +-int_parameter(level, 30) degrees (bilinear, black fill)."""
  degrees = _int_parameter(level, 30) * _random_sign(rng)
  return img.rotate(degrees, resample=_BILINEAR)


def solarize(img, level, rng):
  """Invert pixels >= 256 - int_parameter(level, 256)."""
  del rng
  return ImageOps.solarize(img, 256 - _int_parameter(level, 256))


def _affine(img, coefficients):
  """PIL affine transform (output pixel (x, y) reads (a x + b y + c, d x + e y + f))."""
  return img.transform(img.size, _AFFINE, coefficients, resample=_BILINEAR)


def shear_x(img, level, rng):
  """Horizontal shear by +-float_parameter(level, 0.3)."""
  shear = _float_parameter(level, 0.3) * _random_sign(rng)
  return _affine(img, (1, shear, 0, 0, 1, 0))


def shear_y(img, level, rng):
  """Vertical shear by +-float_parameter(level, 0.3)."""
  shear = _float_parameter(level, 0.3) * _random_sign(rng)
  return _affine(img, (1, 0, 0, shear, 1, 0))


def translate_x(img, level, rng):
  """Horizontal shift by +-int_parameter(level, W / 3) pixels."""
  shift = _int_parameter(level, img.size[0] / 3) * _random_sign(rng)
  return _affine(img, (1, 0, shift, 0, 1, 0))


def translate_y(img, level, rng):
  """Vertical shift by +-int_parameter(level, H / 3) pixels."""
  shift = _int_parameter(level, img.size[1] / 3) * _random_sign(rng)
  return _affine(img, (1, 0, 0, 0, 1, shift))


# Exactly the list of Appendix 6.4, in that order.
OPERATIONS = {
    'equalize': equalize,
    'posterize': posterize,
    'rotate': rotate,
    'solarize': solarize,
    'shear_x': shear_x,
    'shear_y': shear_y,
    'translate_x': translate_x,
    'translate_y': translate_y,
}
_OPERATION_LIST = tuple(OPERATIONS.values())


def _chain(img, rng, severity, depth):
  """Applies `depth` (or U{1,2,3} if depth <= 0) random operations to img."""
  length = depth if depth > 0 else int(rng.integers(1, 4))
  for _ in range(length):
    operation = _OPERATION_LIST[int(rng.integers(len(_OPERATION_LIST)))]
    img = operation(img, rng.uniform(0.1, severity), rng)
  return img


def augmix(image, rng, severity=3, width=3, depth=4, alpha=1.0):
  """AugMix of one image: m x + (1 - m) sum_j w_j chain_j(x).

  Args:
    image: uint8 [H, W, 3].
    rng: np.random.Generator, the only source of randomness.
    severity: AugMix severity; level ~ U(0.1, severity).
    width: number of chains.
    depth: operations per chain; <= 0 draws 1-3 per chain (module doc).
    alpha: Dirichlet and Beta concentration.

  Returns:
    uint8 [H, W, 3].
  """
  weights = rng.dirichlet([alpha] * width)
  m = rng.beta(alpha, alpha)
  pil = Image.fromarray(np.asarray(image, np.uint8))
  mix = np.zeros(image.shape, np.float64)
  for weight in weights:
    mix += weight * np.asarray(_chain(pil, rng, severity, depth), np.float64)
  mixed = m * np.asarray(image, np.float64) / 255.0 + (1 - m) * mix / 255.0
  return np.clip(np.round(mixed * 255.0), 0, 255).astype(np.uint8)


def augmix_batch(images, seed, step, severity=3, width=3, depth=4, alpha=1.0,
                 first_index=0):
  """AugMix of every image, deterministic from (seed, step, global position).

  Image n draws from its own generator np.random.default_rng([seed, step,
  first_index + n]), so a host that augments only its slice of the global
  batch (first_index = the slice start) produces exactly what one host would
  for the whole batch: results do not depend on the number of hosts.

  Args:
    images: uint8 [N, H, W, 3].
    seed: int.
    step: int (training step).
    severity, width, depth, alpha: as in `augmix`.
    first_index: position of images[0] in the step's global batch.

  Returns:
    uint8 [N, H, W, 3].
  """
  out = np.empty_like(np.asarray(images, np.uint8))
  for n, image in enumerate(images):
    rng = np.random.default_rng([seed, step, first_index + n])
    out[n] = augmix(image, rng, severity, width, depth, alpha)
  return out

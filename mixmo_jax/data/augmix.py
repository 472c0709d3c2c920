"""On-device AugMix (Hendrycks et al., ICLR 2020) in jax.numpy.

Everything is vectorised over any leading batch dims, jit-able, and draws
its randomness only from the PRNG key. Images are uint8 [..., H, W, 3]
(channels last); every image gets its own independent draw, so calling
`augmix` on the member inputs [B, M, H, W, 3] draws once per
(sample, member).

AugMix of one image x (uint8, mixed as float on the [0, 255] scale):

  x_augmix = (1 - m) x + m sum_{j=1..width} w_j chain_j(x),
  (w_1 .. w_width) ~ Dirichlet(alpha), m ~ Beta(alpha, alpha),

where chain_j applies `depth_j` operations, each drawn uniformly with
replacement from the rule's list; every operation reads and writes uint8
(as PIL does). Convex mixing commutes with the affine normalisation, so
mixing on [0, 255] equals mixing normalised tensors; `as_float=True`
returns that un-rounded float32 mixture, the default rounds it to uint8.

Two rules (`rule=`):

'mixmo' -- the official MixMo code (Rame et al. 2021, the authors' PyTorch
  release, `augmentations/augmix.py`), the default:
  * operations (10): identity, equalize, posterize, rotate, solarize,
    shear_x, shear_y, translate_x, translate_y, invert (autocontrast is
    off in their configuration);
  * magnitude fixed by the severity s in [0, 30] (no sampling): each
    operation has a range [lo, hi] and uses v = s / 30 * (hi - lo) + lo:
    posterize [4, 8] keeps int(v) bits; rotate [0, 30] degrees; solarize
    [0, 256] inverts the values >= v; shear_x / shear_y [0, 0.3];
    translate_x / translate_y [0, 0.45] times the image width / height,
    in pixels (not rounded). At s = 3: 4 bits, 3 degrees, threshold 25.6,
    shear 0.03, shift 0.045 W;
  * geometric operations get a sign -1 or +1 with probability 1/2 each,
    drawn independently at every application;
  * chain depth uniform in {1, 2, 3, 4} when depth <= 0 (Python's
    random.randint(1, 4) is inclusive), else exactly `depth`;
  * resampling: PIL's default, NEAREST, for rotate and the affine ops
    (their code passes no `resample`).

'augmix' -- the original AugMix rule (google-research/augmix,
  `augmentations.py`), restricted to the 8 operations of the MixMo paper,
  Appendix 6.4 (those not overlapping CIFAR-100-C, autocontrast excluded):
  equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x,
  translate_y; at every application a level l ~ U(0.1, severity) on
  AugMix's 0-10 scale, int_parameter(l, max) = int(l max / 10),
  float_parameter(l, max) = l max / 10: posterize keeps
  4 - int_parameter(l, 4) bits; rotate +-int_parameter(l, 30) degrees;
  solarize threshold 256 - int_parameter(l, 256); shear
  +-float_parameter(l, 0.3); translate +-int_parameter(l, W / 3) (H / 3)
  pixels; BILINEAR resampling; chain depth exactly `depth` when
  depth > 0, else uniform in {1, 2, 3} (numpy's randint(1, 4)).

Operations follow PIL 13 bit for bit where stated (tests compare against
PIL): the point operations (identity, invert, posterize, solarize,
equalize, autocontrast) exactly; the geometric ones use PIL's inverse
mapping: output pixel (x, y) reads the source at
(a x' + b y' + c, d x' + e y' + f) with pixel-centre coordinates
x' = x + 0.5, y' = y + 0.5 and PIL's coefficient tuples (rotation about
(W / 2, H / 2), angle counter-clockwise), black outside the image; NEAREST
reads pixel floor(source); BILINEAR subtracts 0.5, interpolates the 4
neighbours (clamped at the border) and truncates to uint8. They run in
float32 (PIL uses float64), so a pixel whose source coordinate or value
lies within ~1e-5 of an integer can differ.

Vectorised selection: every operation here is either a per-channel
look-up table (point operations) or an affine resampling (geometric ones
and identity). A chain step therefore computes one histogram, selects one
of 6 tiny 256-entry tables and one of 5 coefficient vectors by the drawn
operation index, and applies one table look-up followed by one resampling
(the identity table for geometric operations, the identity map for point
operations, both exact). The cost is one look-up plus one warp per step
whatever the operation, instead of evaluating all 11 operations on the
image and selecting (which is also what `lax.switch` under `vmap`
lowers to); the steps run in a `lax.scan`, so one step body is compiled.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Global operation ids (the order of `OPERATIONS`).
OPERATIONS = ('identity', 'autocontrast', 'equalize', 'posterize', 'solarize',
              'invert', 'rotate', 'shear_x', 'shear_y', 'translate_x',
              'translate_y')
_ID = {name: i for i, name in enumerate(OPERATIONS)}
_NUM_POINT_OPS = 6  # identity .. invert are look-up tables.

# The rules' operation lists, in their sources' order.
MIXMO_OPERATIONS = ('identity', 'equalize', 'posterize', 'rotate', 'solarize',
                    'shear_x', 'shear_y', 'translate_x', 'translate_y',
                    'invert')
AUGMIX_OPERATIONS = ('equalize', 'posterize', 'rotate', 'solarize', 'shear_x',
                     'shear_y', 'translate_x', 'translate_y')
RULES = ('mixmo', 'augmix')
RESAMPLES = ('nearest', 'bilinear')

# MixMo's magnitude ranges [lo, hi] (value = severity / 30 * (hi - lo) + lo).
_MIXMO_RANGES = {
    'identity': (0.0, 1.0),
    'equalize': (0.0, 1.0),
    'posterize': (4.0, 8.0),
    'rotate': (0.0, 30.0),
    'solarize': (0.0, 256.0),
    'shear_x': (0.0, 0.3),
    'shear_y': (0.0, 0.3),
    'translate_x': (0.0, 0.45),
    'translate_y': (0.0, 0.45),
    'invert': (0.0, 1.0)
}
_MIXMO_MAX_DEPTH = 4  # depth <= 0: uniform in {1, 2, 3, 4}.
_AUGMIX_MAX_DEPTH = 3  # depth <= 0: uniform in {1, 2, 3}.

# ---------------------------------------------------------------- helpers --


def _map_images(fn, images, *params):
  """Applies fn(image [H, W, 3], *scalars) to every image of [..., H, W, 3].

  Each param is broadcast to the leading dims `...`.
  """
  images = jnp.asarray(images)
  lead = images.shape[:-3]
  flat = images.reshape((-1,) + images.shape[-3:])
  flat_params = [
      jnp.broadcast_to(jnp.asarray(p, jnp.float32), lead).reshape(-1)
      for p in params
  ]
  out = jax.vmap(fn)(flat, *flat_params)
  return out.reshape(lead + out.shape[1:])


def _apply_lut(image, lut):
  """image uint8 [H, W, 3], lut [3, 256] -> lut[c, image[..., c]], uint8."""
  channels = jnp.moveaxis(image, -1, 0).reshape(3, -1).astype(jnp.int32)
  out = jnp.take_along_axis(lut.astype(jnp.uint8), channels, axis=1)
  return jnp.moveaxis(out.reshape((3,) + image.shape[:2]), 0, -1)


def _histograms(image):
  """Per-channel histograms of uint8 [H, W, 3] -> int32 [3, 256]."""
  channels = jnp.moveaxis(image, -1, 0).reshape(3, -1).astype(jnp.int32)
  return jax.vmap(lambda c: jnp.zeros(256, jnp.int32).at[c].add(1))(channels)


def _values():
  """The 256 grey levels, int32 [256] (built on use: no array at import)."""
  return jnp.arange(256, dtype=jnp.int32)


# ------------------------------------------------------ point operations --


def _identity_lut():
  return jnp.broadcast_to(_values(), (3, 256))


def _invert_lut():
  return jnp.broadcast_to(255 - _values(), (3, 256))


def _posterize_lut(bits):
  """Keeps the `bits` high bits: v & ~(2 ** (8 - bits) - 1) (PIL)."""
  bits = jnp.clip(jnp.asarray(bits).astype(jnp.int32), 0, 8)
  mask = 255 - (jnp.left_shift(1, 8 - bits) - 1)
  return jnp.broadcast_to(_values() & mask, (3, 256))


def _solarize_lut(threshold):
  """v if v < threshold else 255 - v (PIL; the threshold may be a float)."""
  values = _values()
  values = jnp.where(
      values.astype(jnp.float32) < threshold, values, 255 - values)
  return jnp.broadcast_to(values, (3, 256))


def _equalize_lut(hist):
  """PIL's ImageOps.equalize table from one channel's histogram [256].

  step = (N - count of the highest occupied value) // 255 (Pillow 13);
  identity when
  fewer than 2 values are occupied or step == 0; else
  lut[i] = (step // 2 + sum_{j < i} h[j]) // step, clipped to 255.
  """
  occupied = hist > 0
  last = 255 - jnp.argmax(occupied[::-1])
  step = (jnp.sum(hist) - hist[last]) // 255
  trivial = (jnp.sum(occupied) <= 1) | (step == 0)
  safe_step = jnp.maximum(step, 1)
  below = jnp.cumsum(hist) - hist
  lut = jnp.minimum((safe_step // 2 + below) // safe_step, 255)
  return jnp.where(trivial, _values(), lut)


@functools.lru_cache(maxsize=1)
def _autocontrast_exceptions():
  """Sorted keys lo * 65536 + hi * 256 + v where PIL's float64 rule drops 1.

  PIL computes int(v * scale + offset) with scale = 255.0 / (hi - lo),
  offset = -lo * scale in float64; where the exact value
  (v - lo) * 255 / (hi - lo) is an integer, rounding can land just below
  it (e.g. lo = 0, hi = 25, v = 25 gives 254). float32 cannot reproduce
  that, so the exact integer floor is used and these (~12k of 8.4M) cases
  are corrected from this table, built here with numpy float64.
  """
  keys = []
  v = np.arange(256, dtype=np.int64)
  for lo in range(255):
    hi = np.arange(lo + 1, 256, dtype=np.int64)[:, None]
    scale = 255.0 / (hi - lo)
    pil = (v * scale + (-lo * scale)).astype(np.int64)
    exact = np.floor_divide((v - lo) * 255, hi - lo)
    bad = (pil != exact) & (v >= lo) & (v <= hi)
    rows, cols = np.nonzero(bad)
    keys.append(lo * 65536 + hi[rows, 0] * 256 + cols)
  return np.sort(np.concatenate(keys)).astype(np.int32)


def _autocontrast_lut(hist):
  """PIL's ImageOps.autocontrast table (cutoff 0) from a histogram [256].

  lo, hi = lowest and highest occupied values; identity if hi <= lo; else
  lut[v] = clip(int(v * 255 / (hi - lo) - lo * 255 / (hi - lo)), 0, 255)
  evaluated as PIL does in float64 (see `_autocontrast_exceptions`).
  """
  occupied = hist > 0
  lo = jnp.argmax(occupied)
  hi = 255 - jnp.argmax(occupied[::-1])
  span = jnp.maximum(hi - lo, 1)
  exact = jnp.floor_divide((_values() - lo) * 255, span)
  keys = jnp.asarray(_autocontrast_exceptions())
  key = lo * 65536 + hi * 256 + _values()
  pos = jnp.clip(jnp.searchsorted(keys, key), 0, keys.shape[0] - 1)
  lut = jnp.clip(exact - (keys[pos] == key).astype(jnp.int32), 0, 255)
  return jnp.where(hi <= lo, _values(), lut)


def identity(images):
  """Returns the images unchanged. uint8 [..., H, W, 3] -> same."""
  return jnp.asarray(images)


def invert(images):
  """255 - x (PIL ImageOps.invert). uint8 [..., H, W, 3] -> same."""
  return _map_images(lambda im: _apply_lut(im, _invert_lut()), images)


def posterize(images, bits):
  """Keeps `bits` (int, broadcast to [...]) high bits per channel (PIL)."""
  return _map_images(lambda im, b: _apply_lut(im, _posterize_lut(b)), images,
                     bits)


def solarize(images, threshold):
  """Inverts values >= threshold (broadcast to [...]) (PIL ImageOps)."""
  return _map_images(lambda im, t: _apply_lut(im, _solarize_lut(t)), images,
                     threshold)


def equalize(images):
  """Per-channel histogram equalisation (PIL ImageOps.equalize)."""
  return _map_images(
      lambda im: _apply_lut(im,
                            jax.vmap(_equalize_lut)(_histograms(im))), images)


def autocontrast(images):
  """Per-channel stretch of [min, max] to [0, 255] (PIL, cutoff 0)."""
  return _map_images(
      lambda im: _apply_lut(im,
                            jax.vmap(_autocontrast_lut)(_histograms(im))),
      images)


# -------------------------------------------------- geometric operations --


def _warp(image, coefficients, resample):
  """PIL-style affine resampling of uint8 [H, W, 3], black fill.

  coefficients (a, b, c, d, e, f) in centred form: with u = x + 0.5 - W / 2,
  v = y + 0.5 - H / 2 the source point is (a u + b v + c + W / 2,
  d u + e v + f + H / 2), i.e. PIL's tuple with c, f re-expressed about the
  image centre (more accurate in float32).
  """
  height, width = image.shape[0], image.shape[1]
  a, b, c, d, e, f = [coefficients[i] for i in range(6)]
  u = jnp.arange(width, dtype=jnp.float32) + 0.5 - width / 2
  v = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5 - height / 2
  xs = a * u + b * v + c + width / 2
  ys = d * u + e * v + f + height / 2
  if resample == 'nearest':
    xi = jnp.floor(xs).astype(jnp.int32)
    yi = jnp.floor(ys).astype(jnp.int32)
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    pixels = image[jnp.clip(yi, 0, height - 1), jnp.clip(xi, 0, width - 1)]
    return jnp.where(inside[..., None], pixels, 0).astype(jnp.uint8)
  inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
  xs, ys = xs - 0.5, ys - 0.5
  x0, y0 = jnp.floor(xs), jnp.floor(ys)
  dx, dy = (xs - x0)[..., None], (ys - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  xa, xb = jnp.clip(x0, 0, width - 1), jnp.clip(x0 + 1, 0, width - 1)
  ya, yb = jnp.clip(y0, 0, height - 1), jnp.clip(y0 + 1, 0, height - 1)
  img = image.astype(jnp.float32)
  top = img[ya, xa] + (img[ya, xb] - img[ya, xa]) * dx
  bottom = img[yb, xa] + (img[yb, xb] - img[yb, xa]) * dx
  value = jnp.trunc(top + (bottom - top) * dy)
  return jnp.where(inside[..., None], value, 0).astype(jnp.uint8)


def _rotate_coefficients(degrees):
  """PIL Image.rotate: angle -radians(degrees), about the centre."""
  angle = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return jnp.stack([cos, sin, 0.0 * cos, -sin, cos, 0.0 * cos])


def _affine_coefficients(op, magnitude, height, width):
  """Centred coefficients of geometric op id `op` (identity otherwise).

  PIL tuples: shear_x (1, s, 0, 0, 1, 0), shear_y (1, 0, 0, s, 1, 0),
  translate_x (1, 0, t, 0, 1, 0), translate_y (1, 0, 0, 0, 1, t);
  re-centred: shear_x moves c by s H / 2, shear_y moves f by s W / 2.
  """
  m = jnp.asarray(magnitude, jnp.float32)
  one, zero = jnp.ones_like(m), jnp.zeros_like(m)
  table = jnp.stack([
      jnp.stack([one, zero, zero, zero, one, zero]),  # identity / point ops
      _rotate_coefficients(m),
      jnp.stack([one, m, m * (height / 2), zero, one, zero]),
      jnp.stack([one, zero, zero, m, one, m * (width / 2)]),
      jnp.stack([one, zero, m, zero, one, zero]),
      jnp.stack([one, zero, zero, zero, one, m])
  ])
  row = jnp.clip(op - _NUM_POINT_OPS + 1, 0, 5)
  return table[row]


def _geometric(op_name):
  op = _ID[op_name]

  def fn(images, magnitude, resample='bilinear'):
    _check_resample(resample)

    def one(im, mag):
      coefficients = _affine_coefficients(op, mag, im.shape[0], im.shape[1])
      return _warp(im, coefficients, resample)

    return _map_images(one, images, magnitude)

  return fn


_rotate = _geometric('rotate')
_shear_x = _geometric('shear_x')
_shear_y = _geometric('shear_y')
_translate_x = _geometric('translate_x')
_translate_y = _geometric('translate_y')


def rotate(images, degrees, resample='bilinear'):
  """PIL Image.rotate(degrees) (counter-clockwise, same size, black fill).

  images uint8 [..., H, W, 3]; degrees broadcast to [...]; resample
  'nearest' or 'bilinear'.
  """
  return _rotate(images, degrees, resample)


def shear_x(images, shear, resample='bilinear'):
  """PIL transform AFFINE (1, shear, 0, 0, 1, 0): reads (x' + s y', y')."""
  return _shear_x(images, shear, resample)


def shear_y(images, shear, resample='bilinear'):
  """PIL transform AFFINE (1, 0, 0, shear, 1, 0): reads (x', s x' + y')."""
  return _shear_y(images, shear, resample)


def translate_x(images, pixels, resample='bilinear'):
  """PIL transform AFFINE (1, 0, t, 0, 1, 0): reads (x' + t, y')."""
  return _translate_x(images, pixels, resample)


def translate_y(images, pixels, resample='bilinear'):
  """PIL transform AFFINE (1, 0, 0, 0, 1, t): reads (x', y' + t)."""
  return _translate_y(images, pixels, resample)


# ---------------------------------------------------------------- chains --


class Chains(NamedTuple):
  """The random draws of AugMix for images [...] (leading dims `...`).

  ops: int32 [..., width, max_depth] global ids into `OPERATIONS`
    (steps at or beyond `depths` are replaced by identity when applied).
  magnitudes: float32 [..., width, max_depth] in the op's native unit
    (bits, threshold, signed degrees, signed shear, signed pixels).
  depths: int32 [..., width] chain lengths.
  weights: float32 [..., width] Dirichlet(alpha) chain weights.
  m: float32 [...] Beta(alpha, alpha) weight of the augmented mixture.
  """
  ops: jax.Array
  magnitudes: jax.Array
  depths: jax.Array
  weights: jax.Array
  m: jax.Array


def _check_resample(resample):
  if resample not in RESAMPLES:
    raise ValueError(f'augmix resample must be one of {RESAMPLES}, got '
                     f'{resample!r}.')


def _check(rule, severity, width, depth):
  if rule not in RULES:
    raise ValueError(f'augmix rule must be one of {RULES}, got {rule!r}.')
  if rule == 'mixmo' and not 0 <= severity <= 30:
    raise ValueError(f'augmix severity must be in [0, 30] for rule '
                     f"'mixmo', got {severity}.")
  if rule == 'augmix' and not 0.1 <= severity <= 10:
    raise ValueError(f'augmix severity must be in [0.1, 10] for rule '
                     f"'augmix', got {severity}.")
  if int(width) != width or width < 1:
    raise ValueError(f'augmix width must be an int >= 1, got {width}.')
  if int(depth) != depth:
    raise ValueError(f'augmix depth must be an int (<= 0: random), got '
                     f'{depth}.')


def _max_depth(rule, depth):
  if depth > 0:
    return int(depth)
  return _MIXMO_MAX_DEPTH if rule == 'mixmo' else _AUGMIX_MAX_DEPTH


def _magnitudes(key, ops, rule, severity, height, width):
  """Native magnitudes of global op ids `ops` (any shape), signs drawn."""
  k_sign, k_level = jax.random.split(key)
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, ops.shape), -1.0, 1.0)
  if rule == 'mixmo':
    frac = severity / 30.0

    def value(name):
      lo, hi = _MIXMO_RANGES[name]
      return frac * (hi - lo) + lo

    per_op = {
        'posterize': float(int(value('posterize'))),
        'solarize': value('solarize'),
        'rotate': value('rotate'),
        'shear_x': value('shear_x'),
        'shear_y': value('shear_y'),
        'translate_x': value('translate_x') * width,
        'translate_y': value('translate_y') * height
    }
    table = jnp.asarray([per_op.get(name, 0.0) for name in OPERATIONS],
                        jnp.float32)
    unsigned = table[ops]
  else:
    level = jax.random.uniform(k_level, ops.shape, jnp.float32, 0.1, severity)
    int_param = lambda maxval: jnp.floor(level * maxval / 10)
    candidates = {
        'posterize': 4 - int_param(4),
        'solarize': 256 - int_param(256),
        'rotate': int_param(30),
        'shear_x': level * 0.3 / 10,
        'shear_y': level * 0.3 / 10,
        'translate_x': int_param(width / 3),
        'translate_y': int_param(height / 3)
    }
    unsigned = jnp.zeros(ops.shape, jnp.float32)
    for name, val in candidates.items():
      unsigned = jnp.where(ops == _ID[name], val, unsigned)
  is_geometric = ops >= _NUM_POINT_OPS
  return jnp.where(is_geometric, sign * unsigned, unsigned)


def sample_chains(key, lead_shape, image_hw, *, rule='mixmo', severity=3,
                  width=3, depth=-1, alpha=1.0):
  """Draws AugMix's chains for images of leading shape `lead_shape`.

  Independent draws per image (`key` is split per image). No image is
  touched, so the depth and operation distributions can be tested cheaply.

  Args:
    key: PRNG key.
    lead_shape: tuple, the leading dims `...` of the images.
    image_hw: (H, W), for the translate magnitudes.
    rule, severity, width, depth, alpha: as in `augmix`.

  Returns:
    `Chains` with leading dims `lead_shape`.
  """
  _check(rule, severity, width, depth)
  height, img_width = image_hw
  max_depth = _max_depth(rule, depth)
  names = MIXMO_OPERATIONS if rule == 'mixmo' else AUGMIX_OPERATIONS
  op_ids = jnp.asarray([_ID[n] for n in names], jnp.int32)
  n = int(np.prod(lead_shape, dtype=np.int64))

  def one(k):
    k_w, k_m, k_depth, k_op, k_mag = jax.random.split(k, 5)
    weights = jax.random.dirichlet(k_w, jnp.full((width,), alpha, jnp.float32))
    m = jax.random.beta(k_m, alpha, alpha)
    if depth > 0:
      depths = jnp.full((width,), depth, jnp.int32)
    else:
      depths = jax.random.randint(k_depth, (width,), 1, max_depth + 1)
    ops = op_ids[jax.random.randint(k_op, (width, max_depth), 0, len(names))]
    mags = _magnitudes(k_mag, ops, rule, severity, height, img_width)
    return Chains(ops, mags, depths.astype(jnp.int32), weights, m)

  flat = jax.vmap(one)(jax.random.split(key, n))
  return jax.tree.map(lambda x: x.reshape(tuple(lead_shape) + x.shape[1:]),
                      flat)


def _step(image, op, magnitude, resample, with_autocontrast):
  """One operation (global id, traced) on uint8 [H, W, 3].

  Without `with_autocontrast` (neither rule uses it) its table is not
  built and the id acts as identity.
  """
  hist = _histograms(image)
  luts = jnp.stack([
      _identity_lut(),
      (jax.vmap(_autocontrast_lut)(hist)
       if with_autocontrast else _identity_lut()),
      jax.vmap(_equalize_lut)(hist),
      _posterize_lut(magnitude),
      _solarize_lut(magnitude),
      _invert_lut()
  ])
  point = jnp.where(op < _NUM_POINT_OPS, op, 0)
  image = _apply_lut(image, luts[point])
  coefficients = _affine_coefficients(op, magnitude, image.shape[0],
                                      image.shape[1])
  return _warp(image, coefficients, resample)


def apply_chains(images, chains, *, resample, as_float=False,
                 with_autocontrast=False):
  """AugMix with given draws: (1 - m) x + m sum_j w_j chain_j(x).

  Args:
    images: uint8 [..., H, W, 3].
    chains: `Chains` with leading dims `...`.
    resample: 'nearest' or 'bilinear', for the geometric operations.
    as_float: return the float32 mixture on [0, 255] instead of rounding.
    with_autocontrast: build autocontrast's table (else that id is
      identity; no rule draws it).

  Returns:
    uint8 (or float32) [..., H, W, 3].
  """
  _check_resample(resample)
  images = jnp.asarray(images, jnp.uint8)
  lead = images.shape[:-3]
  flat = images.reshape((-1,) + images.shape[-3:])
  flat_chains = jax.tree.map(
      lambda x: x.reshape((flat.shape[0],) + x.shape[len(lead):]), chains)

  def chain(image, ops, mags, length):

    def body(img, step):
      i, op, mag = step
      op = jnp.where(i < length, op, _ID['identity'])
      return _step(img, op, mag, resample, with_autocontrast), None

    steps = (jnp.arange(ops.shape[0]), ops, mags)
    return jax.lax.scan(body, image, steps)[0]

  def one(image, c):
    augmented = jax.vmap(chain, in_axes=(None, 0, 0, 0))(image, c.ops,
                                                         c.magnitudes, c.depths)
    mix = jnp.einsum('j,jhwc->hwc', c.weights, augmented.astype(jnp.float32))
    return (1.0 - c.m) * image.astype(jnp.float32) + c.m * mix

  out = jax.vmap(one)(flat, flat_chains).reshape(images.shape)
  if as_float:
    return out
  return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def augmix(key, images, draws=None, num_draws=None, *, rule='mixmo', severity=3,
           width=3, depth=-1, alpha=1.0, resample=None, as_float=False):
  """AugMix of every image: one draw per image, or per draw id.

  Args:
    key: PRNG key, the only source of randomness.
    images: uint8 [..., H, W, 3] (e.g. member inputs [B, M, H, W, 3]).
    draws: None (an independent draw per image), or int [...] ids in
      [0, num_draws): `num_draws` draws are sampled and image i takes draw
      draws[i], so images with the same id get the same chains, weights and
      m (`mixmo.batch.member_batch`'s 'per_sample' sharing).
    num_draws: static int, with `draws`.
    rule: 'mixmo' (the official MixMo code) or 'augmix' (original AugMix
      levels on the MixMo paper's 8 operations); see the module doc.
    severity: 'mixmo': in [0, 30], fixes the magnitudes; 'augmix': in
      [0.1, 10], levels ~ U(0.1, severity).
    width: number of chains mixed (3).
    depth: operations per chain; <= 0 draws it per chain, uniform in
      {1..4} ('mixmo') or {1..3} ('augmix').
    alpha: Dirichlet and Beta concentration (1).
    resample: 'nearest' or 'bilinear'; None takes the rule's ('mixmo':
      nearest, 'augmix': bilinear).
    as_float: return the un-rounded float32 mixture on [0, 255].

  Returns:
    uint8 [..., H, W, 3] (float32 if as_float), same shape.
  """
  images = jnp.asarray(images)
  if images.ndim < 3 or images.shape[-1] != 3:
    raise ValueError(f'augmix images must be [..., H, W, 3], got shape '
                     f'{images.shape}.')
  if resample is None:
    resample = 'nearest' if rule == 'mixmo' else 'bilinear'
  settings = dict(rule=rule, severity=severity, width=width, depth=depth,
                  alpha=alpha)
  if draws is None:
    chains = sample_chains(key, images.shape[:-3], images.shape[-3:-1],
                           **settings)
  else:
    if tuple(jnp.shape(draws)) != images.shape[:-3]:
      raise ValueError(f'augmix draws {jnp.shape(draws)} must match the '
                       f"images' leading shape {images.shape[:-3]}.")
    chains = sample_chains(key, (int(num_draws),), images.shape[-3:-1],
                           **settings)
    chains = jax.tree.map(lambda c: c[jnp.asarray(draws)], chains)
  return apply_chains(images, chains, resample=resample, as_float=as_float)

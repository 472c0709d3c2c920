"""Tests for mixmo_jax.data.augmix (on-device AugMix) against PIL."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from mixmo_jax.data import augmix

_AFFINE = Image.Transform.AFFINE
_PIL_RESAMPLE = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR
}


def _images(size=16):
  """uint8 [8, size, size, 3]: random, low-range, ramps, constant, binary."""
  rng = np.random.default_rng(0)
  out = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
  out[2] = rng.integers(0, 4, (size, size, 3)) * 7 + 40  # 4 levels.
  out[3] = (np.arange(size) * (255 // (size - 1)))[None, :, None]
  out[4] = (np.arange(size) * 3 + 100)[:, None, None]
  out[5] = 200  # Constant: equalize / autocontrast are the identity.
  out[6] = rng.integers(0, 2, (size, size, 3)) * 255
  out[7, ..., 0], out[7, ..., 1], out[7, ..., 2] = 0, 128, 255
  return out


def _pil(fn, images):
  """Applies fn(PIL image) to every image of uint8 [N, H, W, 3]."""
  return np.stack([np.asarray(fn(Image.fromarray(im))) for im in images])


# PIL references of every operation, magnitude in the op's native unit.
def _pil_op(name, magnitude, resample):
  r = _PIL_RESAMPLE[resample]
  aff = lambda coeffs: (lambda im: im.transform(im.size, _AFFINE, coeffs,
                                                resample=r))
  return {
      'identity': lambda im: im,
      'invert': ImageOps.invert,
      'autocontrast': ImageOps.autocontrast,
      'equalize': ImageOps.equalize,
      'posterize': lambda im: ImageOps.posterize(im, int(magnitude)),
      'solarize': lambda im: ImageOps.solarize(im, magnitude),
      'rotate': lambda im: im.rotate(magnitude, resample=r),
      'shear_x': aff((1, magnitude, 0, 0, 1, 0)),
      'shear_y': aff((1, 0, 0, magnitude, 1, 0)),
      'translate_x': aff((1, 0, magnitude, 0, 1, 0)),
      'translate_y': aff((1, 0, 0, 0, 1, magnitude)),
  }[name]


@pytest.mark.parametrize('name',
                         ['identity', 'invert', 'autocontrast', 'equalize'])
def test_point_operations_equal_pil(name):
  images = _images()
  out = jax.jit(getattr(augmix, name))(images)
  np.testing.assert_array_equal(out, _pil(_pil_op(name, 0, 'nearest'), images))


def test_posterize_and_solarize_equal_pil_for_every_magnitude():
  images = _images()
  bits = jnp.arange(8) + 1  # One magnitude per image: 1 .. 8 bits.
  thresholds = jnp.asarray([0, 25.6, 26, 100, 128, 180.5, 255, 256])
  post = jax.jit(augmix.posterize)(images, bits)
  sol = jax.jit(augmix.solarize)(images, thresholds)
  for i in range(len(images)):
    np.testing.assert_array_equal(
        post[i],
        np.asarray(
            ImageOps.posterize(Image.fromarray(images[i]), int(bits[i]))))
    np.testing.assert_array_equal(
        sol[i],
        np.asarray(
            ImageOps.solarize(Image.fromarray(images[i]),
                              float(thresholds[i]))))


def test_autocontrast_reproduces_pil_float64_rounding():
  # lo = 0, hi = 25: PIL maps 25 to 254 (float64 rounding), not 255.
  image = np.zeros((2, 2, 3), np.uint8)
  image[0, 0], image[1, 1] = 0, 25
  out = augmix.autocontrast(image)
  pil = np.asarray(ImageOps.autocontrast(Image.fromarray(image)))
  np.testing.assert_array_equal(out, pil)
  assert pil[1, 1, 0] == 254


_GEOMETRIC = [('rotate', [3.0, -3.0, 17.0, -30.0]),
              ('shear_x', [0.03, -0.03, 0.27, -0.3]),
              ('shear_y', [0.03, -0.03, 0.27, -0.3]),
              ('translate_x', [1.44, -1.44, 5.0, -3.0]),
              ('translate_y', [1.44, -1.44, 5.0, -3.0])]


@pytest.mark.parametrize('resample', ['nearest', 'bilinear'])
@pytest.mark.parametrize('name,magnitudes', _GEOMETRIC)
def test_geometric_operations_match_pil(name, magnitudes, resample):
  """NEAREST: >= 99.5% of pixels equal. BILINEAR: all within 1 grey level,
  >= 98% equal (float32 here vs float64 in PIL; truncation to uint8)."""
  images = np.tile(_images(), (4, 1, 1, 1))  # 32 images, 4 magnitudes.
  mags = np.repeat(np.asarray(magnitudes, np.float32), 8)
  fn = jax.jit(functools.partial(getattr(augmix, name), resample=resample))
  out = np.asarray(fn(images, mags)).astype(int)
  ref = np.stack([
      np.asarray(_pil_op(name, float(m), resample)(Image.fromarray(im)))
      for im, m in zip(images, mags)
  ]).astype(int)
  diff = np.abs(out - ref)
  assert (diff == 0).mean() >= (0.995 if resample == 'nearest' else 0.98)
  if resample == 'bilinear':
    assert diff.max() <= 1
  # The operation does move pixels (a wrong sign would fail above).
  assert (out != images).mean() > 0.1


def _reference_augmix(image, chains, resample):
  """AugMix of one image from drawn `chains` with PIL ops, float64 mix."""
  mix = np.zeros(image.shape)
  for j in range(chains.ops.shape[0]):
    pil = Image.fromarray(image)
    for step in range(int(chains.depths[j])):
      name = augmix.OPERATIONS[int(chains.ops[j, step])]
      pil = _pil_op(name, float(chains.magnitudes[j, step]), resample)(pil)
    mix += float(chains.weights[j]) * np.asarray(pil, np.float64)
  m = float(chains.m)
  return (1 - m) * image.astype(np.float64) + m * mix


@pytest.mark.parametrize('rule', ['mixmo', 'augmix'])
def test_augmix_equals_pil_chain_replay(rule):
  """Whole AugMix vs a PIL replay of the same draws (op order, depths,
  magnitudes, weights, m all wired as the formula says)."""
  images = _images()[:6].reshape(3, 2, 16, 16, 3)  # [B, M, H, W, 3].
  chains = augmix.sample_chains(
      jax.random.key(1), (3, 2), (16, 16), rule=rule, severity=3, depth=-1)
  resample = 'nearest' if rule == 'mixmo' else 'bilinear'
  out = augmix.apply_chains(images, chains, resample=resample, as_float=True)
  for b in range(3):
    for k in range(2):
      c = jax.tree.map(lambda x, b=b, k=k: np.asarray(x[b, k]), chains)
      ref = _reference_augmix(images[b, k], c, resample)
      diff = np.abs(np.asarray(out[b, k]) - ref)
      # Exact ops up to float32 mixing (nearest); bilinear: rare +-1 steps.
      assert (diff < 1e-3).mean() >= (0.99 if rule == 'mixmo' else 0.9)
      assert diff.max() <= (255 if rule == 'mixmo' else 4)


def test_mixmo_depths_uniform_and_magnitudes_fixed():
  chains = augmix.sample_chains(
      jax.random.key(0), (4000,), (32, 32), rule='mixmo', severity=3, width=3,
      depth=-1)
  depths = np.asarray(chains.depths).ravel()
  freq = np.bincount(depths, minlength=5)[1:] / depths.size
  np.testing.assert_allclose(freq, 0.25, atol=0.015)  # 12000 draws.
  ops = np.asarray(chains.ops).ravel()
  mags = np.asarray(chains.magnitudes).ravel()
  names = [augmix.OPERATIONS[i] for i in np.unique(ops)]
  assert sorted(names) == sorted(augmix.MIXMO_OPERATIONS)
  op_freq = np.bincount(ops, minlength=11)[np.unique(ops)] / ops.size
  np.testing.assert_allclose(op_freq, 0.1, atol=0.01)
  # severity 3: v = 3 / 30 * (hi - lo) + lo.
  expected = {
      'posterize': {4.0},
      'solarize': {25.6},
      'rotate': {3.0, -3.0},
      'shear_x': {0.03, -0.03},
      'shear_y': {0.03, -0.03},
      'translate_x': {1.44, -1.44},
      'translate_y': {1.44, -1.44}
  }
  for name, values in expected.items():
    got = mags[ops == augmix.OPERATIONS.index(name)]
    np.testing.assert_allclose(
        sorted(set(np.round(got, 5))), sorted(values), rtol=1e-6)
    if len(values) == 2:  # Sign -1 / +1 with probability 1/2.
      assert abs((got > 0).mean() - 0.5) < 0.05


def test_augmix_rule_levels_and_fixed_depth():
  chains = augmix.sample_chains(
      jax.random.key(0), (2000,), (30, 30), rule='augmix', severity=3, depth=4)
  np.testing.assert_array_equal(chains.depths, 4)
  assert chains.ops.shape == (2000, 3, 4)
  ops, mags = np.asarray(chains.ops), np.asarray(chains.magnitudes)
  assert sorted({augmix.OPERATIONS[i] for i in np.unique(ops)
                }) == sorted(augmix.AUGMIX_OPERATIONS)
  of = lambda name: mags[ops == augmix.OPERATIONS.index(name)]
  # level l ~ U(0.1, 3): int(l * 4 / 10) in {0, 1}; int(l * 30 / 10) in
  # 0..8; int(l * 256 / 10) in 2..76; int(l * (30 / 3) / 10) in {0, 1, 2}.
  assert set(of('posterize')) == {3.0, 4.0}
  assert set(np.abs(of('rotate'))) == set(float(d) for d in range(9))
  assert set(of('solarize')) == set(256.0 - np.arange(2, 77))
  assert set(np.abs(of('translate_x'))) == {0.0, 1.0, 2.0}
  shear = np.abs(of('shear_x'))
  assert 0.003 <= shear.min() and shear.max() <= 0.09
  random_depths = augmix.sample_chains(
      jax.random.key(1), (1000,), (30, 30), rule='augmix', depth=-1).depths
  assert set(np.unique(random_depths)) == {1, 2, 3}


def test_augmix_shape_determinism_independence_and_jit():
  images = jnp.asarray(_images()[:6].reshape(3, 2, 16, 16, 3))
  fn = jax.jit(augmix.augmix)
  out = fn(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  np.testing.assert_array_equal(out, fn(jax.random.key(0), images))
  assert not np.array_equal(out, fn(jax.random.key(1), images))
  # Same image at every (sample, member): each gets its own draw.
  same = jnp.broadcast_to(images[0, 0], images.shape)
  out = np.asarray(fn(jax.random.key(2), same)).reshape(6, -1)
  assert len({row.tobytes() for row in out}) == 6
  chains = augmix.sample_chains(jax.random.key(2), (3, 2), (16, 16))
  assert chains.ops.shape == (3, 2, 3, 4) and chains.m.shape == (3, 2)
  np.testing.assert_allclose(chains.weights.sum(-1), 1.0, rtol=1e-5)


def test_rounding_of_the_float_mixture():
  images = _images()[:2]
  key = jax.random.key(3)
  as_float = augmix.augmix(key, images, as_float=True)
  rounded = augmix.augmix(key, images)
  np.testing.assert_array_equal(rounded,
                                np.clip(np.round(np.asarray(as_float)), 0, 255))


@pytest.mark.parametrize('kwargs,field', [({
    'rule': 'randaugment'
}, 'rule'), ({
    'severity': 31
}, 'severity'), ({
    'rule': 'augmix',
    'severity': 11
}, 'severity'), ({
    'width': 0
}, 'width'), ({
    'resample': 'bicubic'
}, 'resample')])
def test_bad_arguments_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f'augmix {field}'):
    augmix.augmix(jax.random.key(0), _images()[:1], **kwargs)

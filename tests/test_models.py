"""Tests for mixmo_jax.models: sizes (eval_shape only), numerics of tiny nets
against an independent lax implementation written here, mixing and gradients.

Shape letters: B batch, M members, C classes, H, W image, h, w stem output.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mixmo_jax import models
from mixmo_jax.models import PreActResNet18, WideResNet

HIGHEST = jax.lax.Precision.HIGHEST
TOL = dict(rtol=2e-4, atol=2e-4)

# ----------------------------------------------------------------------------
# Helpers.


def abstract_variables(model, size):
  """Variable shapes of `model` for [1,size,size,3] inputs, nothing allocated."""
  x = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def random_variables(model, size, seed):
  """Variables of `model` drawn on the host (no init compile, ~0.2 s).

  Kernels are N(0, 2 / fan_in) (fan_in excludes the member axis of the
  stacked stems and heads); BN scales/biases, head biases and running
  statistics are random too: init values (scale 1, bias 0, mean 0, var 1)
  would hide a swapped or missing BN.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_in = int(
          np.prod(leaf.shape[1:-1] if leaf.ndim != 4 else leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
    elif name.endswith("['scale']") or name.endswith("['var']"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # BN and head biases, running means.
      value = 0.3 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, size))


# ----------------------------------------------------------------------------
# Independent implementation: lax convs, hand-written BN, explicit padding.


class Reference:
  """Plain-JAX forward pass reading the same weights by name."""

  def __init__(self, variables, train):
    self.p = variables['params']
    self.s = variables['batch_stats']
    self.train = train
    self.new_stats = {}

  def kernel(self, *path):
    return functools.reduce(lambda d, k: d[k], path, self.p)['kernel']

  def conv(self, x, path, stride, pad):
    k = self.kernel(*path)
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=HIGHEST)

  def bn(self, x, *path):
    p = functools.reduce(lambda d, k: d[k], path, self.p)
    s = functools.reduce(lambda d, k: d[k], path, self.s)
    if self.train:
      mean = x.mean(axis=(0, 1, 2))
      var = ((x - mean)**2).mean(axis=(0, 1, 2))
      node = self.new_stats
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = {
          'mean': 0.9 * s['mean'] + 0.1 * mean,
          'var': 0.9 * s['var'] + 0.1 * var
      }
    else:
      mean, var = s['mean'], s['var']
    return (x - mean) / jnp.sqrt(var + 1e-5) * p['scale'] + p['bias']

  def stems(self, x, w, stride):
    """Inference: sum_m c_m(x). Mixed: M * sum_m w_m * c_m(x_m), one conv each."""
    kernels = self.p['stems']['kernel']  # [M,3,3,3,C0]
    m = kernels.shape[0]
    pad = ((1, 1), (1, 1))
    out = 0.0
    for i in range(m):
      conv = functools.partial(jax.lax.conv_general_dilated, rhs=kernels[i],
                               window_strides=(stride, stride), padding=pad,
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                               precision=HIGHEST)
      if w is None:
        out = out + conv(x)
      else:
        out = out + m * w[:, i, :, :, None] * conv(x[:, i])
    return out

  def heads(self, f):
    h = self.p['heads']
    return jnp.einsum('bf,mfc->bmc', f, h['kernel'],
                      precision=HIGHEST) + h['bias']

  def wrn(self, x, w, depth, width):
    """WRN: stride on conv2 with bottom/right padding, shortcut on raw x."""
    n = (depth - 4) // 6
    h = self.stems(x, w, stride=1)
    for s, (c, stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), start=1):
      for b in range(1, n + 1):
        st = stride if b == 1 else 1
        name = f'stage{s}_block{b}'
        cin = h.shape[-1]
        o = jax.nn.relu(self.bn(h, name, 'bn1'))
        o = self.conv(o, (name, 'conv1'), 1, ((1, 1), (1, 1)))
        o = jax.nn.relu(self.bn(o, name, 'bn2'))
        pad = ((0, 1), (0, 1)) if st == 2 else ((1, 1), (1, 1))
        o = self.conv(o, (name, 'conv2'), st, pad)
        if st != 1 or cin != c * width:
          h = self.conv(h, (name, 'shortcut_conv'), st, ((0, 0), (0, 0)))
        h = o + h
    h = jax.nn.relu(self.bn(h, 'final_bn'))
    return self.heads(h.mean(axis=(1, 2)))

  def preact(self, x, w, width, base):
    """PreActResNet-18: stride on conv1, shortcut on ReLU(BN(x)), 4x4 pool."""
    h = self.stems(x, w, stride=2)
    pad = ((1, 1), (1, 1))
    for s, stride in enumerate((1, 2, 2, 2), start=1):
      c = base * 2**(s - 1) * width
      for b in (1, 2):
        st = stride if b == 1 else 1
        name = f'stage{s}_block{b}'
        a = jax.nn.relu(self.bn(h, name, 'bn1'))
        if st != 1 or h.shape[-1] != c:
          h = self.conv(a, (name, 'shortcut_conv'), st, ((0, 0), (0, 0)))
        o = self.conv(a, (name, 'conv1'), st, pad)
        o = jax.nn.relu(self.bn(o, name, 'bn2'))
        h = self.conv(o, (name, 'conv2'), 1, pad) + h
    assert h.shape[1:3] == (4, 4)
    return self.heads(h.mean(axis=(1, 2)))


# ----------------------------------------------------------------------------
# Tiny networks shared by the numerical tests.

TINY = {
    # WRN-16-2: 2 blocks per stage, projections in every stage's first block.
    'wrn':
        dict(
            model=WideResNet(depth=16, width=2, num_classes=5, num_members=2),
            size=8, hw=8, ref=lambda r, x, w: r.wrn(x, w, depth=16, width=2)),
    # PreActResNet-18-2 with 4 stem channels (stages 8, 16, 32, 64) on 64x64.
    'preact':
        dict(
            model=PreActResNet18(width=2, num_classes=5, num_members=2,
                                 base_width=4), size=64, hw=32,
            ref=lambda r, x, w: r.preact(x, w, width=2, base=4)),
    # WRN-10-1 with three members: identity shortcut in stage 1.
    'wrn_m3':
        dict(
            model=WideResNet(depth=10, width=1, num_classes=4, num_members=3),
            size=8, hw=8, ref=lambda r, x, w: r.wrn(x, w, depth=10, width=1)),
}
BATCH = 3


@functools.cache
def tiny_setup(name):
  """(model, randomized variables, x [B,H,W,3], xs [B,M,H,W,3], w [B,M,h,w])."""
  spec = TINY[name]
  model, size, hw = spec['model'], spec['size'], spec['hw']
  m = model.num_members
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((BATCH, size, size, 3)), jnp.float32)
  xs = jnp.asarray(rng.standard_normal((BATCH, m, size, size, 3)), jnp.float32)
  w = jnp.asarray(rng.uniform(size=(BATCH, m, hw, hw)), jnp.float32)
  return model, random_variables(model, size, seed=2), x, xs, w


@functools.cache
def jitted_apply(name, train, mixed):
  model = TINY[name]['model']
  if mixed:
    fn = lambda v, x, w: model.apply(v, x, mix_weights=w, train=train,
                                     mutable=['batch_stats'])
  else:
    fn = lambda v, x, w: model.apply(v, x, train=train, mutable=['batch_stats'])
  return jax.jit(fn)


# ----------------------------------------------------------------------------
# Sizes.


class TestParameterCounts:

  @pytest.mark.parametrize('classes,members,expected', [(100, 1, 36_536_884),
                                                        (100, 2, 36_601_416),
                                                        (100, 3, 36_665_948),
                                                        (10, 1, 36_479_194),
                                                        (10, 2, 36_486_036)])
  def test_wrn_28_10(self, classes, members, expected):
    v = abstract_variables(WideResNet(28, 10, classes, members), 32)
    assert models.num_params(v['params']) == expected

  @pytest.mark.parametrize('width,members,expected', [(1, 1, 11_268_616),
                                                      (1, 2, 11_372_944),
                                                      (2, 1, 44_784_648),
                                                      (2, 2, 44_991_376),
                                                      (3, 1, 100_537_864),
                                                      (3, 2, 100_846_992)])
  def test_preact_resnet18(self, width, members, expected):
    v = abstract_variables(PreActResNet18(width, 200, members), 64)
    assert models.num_params(v['params']) == expected


class TestParameterLayout:

  @pytest.mark.parametrize('model,size,c0,features',
                           [(WideResNet(28, 10, 100, 3), 32, 16, 640),
                            (PreActResNet18(2, 200, 2), 64, 64, 1024)])
  def test_stems_heads_and_core_kernels(self, model, size, c0, features):
    params = abstract_variables(model, size)['params']
    m, c = model.num_members, model.num_classes
    assert params['stems']['kernel'].shape == (m, 3, 3, 3, c0)
    assert params['heads']['kernel'].shape == (m, features, c)
    assert params['heads']['bias'].shape == (m, c)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      assert leaf.dtype == jnp.float32
      keys = [p.key for p in path]
      if keys[-1] == 'kernel' and keys[0] not in ('stems', 'heads'):
        assert leaf.ndim == 4 and 'conv' in keys[-2].lower(), keys

  def test_wrn_blocks(self):
    """Projections exactly where stride or width changes (WRN-16-2)."""
    params = tiny_setup('wrn')[1]['params']
    expected = {
        'stage1_block1', 'stage1_block2', 'stage2_block1', 'stage2_block2',
        'stage3_block1', 'stage3_block2'
    }
    assert set(params) == expected | {'stems', 'heads', 'final_bn'}
    for name in expected:
      has_proj = name.endswith('block1')
      assert ('shortcut_conv' in params[name]) == has_proj, name

  def test_preact_blocks(self):
    """No final BN; projection in stage1 only when the width changes."""
    params = abstract_variables(PreActResNet18(1, 200, 1), 64)['params']
    blocks = {f'stage{s}_block{b}' for s in range(1, 5) for b in (1, 2)}
    assert set(params) == blocks | {'stems', 'heads'}  # No final BN.
    assert 'shortcut_conv' not in params['stage1_block1']
    assert 'shortcut_conv' in params['stage2_block1']
    assert 'shortcut_conv' not in params['stage2_block2']
    params = abstract_variables(PreActResNet18(2, 200, 1), 64)['params']
    assert params['stage1_block1']['shortcut_conv']['kernel'].shape == (1, 1,
                                                                        64, 128)


class TestInit:

  def test_he_normal_fan_in_and_bn_defaults(self):
    """Kernels ~ N(0, 2 / fan_in); BN 1/0; statistics 0/1; head biases 0."""
    model = WideResNet(depth=10, width=2, num_classes=10, num_members=3)
    init = jax.jit(functools.partial(model.init, train=False))
    v = init(jax.random.key(0, impl='rbg'), jnp.zeros((1, 8, 8, 3)))
    p = v['params']
    stems = np.asarray(p['stems']['kernel'])  # [M,3,3,3,16], fan_in 27.
    np.testing.assert_allclose(
        stems.reshape(3, -1).std(axis=1), np.sqrt(2 / 27), rtol=0.15)
    assert not np.allclose(stems[0], stems[1])
    conv = np.asarray(p['stage3_block1']['conv2']['kernel'])  # [3,3,128,128].
    np.testing.assert_allclose(conv.std(), np.sqrt(2 / (9 * 128)), rtol=0.05)
    assert np.abs(
        conv).max() <= 2 * np.sqrt(2 / (9 * 128)) / 0.8796 + 1e-6  # Truncated.
    heads = np.asarray(p['heads']['kernel'])  # [M,128,10], fan_in 128.
    np.testing.assert_allclose(heads.std(), np.sqrt(2 / 128), rtol=0.1)
    np.testing.assert_array_equal(p['heads']['bias'], 0.0)
    np.testing.assert_array_equal(p['final_bn']['scale'], 1.0)
    np.testing.assert_array_equal(p['final_bn']['bias'], 0.0)
    np.testing.assert_array_equal(v['batch_stats']['final_bn']['mean'], 0.0)
    np.testing.assert_array_equal(v['batch_stats']['final_bn']['var'], 1.0)


class TestShapes:

  @pytest.mark.parametrize('members', [1, 2, 3])
  def test_wrn_stages(self, members):
    model = WideResNet(28, 10, 100, members)
    self._check(model, 32, (32, 32), [(32, 32, 16), (32, 32, 160),
                                      (16, 16, 320), (8, 8, 640)], 640)

  @pytest.mark.parametrize('members', [1, 2, 3])
  def test_preact_stages(self, members):
    model = PreActResNet18(3, 200, members)
    self._check(model, 64, (32, 32), [(32, 32, 64),
                                      (32, 32, 192), (16, 16, 384), (8, 8, 768),
                                      (4, 4, 1536)], 1536)

  def _check(self, model, size, hw, stage_shapes, features):
    b, m, c = 2, model.num_members, model.num_classes
    v = abstract_variables(model, size)
    x = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
    xs = jax.ShapeDtypeStruct((b, m, size, size, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((b, m) + hw, jnp.float32)
    logits, state = jax.eval_shape(
        lambda v, xs, w: model.apply(v, xs, mix_weights=w, train=True,
                                     mutable=['batch_stats', 'intermediates']),
        v, xs, w)
    assert logits.shape == (b, m, c) and logits.dtype == jnp.float32
    inter = state['intermediates']
    names = ['stem'] + [f'stage{i}' for i in range(1, len(stage_shapes))]
    for name, shape in zip(names, stage_shapes):
      assert inter[name][0].shape == (b,) + shape, name
    assert inter['features'][0].shape == (b, features)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
    assert logits.shape == (b, m, c) and logits.dtype == jnp.float32


# ----------------------------------------------------------------------------
# Numerics against the independent implementation.


class TestAgainstReference:

  @pytest.mark.parametrize('name,train,mixed', [('wrn', False, False),
                                                ('wrn', False, True),
                                                ('wrn', True, True),
                                                ('preact', False, False),
                                                ('preact', False, True),
                                                ('preact', True, True),
                                                ('wrn_m3', True, True)])
  def test_logits_and_batch_stats(self, name, train, mixed):
    model, variables, x, xs, w = tiny_setup(name)
    inp, weights = (xs, w) if mixed else (x, None)

    def both(v, inp, weights):  # One compile for the model and the reference.
      ref = Reference(v, train)
      expected = TINY[name]['ref'](ref, inp, weights)
      kwargs = {} if weights is None else {'mix_weights': weights}
      got = model.apply(v, inp, train=train, mutable=['batch_stats'], **kwargs)
      return got, (expected, ref.new_stats)

    (logits, updates), (expected, new_stats) = jax.jit(both)(variables, inp,
                                                             weights)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, **TOL)
    # Sanity: every member's logits differ from member 0's.
    assert bool((jnp.abs(logits[:, :1] - logits[:, 1:]).max(axis=(0, 2))
                 > 1e-3).all())
    if train:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
                   updates['batch_stats'], new_stats)
    else:
      jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'],
                   variables['batch_stats'])

  @pytest.mark.parametrize('name', ['wrn', 'preact'])
  def test_inference_is_mixed_call_with_uniform_weights(self, name):
    """sum_i c_i(x) == M * sum_i (1/M) c_i(x): paper sec. 3.1."""
    model, variables, x, _, w = tiny_setup(name)
    m = model.num_members
    xs = jnp.repeat(x[:, None], m, axis=1)
    uniform = jnp.full(w.shape, 1.0 / m)
    plain, mixed = jax.jit(lambda v, x, xs, w: (model.apply(
        v, x, train=False), model.apply(v, xs, mix_weights=w, train=False)))(
            variables, x, xs, uniform)
    np.testing.assert_allclose(plain, mixed, **TOL)

  def test_single_member_is_plain_network(self):
    """M = 1 with w = 1: the mixed call is the plain network on x."""
    model = WideResNet(depth=10, width=1, num_classes=3, num_members=1)
    x = jnp.asarray(
        np.random.default_rng(3).standard_normal((2, 8, 8, 3)), jnp.float32)
    v = random_variables(model, 8, seed=5)
    plain, mixed, expected = jax.jit(
        lambda v, x: (model.apply(v, x, train=False),
                      model.apply(v, x[:, None], mix_weights=jnp.ones(
                          (2, 1, 8, 8)), train=False), Reference(
                              v, train=False).wrn(x, None, depth=10, width=1)))(
                                  v, x)
    np.testing.assert_allclose(plain, mixed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain, expected, **TOL)

  def test_jit_matches_eager(self):
    model, variables, _, xs, w = tiny_setup('wrn_m3')
    eager = model.apply(variables, xs, mix_weights=w, train=True,
                        mutable=['batch_stats'])
    jitted = jitted_apply('wrn_m3', True, True)(variables, xs, w)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        eager, jitted)

  def test_bfloat16_compute(self):
    """bf16 compute: float32 logits and statistics, close to the f32 result."""
    _, variables, _, xs, w = tiny_setup('wrn_m3')
    model = WideResNet(depth=10, width=1, num_classes=4, num_members=3,
                       dtype=jnp.bfloat16)
    logits, updates = jax.jit(lambda v, x, w: model.apply(
        v, x, mix_weights=w, train=True, mutable=['batch_stats']))(variables,
                                                                   xs, w)
    ref, _ = jitted_apply('wrn_m3', True, True)(variables, xs, w)
    assert logits.dtype == jnp.float32
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(updates))
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(logits, ref, atol=0.1 * scale)


# ----------------------------------------------------------------------------
# Gradients.


@functools.cache
def grad_fn(name):
  model = TINY[name]['model']

  def loss(params, batch_stats, xs, w, labels):
    logits, _ = model.apply({
        'params': params,
        'batch_stats': batch_stats
    }, xs, mix_weights=w, train=True, mutable=['batch_stats'])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1).sum()

  return jax.jit(jax.grad(loss))


class TestGradients:

  def test_every_stem_and_head_learns(self):
    """Every parameter, each member's stem and head included, gets a gradient.

    (The stems and heads are shared code (common.py); the PreActResNet's
    forward numerics are checked above, so one network is enough here.)
    """
    name = 'wrn_m3'
    model, variables, _, xs, w = tiny_setup(name)
    m = model.num_members
    labels = jnp.asarray(
        np.random.default_rng(7).integers(0, model.num_classes, (BATCH, m)))
    grads = grad_fn(name)(variables['params'], variables['batch_stats'], xs, w,
                          labels)
    for i in range(m):
      assert float(jnp.abs(grads['stems']['kernel'][i]).max()) > 0, i
      assert float(jnp.abs(grads['heads']['kernel'][i]).max()) > 0, i
      assert float(jnp.abs(grads['heads']['bias'][i]).max()) > 0, i
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
      assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)

  def test_masked_member_gets_no_stem_gradient(self):
    """w_1 = 0 everywhere: stem 1 does not reach the core (the model only mixes)."""
    _, variables, _, xs, w = tiny_setup('wrn_m3')
    w = w.at[:, 1].set(0.0)
    labels = jnp.zeros((BATCH, 3), jnp.int32)
    grads = grad_fn('wrn_m3')(variables['params'], variables['batch_stats'], xs,
                              w, labels)
    norms = jnp.abs(grads['stems']['kernel']).max(axis=(1, 2, 3, 4))
    assert float(norms[1]) == 0.0 and float(norms[0]) > 0 and float(
        norms[2]) > 0


# ----------------------------------------------------------------------------
# Registry and configuration helpers.


def make_config(name, image_size, depth=28, width=10, members=2,
                dtype='float32'):
  config = ml_collections.ConfigDict()
  config.num_classes = 10
  config.num_members = members
  config.image_size = image_size
  config.model = ml_collections.ConfigDict(
      dict(name=name, depth=depth, width=width, dtype=dtype))
  return config


class TestRegistry:

  def test_get_model(self):
    model = models.get_model(make_config('wide_resnet', 32, dtype='bfloat16'))
    assert isinstance(model, WideResNet)
    assert (model.depth, model.width, model.num_classes,
            model.num_members) == (28, 10, 10, 2)
    assert model.dtype == jnp.bfloat16
    model = models.get_model(make_config('preact_resnet18', 64, width=3))
    assert isinstance(model, PreActResNet18) and model.width == 3
    assert model.dtype == jnp.float32
    assert set(models.MODEL_NAMES) == {'wide_resnet', 'preact_resnet18'}

  def test_errors(self):
    with pytest.raises(ValueError, match='unknown model'):
      models.get_model(make_config('resnet50', 32))
    with pytest.raises(ValueError, match='dtype'):
      models.get_model(make_config('wide_resnet', 32, dtype='float16'))
    with pytest.raises(ValueError, match='6n\\+4'):
      WideResNet(depth=27, width=1, num_classes=10, num_members=1)
    with pytest.raises(ValueError, match='already registered'):
      models.register_model('wide_resnet')(lambda config: None)

  def test_stem_resolution_and_image_size(self):
    assert models.stem_resolution(make_config('wide_resnet', 32)) == (32, 32)
    assert models.stem_resolution(make_config('preact_resnet18',
                                              64)) == (32, 32)
    models.check_image_size(make_config('wide_resnet', 32))
    models.check_image_size(make_config('preact_resnet18', 64))
    for bad in (32, 48, 128):
      with pytest.raises(ValueError, match='image_size'):
        models.check_image_size(make_config('preact_resnet18', bad))

  def test_register_model(self):
    name = 'test_only_tiny_wrn'
    if name not in models.model_names():
      models.register_model(name)(lambda config: WideResNet(
          10, 1, config.num_classes, config.num_members))
    config = make_config(name, 16)
    assert name in models.model_names()
    assert models.stem_resolution(config) == (16, 16)
    assert isinstance(models.get_model(config), WideResNet)

  def test_bad_mix_weights_shape(self):
    model, variables, _, xs, w = tiny_setup('wrn')
    with pytest.raises(ValueError, match='mix_weights'):
      model.apply(variables, xs, mix_weights=w[:, :, :4, :4], train=False)
    with pytest.raises(ValueError, match='B,M'):
      model.apply(variables, xs[:, 0], mix_weights=w, train=False)

"""mixmo_jax/contrib/onednn/conv.py: the oneDNN conv equals XLA's, in value
and gradient, on one device and batch-sharded over several; every case it
does not handle goes to XLA's conv unchanged."""
import os
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from conftest import REPO, onednn_conv_on
from mixmo_jax.contrib.onednn import conv as onednn_conv
from mixmo_jax.contrib.onednn import library
from mixmo_jax.models import common

NHWC = ('NHWC', 'HWIO', 'NHWC')
TARGETS = library.TARGETS
with onednn_conv_on() as ON:  # The other test files run with it off.
  pass
needs_onednn = pytest.mark.skipif(
    not ON, reason='oneDNN conv path off here (not x86, not CPU, or probe)')


@pytest.fixture(autouse=True, scope='module')
def _onednn_on():
  with onednn_conv_on():
    yield


def _data(b, h, w, ci, k, co, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, h, w, ci)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, ci, co)) / k, jnp.float32)
  return x, kernel


def _value_and_grads(conv, x, w, strides, padding):
  # A non-linear loss, so dL/dy differs per position.
  def loss(x, w):
    y = conv(x, w, strides, padding, dimension_numbers=NHWC)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1], dtype=y.dtype))

  return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)


def _hlo(conv, x, w, strides, padding):
  return jax.jit(
      lambda x, w: conv(x, w, strides, padding, dimension_numbers=NHWC)).lower(
          x, w).compile().as_text()


def _assert_close(ours, ref):
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-6
    np.testing.assert_allclose(
        np.asarray(a) / scale,
        np.asarray(b) / scale, atol=2e-5)


@needs_onednn
@pytest.mark.parametrize(
    'k,strides,padding',
    [
        (3, (1, 1), 'SAME'),
        (3, (2, 2), 'SAME'),  # The strided block's first conv.
        (1, (2, 2), 'VALID'),  # The strided shortcut.
        (1, (1, 1), 'VALID'),
        (3, (1, 1), ((0, 2), (1, 0))),  # Asymmetric explicit pads.
        (3, (1, 2), 'VALID'),  # Unequal strides.
        (2, (3, 3), ((1, 0), (2, 1))),  # Even kernel, stride 3: 9 phases.
        (1, (1, 1), ((1, 1), (1, 1))),  # Pads > k - 1: XLA's dx.
    ])
def test_value_and_gradients_equal_xla(k, strides, padding):
  x, w = _data(3, 9, 8, 5, k, 6)
  ours = _value_and_grads(onednn_conv.conv_general_dilated, x, w, strides,
                          padding)
  ref = _value_and_grads(lax.conv_general_dilated, x, w, strides, padding)
  _assert_close(ours, ref)
  assert TARGETS['conv'] in _hlo(onednn_conv.conv_general_dilated, x, w,
                                 strides, padding)


@needs_onednn
@pytest.mark.parametrize('k,strides', [(3, (1, 1)), (3, (2, 2)), (1, (2, 2))])
def test_both_gradients_go_through_onednn_too(k, strides):
  """The train step's conv is three FFI calls of our own, whatever the
  stride: the forward conv, dL/dx (oneDNN's backward-data kernel) and
  dL/dw (its backward-weights kernel); no XLA convolution is left, and
  oneDNN's threads are the cores shared among this process's CPU devices
  (8 in the suite)."""
  x, w = _data(2, 8, 8, 3, k, 4)
  grad = jax.jit(
      jax.grad(
          lambda x, w: jnp.sum(
              onednn_conv.conv_general_dilated(
                  x, w, strides, 'SAME', dimension_numbers=NHWC)**2), (0, 1)))
  text = grad.lower(x, w).compile().as_text()
  for target in TARGETS.values():
    assert text.count(f'custom_call_target="{target}"') == 1, target
  assert ' convolution(' not in text
  assert library.threads() == max(
      1,
      len(os.sched_getaffinity(0)) // jax.local_device_count())
  assert f'threads = {library.threads()} : i64' in text


def _numpy_grads(x, w, dy, strides, pads):
  """(dx, dw) of y = conv(x, w) for the output gradient dy, term by term in
  float64: dw[p, q, c, o] = sum_{b, i, j} x_pad[b, s_h i + p, s_w j + q, c]
  dy[b, i, j, o], and dx_pad[b, s_h i + p, s_w j + q, c] accumulates
  dy[b, i, j, o] w[p, q, c, o]."""
  x_pad = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  dy, w = np.asarray(dy, np.float64), np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  _, ho, wo, _ = dy.shape
  dw, dx_pad = np.zeros(w.shape), np.zeros(x_pad.shape)
  for p in range(kh):
    for q in range(kw):
      rows = slice(p, p + strides[0] * ho, strides[0])
      cols = slice(q, q + strides[1] * wo, strides[1])
      dw[p, q] = np.einsum('bijc,bijo->co', x_pad[:, rows, cols], dy)
      dx_pad[:, rows, cols] += np.einsum('bijo,co->bijc', dy, w[p, q])
  h, w_ = x.shape[1:3]
  return dx_pad[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w_], dw


def _onednn_grads(x, w, dy, strides, pads):
  _, vjp = jax.vjp(
      lambda x, w: onednn_conv.conv_general_dilated(
          x, w, strides, pads, dimension_numbers=NHWC), x, w)
  return jax.jit(vjp)(dy)


@needs_onednn
@pytest.mark.parametrize(
    'k,strides,pads',
    [
        (3, (1, 1), ((1, 1), (1, 1))),  # WRN's 3x3 conv.
        (3, (2, 2), ((0, 1), (0, 1))),  # Its strided first conv ('SAME').
        (1, (2, 2), ((0, 0), (0, 0))),  # The strided shortcut.
        (3, (1, 2), ((0, 2), (1, 0))),  # Unequal strides, asymmetric pads.
        (2, (3, 3), ((1, 0), (2, 1))),  # Even kernel, stride 3.
    ])
def test_gradients_equal_the_formula(k, strides, pads):
  """dL/dx and dL/dw against an independent float64 sum over the taps."""
  rng = np.random.default_rng(1)
  x, w = _data(3, 9, 8, 5, k, 6)
  ho = (9 + sum(pads[0]) - k) // strides[0] + 1
  wo = (8 + sum(pads[1]) - k) // strides[1] + 1
  dy = jnp.asarray(rng.standard_normal((3, ho, wo, 6)), jnp.float32)
  ours = _onednn_grads(x, w, dy, strides, pads)
  for a, b in zip(ours, _numpy_grads(x, w, dy, strides, pads)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_a_planted_product_lands_at_its_tap_and_channels():
  """x = 1 at one pixel and input channel, dy = 1 at one output position and
  channel: dw is 1 exactly at the tap linking them, (p, q) = (padded row -
  s_h*i, padded col - s_w*j), for the channels planted, and 0 elsewhere
  (catches swapped H/W, Ci/Co or a wrong padding offset); dx is w's column
  at that tap, at that pixel."""
  strides, pads = (2, 1), ((1, 0), (0, 1))
  x = np.zeros((2, 7, 6, 3), np.float32)
  dy = np.zeros((2, 3, 5, 5), np.float32)  # Ho = (7+1-3)//2+1, Wo = 6+1-3+1.
  x[1, 4, 2, 2] = 1.0  # b 1, row 4, col 2, c 2.
  dy[1, 2, 1, 3] = 1.0  # b 1, i 2, j 1, o 3.
  w = np.arange(3 * 3 * 3 * 5, dtype=np.float32).reshape(3, 3, 3, 5)
  dx, dw = _onednn_grads(
      jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy), strides, pads)
  # Padded row 4 + 1 = 2*i + p -> p = 1; padded col 2 = 1*j + q -> q = 1.
  expected = np.zeros((3, 3, 3, 5), np.float32)
  expected[1, 1, 2, 3] = 1.0
  np.testing.assert_array_equal(np.asarray(dw), expected)
  # dy's one entry reaches x_pad[1, 2*2 + p, 1 + q, c] with w[p, q, c, 3].
  dx_expected = np.zeros_like(x)
  for p in range(3):
    for q in range(3):
      row, col = 4 + p - 1, 1 + q
      if 0 <= row < 7 and 0 <= col < 6:
        dx_expected[1, row, col] = w[p, q, :, 3]
  np.testing.assert_array_equal(np.asarray(dx), dx_expected)


@pytest.mark.parametrize(
    'case', ['bfloat16', 'groups', 'dilation', 'nchw', 'precision'])
def test_other_cases_are_xla_convs_unchanged(case):
  x, w = _data(2, 6, 6, 4, 3, 4)
  kwargs = dict(dimension_numbers=NHWC)
  if case == 'bfloat16':
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  elif case == 'groups':
    w = w[:, :, :2]
    kwargs['feature_group_count'] = 2
  elif case == 'dilation':
    kwargs['rhs_dilation'] = (2, 2)
  elif case == 'nchw':
    x = jnp.transpose(x, (0, 3, 1, 2))
    kwargs['dimension_numbers'] = ('NCHW', 'HWIO', 'NCHW')
  elif case == 'precision':
    kwargs['precision'] = lax.Precision.HIGHEST
  fn = lambda conv: jax.jit(lambda x, w: conv(x, w, (1, 1), 'SAME', **kwargs)
                           )  # noqa: E731
  ours = fn(onednn_conv.conv_general_dilated)
  ref = fn(lax.conv_general_dilated)
  np.testing.assert_array_equal(
      np.asarray(ours(x, w), np.float32), np.asarray(ref(x, w), np.float32))
  text = ours.lower(x, w).compile().as_text()
  assert not any(target in text for target in TARGETS.values())


def test_vmap_and_eager_calls_equal_xla():
  """Batched (vmap: XLA's conv) and eager calls give XLA's values, and the
  vmapped gradient matches."""
  x, w = _data(6, 5, 5, 3, 3, 4)
  xs = x.reshape((2, 3) + x.shape[1:])
  conv = lambda f: lambda x, w: f(x, w, (1, 1), 'SAME', dimension_numbers=NHWC
                                 )  # noqa: E731
  ours, ref = conv(onednn_conv.conv_general_dilated), conv(
      lax.conv_general_dilated)
  _assert_close(
      jax.vmap(ours, (0, None))(xs, w),
      jax.vmap(ref, (0, None))(xs, w))
  _assert_close(ours(x, w), ref(x, w))
  loss = lambda f: lambda x, w: jnp.sum(jax.vmap(f, (0, None))
                                        (x, w)**2)  # noqa: E731
  _assert_close(
      jax.grad(loss(ours), (0, 1))(xs, w),
      jax.grad(loss(ref), (0, 1))(xs, w))


@needs_onednn
def test_batch_sharded_conv_runs_per_shard_without_gathering():
  """Over a 4-device batch-sharded mesh: each FFI call once per shard (the
  conv's and dx's shapes are the shard's), the per-shard weight gradients
  added by an all-reduce, no all-gather, and XLA's values and gradients."""
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  x, w = _data(8, 6, 6, 3, 3, 4)
  shard = NamedSharding(mesh, P('data'))
  x = jax.device_put(x, shard)
  w = jax.device_put(w, NamedSharding(mesh, P()))

  def loss(conv):
    return jax.jit(
        jax.value_and_grad(
            lambda x, w: jnp.sum(
                jnp.sin(conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC))),
            (0, 1)), in_shardings=(shard, NamedSharding(mesh, P())))

  compiled = loss(onednn_conv.conv_general_dilated).lower(x, w).compile()
  text = compiled.as_text()
  calls = {
      kind: [
          line
          for line in text.splitlines()
          if f'custom_call_target="{target}"' in line
      ] for kind, target in TARGETS.items()
  }
  assert all(len(found) == 1 for found in calls.values()), calls
  assert 'f32[2,6,6,4]' in calls['conv'][0]  # y of the shard's 2 images.
  assert 'f32[2,6,6,3]' in calls['dx'][0]  # dx of the same.
  assert 'all-reduce' in text and 'all-gather' not in text
  _assert_close(compiled(x, w), loss(lax.conv_general_dilated)(x, w))


def test_disabled_context_traces_xla_convs():
  x, w = _data(2, 6, 6, 3, 3, 4)
  with onednn_conv.disabled():
    assert not onednn_conv.active()
    text = _hlo(onednn_conv.conv_general_dilated, x, w, (1, 1), 'SAME')
  assert TARGETS['conv'] not in text
  assert onednn_conv.active() == ON


def test_the_path_is_opt_in():
  """The models' conv takes oneDNN only with MIXMO_ONEDNN_CONV=1 (in a fresh
  process each); with the contrib module unloadable it warns once and
  takes XLA's conv."""
  code = ('import sys\n'
          'if sys.argv[1] == "gone":\n'
          '  sys.modules["mixmo_jax.contrib.onednn.conv"] = None\n'
          'import jax, jax.numpy as jnp\n'
          'from mixmo_jax.models import common\n'
          'f = jax.jit(lambda x, w: common.conv_general_dilated(x, w, (1, 1), '
          '"SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))\n'
          'x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))\n'
          'print("mixmo_onednn_conv" in f.lower(x, w).compile().as_text(),'
          ' "mixmo_jax.contrib.onednn.conv" in sys.modules)\n')
  out = {}
  for value, case in (('0', ''), ('', ''), ('1', ''), ('1', 'gone')):
    env = dict(os.environ, MIXMO_ONEDNN_CONV=value, JAX_PLATFORMS='cpu')
    proc = subprocess.run([sys.executable, '-c', code, case], cwd=REPO, env=env,
                          check=True, capture_output=True, text=True,
                          timeout=120)
    out[value, case] = proc.stdout.split(), proc.stderr
  assert out['0', ''][0] == ['False', 'False']
  assert out['', ''][0] == ['False', 'False']  # Nothing imports contrib.
  assert out['1', ''][0] == [str(ON), 'True']
  assert out['1', 'gone'][0] == ['False', 'True']  # The None placeholder.
  assert out['1', 'gone'][1].count('cannot be loaded') == 1


@needs_onednn
def test_the_models_conv_layers_go_through_onednn():
  """common.conv, the models' conv layer, calls the oneDNN conv."""
  layer = common.conv(8, 3, 1, 'SAME', jnp.float32)
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  params = layer.init(jax.random.key(0), x)
  text = jax.jit(layer.apply).lower(params, x).compile().as_text()
  assert TARGETS['conv'] in text


def test_op_profile_times_the_onednn_custom_calls():
  """The oneDNN conv's FFI calls: their trace events carry the target in
  the name, event_names() maps them back and the profile times them."""
  from experiments import op_profile

  def loss(w, x):
    y = onednn_conv.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jax.nn.relu(y)**2)

  w, x = jnp.ones((3, 3, 8, 8)), jnp.ones((4, 16, 16, 8))
  with onednn_conv_on() as on:  # Traced inside: the FFI calls.
    if not on:
      pytest.skip('no oneDNN conv on this machine')
    compiled = jax.jit(jax.value_and_grad(loss,
                                          argnums=(0, 1))).lower(w,
                                                                 x).compile()
  text = compiled.as_text()
  known = op_profile.instructions(text)
  calls = {name for name, (op, _) in known.items() if op == 'custom-call'}
  assert len(calls) == 3, known  # The conv, dx and dw.
  aliases = op_profile.event_names(text)
  assert sorted(aliases.values()) == sorted(calls)
  targets = sorted(event[len(name):] for event, name in aliases.items())
  assert targets == sorted(TARGETS.values())
  ops = op_profile.profile(lambda: jax.block_until_ready(compiled(w, x)),
                           compiled, steps=2)
  assert calls <= {op.name for op in ops}, ops


@needs_onednn
def test_the_programs_platform_decides_not_the_default_backend():
  """A program exported for a GPU or TPU from this CPU process (as
  experiments.aot compiles) holds XLA's own convs and gradients, the same
  convolutions as with the path off; the CPU program holds oneDNN's."""
  x, w = _data(2, 8, 8, 3, 3, 4)

  def grad(conv):
    return jax.jit(
        jax.grad(
            lambda x, w: jnp.sum(
                conv(x, w, (2, 2), 'SAME', dimension_numbers=NHWC)**2), (0, 1)))

  def exported(platform, conv):
    return jax.export.export(grad(conv), platforms=[platform])(x,
                                                               w).mlir_module()

  for platform in ('cuda', 'tpu'):
    ours = exported(platform, onednn_conv.conv_general_dilated)
    assert not any(target in ours for target in TARGETS.values())
    stock = exported(platform, lax.conv_general_dilated)
    assert (ours.count('stablehlo.convolution') ==
            stock.count('stablehlo.convolution') > 0)
  assert TARGETS['conv'] in grad(onednn_conv.conv_general_dilated).lower(
      x, w).as_text()

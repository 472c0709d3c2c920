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
from mixmo_jax.contrib.onednn import dw as onednn_dw
from mixmo_jax.models import common

NHWC = ('NHWC', 'HWIO', 'NHWC')
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
  return jax.jit(lambda x, w: conv(x, w, strides, padding,
                                   dimension_numbers=NHWC)).lower(
                                       x, w).compile().as_text()


def _assert_close(ours, ref):
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-6
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale,
                               atol=2e-5)


@needs_onednn
@pytest.mark.parametrize('k,strides,padding', [
    (3, (1, 1), 'SAME'),
    (3, (2, 2), 'SAME'),           # The strided block's first conv.
    (1, (2, 2), 'VALID'),          # The strided shortcut.
    (1, (1, 1), 'VALID'),
    (3, (1, 1), ((0, 2), (1, 0))),  # Asymmetric explicit pads.
    (3, (1, 2), 'VALID'),          # Unequal strides.
    (2, (3, 3), ((1, 0), (2, 1))),  # Even kernel, stride 3: 9 phases.
    (1, (1, 1), ((1, 1), (1, 1))),  # Pads > k - 1: XLA's dx.
])
def test_value_and_gradients_equal_xla(k, strides, padding):
  x, w = _data(3, 9, 8, 5, k, 6)
  ours = _value_and_grads(onednn_conv.conv_general_dilated, x, w, strides,
                          padding)
  ref = _value_and_grads(lax.conv_general_dilated, x, w, strides, padding)
  _assert_close(ours, ref)
  assert onednn_conv.CUSTOM_CALL in _hlo(
      onednn_conv.conv_general_dilated, x, w, strides, padding)


@needs_onednn
@pytest.mark.parametrize('k,strides,calls', [
    (3, (1, 1), 2),   # Forward, dx.
    (3, (2, 2), 5),   # Forward, dx as 4 phase convs.
    (1, (2, 2), 2),   # Forward, the one phase with a tap (3 are zero).
])
def test_input_gradient_goes_through_onednn_too(k, strides, calls):
  """dL/dx is the oneDNN conv with the flipped kernel (stride 1) or one
  per phase of the stride (`_strided_input_grad`); dL/dw is oneDNN's
  weight-gradient FFI call (onednn_dw.py) where it builds, else XLA's."""
  x, w = _data(2, 8, 8, 3, k, 4)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(
      onednn_conv.conv_general_dilated(x, w, strides, 'SAME',
                                       dimension_numbers=NHWC) ** 2),
                          (0, 1)))
  text = grad.lower(x, w).compile().as_text()
  assert text.count(f'custom_call_target="{onednn_conv.CUSTOM_CALL}"') == calls
  dw_calls = text.count(f'custom_call_target="{onednn_dw.TARGET}"')
  if onednn_dw.enabled():
    assert dw_calls == 1 and ' convolution(' not in text
  else:
    assert dw_calls == 0 and ' convolution(' in text


@pytest.mark.parametrize('case', ['bfloat16', 'groups', 'dilation', 'nchw',
                                  'precision'])
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
  fn = lambda conv: jax.jit(lambda x, w: conv(x, w, (1, 1), 'SAME', **kwargs))  # noqa: E731
  ours = fn(onednn_conv.conv_general_dilated)
  ref = fn(lax.conv_general_dilated)
  np.testing.assert_array_equal(np.asarray(ours(x, w), np.float32),
                                np.asarray(ref(x, w), np.float32))
  assert onednn_conv.CUSTOM_CALL not in ours.lower(x, w).compile().as_text()


def test_vmap_and_eager_calls_equal_xla():
  """Batched (vmap: XLA's conv) and eager calls give XLA's values, and the
  vmapped gradient matches."""
  x, w = _data(6, 5, 5, 3, 3, 4)
  xs = x.reshape((2, 3) + x.shape[1:])
  conv = lambda f: lambda x, w: f(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)  # noqa: E731
  ours, ref = conv(onednn_conv.conv_general_dilated), conv(
      lax.conv_general_dilated)
  _assert_close(jax.vmap(ours, (0, None))(xs, w),
                jax.vmap(ref, (0, None))(xs, w))
  _assert_close(ours(x, w), ref(x, w))
  loss = lambda f: lambda x, w: jnp.sum(jax.vmap(f, (0, None))(x, w) ** 2)  # noqa: E731
  _assert_close(jax.grad(loss(ours), (0, 1))(xs, w),
                jax.grad(loss(ref), (0, 1))(xs, w))


@needs_onednn
def test_batch_sharded_conv_runs_per_shard_without_gathering():
  """Over a 4-device batch-sharded mesh: one custom call per shard (its
  shapes are the shard's), no all-gather, and XLA's values and gradients."""
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  x, w = _data(8, 6, 6, 3, 3, 4)
  shard = NamedSharding(mesh, P('data'))
  x = jax.device_put(x, shard)
  w = jax.device_put(w, NamedSharding(mesh, P()))

  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv(
        x, w, (1, 1), 'SAME', dimension_numbers=NHWC))), (0, 1)),
                   in_shardings=(shard, NamedSharding(mesh, P())))

  compiled = loss(onednn_conv.conv_general_dilated).lower(x, w).compile()
  text = compiled.as_text()
  calls = [line for line in text.splitlines()
           if f'custom_call_target="{onednn_conv.CUSTOM_CALL}"' in line]
  assert len(calls) == 2 and all('f32[2,6,6,' in c for c in calls), calls
  assert 'all-gather' not in text
  _assert_close(compiled(x, w), loss(lax.conv_general_dilated)(x, w))


def test_disabled_context_traces_xla_convs():
  x, w = _data(2, 6, 6, 3, 3, 4)
  with onednn_conv.disabled():
    assert not onednn_conv.active()
    text = _hlo(onednn_conv.conv_general_dilated, x, w, (1, 1), 'SAME')
  assert onednn_conv.CUSTOM_CALL not in text
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
          'print("__onednn$convolution" in f.lower(x, w).compile().as_text(),'
          ' "mixmo_jax.contrib.onednn.conv" in sys.modules)\n')
  out = {}
  for value, case in (('0', ''), ('', ''), ('1', ''), ('1', 'gone')):
    env = dict(os.environ, MIXMO_ONEDNN_CONV=value, JAX_PLATFORMS='cpu')
    proc = subprocess.run(
        [sys.executable, '-c', code, case], cwd=REPO, env=env, check=True,
        capture_output=True, text=True, timeout=120)
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
  assert onednn_conv.CUSTOM_CALL in text


def test_op_profile_times_the_onednn_custom_calls():
  """The oneDNN conv's custom calls: their trace events carry the target in
  the name, event_names() maps them back and the profile times them (the
  weight gradient's FFI call, where onednn_dw builds it, too)."""
  from experiments import op_profile

  def loss(w, x):
    y = onednn_conv.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jax.nn.relu(y) ** 2)

  w, x = jnp.ones((3, 3, 8, 8)), jnp.ones((4, 16, 16, 8))
  with onednn_conv_on() as on:  # Traced inside: the custom calls.
    if not on:
      pytest.skip('no oneDNN conv on this machine')
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
        w, x).compile()
  text = compiled.as_text()
  known = op_profile.instructions(text)
  calls = {name for name, (op, _) in known.items() if op == 'custom-call'}
  # Forward and input gradient, and the weight gradient's FFI call.
  assert len(calls) == 2 + onednn_dw.enabled(), known
  aliases = op_profile.event_names(text)
  assert sorted(aliases.values()) == sorted(calls)
  targets = sorted(event[len(name):] for event, name in aliases.items())
  assert targets == sorted([onednn_conv.CUSTOM_CALL] * 2
                           + [onednn_dw.TARGET] * onednn_dw.enabled())
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
    return jax.jit(jax.grad(lambda x, w: jnp.sum(conv(
        x, w, (2, 2), 'SAME', dimension_numbers=NHWC) ** 2), (0, 1)))

  def exported(platform, conv):
    return jax.export.export(grad(conv), platforms=[platform])(
        x, w).mlir_module()

  for platform in ('cuda', 'tpu'):
    ours = exported(platform, onednn_conv.conv_general_dilated)
    assert onednn_conv.CUSTOM_CALL not in ours
    assert onednn_dw.TARGET not in ours
    stock = exported(platform, lax.conv_general_dilated)
    assert (ours.count('stablehlo.convolution')
            == stock.count('stablehlo.convolution') > 0)
  assert onednn_conv.CUSTOM_CALL in grad(
      onednn_conv.conv_general_dilated).lower(x, w).as_text()

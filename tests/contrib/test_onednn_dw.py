"""mixmo_jax/contrib/onednn/dw.py: oneDNN's conv weight gradient equals the
formula (an independent numpy sum) and XLA's, on one device and summed over
a batch-sharded mesh; a missing library or compiler falls back to XLA's."""
import logging
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from conftest import REPO
from mixmo_jax.contrib.onednn import dw as onednn_dw

ON = onednn_dw.enabled()
needs_dw = pytest.mark.skipif(
    not ON, reason='oneDNN weight gradient unavailable here (see the log)')
# Where setup.py installs the library and a compiler is found, the path must
# be on: a kernel that fails the probe is an error, not a skip.
BUILDABLE = (platform.machine() == 'x86_64' and sys.platform == 'linux'
             and onednn_dw.onednn_root() is not None
             and shutil.which(os.environ.get('CXX', 'g++')) is not None)


def test_on_wherever_it_can_be_built():
  if not BUILDABLE:
    pytest.skip('no oneDNN library or no C++ compiler here')
  assert ON, 'built but the probe or the registration failed (see the log)'


def _numpy_dw(x, dy, w_shape, strides, pads):
  """dw[p, q, c, o] = sum_{b, i, j} x_pad[b, s_h*i + p, s_w*j + q, c]
  dy[b, i, j, o], term by term in float64."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  dy = np.asarray(dy, np.float64)
  kh, kw = w_shape[:2]
  _, ho, wo, _ = dy.shape
  dw = np.zeros(w_shape)
  for p in range(kh):
    for q in range(kw):
      window = x[:, p:p + strides[0] * ho:strides[0],
                 q:q + strides[1] * wo:strides[1]]
      dw[p, q] = np.einsum('bijc,bijo->co', window, dy)
  return dw


def _case(b, h, w, ci, k, co, strides, pads, seed=0):
  rng = np.random.default_rng(seed)
  ho = (h + sum(pads[0]) - k) // strides[0] + 1
  wo = (w + sum(pads[1]) - k) // strides[1] + 1
  x = jnp.asarray(rng.standard_normal((b, h, w, ci)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((b, ho, wo, co)), jnp.float32)
  return x, dy, (k, k, ci, co)


CASES = [
    (3, (1, 1), ((1, 1), (1, 1))),   # WRN's 3x3 conv.
    (3, (2, 2), ((0, 1), (0, 1))),   # Its strided first conv ('SAME').
    (1, (2, 2), ((0, 0), (0, 0))),   # The strided shortcut.
    (3, (1, 2), ((0, 2), (1, 0))),   # Unequal strides, asymmetric pads.
    (2, (3, 3), ((1, 0), (2, 1))),   # Even kernel, stride 3.
]


@needs_dw
@pytest.mark.parametrize('k,strides,pads', CASES)
def test_weight_gradient_equals_the_formula_and_xla(k, strides, pads):
  x, dy, w_shape = _case(3, 9, 8, 5, k, 6, strides, pads)
  fn = jax.jit(onednn_dw.weight_grad, static_argnums=(2, 3, 4))
  ours = np.asarray(fn(x, dy, w_shape, strides, pads))
  ref = _numpy_dw(x, dy, w_shape, strides, pads)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  xla = onednn_dw.xla_weight_grad(x, dy, w_shape, strides, pads)
  np.testing.assert_allclose(ours, np.asarray(xla), rtol=1e-4, atol=1e-4)
  text = fn.lower(x, dy, w_shape, strides, pads).compile().as_text()
  assert f'custom_call_target="{onednn_dw.TARGET}"' in text
  assert ' convolution(' not in text
  # oneDNN's threads: the cores shared among this process's CPU devices (8).
  assert onednn_dw.threads() == max(
      1, len(os.sched_getaffinity(0)) // jax.local_device_count())
  assert f'threads = {onednn_dw.threads()} : i64' in text


@needs_dw
def test_a_planted_product_lands_at_its_tap_and_channels():
  """x = 1 at one pixel and input channel, dy = 1 at one output position and
  channel: dw is 1 exactly at the tap linking them, (p, q) = (padded row -
  s_h*i, padded col - s_w*j), for the channels planted, and 0 elsewhere
  (catches swapped H/W, Ci/Co or a wrong padding offset)."""
  strides, pads = (2, 1), ((1, 0), (0, 1))
  x = np.zeros((2, 7, 6, 3), np.float32)
  dy = np.zeros((2, 3, 5, 5), np.float32)  # Ho = (7+1-3)//2+1, Wo = 6+1-3+1.
  x[1, 4, 2, 2] = 1.0                      # b 1, row 4, col 2, c 2.
  dy[1, 2, 1, 3] = 1.0                     # b 1, i 2, j 1, o 3.
  # Padded row 4 + 1 = 2*i + p -> p = 1; padded col 2 = 1*j + q -> q = 1.
  dw = np.asarray(jax.jit(onednn_dw.weight_grad, static_argnums=(2, 3, 4))(
      jnp.asarray(x), jnp.asarray(dy), (3, 3, 3, 5), strides, pads))
  expected = np.zeros((3, 3, 3, 5), np.float32)
  expected[1, 1, 2, 3] = 1.0
  np.testing.assert_array_equal(dw, expected)


@needs_dw
def test_batch_sharded_sum_is_one_call_per_shard_and_a_psum():
  """Over a 4-device batch-sharded mesh: one FFI call per shard (the
  shard's batch of 2), an all-reduce of the partial sums, no all-gather of
  the activations, and the full batch's dw."""
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  strides, pads = (1, 1), ((1, 1), (1, 1))
  x, dy, w_shape = _case(8, 6, 6, 3, 3, 4, strides, pads)
  shard = NamedSharding(mesh, P('data'))
  fn = jax.jit(lambda x, dy: onednn_dw.weight_grad(x, dy, w_shape, strides,
                                                   pads),
               in_shardings=(shard, shard))
  compiled = fn.lower(x, dy).compile()
  text = compiled.as_text()
  calls = [line for line in text.splitlines()
           if f'custom_call_target="{onednn_dw.TARGET}"' in line]
  assert len(calls) == 1 and 'f32[2,6,6,3]' in calls[0], calls
  assert 'all-reduce' in text and 'all-gather' not in text
  out = compiled(jax.device_put(x, shard), jax.device_put(dy, shard))
  np.testing.assert_allclose(np.asarray(out),
                             _numpy_dw(x, dy, w_shape, strides, pads),
                             rtol=1e-4, atol=1e-4)


def test_vmap_and_eager_are_xla_weight_gradients():
  strides, pads = (1, 1), ((1, 1), (1, 1))
  x, dy, w_shape = _case(4, 5, 5, 2, 3, 3, strides, pads)
  eager = onednn_dw.weight_grad(x, dy, w_shape, strides, pads)
  np.testing.assert_allclose(np.asarray(eager),
                             _numpy_dw(x, dy, w_shape, strides, pads),
                             rtol=1e-4, atol=1e-4)
  batched = jax.jit(jax.vmap(lambda x, dy: onednn_dw.weight_grad(
      x, dy, w_shape, strides, pads)))(x[:, None], dy[:, None])
  for b in range(4):
    np.testing.assert_allclose(
        np.asarray(batched[b]),
        _numpy_dw(x[b:b + 1], dy[b:b + 1], w_shape, strides, pads),
        rtol=1e-4, atol=1e-4)


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
  """No library (or compiler): XLA's weight gradient and one warning naming
  the cause, before anything is compiled."""
  def no_library():
    raise RuntimeError('no oneDNN library (test)')
  monkeypatch.setattr(onednn_dw, 'load', no_library)
  onednn_dw.enabled.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not onednn_dw.enabled()
      assert not onednn_dw.enabled()  # Cached: no second warning.
    warnings = [r.getMessage() for r in caplog.records
                if onednn_dw.ENV in r.getMessage()]
    assert len(warnings) == 1 and 'no oneDNN library (test)' in warnings[0]
    strides, pads = (1, 1), ((1, 1), (1, 1))
    x, dy, w_shape = _case(2, 5, 5, 2, 3, 3, strides, pads)
    text = jax.jit(onednn_dw.weight_grad, static_argnums=(2, 3, 4)).lower(
        x, dy, w_shape, strides, pads).compile().as_text()
    assert onednn_dw.TARGET not in text
  finally:
    monkeypatch.undo()
    onednn_dw.enabled.cache_clear()


def test_build_errors_name_the_cause_and_leave_no_partial_file(
    tmp_path, monkeypatch):
  monkeypatch.setenv(onednn_dw.CACHE_ENV, str(tmp_path))
  if onednn_dw.onednn_root() is None:
    with pytest.raises(RuntimeError, match='no oneDNN library'):
      onednn_dw.build()
    return
  monkeypatch.setenv('CXX', 'no-such-compiler-mixmo')
  with pytest.raises(RuntimeError, match='no C\\+\\+ compiler'):
    onednn_dw.build()
  monkeypatch.setenv('CXX', 'false')  # A "compiler" that fails.
  with pytest.raises(RuntimeError, match='failed'):
    onednn_dw.build()
  assert list(tmp_path.iterdir()) == []


@needs_dw
def test_the_build_is_cached_by_content(tmp_path, monkeypatch):
  monkeypatch.setenv(onednn_dw.CACHE_ENV, str(tmp_path))
  first = onednn_dw.build()
  mtime = first.stat().st_mtime_ns
  assert onednn_dw.build() == first and first.stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_environment_variable_turns_it_off():
  code = ('from mixmo_jax.contrib.onednn import dw as d\n'
          'print(d.enabled())\n')
  env = dict(os.environ, MIXMO_ONEDNN_DW='0', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                       check=True, capture_output=True, text=True,
                       timeout=120).stdout.split()
  assert out == ['False']

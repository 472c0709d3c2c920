"""2-D convolutions through oneDNN on x86 CPUs (forward and input gradient).

    from mixmo_jax.contrib.onednn import conv as onednn_conv
    y = onednn_conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

is a drop-in for `jax.lax.conv_general_dilated` (same arguments, same
result up to float32 rounding). On an x86 CPU backend, for a float32
NHWC x [B, H, W, Ci] and HWIO w [kh, kw, Ci, Co] with strides s, explicit
or 'SAME'/'VALID' padding, no dilation and no groups, it computes

    y[b, i, j, o] = sum_{p, q, c} x_pad[b, s*i + p, s*j + q, c] w[p, q, c, o]

with oneDNN's convolution kernel (the one PyTorch uses on CPUs), which
jaxlib ships and XLA can call as the custom call `__onednn$convolution`,
but which this jaxlib's XLA never selects itself (its rewriter is compiled
out of the pip builds; convolutions go to Eigen or YNNPACK). The gradients
(a `jax.custom_vjp`):

    dL/dx, stride 1:  conv(dy, w') with w'[p, q, o, c] = w[kh-1-p, kw-1-q,
            c, o] and padding (k-1-lo, k-1-hi): the same oneDNN kernel;
    dL/dx, stride s > 1:  s_h * s_w stride-1 oneDNN convs of dy, one per
            output phase u = s*t + a, each with the sub-kernel w[a::s]
            flipped, interleaved and cropped (`_strided_input_grad` derives
            it); XLA's own is a dilated conv, 2-3x slower here;
    dL/dw:  oneDNN's backward-weights kernel, through an FFI call that
            `onednn_dw` builds at first use (jaxlib's custom call runs only
            oneDNN's forward kernel, ~3x slower than XLA's on the weight
            gradient's shapes); XLA's own where that library is missing.

Under a device mesh (jit with a batch-sharded input), the custom call is a
`jax.experimental.custom_partitioning` op: one call per device on its
batch shard with the weights replicated, as XLA does for its own conv
(left to XLA's partitioner, an opaque custom call would all-gather the
batch onto every device).

Every other case (other dtypes or layouts, dilation, groups, `precision`
or `preferred_element_type` set) calls `jax.lax.conv_general_dilated`
unchanged. The choice between the two is made per program, by the platform
it is compiled for (`jax.lax.platform_dependent`), not by the process's
default backend: a GPU or TPU program (compiled on a CPU host ahead of
time, or on a machine with both) is the same as without this module. The
oneDNN path is used only when

  * the machine is x86-64 and the program is compiled for its CPU,
  * MIXMO_ONEDNN_CONV is '1' (on a jaxlib other than the tested ones
    below, with a warning), and
  * a probe conv through the custom call, at first use, equals XLA's
    within float32 rounding, gradients included (the config encoding is
    an XLA internal that can change between jaxlib releases; a mismatch or
    an error turns the path off with one warning).

Measured with `python -m experiments.conv_peer --parts` and `python -m
experiments.benchmark --peer=torch` (README, Performance): on a 2-core Xeon
(Sapphire Rapids) per WRN layer the oneDNN forward and stride-1 input
gradient take 65-95% of XLA's time, the stride-2 input gradient a third to
a half (26.1 -> 8.0 ms at 32x32x64 -> 128), a training step 8-15% less;
on a 2-core AMD EPYC (Zen 4) the oneDNN weight gradient takes 50-85% of
XLA's.

Caveats of the custom call, both outside training itself:
  * jax's persistent compilation cache cannot store a program that holds
    it: jax logs "Error writing persistent compilation cache entry ...
    std::bad_alloc" and compiles the program again in the next process
    (correct, only the cache is missed);
  * `jax.export` of such a program would carry an x86-only custom call.
Leave MIXMO_ONEDNN_CONV unset (or '0') where either
matters.
"""
import contextlib
import functools
import json
import logging
import os
import platform as _host
import threading
from typing import Iterator, Sequence

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from jax.extend.core import Primitive
from jax.interpreters import mlir
# custom_call has no public home (jax.ffi builds FFI calls, not this legacy
# XLA target); the probe below turns the path off if it moves.
from jax._src.interpreters import mlir as mlir_internal

from mixmo_jax.contrib.onednn import kernels as cpu_kernels
from mixmo_jax.contrib.onednn import dw as onednn_dw

ENV = 'MIXMO_ONEDNN_CONV'
# jaxlib releases whose custom-call config encoding this module was checked
# against (window dilations stored as value + 1; pads, strides and
# dimension indices as they are).
TESTED_JAXLIB = ('0.10.',)
_NHWC = ('NHWC', 'HWIO', 'NHWC')
CUSTOM_CALL = '__onednn$convolution'  # XLA's custom-call target.

Pads = onednn_dw.Pads


def _xla_conv(x, w, strides: tuple[int, int], pads: Pads):
  """XLA's NHWC/HWIO conv, the reference and the fallback."""
  return lax.conv_general_dilated(x, w, strides, pads,
                                  dimension_numbers=_NHWC)


def _out_shape(x_shape, w_shape, strides, pads):
  """[B, Ho, Wo, Co] of a valid conv of the padded input."""
  b, h, w, _ = x_shape
  kh, kw, _, co = w_shape
  ho = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
  wo = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
  return (b, ho, wo, co)


def _config(strides, pads) -> str:
  """The custom call's backend config (XLA's OneDnnConvolutionConfig) as JSON.

  Dimension indices: x [B, H, W, Ci] (batch 0, feature 3, spatial 1, 2),
  w [kh, kw, Ci, Co] (input feature 2, output feature 3, spatial 0, 1).
  """
  nhwc = {'batch_dim': 0, 'feature_dim': 3, 'spatial_dims': [1, 2]}
  return json.dumps({'onednn_conv_config': {
      'dims': 4, 'feature_groups': 1,
      'input': {'dims': 4, 'data': nhwc},
      'kernel': {'dims': 4, 'filter': {
          'input_feature_dim': 2, 'output_feature_dim': 3,
          'spatial_dims': [0, 1]}},
      'output': {'dims': 4, 'data': nhwc},
      'window': {'pad_left': [pads[0][0], pads[1][0]],
                 'pad_right': [pads[0][1], pads[1][1]],
                 'strides': list(strides),
                 'window_dilations': [1, 1]}}})


def _abstract_eval(x, w, *, strides, pads):
  return jax.core.ShapedArray(_out_shape(x.shape, w.shape, strides, pads),
                              x.dtype)


def _xla_lowering(ctx, x, w, *, strides, pads):
  return mlir.lower_fun(lambda x, w: _xla_conv(x, w, strides, pads),
                        multiple_results=False)(ctx, x, w)


# Two primitives, both y = conv(x, w) [B, Ho, Wo, Co]:
#  * _conv_p, what the model binds: eager calls, vmap and non-CPU lowerings
#    are XLA's conv; its CPU lowering is _partitioned() below;
#  * _call_p, the custom call itself, on one device's shard.
_call_p = Primitive('mixmo_onednn_conv')
_call_p.def_abstract_eval(_abstract_eval)


def _lower_custom_call(ctx, x, w, *, strides, pads):
  out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
  return mlir_internal.custom_call(
      CUSTOM_CALL, result_types=[out_type], operands=[x, w],
      backend_config=_config(strides, pads), api_version=1).results


mlir.register_lowering(_call_p, _xla_lowering)
mlir.register_lowering(_call_p, _lower_custom_call, platform='cpu')


@functools.cache
def _partitioned(strides: tuple[int, int], pads: Pads):
  """_call_p as a `custom_partitioning` op: batch-sharded x -> batch-sharded
  y, one custom call per shard, w replicated (XLA's SPMD partitioner cannot
  split an opaque custom call: it would all-gather the batch onto every
  device)."""
  def conv(x, w):
    return _call_p.bind(x, w, strides=strides, pads=pads)

  def batch_sharding(mesh, x_sharding):
    spec = getattr(x_sharding, 'spec', None)
    return NamedSharding(mesh, P(spec[0] if spec else None))

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    out = batch_sharding(mesh, arg_shapes[0].sharding)
    return mesh, conv, out, (out, NamedSharding(mesh, P()))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return batch_sharding(mesh, arg_shapes[0].sharding)

  fn = custom_partitioning(conv)
  fn.def_partition(partition=partition, infer_sharding_from_operands=infer,
                   sharding_rule='b h w c, p q c o -> b i j o')
  return fn


_conv_p = Primitive('mixmo_conv')
_conv_p.def_abstract_eval(_abstract_eval)
_conv_p.def_impl(lambda x, w, *, strides, pads: jax.jit(
    _xla_conv, static_argnums=(2, 3))(x, w, strides, pads))


def _lower_partitioned(ctx, x, w, *, strides, pads):
  return mlir.lower_fun(lambda x, w: _partitioned(strides, pads)(x, w),
                        multiple_results=False)(ctx, x, w)


def _batch(args, dims, *, strides, pads):
  conv = functools.partial(_xla_conv, strides=strides, pads=pads)
  return jax.vmap(conv, in_axes=dims)(*args), 0


cpu_kernels.register(_conv_p, xla=_xla_lowering, one_device=_lower_custom_call,
                     mesh=_lower_partitioned, batch=_batch)


def _call(x, w, strides: tuple[int, int], pads: Pads):
  return _conv_p.bind(x, w, strides=strides, pads=pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, w, strides, pads):
  return _call(x, w, strides, pads)


def _onednn_conv_fwd(x, w, strides, pads):
  return _onednn_conv(x, w, strides, pads), (x, w)


def _input_grad_pads(w_shape, pads) -> Pads | None:
  """Padding of the stride-1 input-gradient conv, None if it would be < 0."""
  k = w_shape[:2]
  grad = tuple((k[d] - 1 - pads[d][0], k[d] - 1 - pads[d][1])
               for d in range(2))
  return grad if min(min(p) for p in grad) >= 0 else None


def _flipped(w):
  """w'[p, q, o, c] = w[kh-1-p, kw-1-q, c, o]: the input-gradient kernel."""
  return jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))


def _strided_input_grad(dy, w, x_shape, strides, pads: Pads):
  """dL/dx [B, H, W, Ci] of a strided conv as s_h * s_w stride-1 convs.

  Per dimension, with x_pad = x padded by (lo, hi) to length Hp and
  y[i] = sum_p x_pad[s*i + p] w[p]: the padded input gradient at
  u = s*t + a (phase a in [0, s)) collects the taps p = a + s*r,
  r < R_a = ceil((k - a) / s), at i = t - r:

      dx_pad[s*t + a] = sum_r dy[t - r] w[a + s*r],

  a stride-1 correlation of dy (padded by R_a - 1 below and up to
  T = ceil(Hp / s) outputs) with the flipped sub-kernel w[a::s][::-1]
  (features swapped). The s_h * s_w phases interleave into dx_pad
  [B, T*s_h, T*s_w, Ci], of which dx is rows lo .. lo + H - 1; a phase with
  no tap (k <= a, e.g. a 1x1 kernel of stride 2) is zero.
  """
  b, _, _, ci = x_shape
  k = w.shape[:2]
  t = [-(-(x_shape[1 + d] + sum(pads[d])) // strides[d]) for d in range(2)]
  rows = []
  for a in range(strides[0]):
    cols = []
    for c in range(strides[1]):
      taps = [-(-(k[d] - phase) // strides[d]) if phase < k[d] else 0
              for d, phase in enumerate((a, c))]
      if min(taps) == 0:
        cols.append(jnp.zeros((b, t[0], t[1], ci), dy.dtype))
        continue
      phase_pads = tuple((taps[d] - 1, t[d] - dy.shape[1 + d])
                         for d in range(2))
      cols.append(_call(dy, _flipped(w[a::strides[0], c::strides[1]]),
                        (1, 1), phase_pads))
    rows.append(jnp.stack(cols, 3))            # [B, T0, T1, s_w, Ci]
  full = jnp.stack(rows, 2).reshape(           # [B, T0, s_h, T1, s_w, Ci]
      b, t[0] * strides[0], t[1] * strides[1], ci)
  (lo_h, _), (lo_w, _) = pads
  return full[:, lo_h:lo_h + x_shape[1], lo_w:lo_w + x_shape[2]]


def _onednn_conv_bwd(strides, pads, res, dy):
  x, w = res
  dw = onednn_dw.weight_grad(x, dy, w.shape, strides, pads)
  grad_pads = _input_grad_pads(w.shape, pads)
  if strides != (1, 1):
    dx = _strided_input_grad(dy, w, x.shape, strides, pads)
  elif grad_pads is not None:
    # Correlation with the flipped kernel, input/output features swapped.
    dx = _call(dy, _flipped(w), (1, 1), grad_pads)
  else:
    _, x_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, pads), x)
    (dx,) = x_vjp(dy)
  return dx, dw


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


_LOCAL = threading.local()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Programs traced inside use XLA's convs, e.g. to count their FLOPs.

  XLA's cost analysis counts no FLOPs for a custom call, so
  experiments/benchmark.py lowers the step once more inside this context to
  count them. Only tracing is affected: a function jitted (and cached)
  before keeps its program.
  """
  depth = getattr(_LOCAL, 'off', 0)
  _LOCAL.off = depth + 1
  try:
    yield
  finally:
    _LOCAL.off = depth


def active() -> bool:
  """Whether a conv traced now goes through oneDNN."""
  return not getattr(_LOCAL, 'off', 0) and enabled()


def describe() -> str:
  """Which conv kernels a float32 NHWC conv traced now runs, for logs and
  benchmark headers: 'XLA', 'oneDNN fwd/dx, XLA dw' or 'oneDNN fwd/dx/dw'
  (with the release of the oneDNN library the weight gradient links)."""
  if not active():
    return 'XLA'
  if not onednn_dw.enabled():
    return 'oneDNN fwd/dx, XLA dw'
  return f'oneDNN fwd/dx/dw (dw: oneDNN {onednn_dw.onednn_version()})'


@functools.cache
def enabled() -> bool:
  """Whether the oneDNN path is on in this process (see the module doc)."""
  if os.environ.get(ENV, '') != '1':
    return False
  if _host.machine().lower() not in ('x86_64', 'amd64'):
    return False
  import jaxlib
  if not jaxlib.__version__.startswith(TESTED_JAXLIB):
    logging.warning('%s=1: jaxlib %s is not among the tested %s; trying '
                    'oneDNN (the probe checks it)', ENV, jaxlib.__version__,
                    TESTED_JAXLIB)
  try:
    cpu = jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # No CPU backend (JAX_PLATFORMS without cpu).
    return False
  # Concrete values even when the first use is inside a jit trace.
  with jax.ensure_compile_time_eval(), jax.default_device(cpu):
    return _probe()


def _probe() -> bool:
  """One small conv and its gradients through oneDNN against XLA's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  try:
    for strides, pads in (((1, 1), ((1, 1), (1, 1))),
                          ((2, 2), ((0, 1), (1, 0)))):
      ours = jax.jit(jax.value_and_grad(loss(
          lambda x, w: _onednn_conv(x, w, strides, pads)), (0, 1)))(x, w)
      ref = jax.jit(jax.value_and_grad(loss(
          lambda x, w: _xla_conv(x, w, strides, pads)), (0, 1)))(x, w)
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        if not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                           atol=1e-4):
          raise ValueError('result differs from XLA conv')
  except Exception as e:
    logging.warning('%s: the oneDNN conv probe failed (%s); using XLA convs',
                    ENV, str(e).splitlines()[0] if str(e) else type(e))
    return False
  return True


def _dims_match(x, w, dimension_numbers) -> bool:
  dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
  return dn == lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)


def _explicit_pads(x, w, strides, padding) -> Pads | None:
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides,
                                  padding)
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
    return None
  return pads


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`jax.lax.conv_general_dilated`, through oneDNN where it applies."""
  args = (lhs, rhs, window_strides, padding)
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
  usable = (
      lhs.ndim == 4 and rhs.ndim == 4 and len(window_strides) == 2
      and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
      and feature_group_count == 1 and batch_group_count == 1
      and precision is None and preferred_element_type is None
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and dimension_numbers is not None
      and _dims_match(lhs, rhs, dimension_numbers))
  pads = _explicit_pads(lhs, rhs, tuple(window_strides), padding) \
      if usable else None
  if pads is None or not active():
    return lax.conv_general_dilated(*args, **kwargs)
  strides = tuple(int(s) for s in window_strides)
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda x, w: _onednn_conv(x, w, strides, pads),
      default=lambda x, w: lax.conv_general_dilated(x, w, *args[2:],
                                                    **kwargs))

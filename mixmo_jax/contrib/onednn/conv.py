"""2-D convolutions through oneDNN on x86 CPUs, gradients included.

    from mixmo_jax.contrib.onednn import conv as onednn_conv
    y = onednn_conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

is a drop-in for `jax.lax.conv_general_dilated` (same arguments, same
result up to float32 rounding). On an x86 CPU backend, for a float32
NHWC x [B, H, W, Ci] and HWIO w [kh, kw, Ci, Co] with strides s, explicit
or 'SAME'/'VALID' padding, no dilation and no groups, it computes

    y[b, i, j, o] = sum_{p, q, c} x_pad[b, s*i + p, s*j + q, c] w[p, q, c, o]

and its gradients (a `jax.custom_vjp`) with oneDNN's kernels, the ones
PyTorch uses on CPUs: the forward convolution, the input gradient
(`convolution_backward_data`, any stride) and the weight gradient
(`convolution_backward_weights`, which reads x and dy where they lie; XLA
transposes both first). Each is an XLA FFI handler of our own
(`csrc/onednn_conv.cc`, built and registered by `library.py`) called
through `jax.ffi.ffi_call`: public jax APIs only, so the path works on
every jax the package supports.

Under a device mesh (jit with a batch-sharded input) each call is a
`jax.experimental.custom_partitioning` op: one call per device on its batch
shard with the weights replicated (the weight gradient's per-shard sums
then added by a psum over the batch's mesh axes), as XLA does for its own
conv; left to XLA's partitioner, an opaque call would all-gather the batch
onto every device. Under `jax.vmap` the ops are XLA's
(`jax.custom_batching.custom_vmap`).

Every other case (other dtypes or layouts, dilation, groups, `precision`
or `preferred_element_type` set) calls `jax.lax.conv_general_dilated`
unchanged. The choice between the two is made per program, by the platform
it is compiled for (`jax.lax.platform_dependent`), not by the process's
default backend: a GPU or TPU program (compiled on a CPU host ahead of
time, or on a machine with both) is the same as without this module. The
oneDNN path is used only when

  * the machine is x86-64 and the program is compiled for its CPU,
  * MIXMO_ONEDNN_CONV is '1',
  * the library, a C++ compiler and jax's FFI headers are found and the
    build succeeds (`library.build`), and
  * a probe at first use, a strided and an unstrided conv with both
    gradients, equals XLA's within float32 rounding;

otherwise (with one warning saying why) the convs are XLA's.

Measured with `python -m experiments.conv_peer --parts` and `python -m
experiments.benchmark --peer=torch` (docs/performance.md).
"""
import contextlib
import functools
import logging
import os
import platform as _host
import threading
from collections.abc import Iterator, Sequence

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from mixmo_jax.contrib.onednn import library

ENV = 'MIXMO_ONEDNN_CONV'
_NHWC = ('NHWC', 'HWIO', 'NHWC')

Pads = tuple[tuple[int, int], tuple[int, int]]


def _xla_conv(x, w, strides: tuple[int, int], pads: Pads):
  """XLA's NHWC/HWIO conv y [B, Ho, Wo, Co]: the reference and fallback."""
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _xla_input_grad(dy, w, x_shape, strides, pads):
  """XLA's dx [B, H, W, Ci] of y = conv(x, w)."""
  _, vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, pads),
                   jnp.zeros(x_shape, dy.dtype))
  return vjp(dy)[0]


def _xla_weight_grad(x, dy, w_shape, strides, pads):
  """XLA's dw [kh, kw, Ci, Co] of y = conv(x, w)."""
  _, vjp = jax.vjp(lambda w: _xla_conv(x, w, strides, pads),
                   jnp.zeros(w_shape, x.dtype))
  return vjp(dy)[0]


def _out_shape(x_shape, w_shape, strides, pads):
  """[B, Ho, Wo, Co] of a valid conv of the padded input."""
  b, h, w, _ = x_shape
  kh, kw, _, co = w_shape
  ho = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
  wo = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
  return (b, ho, wo, co)


def _ffi(kind: str, out_shape, a, b, strides, pads):
  """One FFI call of `library.TARGETS[kind]` on operands (a, b)."""
  (top, bottom), (left, right) = pads
  return jax.ffi.ffi_call(
      library.TARGETS[kind], jax.ShapeDtypeStruct(out_shape, jnp.float32))(
          a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
          pad_top=np.int64(top), pad_bottom=np.int64(bottom),
          pad_left=np.int64(left), pad_right=np.int64(right),
          threads=np.int64(library.threads()))


def _batch_axes(sharding):
  """The mesh axes of an operand's batch dimension (None: replicated)."""
  spec = getattr(sharding, 'spec', None)
  return spec[0] if spec else None


# What each call reads and writes, as (operand a, operand b) -> result:
#   conv: (x, w) -> y    dx: (dy, w) -> dx    dw: (x, dy) -> dw
# Einsum-like rules for the partitioner: b is the batch.
_RULES = {
    'conv': 'b h w c, p q c o -> b i j o',
    'dx': 'b i j o, p q c o -> b h w c',
    'dw': 'b h w c, b i j o -> p q c o'
}


@functools.cache
def _op(kind: str, out_shape: tuple[int, ...], strides: tuple[int, int],
        pads: Pads):
  """The FFI call of `kind` (above) split over a batch-sharded mesh and,
  under vmap, XLA's equivalent."""

  def call(a, b):
    return _ffi(kind, out_shape, a, b, strides, pads)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    axes = _batch_axes(arg_shapes[0].sharding)
    batch, replicated = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
    if kind != 'dw':
      local = (arg_shapes[0].shape[0] // _size(mesh, axes),) + out_shape[1:]
      return mesh, lambda a, b: _ffi(kind, local, a, b, strides, pads), \
          batch, (batch, replicated)

    def per_shard(a, b):
      dw = _ffi(kind, out_shape, a, b, strides, pads)
      return lax.psum(dw, axes) if axes is not None else dw

    return mesh, per_shard, replicated, (batch, batch)

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    if kind == 'dw':
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(_batch_axes(arg_shapes[0].sharding)))

  partitioned = custom_partitioning(call)
  partitioned.def_partition(partition=partition,
                            infer_sharding_from_operands=infer,
                            sharding_rule=_RULES[kind])

  @jax.custom_batching.custom_vmap
  def op(a, b):
    return partitioned(a, b)

  @op.def_vmap
  def _vmapped(axis_size, in_batched, a, b):
    del axis_size

    def xla(a, b):
      if kind == 'conv':
        return _xla_conv(a, b, strides, pads)
      if kind == 'dx':
        return _xla_input_grad(a, b, out_shape, strides, pads)
      return _xla_weight_grad(a, b, out_shape, strides, pads)

    axes = tuple(0 if batched else None for batched in in_batched)
    return jax.vmap(xla, in_axes=axes)(a, b), True

  return op


def _size(mesh, axes) -> int:
  """Devices along mesh axes `axes` (a name, a tuple of names or None)."""
  if axes is None:
    return 1
  names = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[name] for name in names]))


def _conv(x, w, strides, pads):
  return _op('conv', _out_shape(x.shape, w.shape, strides, pads), strides,
             pads)(x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, w, strides, pads):
  return _conv(x, w, strides, pads)


def _onednn_conv_fwd(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _onednn_conv_bwd(strides, pads, res, dy):
  x, w = res
  dx = _op('dx', tuple(x.shape), strides, pads)(dy, w)
  dw = _op('dw', tuple(w.shape), strides, pads)(x, dy)
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
  benchmark headers: 'XLA' or 'oneDNN 3.2.0 fwd/dx/dw' (the release of the
  library the handlers link)."""
  if not active():
    return 'XLA'
  return f'oneDNN {library.onednn_version()} fwd/dx/dw'


@functools.cache
def enabled() -> bool:
  """Whether the oneDNN path is on in this process (see the module doc)."""
  if os.environ.get(ENV, '') != '1':
    return False
  if _host.machine().lower() not in ('x86_64', 'amd64'):
    return False
  try:
    cpu = jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # No CPU backend (JAX_PLATFORMS without cpu).
    return False
  try:
    library.load()
  except Exception as e:
    logging.warning(
        "%s=1 but the oneDNN kernels are unavailable (%s); "
        "using XLA's convs", ENV, _reason(e))
    return False
  # Concrete values even when the first use is inside a jit trace.
  with jax.ensure_compile_time_eval(), jax.default_device(cpu):
    return _probe()


def _reason(e: Exception) -> str:
  """An exception's first line, or its type's name."""
  return str(e).splitlines()[0] if str(e) else type(e).__name__


# (strides, pads) of the probe's convs: unstrided and strided, asymmetric.
_PROBES = (((1, 1), ((1, 1), (1, 1))), ((2, 2), ((0, 1), (1, 0))))


def _probe() -> bool:
  """Small convs and their gradients through oneDNN against XLA's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)

  def value_and_grads(conv, strides, pads):

    def loss(x, w):
      return jnp.sum(jnp.sin(conv(x, w, strides, pads)))

    return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)

  try:
    for strides, pads in _PROBES:
      ours = value_and_grads(_onednn_conv, strides, pads)
      ref = value_and_grads(_xla_conv, strides, pads)
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        if not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4):
          raise ValueError('result differs from XLA conv')
  except Exception as e:
    logging.warning("%s: the oneDNN conv probe failed (%s); using XLA's convs",
                    ENV, _reason(e))
    return False
  return True


def _dims_match(x, w, dimension_numbers) -> bool:
  dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
  return dn == lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)


def _explicit_pads(x, w, strides, padding) -> Pads | None:
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
    return None
  (top, bottom), (left, right) = pads
  return (top, bottom), (left, right)


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
      lhs.ndim == 4 and rhs.ndim == 4 and len(window_strides) == 2 and
      lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32 and
      feature_group_count == 1 and batch_group_count == 1 and
      precision is None and preferred_element_type is None and
      all(d == 1 for d in (lhs_dilation or (1, 1))) and
      all(d == 1 for d in (rhs_dilation or (1, 1))) and
      dimension_numbers is not None and
      _dims_match(lhs, rhs, dimension_numbers))
  pads = _explicit_pads(lhs, rhs, tuple(window_strides), padding) \
      if usable else None
  if pads is None or not active():
    return lax.conv_general_dilated(*args, **kwargs)
  strides = tuple(int(s) for s in window_strides)
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda x, w: _onednn_conv(x, w, strides, pads),
      default=lambda x, w: lax.conv_general_dilated(x, w, *args[2:], **kwargs))

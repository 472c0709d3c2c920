"""The weight gradient of the oneDNN convs, through oneDNN (x86 CPUs).

    from mixmo_jax.contrib.onednn import dw as onednn_dw
    dw = onednn_dw.weight_grad(x, dy, w_shape, strides, pads)

For the forward conv y = conv(x, w) of `onednn_conv` (x [B, H, W, Ci], w
[kh, kw, Ci, Co], strides s, explicit pads ((top, bottom), (left, right)))
and its output gradient dy [B, Ho, Wo, Co], returns

    dw[p, q, c, o] = sum_{b, i, j} x_pad[b, s_h*i + p, s_w*j + q, c] dy[b, i, j, o]

[kh, kw, Ci, Co], the vjp of the conv with respect to w. XLA computes it as a
conv whose "kernel" is the whole image, after transposing x to [Ci, H, W, B]
and dy to [H, W, B, Co]; oneDNN's backward-weights kernel reads both where
they lie. jaxlib's own custom call into its oneDNN exposes the forward
kernel only, so this module builds `csrc/onednn_conv_dw.cc`, an XLA FFI
handler calling the oneDNN library of the PyPI packages `onednn-cpu-gomp`
(the kernels) and `onednn-devel-cpu-gomp` (the headers), which setup.py
installs on x86-64 Linux, and registers it with jax as the FFI target
`mixmo_onednn_conv_dw`.

The build happens once per machine, at the first use (a few seconds with
g++; `$CXX` if set), into the cache folder $MIXMO_CACHE_DIR (default
$XDG_CACHE_HOME/mixmo_jax or ~/.cache/mixmo_jax), named by a hash of the
source and the compile command (compiler, flags, the headers' and the
library's folders), written under a temporary name and renamed, so
concurrent processes never load a half-written file.
The library is looked for in $MIXMO_ONEDNN_ROOT, then in the Python
environment's prefix and the user base (where pip puts the packages' files:
lib/libdnnl.so.3 and include/oneapi/dnnl/dnnl.hpp).

Used only inside `onednn_conv`'s gradient, and only when

  * MIXMO_ONEDNN_DW is not '0' (set it to '0' for XLA's weight gradient),
  * the library, a C++ compiler and jax's FFI headers are found and the
    build succeeds, and
  * a probe, at first use, equals XLA's weight gradient within float32
    rounding for a stride-1 and a stride-2 conv;

otherwise (with one warning saying why, except for the '0') the weight
gradient is XLA's. Under a device mesh the call is a `custom_partitioning`
op: each device computes its batch shard's sum and a psum over the batch's
mesh axes adds them, the reduction XLA's partitioner inserts for its own
conv.
"""
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import site
import subprocess
import sys
import tempfile

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import mlir
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from mixmo_jax.contrib.onednn import kernels as cpu_kernels

ENV = 'MIXMO_ONEDNN_DW'
ROOT_ENV = 'MIXMO_ONEDNN_ROOT'
CACHE_ENV = 'MIXMO_CACHE_DIR'
TARGET = 'mixmo_onednn_conv_dw'  # The FFI target's name.
SOURCE = pathlib.Path(__file__).with_name('csrc') / 'onednn_conv_dw.cc'
_LIB = 'libdnnl.so.3'
_HEADER = pathlib.Path('include', 'oneapi', 'dnnl', 'dnnl.hpp')
_NHWC = ('NHWC', 'HWIO', 'NHWC')

Pads = tuple[tuple[int, int], tuple[int, int]]


def xla_weight_grad(x, dy, w_shape, strides: tuple[int, int], pads: Pads):
  """XLA's dw [kh, kw, Ci, Co]: the reference and the fallback."""
  w = jnp.zeros(w_shape, x.dtype)
  _, vjp = jax.vjp(lambda w_: lax.conv_general_dilated(
      x, w_, strides, pads, dimension_numbers=_NHWC), w)
  return vjp(dy)[0]


def onednn_root() -> pathlib.Path | None:
  """The folder holding lib/libdnnl.so.3 and the headers, None if none."""
  candidates = [os.environ.get(ROOT_ENV, ''), sys.prefix, site.USER_BASE]
  for root in candidates:
    if root and (pathlib.Path(root, 'lib', _LIB).exists()
                 and pathlib.Path(root, _HEADER).exists()):
      return pathlib.Path(root)
  return None


def cache_dir() -> pathlib.Path:
  env = os.environ.get(CACHE_ENV)
  if env:
    return pathlib.Path(env)
  xdg = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(xdg, 'mixmo_jax')


def _compile_command(compiler: str, root: pathlib.Path,
                     out: pathlib.Path) -> list[str]:
  lib = root / 'lib'
  return [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w',
          f'-I{jax.ffi.include_dir()}', f'-I{root / "include"}',
          str(SOURCE), f'-L{lib}', f'-l:{_LIB}', f'-Wl,-rpath,{lib}',
          '-o', str(out)]


def build() -> pathlib.Path:
  """Compiles csrc/onednn_conv_dw.cc (once per machine); the library's path.

  Raises:
    RuntimeError: no oneDNN library, no compiler, or a failed build.
  """
  root = onednn_root()
  if root is None:
    raise RuntimeError(
        f'no oneDNN library ({_LIB} and {_HEADER} under ${ROOT_ENV}, '
        f'{sys.prefix} or {site.USER_BASE}; pip install onednn-cpu-gomp '
        'onednn-devel-cpu-gomp)')
  compiler = shutil.which(os.environ.get('CXX', 'g++'))
  if compiler is None:
    raise RuntimeError(f'no C++ compiler ({os.environ.get("CXX", "g++")})')
  digest = hashlib.sha256(SOURCE.read_bytes())
  # The command names the compiler, the flags and the headers' folders.
  digest.update(' '.join(_compile_command(compiler, root,
                                          pathlib.Path('out'))).encode())
  out_dir = cache_dir()
  out = out_dir / f'onednn_conv_dw-{digest.hexdigest()[:16]}.so'
  if out.exists():
    return out
  out_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out_dir)
  os.close(fd)
  try:
    done = subprocess.run(_compile_command(compiler, root, pathlib.Path(tmp)),
                          capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode:
      raise RuntimeError(f'{compiler} failed: '
                         + (done.stderr.strip().splitlines() or ['?'])[-1])
    os.replace(tmp, out)  # Atomic: another process sees all of it or none.
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


@functools.cache
def load() -> ctypes.CDLL:
  """Builds, loads and registers the FFI target (once per process)."""
  lib = ctypes.CDLL(str(build()))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MixmoOnednnConvDw),
                              platform='cpu')
  return lib


def onednn_version() -> str:
  """The oneDNN release the handler runs, e.g. '3.2.0'."""
  v = load().MixmoOnednnVersion()
  return f'{v // 10000}.{v // 100 % 100}.{v % 100}'


# The primitive dw = weight_grad(x, dy): XLA's weight gradient everywhere but
# in CPU lowerings, which are the FFI call (one device) or a
# custom_partitioning op around it (a mesh; cpu_kernels.py).
_dw_p = Primitive('mixmo_onednn_dw')


def _abstract_eval(x, dy, *, w_shape, strides, pads):
  del dy, strides, pads
  return jax.core.ShapedArray(w_shape, x.dtype)


def threads() -> int:
  """oneDNN's threads per call: the cores this process may use divided among
  jax's CPU devices, which run their shards concurrently (with
  `config.cpu_devices = 2` on 2 cores, one each: two threads each made the
  digits quickstart 15% slower than XLA's weight gradient)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') \
      else (os.cpu_count() or 1)
  return max(1, cores // max(1, jax.local_device_count('cpu')))


def _attrs(strides, pads):
  (top, bottom), (left, right) = pads
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(top), pad_bottom=np.int64(bottom),
              pad_left=np.int64(left), pad_right=np.int64(right),
              threads=np.int64(threads()))


def _ffi_call(x, dy, w_shape, strides, pads):
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(w_shape, x.dtype))(
      x, dy, **_attrs(strides, pads))


def _xla_lowering(ctx, x, dy, *, w_shape, strides, pads):
  return mlir.lower_fun(
      lambda x, dy: xla_weight_grad(x, dy, w_shape, strides, pads),
      multiple_results=False)(ctx, x, dy)


@functools.cache
def _partitioned(w_shape, strides, pads):
  """Batch-sharded x, dy -> replicated dw: per-shard sums, then a psum."""
  def batch_axes(sharding):
    spec = getattr(sharding, 'spec', None)
    return spec[0] if spec else None

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    axes = batch_axes(arg_shapes[0].sharding)
    batch = NamedSharding(mesh, P(axes))

    def per_shard(x, dy):
      dw = _ffi_call(x, dy, w_shape, strides, pads)
      return lax.psum(dw, axes) if axes is not None else dw

    return mesh, per_shard, NamedSharding(mesh, P()), (batch, batch)

  def infer(mesh, arg_shapes, result_shape):
    del arg_shapes, result_shape
    return NamedSharding(mesh, P())

  fn = custom_partitioning(
      lambda x, dy: _ffi_call(x, dy, w_shape, strides, pads))
  fn.def_partition(partition=partition, infer_sharding_from_operands=infer,
                   sharding_rule='b h w c, b i j o -> p q c o')
  return fn


def _lower_one_device(ctx, x, dy, *, w_shape, strides, pads):
  return mlir.lower_fun(
      lambda x, dy: _ffi_call(x, dy, w_shape, strides, pads),
      multiple_results=False)(ctx, x, dy)


def _lower_partitioned(ctx, x, dy, *, w_shape, strides, pads):
  return mlir.lower_fun(
      lambda x, dy: _partitioned(w_shape, strides, pads)(x, dy),
      multiple_results=False)(ctx, x, dy)


def _batch(args, dims, *, w_shape, strides, pads):
  fn = functools.partial(xla_weight_grad, w_shape=w_shape, strides=strides,
                         pads=pads)
  return jax.vmap(fn, in_axes=dims)(*args), 0


_dw_p.def_abstract_eval(_abstract_eval)
_dw_p.def_impl(lambda x, dy, *, w_shape, strides, pads: jax.jit(
    xla_weight_grad, static_argnums=(2, 3, 4))(x, dy, w_shape, strides, pads))
cpu_kernels.register(_dw_p, xla=_xla_lowering, one_device=_lower_one_device,
                     mesh=_lower_partitioned, batch=_batch)


@functools.cache
def enabled() -> bool:
  """Whether weight_grad uses oneDNN in this process (see the module doc)."""
  if os.environ.get(ENV, '') == '0':
    return False
  try:
    load()
    with jax.ensure_compile_time_eval():
      _probe()
  except Exception as e:
    logging.warning('%s: oneDNN weight gradient unavailable (%s); using '
                    "XLA's", ENV, str(e).splitlines()[0] if str(e) else
                    type(e).__name__)
    return False
  return True


def _probe() -> None:
  """Raises ValueError if the FFI call differs from XLA's weight gradient."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
  for strides, pads in (((1, 1), ((1, 1), (1, 1))),
                        ((2, 2), ((0, 1), (1, 0)))):
    ho = (7 + sum(pads[0]) - 3) // strides[0] + 1
    wo = (6 + sum(pads[1]) - 3) // strides[1] + 1
    dy = jnp.asarray(rng.standard_normal((2, ho, wo, 4)), jnp.float32)
    args = (x, dy, (3, 3, 3, 4), strides, pads)
    ours = jax.jit(_ffi_call, static_argnums=(2, 3, 4))(*args)
    ref = jax.jit(xla_weight_grad, static_argnums=(2, 3, 4))(*args)
    if not np.allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4,
                       atol=1e-4):
      raise ValueError(f'result differs from XLA (strides {strides})')


def weight_grad(x, dy, w_shape: tuple[int, ...], strides: tuple[int, int],
                pads: Pads):
  """dw [kh, kw, Ci, Co] of y = conv(x, w) (module doc); XLA's where the
  oneDNN path is off."""
  w_shape = tuple(int(d) for d in w_shape)
  if (x.dtype != jnp.float32 or dy.dtype != jnp.float32 or not enabled()):
    return xla_weight_grad(x, dy, w_shape, strides, pads)
  return _dw_p.bind(x, dy, w_shape=w_shape, strides=tuple(strides),
                    pads=tuple(tuple(p) for p in pads))

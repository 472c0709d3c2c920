"""The oneDNN convolution kernels as jax FFI targets (x86-64 Linux CPUs).

    from mixmo_jax.contrib.onednn import library
    library.load()               # builds once per machine, registers
    library.TARGETS['conv']      # 'mixmo_onednn_conv' (and 'dx', 'dw')

Builds `csrc/onednn_conv.cc`, three XLA FFI handlers (the convolution, its
input gradient and its weight gradient) calling the oneDNN library of the
PyPI packages `onednn-cpu-gomp` (the kernels) and `onednn-devel-cpu-gomp`
(the headers), which the `cpu-onednn` extra installs, and registers them
with jax (`jax.ffi.register_ffi_target`, platform 'cpu').

The build happens once per machine, at the first use (a few seconds with
g++; `$CXX` if set), into the cache folder $MIXMO_CACHE_DIR (default
$XDG_CACHE_HOME/mixmo_jax or ~/.cache/mixmo_jax), named by a hash of the
source and the compile command (compiler, flags, the headers' and the
library's folders), written under a temporary name and renamed, so
concurrent processes never load a half-written file. The library is looked
for in $MIXMO_ONEDNN_ROOT, then in the Python environment's prefix and the
user base (where pip puts the packages' files: lib/libdnnl.so.3 and
include/oneapi/dnnl/dnnl.hpp).
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import site
import subprocess
import sys
import tempfile

import jax

ROOT_ENV = 'MIXMO_ONEDNN_ROOT'
CACHE_ENV = 'MIXMO_CACHE_DIR'
SOURCE = pathlib.Path(__file__).with_name('csrc') / 'onednn_conv.cc'
# The FFI targets, by what they compute, and the handler symbols of SOURCE.
TARGETS = {
    'conv': 'mixmo_onednn_conv',
    'dx': 'mixmo_onednn_conv_dx',
    'dw': 'mixmo_onednn_conv_dw'
}
_SYMBOLS = {
    'conv': 'MixmoOnednnConv',
    'dx': 'MixmoOnednnConvDx',
    'dw': 'MixmoOnednnConvDw'
}
_LIB = 'libdnnl.so.3'
_HEADER = pathlib.Path('include', 'oneapi', 'dnnl', 'dnnl.hpp')


def onednn_root() -> pathlib.Path | None:
  """The folder holding lib/libdnnl.so.3 and the headers, None if none."""
  candidates = [os.environ.get(ROOT_ENV, ''), sys.prefix, site.USER_BASE]
  for root in candidates:
    if root and (pathlib.Path(root, 'lib', _LIB).exists() and
                 pathlib.Path(root, _HEADER).exists()):
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
  return [
      compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w',
      f'-I{jax.ffi.include_dir()}', f'-I{root / "include"}',
      str(SOURCE), f'-L{lib}', f'-l:{_LIB}', f'-Wl,-rpath,{lib}', '-o',
      str(out)
  ]


def build() -> pathlib.Path:
  """Compiles csrc/onednn_conv.cc (once per machine); the library's path.

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
  out = out_dir / f'onednn_conv-{digest.hexdigest()[:16]}.so'
  if out.exists():
    return out
  out_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out_dir)
  os.close(fd)
  try:
    done = subprocess.run(
        _compile_command(compiler, root, pathlib.Path(tmp)),
        capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
      raise RuntimeError(f'{compiler} failed: ' +
                         (done.stderr.strip().splitlines() or ['?'])[-1])
    os.replace(tmp, out)  # Atomic: another process sees all of it or none.
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


@functools.cache
def load() -> ctypes.CDLL:
  """Builds, loads and registers the FFI targets (once per process).

  Raises:
    RuntimeError: see `build`.
  """
  lib = ctypes.CDLL(str(build()))
  for kind, target in TARGETS.items():
    jax.ffi.register_ffi_target(target,
                                jax.ffi.pycapsule(getattr(lib, _SYMBOLS[kind])),
                                platform='cpu')
  return lib


def onednn_version() -> str:
  """The oneDNN release the handlers run, e.g. '3.2.0'."""
  v = load().MixmoOnednnVersion()
  return f'{v // 10000}.{v // 100 % 100}.{v % 100}'


def threads() -> int:
  """oneDNN's threads per call: the cores this process may use divided among
  jax's CPU devices, which run their shards concurrently (with
  `config.cpu_devices = 2` on 2 cores, one each: two threads each made the
  digits quickstart 15% slower than XLA's weight gradient)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') \
      else (os.cpu_count() or 1)
  return max(1, cores // max(1, jax.local_device_count('cpu')))

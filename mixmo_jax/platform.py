"""XLA flag defaults per platform, applied before the jax backend starts.

    from mixmo_jax import platform
    platform.apply_defaults()   # before the first jax.devices() / jit

adds to the environment variable XLA_FLAGS each default flag below that
belongs to a platform the backend will run (`target_platforms`), that the
running jaxlib knows (`unknown_flags`: XLA aborts at start on a flag it
does not know, so an unknown default is left out with one warning) and
whose name the user's XLA_FLAGS does not already mention (so any default is
overridden by passing the flag yourself, e.g.
XLA_FLAGS=--xla_gpu_deterministic_ops=false). MIXMO_XLA_DEFAULTS=0 sets
nothing at all. XLA reads XLA_FLAGS once, when the first backend starts;
calling this later has no effect (a warning says so).

CPU (measured with experiments/benchmark.py --peer=torch, docs/performance.md):
  --xla_cpu_experimental_ynn_fusion_type=reduce   keeps jaxlib's YNNPACK
      fusions for reductions only (BatchNorm's sums over B, H, W) and sends
      convolutions and dots back to XLA's Eigen kernels: jaxlib 0.10's
      default YNNPACK convolution-gradient kernels are ~3x slower than the
      forward ones on x86 CPUs, while without YNNPACK the BN sums become
      slow reduce-windows. WRN-16-4 MIMO step, torch_time / jax_time
      (interleaved, 2-core Intel Xeon, 2026-12-03): jaxlib default 0.42,
      empty list (no YNNPACK) 0.51, 'reduce' 0.84 (1964 / 1607 / 962 ms
      against torch's 811-818 ms).
GPU (reproducibility: same seed -> same run):
  --xla_gpu_deterministic_ops=true   deterministic kernels (no atomics in
      scatter/reductions), so two runs of one program are bit-identical.
      For bit-identity across processes, add --xla_gpu_autotune_level=0
      (fixed conv/GEMM algorithms instead of timing-based choices).
  float32 matmuls/convs use TF32 on Ampere+ GPUs by jax's default; set
  JAX_DEFAULT_MATMUL_PRECISION=highest for true float32 (slower).
"""
import glob
import importlib.util
import logging
import mmap
import os
from collections.abc import MutableMapping, Sequence

CPU_DEFAULTS: dict[str, str] = {
    'xla_cpu_experimental_ynn_fusion_type': 'reduce',
}
GPU_DEFAULTS: dict[str, str] = {
    'xla_gpu_deterministic_ops': 'true',
}
DEFAULTS: dict[str, dict[str, str]] = {'cpu': CPU_DEFAULTS, 'gpu': GPU_DEFAULTS}
DISABLE_ENV = 'MIXMO_XLA_DEFAULTS'
# JAX_PLATFORMS names -> the platform whose defaults apply.
_PLATFORM_NAMES = {
    'cpu': 'cpu',
    'cuda': 'gpu',
    'rocm': 'gpu',
    'gpu': 'gpu',
    'tpu': 'tpu'
}
# Installed jax plugins (module names) -> the platform jax will prefer.
_PLUGINS = {
    'jax_cuda12_plugin': 'gpu',
    'jax_cuda13_plugin': 'gpu',
    'jax_rocm60_plugin': 'gpu',
    'jax_rocm7_plugin': 'gpu',
    'libtpu': 'tpu'
}


def target_platforms(
    environ: MutableMapping[str, str] | None = None) -> frozenset[str]:
  """The platforms ('cpu', 'gpu', 'tpu') whose defaults apply, decided
  before the backend starts: those JAX_PLATFORMS names, else the
  accelerator plugins installed (jax prefers them), else the CPU."""
  environ = os.environ if environ is None else environ
  named = [
      p.strip().lower()
      for p in environ.get('JAX_PLATFORMS', '').split(',')
      if p.strip()
  ]
  if named:
    return frozenset(_PLATFORM_NAMES.get(p, p) for p in named)
  plugins = {
      platform for module, platform in _PLUGINS.items()
      if importlib.util.find_spec(module) is not None
  }
  return frozenset(plugins or {'cpu'})


def default_flags(platforms: Sequence[str] = ('cpu', 'gpu')) -> dict[str, str]:
  """The default flags of `platforms`, name -> value."""
  return {
      name: value for p in platforms
      for name, value in DEFAULTS.get(p, {}).items()
  }


def _jaxlib_library() -> str | None:
  """The largest shared library of the installed jaxlib: the one holding
  XLA, whose flag table names every flag XLA_FLAGS may set."""
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.origin:
    return None
  libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), '*.so'))
  return max(libraries, key=os.path.getsize) if libraries else None


def unknown_flags(names: Sequence[str],
                  library: str | None = None) -> list[str]:
  """The flag names among `names` that the installed jaxlib does not know.

  XLA registers each flag under its name, a NUL-terminated string in
  jaxlib's XLA library; a name absent from it would abort the backend's
  start. Read without loading the library (a scan of one file, ~0.2 s
  cold). Where the library cannot be found or read, every name counts as
  unknown (no default is risked).
  """
  library = _jaxlib_library() if library is None else library
  if library is None:
    return list(names)
  try:
    with open(library, 'rb') as f, mmap.mmap(f.fileno(), 0,
                                             access=mmap.ACCESS_READ) as data:
      return [n for n in names if data.find(n.encode() + b'\0') < 0]
  except (OSError, TypeError, ValueError):
    return list(names)


def merged_xla_flags(user_flags: str,
                     defaults: dict[str, str] | None = None) -> str:
  """`user_flags` plus each default whose name it does not mention."""
  defaults = default_flags() if defaults is None else defaults
  added = [
      f'--{name}={value}' for name, value in defaults.items()
      if f'--{name}' not in user_flags
  ]
  return ' '.join([user_flags.strip()] + added).strip()


def backend_started() -> bool:
  """Whether jax's backend runs already (XLA_FLAGS is then read).

  jax has no public query for it. Every backend starts through the public
  `jax.extend.backend.get_backend`, a memoised function: a call counted by
  its cache (a hit or a miss) means a backend runs. Where that detail
  changes, this says False (the defaults are then written, harmlessly,
  after the start).
  """
  import jax.extend.backend
  cache_info = getattr(jax.extend.backend.get_backend, 'cache_info', None)
  if cache_info is None:
    return False
  info = cache_info()
  return bool(getattr(info, 'hits', 0) or getattr(info, 'misses', 0))


def apply_defaults(environ: MutableMapping[str, str] | None = None,
                   platforms: Sequence[str] | None = None) -> list[str]:
  """Adds the default XLA flags to environ['XLA_FLAGS']; returns the added.

  Args:
    environ: the environment to edit (default os.environ).
    platforms: whose defaults ('cpu', 'gpu', 'tpu'; default:
      `target_platforms(environ)`): a program compiled ahead of time for a
      GPU on a CPU host (experiments.aot) names the GPU's.

  Returns:
    The '--name=value' strings added (empty if disabled, all user-set,
    unknown to this jaxlib or for other platforms).
  """
  environ = os.environ if environ is None else environ
  if environ.get(DISABLE_ENV, '1') == '0':
    return []
  user = environ.get('XLA_FLAGS', '')
  defaults = {
      name: value
      for name, value in default_flags(
          sorted(platforms or target_platforms(environ))).items()
      if f'--{name}' not in user
  }
  unknown = unknown_flags(list(defaults))
  if unknown:
    logging.warning(
        'mixmo_jax.platform: this jaxlib does not know %s; '
        'not set (XLA would refuse to start)',
        ', '.join(f'--{n}' for n in unknown))
  defaults = {n: v for n, v in defaults.items() if n not in unknown}
  merged = merged_xla_flags(user, defaults)
  added = merged[len(user.strip()):].split()
  if added and environ is os.environ and backend_started():
    # The running backend keeps its flags; XLA_FLAGS stays what it uses, as
    # jax's persistent compilation cache keys programs by XLA_FLAGS (a
    # subprocess inheriting it would otherwise load programs compiled with
    # other flags under its own flags' key).
    logging.warning(
        'mixmo_jax.platform.apply_defaults() after the jax '
        'backend started: %s not applied', added)
    return []
  environ['XLA_FLAGS'] = merged
  return added


def setup(config) -> None:
  """XLA's flags for this run, set once before jax starts its backend.

  The library's XLA defaults (`apply_defaults`: CPU kernels, GPU
  determinism; the user's XLA_FLAGS win), and `config.cpu_devices` XLA CPU
  devices where XLA_FLAGS does not already set the host device count (GPUs
  and TPUs are unaffected: the flag applies to the host platform).  Once
  jax's backend is running (e.g. a notebook that already used jax) nothing
  can change any more and the run uses the devices it has.
  """
  apply_defaults()
  xla_flags = os.environ.get('XLA_FLAGS', '')
  count = config.get('cpu_devices', 0)
  if (type(count) is int and count > 0  # Bad values: reported by validate.
      and not backend_started() and
      'xla_force_host_platform_device_count' not in xla_flags):
    os.environ['XLA_FLAGS'] = (
        f'{xla_flags} --xla_force_host_platform_device_count='
        f'{count}').strip()

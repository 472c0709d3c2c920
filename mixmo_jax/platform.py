"""XLA flag defaults per platform, applied before the jax backend starts.

    from mixmo_jax import platform
    platform.apply_defaults()   # before the first jax.devices() / jit

adds to the environment variable XLA_FLAGS each default flag below whose
name the user's XLA_FLAGS does not already mention (so any default is
overridden by passing the flag yourself, e.g.
XLA_FLAGS=--xla_gpu_deterministic_ops=false), and sets nothing at all when
MIXMO_XLA_DEFAULTS=0. XLA reads XLA_FLAGS once, when the first backend
starts; calling this later has no effect (a warning says so). Flags of one
platform are ignored by the others, so all of them are set together.

CPU (measured with experiments/benchmark.py --peer=torch, see README):
  --xla_cpu_experimental_ynn_fusion_type=reduce   keeps jaxlib's YNNPACK
      fusions for reductions only (BatchNorm's sums over B, H, W) and sends
      convolutions and dots back to XLA's Eigen kernels: jaxlib 0.10's
      default YNNPACK convolution-gradient kernels are ~3x slower than the
      forward ones on x86 CPUs, while without YNNPACK the BN sums become
      slow reduce-windows. WRN-16-4 MIMO step, torch_time / jax_time
      (interleaved, 2-core Intel Xeon, 2026-12-03): jaxlib default 0.42,
      empty list (no YNNPACK) 0.51, 'reduce' 0.84 (1964 / 1607 / 962 ms
      against torch's 811-818 ms).
GPU (reproducibility, DESIGN: same seed -> same run):
  --xla_gpu_deterministic_ops=true   deterministic kernels (no atomics in
      scatter/reductions), so two runs of one program are bit-identical.
      For bit-identity across processes, add --xla_gpu_autotune_level=0
      (fixed conv/GEMM algorithms instead of timing-based choices).
  float32 matmuls/convs use TF32 on Ampere+ GPUs by jax's default; set
  JAX_DEFAULT_MATMUL_PRECISION=highest for true float32 (slower).
"""
import logging
import os
from typing import Dict, List, MutableMapping, Optional

CPU_DEFAULTS: Dict[str, str] = {
    'xla_cpu_experimental_ynn_fusion_type': 'reduce',
}
GPU_DEFAULTS: Dict[str, str] = {
    'xla_gpu_deterministic_ops': 'true',
}
DISABLE_ENV = 'MIXMO_XLA_DEFAULTS'


def default_flags() -> Dict[str, str]:
  """All default flags, name -> value."""
  return {**CPU_DEFAULTS, **GPU_DEFAULTS}


def merged_xla_flags(user_flags: str,
                     defaults: Optional[Dict[str, str]] = None) -> str:
  """`user_flags` plus each default whose name it does not mention."""
  defaults = default_flags() if defaults is None else defaults
  added = [f'--{name}={value}' for name, value in defaults.items()
           if f'--{name}' not in user_flags]
  return ' '.join([user_flags.strip()] + added).strip()


def backend_started() -> bool:
  """Whether jax's backend runs already (XLA_FLAGS is then read)."""
  return _backend_started()


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # Private API moved: assume not.
    return False


def apply_defaults(environ: Optional[MutableMapping[str, str]] = None
                   ) -> List[str]:
  """Adds the default XLA flags to environ['XLA_FLAGS']; returns the added.

  Args:
    environ: the environment to edit (default os.environ).

  Returns:
    The '--name=value' strings added (empty if disabled or all user-set).
  """
  environ = os.environ if environ is None else environ
  if environ.get(DISABLE_ENV, '1') == '0':
    return []
  user = environ.get('XLA_FLAGS', '')
  merged = merged_xla_flags(user)
  added = merged[len(user.strip()):].split()
  if added and environ is os.environ and _backend_started():
    # The running backend keeps its flags; XLA_FLAGS stays what it uses, as
    # jax's persistent compilation cache keys programs by XLA_FLAGS (a
    # subprocess inheriting it would otherwise load programs compiled with
    # other flags under its own flags' key).
    logging.warning('mixmo_jax.platform.apply_defaults() after the jax '
                    'backend started: %s not applied', added)
    return []
  environ['XLA_FLAGS'] = merged
  return added

"""CPU smoke tests of the speed scripts (they must not rot; no timings)."""
import os
import subprocess
import sys

from conftest import REPO


def _env(**extra):
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS='cpu', **extra)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  return env


def test_device_check_tiny_prints_the_table():
  out = subprocess.run(
      ['bash', 'experiments/device_check.sh'], cwd=REPO, check=True,
      capture_output=True, text=True, timeout=300,
      env=_env(DEVICE_CHECK_TINY='1', DEVICE_CHECK_EPOCH_STEPS='2')).stdout
  for row in ('train img/s float32', 'train img/s bfloat16', 'MFU float32',
              'Cut-MixMo / MIMO step time', 'eval img/s',
              'peak device memory MB', 'bit-identical reruns (3 steps)  yes',
              'synthetic epoch (2 steps) s'):
    assert row in out, (row, out)


def test_platform_defaults_yield_to_the_user_and_can_be_disabled():
  from mixmo_jax import platform
  env = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=dot'}
  added = platform.apply_defaults(env)
  assert '--xla_cpu_experimental_ynn_fusion_type=dot' in env['XLA_FLAGS']
  assert env['XLA_FLAGS'].count('ynn_fusion_type') == 1  # The user's wins.
  assert '--xla_gpu_deterministic_ops=true' in added
  env = {}
  assert set(platform.apply_defaults(env)) == {
      f'--{k}={v}' for k, v in platform.default_flags().items()}
  env = {'MIXMO_XLA_DEFAULTS': '0', 'XLA_FLAGS': '--a=1'}
  assert platform.apply_defaults(env) == [] and env['XLA_FLAGS'] == '--a=1'

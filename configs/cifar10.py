"""CIFAR-10, WRN-28-10 (Table 1, Table 8).

  python -m mixmo_jax.main --config=configs/cifar10.py --workdir=/tmp/c10

Variants as in configs/default.py (cut_mixmo, linear_mixmo, mimo, vanilla,
mixup, cutmix; +cutmix, +augmix, +b1/+b2/+b4, +m3, +local).
"""
import importlib.util
import os


def _default():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py')
  spec = importlib.util.spec_from_file_location('mixmo_configs_default', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  default = _default()
  config = default.base_config()
  config.dataset = 'cifar10'
  config.num_classes = 10
  return default.apply_variant(config, arg)

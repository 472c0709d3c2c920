"""CIFAR-100, WRN-28-10, the paper's main recipe (Table 1, Appendix 6.4).

  python -m mixmo_jax.main --config=configs/cifar100.py --workdir=/tmp/c100
  python -m mixmo_jax.main --config=configs/cifar100.py:mimo+b4 --workdir=DIR

Variants (`:name`, see configs/default.py): cut_mixmo (default), linear_mixmo,
mimo, vanilla, mixup, cutmix; modifiers +cutmix, +augmix, +b1/+b2/+b4, +m3,
+local.
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
  """CIFAR-100 is the default recipe itself."""
  return _default().get_config(arg)

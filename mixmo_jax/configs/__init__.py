"""The configs of the paper's experiments, importable without path tricks.

    from mixmo_jax import configs
    config = configs.get('digits:mimo')          # dataset[:variant]
    config = configs.get('cifar100:cut_mixmo+cutmix+b4')
    config = configs.load('my_configs/exp.py:mimo')   # any config file

Datasets: cifar100 (the default recipe), cifar10, digits, tiny_imagenet.
Variants are `method[+modifier...]` (see `base.apply_variant`).  The files
under the repository's configs/ folder, used on the command line as
`--config=configs/cifar100.py:mimo`, are one-line wrappers of these.
"""
import importlib
import importlib.util
import os
import re

from mixmo_jax.configs.base import METHODS, MODIFIERS

DATASET_CONFIGS = ('cifar10', 'cifar100', 'digits', 'tiny_imagenet')

__all__ = [
    'DATASET_CONFIGS', 'METHODS', 'MODIFIERS', 'get', 'load', 'unknown_field'
]
_LOCKED = re.compile(r'Key "([^"]+)" does not exist and cannot be added since '
                     r'the config is locked')
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)"')


def unknown_field(error: BaseException) -> str | None:
  """One line for ml_collections' refusal of a field the locked base
  config lacks (a typo in a config file), else None."""
  found = _LOCKED.search(str(error))
  if not found:
    return None
  close = _DID_YOU_MEAN.search(str(error))
  hint = f' (did you mean {close.group(1)!r}?)' if close else ''
  return (f'sets config field {found.group(1)!r}, which does not exist{hint}; '
          'every field must exist in mixmo_jax/configs/base.py')


def get(name: str):
  """The config `dataset[:variant]`, e.g. 'digits:mimo' or 'cifar100'.

  Raises:
    ValueError: unknown dataset config, method or modifier (one line).
  """
  dataset, _, variant = name.partition(':')
  if dataset not in DATASET_CONFIGS:
    raise ValueError(f'unknown config {dataset!r}; allowed: '
                     f'{", ".join(DATASET_CONFIGS)} (then :variant)')
  module = importlib.import_module(f'mixmo_jax.configs.{dataset}')
  return module.get_config(variant or None)


def load(spec: str):
  """`get_config([variant])` of the config file in 'PATH[:variant]', as
  `--config=PATH[:variant]` loads it, or `get(spec)` for a name."""
  path, sep, variant = spec.partition(':')
  if not path.endswith('.py'):
    return get(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist')
  module_spec = importlib.util.spec_from_file_location(
      f'mixmo_config_{abs(hash(os.path.abspath(path)))}', path)
  assert module_spec is not None and module_spec.loader is not None
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(*([variant] if sep else []))
  except (AttributeError, KeyError) as e:
    problem = unknown_field(e)
    if problem is None:
      raise
    raise ValueError(f'config file {path} {problem}') from None

"""Config checks that run before anything heavy is imported or compiled.

Every error is a `ConfigError` whose message is one line naming the field, the
value and what is allowed, e.g.

  config.mixing.p=1.5: must be in [0, 1]

`main` prints it and exits with code 2 before the workdir is touched.
"""
from typing import Any, Dict, List, Optional

from mixmo_jax import workdir as wd

# Fields that do not change the training trajectory: they may differ when a
# workdir is resumed (the change is logged and recorded in the workdir).
RESUME_ALLOWED_CHANGES = (
    'eval_every_epochs', 'checkpoint_every_epochs', 'keep_checkpoints',
    'log_every_steps', 'eval_batch_size', 'data_dir', 'manual_dir',
    'evaluation.ensemble', 'evaluation.calibration_seed', 'cpu_devices',
)

_PIXEL_MIX = ('none', 'mixup', 'cutmix')
_ENSEMBLE = ('logits', 'probs')


class ConfigError(ValueError):
  """A config field with a value that is not allowed (one-line message)."""


def _fail(field: str, value: Any, allowed: str):
  raise ConfigError(f'config.{field}={value!r}: {allowed}')


def _get(config, field: str):
  node = config
  for part in field.split('.'):
    if part not in node:
      _fail(field, None, 'missing field (start from configs/default.py)')
    node = node[part]
  return node


def _check_int(config, field: str, minimum: int):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    _fail(field, value, f'must be an integer >= {minimum}')
  return value


def _check_range(config, field: str, lo: float, hi: float = float('inf'),
                 lo_open: bool = False):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    _fail(field, value, 'must be a number')
  if (value <= lo if lo_open else value < lo) or value > hi:
    bracket = '(' if lo_open else '['
    _fail(field, value, f'must be in {bracket}{lo}, {hi}]')
  return value


def _check_choice(config, field: str, choices):
  value = _get(config, field)
  if value not in choices:
    _fail(field, value, f'must be one of {", ".join(map(str, choices))}')
  return value


def _check_batches(config, num_devices: int):
  batch_size = _check_int(config, 'batch_size', 1)
  b = _check_int(config, 'batch_repetitions', 1)
  if batch_size % b:
    _fail('batch_size', batch_size,
          f'must be divisible by batch_repetitions={b}')
  if (batch_size // b) % num_devices:
    _fail('batch_size', batch_size,
          f'batch_size / batch_repetitions = {batch_size // b} unique samples '
          f'per step must be divisible by the device count {num_devices}')
  num_train = _get(config, 'num_train_examples')
  if num_train and num_train < batch_size // b:
    _fail('num_train_examples', num_train,
          f'must be 0 (all) or >= batch_size / batch_repetitions = '
          f'{batch_size // b} (one step)')
  eval_batch_size = _check_int(config, 'eval_batch_size', 1)
  if eval_batch_size % num_devices:
    _fail('eval_batch_size', eval_batch_size,
          f'must be divisible by the device count {num_devices}')


def _check_model(config):
  from mixmo_jax import models  # Flax only; no TensorFlow.
  _check_choice(config, 'model.name', models.model_names())
  _check_int(config, 'model.width', 1)
  _check_choice(config, 'model.dtype', tuple(models.DTYPES))
  if config.model.name == 'wide_resnet':
    depth = _check_int(config, 'model.depth', 10)
    if (depth - 4) % 6:
      _fail('model.depth', depth, 'WRN depth must be 6n+4 (10, 16, 22, 28, ...)')
  try:
    models.check_image_size(config)
  except ValueError as e:
    _fail('image_size', config.image_size, str(e))


def _check_data(config):
  from mixmo_jax import data  # The registry; no TensorFlow until a load.
  dataset = _check_choice(config, 'dataset', data.dataset_names())
  spec = data.get_dataset(dataset)
  num_classes = spec.num_classes
  sizes = None if spec.resizable else (spec.image_size,)
  if _get(config, 'num_classes') != num_classes:
    _fail('num_classes', config.num_classes,
          f'dataset {dataset} has {num_classes} classes')
  size = _check_int(config, 'image_size', 8)
  if sizes is not None and size not in sizes:
    _fail('image_size', size, f'dataset {dataset} has {sizes[0]}x{sizes[0]} '
          'images')
  _check_int(config, 'num_train_examples', 0)
  for field in ('image_mean', 'image_std'):
    value = tuple(_get(config, field))
    if len(value) != 3 or (field == 'image_std' and min(value) <= 0):
      _fail(field, value, 'must be 3 numbers (std > 0)')


def _check_mixing(config):
  from mixmo_jax import mixmo  # jax only.
  _check_int(config, 'num_members', 1)
  _check_choice(config, 'mixing.method', mixmo.mixing_names())
  _check_range(config, 'mixing.alpha', 0.0, lo_open=True)
  _check_range(config, 'mixing.r', 0.0, lo_open=True)
  _check_range(config, 'mixing.p', 0.0, 1.0)
  _check_range(config, 'mixing.p_decay_fraction', 0.0, 1.0)
  _check_range(config, 'mixing.input_repetition', 0.0, 1.0)


def _check_augment(config):
  _check_int(config, 'augment.crop_padding', 0)
  mix = _check_choice(config, 'augment.pixel_mix', _PIXEL_MIX)
  if mix == 'mixup' and config.num_members > 1:
    _fail('augment.pixel_mix', mix, 'mixup is the single-network baseline '
          '(num_members=1); with MixMo use none or cutmix')
  _check_range(config, 'augment.pixel_mix_prob', 0.0, 1.0)
  _check_range(config, 'augment.cutmix_alpha', 0.0, lo_open=True)
  _check_range(config, 'augment.mixup_alpha', 0.0, lo_open=True)
  _check_int(config, 'augment.augmix_severity', 1)
  _check_int(config, 'augment.augmix_width', 1)
  _check_int(config, 'augment.augmix_depth', 1)


def _check_optimizer(config):
  epochs = _check_int(config, 'num_epochs', 1)
  _check_range(config, 'optimizer.base_learning_rate', 0.0, lo_open=True)
  _check_range(config, 'optimizer.reference_batch_size', 0.0, lo_open=True)
  _check_range(config, 'optimizer.momentum', 0.0, 1.0)
  _check_range(config, 'optimizer.l2', 0.0)
  _check_range(config, 'optimizer.weight_decay', 0.0)
  _check_range(config, 'optimizer.warmup_epochs', 0.0, epochs)
  _check_int(config, 'optimizer.warmup_steps_per_repetition', 0)
  _check_range(config, 'optimizer.decay_factor', 0.0, 1.0, lo_open=True)
  decays = list(_get(config, 'optimizer.decay_epochs'))
  if any(not isinstance(e, int) or e < 1 for e in decays):
    _fail('optimizer.decay_epochs', tuple(decays), 'must be positive integers')
  if decays != sorted(set(decays)):
    _fail('optimizer.decay_epochs', tuple(decays), 'must be strictly increasing')
  if decays and decays[-1] >= epochs:
    _fail('optimizer.decay_epochs', tuple(decays),
          f'must all be < num_epochs={epochs}')


def _check_schedule(config):
  _check_int(config, 'eval_every_epochs', 1)
  _check_int(config, 'checkpoint_every_epochs', 1)
  _check_int(config, 'keep_checkpoints', 1)
  _check_int(config, 'log_every_steps', 1)
  _check_int(config, 'seed', 0)
  _check_int(config, 'cpu_devices', 0)
  _check_choice(config, 'evaluation.ensemble', _ENSEMBLE)


def validate(config, num_devices: Optional[int] = None) -> None:
  """Raises `ConfigError` for the first field that is not allowed.

  Args:
    config: the run's ConfigDict.
    num_devices: global device count (default: `jax.device_count()`); the
      unique samples per step, batch_size / b, must divide by it.
  """
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  _check_data(config)
  _check_model(config)
  _check_mixing(config)
  _check_batches(config, num_devices)
  _check_augment(config)
  _check_optimizer(config)
  _check_schedule(config)


def _flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """Fields whose values differ, as 'field: old -> new' lines."""
  a, b = _flatten(old), _flatten(new)
  return [f'{k}: {a.get(k)!r} -> {b.get(k)!r}'
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume(workdir: str, config, allow_changes: bool = False) -> List[str]:
  """Compares `config` with the workdir's config.json before resuming.

  Returns the changed fields (empty for a new workdir). Changes outside
  `RESUME_ALLOWED_CHANGES` raise `ConfigError` unless `allow_changes`.
  """
  path = wd.path(workdir, wd.CONFIG)
  try:
    old = wd.read_config_dict(workdir)
  except ValueError as e:
    raise ConfigError(f'{e}; restore it or start a new workdir') from e
  if old is None:
    return []
  changes = config_changes(old, wd.config_to_dict(config))
  blocked = [c for c in changes
             if c.split(':')[0] not in RESUME_ALLOWED_CHANGES]
  if blocked and not allow_changes:
    raise ConfigError(
        f'config differs from {path} in fields that change training: '
        f'{"; ".join(blocked)} (rerun with the same config, or pass '
        '--allow_config_change to accept deliberately)')
  return changes

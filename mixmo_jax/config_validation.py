"""Config checks that run before anything heavy is imported or compiled.

Every error is a `ConfigError` whose message is one line naming the field, the
value and what is allowed, e.g.

  config.mixing.p=1.5: must be in [0, 1]

`main` prints it and exits with code 2 before the workdir is touched.
"""
import difflib
import math
from typing import Any


class ConfigError(ValueError):
  """Config fields that are not allowed: one line per problem, e.g.

    config.mixing.p=1.5: must be in [0.0, 1.0]
    config.seed=-1: must be an integer in [0, 4294967295]
  """

  def __init__(self, problems):
    if isinstance(problems, str):
      problems = [problems]
    self.problems = list(problems)
    super().__init__('\n'.join(self.problems))


MAX_SEED = 2**32 - 1
SEED_FIELDS = ('seed', 'data_seed', 'evaluation.calibration_seed')
_MISSING = object()


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def field_values(tree, prefix: str = '') -> dict[str, Any]:
  """{dotted field: value} of a ConfigDict or dict tree."""
  out = {}
  for key in tree.keys():
    value = tree[key]
    if hasattr(value, 'keys') and hasattr(value, 'items'):
      out.update(field_values(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


class _Checks:
  """Collects every problem of one config (`validate`)."""

  def __init__(self, config):
    self.config = config
    self.values = field_values(config)
    self.problems: list[str] = []
    self.bad = set()  # Fields already reported: dependent checks skip them.

  def fail(self, field: str, value: Any, allowed: str) -> None:
    if field not in self.bad:
      self.problems.append(f'config.{field}={value!r}: {allowed}')
    self.bad.add(field)

  def get(self, field: str):
    """The value, or _MISSING when missing or already reported as bad."""
    if field in self.bad or field not in self.values:
      return _MISSING
    return self.values[field]

  # ------------------------------------------------------------ the tree

  def key_tree(self, defaults: dict[str, Any]) -> None:
    """Unknown fields (a typo in a config file), missing fields, and the type
    of every field against mixmo_jax.configs.base.base_config()."""
    for field in sorted(set(self.values) - set(defaults)):
      parent, _, name = field.rpartition('.')
      siblings = [
          f.rpartition('.')[2]
          for f in defaults
          if f.rpartition('.')[0] == parent
      ]
      close = difflib.get_close_matches(name, siblings, n=1)
      hint = f'did you mean {close[0]!r}? ' if close else ''
      self.fail(
          field, self.values[field],
          f'unknown field ({hint}every field must exist in '
          'mixmo_jax/configs/base.py base_config())')
    for field in sorted(set(defaults) - set(self.values)):
      self.fail(
          field, None, 'missing field (start from a config of '
          'mixmo_jax/configs, which sets every field)')
    for field, default in defaults.items():
      if field in self.values:
        self.type_of(field, default)

  def type_of(self, field: str, default: Any) -> None:
    value = self.values[field]
    if isinstance(default, bool):
      if not isinstance(value, bool):
        self.fail(field, value, 'must be True or False')
    elif _is_int(default):
      if not _is_int(value):
        self.fail(field, value, 'must be an integer')
    elif isinstance(default, float):
      if not _is_number(value):
        self.fail(field, value, 'must be a number')
      elif not math.isfinite(value):
        self.fail(field, value, 'must be a finite number (no nan or inf)')
    elif isinstance(default, str):
      if not isinstance(value, str):
        self.fail(field, value, 'must be a string')
    elif isinstance(default, (tuple, list)):
      if not isinstance(value, (tuple, list)):
        self.fail(field, value, 'must be a tuple')
      elif default and all(_is_int(d) for d in default):
        if not all(_is_int(v) for v in value):
          self.fail(field, tuple(value), 'must be a tuple of integers')
      elif default and all(_is_number(d) for d in default):
        if not all(_is_number(v) and math.isfinite(v) for v in value):
          self.fail(field, tuple(value), 'must be a tuple of finite numbers')

  # ------------------------------------------------------------ values

  def int_(self, field: str, minimum: int, maximum: int | None = None):
    value = self.get(field)
    if value is _MISSING:
      return None
    if (not _is_int(value) or value < minimum or
        (maximum is not None and value > maximum)):
      allowed = (f'must be an integer in [{minimum}, {maximum}]'
                 if maximum is not None else f'must be an integer >= {minimum}')
      self.fail(field, value, allowed)
      return None
    return value

  def number(self, field: str, lo: float, hi: float = float('inf'),
             lo_open: bool = False):
    value = self.get(field)
    if value is _MISSING:
      return None
    if not _is_number(value):
      self.fail(field, value, 'must be a number')
      return None
    if not math.isfinite(value):
      self.fail(field, value, 'must be a finite number (no nan or inf)')
      return None
    if (value <= lo if lo_open else value < lo) or value > hi:
      bracket = '(' if lo_open else '['
      self.fail(field, value, f'must be in {bracket}{float(lo)}, {float(hi)}]')
      return None
    return value

  def choice(self, field: str, choices):
    value = self.get(field)
    if value is _MISSING:
      return None
    if value not in choices:
      self.fail(field, value, f'must be one of {", ".join(map(str, choices))}')
      return None
    return value


def _check_data(c: _Checks):
  from mixmo_jax import data  # The registry; no TensorFlow until a load.
  dataset = c.choice('dataset', data.dataset_names())
  c.int_('num_train_examples', 0)
  if dataset is None:
    return None
  spec = data.get_dataset(dataset)
  num_classes = c.get('num_classes')
  if num_classes is not _MISSING and num_classes != spec.num_classes:
    c.fail('num_classes', num_classes,
           f'dataset {dataset} has {spec.num_classes} classes')
  size = c.int_('image_size', 8)
  if size is not None and not spec.resizable and size != spec.image_size:
    c.fail(
        'image_size', size, f'dataset {dataset} has {spec.image_size}x'
        f'{spec.image_size} images')
  for field in ('image_mean', 'image_std'):
    value = c.get(field)
    if value is _MISSING:
      continue
    value = tuple(value)
    if len(value) != 3 or (field == 'image_std' and min(value) <= 0):
      c.fail(field, value, 'must be 3 numbers (std > 0)')
  return spec


def _check_model(c: _Checks):
  from mixmo_jax import models  # Flax only; no TensorFlow.
  name = c.choice('model.name', models.model_names())
  width = c.int_('model.width', 1)
  dtype = c.choice('model.dtype', tuple(models.DTYPES))
  # Every allowed value below is declared by the module that implements it.
  from mixmo_jax.mixmo import layers
  from mixmo_jax.models import wide_resnet
  if name == 'wide_resnet':
    depth = c.int_('model.depth', 10)
    problem = None if depth is None else wide_resnet.depth_problem(depth)
    if problem:
      c.fail('model.depth', depth, problem)
  c.choice('model.stem', layers.STEM_INITS)
  wide_resnet_only = (('model.stride_on', 'second'), ('model.bn_group_rows', 0))
  for field, default in wide_resnet_only:
    # Read by the WideResNet only.
    if name is not None and name != 'wide_resnet' and c.get(field) != default:
      c.fail(
          field, c.get(field), f'only with model.name=wide_resnet (it '
          f'must stay {default!r} for {name})')
  c.choice('model.stride_on', wide_resnet.WideResNet.STRIDE_ON)
  model_ok = not any(f.startswith('model.') for f in c.bad)
  if (model_ok and None not in (name, width, dtype) and
      c.get('image_size') is not _MISSING):
    try:
      models.check_image_size(c.config)
    except ValueError as e:
      c.fail('image_size', c.config.image_size, str(e))


def _check_mixing(c: _Checks):
  from mixmo_jax import mixmo  # jax only.
  c.int_('num_members', 1)
  c.choice('mixing.method', mixmo.mixing_names())
  c.number('mixing.alpha', 0.0, lo_open=True)
  c.number('mixing.r', 0.0, lo_open=True)
  c.number('mixing.p', 0.0, 1.0)
  c.number('mixing.p_decay_fraction', 0.0, 1.0)
  c.number('mixing.input_repetition', 0.0, 1.0)


def _check_batches(c: _Checks, num_devices: int, spec) -> int | None:
  """Returns the steps per epoch when batch and dataset size are valid."""
  batch_size = c.int_('batch_size', 1)
  b = c.int_('batch_repetitions', 1)
  eval_batch_size = c.int_('eval_batch_size', 1)
  if eval_batch_size is not None and eval_batch_size % num_devices:
    c.fail('eval_batch_size', eval_batch_size,
           f'must be divisible by the device count {num_devices}')
  if batch_size is None or b is None:
    return None
  if batch_size % b:
    c.fail('batch_size', batch_size,
           f'must be divisible by batch_repetitions={b}')
    return None
  unique = batch_size // b
  for field in ('mixing.permutation_group_rows', 'model.bn_group_rows'):
    rows = c.int_(field, 0)
    if rows and (batch_size % rows or
                 (field.startswith('mixing') and rows % b)):
      c.fail(
          field, rows, f'must be 0 (the global batch) or divide '
          f'batch_size={batch_size}' +
          (f' and be a multiple of batch_repetitions={b}'
           if field.startswith('mixing') else ''))
  if unique % num_devices:
    c.fail(
        'batch_size', batch_size,
        f'batch_size / batch_repetitions = {unique} unique samples '
        f'per step must be divisible by the device count {num_devices}')
  num_train = c.get('num_train_examples')
  if num_train is _MISSING:
    return None
  if num_train and num_train < unique:
    c.fail(
        'num_train_examples', num_train,
        f'must be 0 (all) or >= batch_size / batch_repetitions = '
        f'{unique} (one step)')
    return None
  if spec is None:
    return None
  available = min(num_train, spec.num_train) if num_train else spec.num_train
  if available < unique:
    c.fail(
        'batch_size', batch_size,
        f'batch_size / batch_repetitions = {unique} is more than the '
        f'{available} training examples (no step would run)')
    return None
  return available * b // batch_size


def _check_augment(c: _Checks):
  from mixmo_jax.mixmo import batch as mixmo_batch  # jax only.
  from mixmo_jax.mixmo import pixel_mix
  c.int_('augment.crop_padding', 0)
  from mixmo_jax.data import augmix
  mix = c.choice('augment.pixel_mix', pixel_mix.PIXEL_MIXES)
  rule = c.choice('augment.pixel_mix_rule', pixel_mix.PIXEL_MIX_RULES)
  members = c.get('num_members')
  if (rule == 'batch' and mix not in (None, 'none') and _is_int(members) and
      members > 1):
    c.fail(
        'augment.pixel_mix_rule', rule, 'the batch-level rule is the '
        'single-network baseline (num_members=1); with MixMo each member '
        'input is mixed on its own (per_sample)')
  c.number('augment.pixel_mix_prob', 0.0, 1.0)
  c.number('augment.cutmix_alpha', 0.0, lo_open=True)
  c.number('augment.mixup_alpha', 0.0, lo_open=True)
  rule = c.choice('augment.augmix_rule', augmix.RULES)
  # The authors' rule scales each range by severity / 30; AugMix's draws a
  # level in U(0.1, severity) on a 0..10 scale.
  if rule is not None:
    c.number('augment.augmix_severity', *{
        'mixmo': (0.0, 30.0),
        'augmix': (0.1, 10.0)
    }[rule])
  c.int_('augment.augmix_width', 1)
  c.choice('augment.augmix_draws', mixmo_batch.PIXEL_AUGMENT_DRAWS)
  depth = c.get('augment.augmix_depth')
  if depth is not _MISSING and (not _is_int(depth) or
                                (depth < 1 and depth != -1)):
    c.fail(
        'augment.augmix_depth', depth, 'must be -1 (uniform in 1..4, the '
        "authors' rule; 1..3 for the augmix rule) or an integer >= 1")


def _check_optimizer(c: _Checks, steps_per_epoch: int | None):
  epochs = c.int_('num_epochs', 1)
  c.number('optimizer.base_learning_rate', 0.0, lo_open=True)
  c.number('optimizer.reference_batch_size', 0.0, lo_open=True)
  c.number('optimizer.momentum', 0.0, 1.0)
  c.number('optimizer.l2', 0.0)
  c.number('optimizer.weight_decay', 0.0)
  if epochs is not None:
    c.number('optimizer.warmup_epochs', 0.0, epochs)
  warmup_steps = c.int_('optimizer.warmup_steps_per_repetition', 0)
  b = c.get('batch_repetitions')
  if (warmup_steps and epochs is not None and steps_per_epoch is not None and
      warmup_steps * b > steps_per_epoch * epochs):
    c.fail(
        'optimizer.warmup_steps_per_repetition', warmup_steps,
        f'the warm-up ({warmup_steps} x b={b} steps) must not be longer '
        f'than the run ({steps_per_epoch * epochs} steps)')
  c.number('optimizer.decay_factor', 0.0, 1.0, lo_open=True)
  decays = c.get('optimizer.decay_epochs')
  if decays is _MISSING:
    return
  decays = list(decays)
  if any(not _is_int(e) or e < 1 for e in decays):
    c.fail('optimizer.decay_epochs', tuple(decays), 'must be positive integers')
  elif decays != sorted(set(decays)):
    c.fail('optimizer.decay_epochs', tuple(decays),
           'must be strictly increasing')
  elif decays and epochs is not None and decays[-1] >= epochs:
    scaled = sorted(
        {max(1, e * epochs // max(decays[-1] + 1, epochs)) for e in decays} -
        {epochs})
    c.fail(
        'optimizer.decay_epochs', tuple(decays),
        f'must all be < num_epochs={epochs}; shorten them with the run, '
        f"e.g. '--config.optimizer.decay_epochs="
        f"({','.join(map(str, scaled))},)', or "
        "'--config.optimizer.decay_epochs=()' for none")


def _check_schedule(c: _Checks):
  c.int_('eval_every_epochs', 1)
  c.int_('checkpoint_every_epochs', 1)
  c.int_('keep_checkpoints', 1)
  c.int_('log_every_steps', 1)
  for field in SEED_FIELDS:
    c.int_(field, 0, MAX_SEED)
  c.int_('cpu_devices', 0)
  from mixmo_jax.evaluation import metrics
  c.choice('evaluation.ensemble', metrics.ENSEMBLE_MODES)


def problems(config, num_devices: int) -> list[str]:
  """Every problem of `config`, one line each (empty when valid)."""
  from mixmo_jax.configs import base
  c = _Checks(config)
  c.key_tree(field_values(base.base_config()))
  spec = _check_data(c)
  _check_model(c)
  _check_mixing(c)
  steps_per_epoch = _check_batches(c, num_devices, spec)
  _check_augment(c)
  _check_optimizer(c, steps_per_epoch)
  _check_schedule(c)
  return c.problems


def validate(config, num_devices: int | None = None) -> None:
  """Raises one `ConfigError` listing every field that is not allowed.

  All checks run in one pass (nothing is compiled, nothing written): the
  key tree against `mixmo_jax.configs.base.base_config()` (unknown and
  missing fields, the type of every field; nan and inf are refused in every
  number), then the allowed values and the relations between fields (batch
  sizes, dataset size, warm-up and decays within the run).

  Args:
    config: the run's ConfigDict.
    num_devices: global device count (default: `jax.device_count()`); the
      unique samples per step, batch_size / b, must divide by it.
  """
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  found = problems(config, num_devices)
  if found:
    raise ConfigError(found)

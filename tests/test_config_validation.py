"""Config validation (issue: Reliability 2, 3): in-process, no training.

Each bad value is checked against `validate(config)` on a valid tiny digits
config: the ConfigError is one line naming `config.FIELD=VALUE` and what is
allowed, and validation writes nothing.
"""
import os
import sys

import pytest

from conftest import load_config, tiny_digits_config, with_fields
from mixmo_jax import config_validation as cv

NUM_DEVICES = 8  # conftest: 8 fake CPU devices.


def test_reference_configs_are_valid():
  cv.validate(tiny_digits_config(), NUM_DEVICES)
  for name in ('cifar10', 'cifar100', 'digits', 'tiny_imagenet'):
    cv.validate(load_config(name), 2)  # Tiny ImageNet: 50 unique per step.


def test_validate_uses_the_device_count_by_default():
  import jax
  assert jax.device_count() == NUM_DEVICES
  config = tiny_digits_config()
  config.batch_size = 8  # 4 unique samples per step over 8 devices.
  with pytest.raises(cv.ConfigError, match=r'^config\.batch_size=8: '):
    cv.validate(config)


# (overrides {field: value}, field named, what is allowed: a substring).
CASES = {
    'num_members_zero': ({
        'num_members': 0
    }, 'num_members=0', '>= 1'),
    'num_members_float': ({
        'num_members': 2.0
    }, 'num_members=2.0', 'integer'),
    'batch_not_divisible_by_b': ({
        'batch_size': 63
    }, 'batch_size=63', 'divisible by batch_repetitions=2'),
    'unique_not_divisible_by_devices':
        ({
            'batch_size': 36
        }, 'batch_size=36',
         '18 unique samples per step must be divisible by the device count 8'),
    'eval_batch_not_divisible_by_devices': ({
        'eval_batch_size': 100
    }, 'eval_batch_size=100', 'device count 8'),
    'p_above_one': ({
        'mixing.p': 1.5
    }, 'mixing.p=1.5', 'must be in [0.0, 1.0]'),
    'p_negative': ({
        'mixing.p': -0.1
    }, 'mixing.p=-0.1', 'must be in [0.0, 1.0]'),
    'p_wrong_type': ({
        'mixing.p': 'abc'
    }, "mixing.p='abc'", 'must be a number'),
    'alpha_zero': ({
        'mixing.alpha': 0.0
    }, 'mixing.alpha=0.0', 'must be in (0.0'),
    'alpha_negative': ({
        'mixing.alpha': -1.0
    }, 'mixing.alpha=-1.0', '(0.0, inf]'),
    'r_zero': ({
        'mixing.r': 0.0
    }, 'mixing.r=0.0', 'must be in (0.0'),
    'r_negative': ({
        'mixing.r': -3.0
    }, 'mixing.r=-3.0', 'must be in (0.0'),
    'unknown_model': ({
        'model.name': 'resnet50'
    }, "model.name='resnet50'", 'preact_resnet18, wide_resnet'),
    'unknown_dataset': ({
        'dataset': 'imagenet'
    }, "dataset='imagenet'", 'cifar10, cifar100, digits, digits_inverted, '
                        'svhn_cropped, tiny_imagenet'),
    'unknown_mixing_method': ({
        'mixing.method': 'magic'
    }, "mixing.method='magic'", 'cut'),
    'wrn_depth_not_6n_plus_4': ({
        'model.depth': 12
    }, 'model.depth=12', '6n+4'),
    'wrn_depth_too_small': ({
        'model.depth': 4
    }, 'model.depth=4', '>= 10'),
    'width_zero': ({
        'model.width': 0
    }, 'model.width=0', '>= 1'),
    'unknown_dtype': ({
        'model.dtype': 'float16'
    }, "model.dtype='float16'", 'float32, bfloat16'),
    'num_epochs_zero': ({
        'num_epochs': 0,
        'optimizer.decay_epochs': ()
    }, 'num_epochs=0', '>= 1'),
    'num_epochs_wrong_type': ({
        'num_epochs': '2'
    }, "num_epochs='2'", 'integer'),
    'decay_epochs_unsorted': ({
        'num_epochs': 6,
        'optimizer.decay_epochs': (4, 2)
    }, 'optimizer.decay_epochs=(4, 2)', 'increasing'),
    'decay_epochs_repeated': ({
        'num_epochs': 6,
        'optimizer.decay_epochs': (2, 2)
    }, 'optimizer.decay_epochs=(2, 2)', 'increasing'),
    'decay_epochs_past_end': ({
        'optimizer.decay_epochs': (1, 5)
    }, 'optimizer.decay_epochs=(1, 5)', '< num_epochs=2'),
    'decay_epoch_at_end': ({
        'optimizer.decay_epochs': (2,)
    }, 'optimizer.decay_epochs=(2,)', '< num_epochs=2'),
    'image_size_model_cannot_take': ({
        'model.name': 'preact_resnet18'
    }, 'image_size=16', '[49, 112]'),
    'image_size_not_the_datasets': ({
        'dataset': 'cifar10',
        'image_size': 64
    }, 'image_size=64', '32x32'),
    'num_classes_not_the_datasets': ({
        'num_classes': 100
    }, 'num_classes=100', 'digits has 10 classes'),
    'too_few_train_examples_for_a_step': ({
        'num_train_examples': 16
    }, 'num_train_examples=16', '>= '),
    'negative_learning_rate': ({
        'optimizer.base_learning_rate': -0.1
    }, 'optimizer.base_learning_rate=-0.1', '(0.0'),
    'unknown_ensemble': ({
        'evaluation.ensemble': 'mean'
    }, "evaluation.ensemble='mean'", 'logits, probs'),
    'eval_every_zero': ({
        'eval_every_epochs': 0
    }, 'eval_every_epochs=0', '>= 1'),
    'permutation_rows_not_dividing_batch': ({
        'mixing.permutation_group_rows': 24
    }, 'mixing.permutation_group_rows=24', 'divide batch_size=64'),
    'permutation_rows_not_multiple_of_b': ({
        'mixing.permutation_group_rows': 1
    }, 'mixing.permutation_group_rows=1', 'multiple of batch_repetitions=2'),
    'bn_rows_not_dividing_batch': ({
        'model.bn_group_rows': 48
    }, 'model.bn_group_rows=48', 'divide batch_size=64'),
    'bn_rows_with_preact_resnet': ({
        'model.name': 'preact_resnet18',
        'image_size': 64,
        'model.bn_group_rows': 32
    }, 'model.bn_group_rows=32', 'only with model.name=wide_resnet'),
    'unknown_augmix_draws': ({
        'augment.augmix_draws': 'shared'
    }, "augment.augmix_draws='shared'", 'per_sample, per_input'),
    'batch_rule_with_mixmo': ({
        'augment.pixel_mix': 'mixup',
        'augment.pixel_mix_rule': 'batch'
    }, "augment.pixel_mix_rule='batch'", 'num_members=1'),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_value_names_field_and_allowed(name, tmp_path, monkeypatch):
  overrides, named, allowed = CASES[name]
  config = with_fields(tiny_digits_config(), overrides)
  monkeypatch.chdir(tmp_path)  # Anything written would land here.
  with pytest.raises(cv.ConfigError) as err:
    cv.validate(config, NUM_DEVICES)
  message = str(err.value)
  assert message.startswith(f'config.{named}: '), message
  assert allowed in message, message
  assert '\n' not in message
  assert os.listdir(tmp_path) == []


def test_missing_field_is_named():
  config = tiny_digits_config()
  with config.mixing.unlocked():
    del config.mixing['r']
  with pytest.raises(cv.ConfigError, match=r'^config\.mixing\.r=None: missing'):
    cv.validate(config, NUM_DEVICES)


def test_validation_imports_no_tensorflow():
  """validate() needs jax and flax only: TF, TFDS, clu, orbax come later."""
  heavy = ('tensorflow', 'tensorflow_datasets', 'clu', 'orbax')
  code = ('import sys; sys.path.insert(0, "tests"); import conftest; '
          'from mixmo_jax import config_validation as cv; '
          'cv.validate(conftest.tiny_digits_config()); '
          f'print(sorted(m for m in {heavy!r} if m in sys.modules))')
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', code], cwd=repo, check=True,
                       capture_output=True, text=True, timeout=120)
  assert out.stdout.strip().splitlines()[-1] == '[]', out.stdout


# Issue 14.2: nan / inf, seeds, sizes, warm-up; every problem in one pass.
ONE_PASS_CASES = {
    'p_nan': ({
        'mixing.p': float('nan')
    }, 'mixing.p=nan', 'finite'),
    'lr_nan': ({
        'optimizer.base_learning_rate': float('nan')
    }, 'optimizer.base_learning_rate=nan', 'finite'),
    'lr_inf': ({
        'optimizer.base_learning_rate': float('inf')
    }, 'optimizer.base_learning_rate=inf', 'finite'),
    'alpha_inf': ({
        'mixing.alpha': float('inf')
    }, 'mixing.alpha=inf', 'finite'),
    'warmup_nan': ({
        'optimizer.warmup_epochs': float('nan')
    }, 'optimizer.warmup_epochs=nan', 'finite'),
    'mean_inf': ({
        'image_mean': (0.5, float('inf'), 0.5)
    }, 'image_mean=(0.5, inf, 0.5)', 'finite'),
    'calibration_seed_negative': ({
        'evaluation.calibration_seed': -1
    }, 'evaluation.calibration_seed=-1', '[0, 4294967295]'),
    'data_seed_negative': ({
        'data_seed': -1
    }, 'data_seed=-1', '[0, 4294967295]'),
    'seed_too_large': ({
        'seed': 2**64
    }, f'seed={2**64}', '[0, 4294967295]'),
    'eval_batch_negative': ({
        'eval_batch_size': -1
    }, 'eval_batch_size=-1', '>= 1'),
    'batch_larger_than_dataset': ({
        'batch_size': 4096,
        'num_train_examples': 0
    }, 'batch_size=4096', 'more than the 1437 training examples'),
    'warmup_steps_longer_than_run': ({
        'optimizer.warmup_steps_per_repetition': 11
    }, 'optimizer.warmup_steps_per_repetition=11', 'than the run (20 steps)'),
    'flip_not_bool': ({
        'augment.flip': 1
    }, 'augment.flip=1', 'True or False'),
    'dataset_not_str': ({
        'model.dtype': 32
    }, 'model.dtype=32', 'string'),
}


@pytest.mark.parametrize('name', sorted(ONE_PASS_CASES))
def test_nan_inf_seeds_sizes_are_refused(name, tmp_path, monkeypatch):
  overrides, named, allowed = ONE_PASS_CASES[name]
  config = with_fields(tiny_digits_config(), overrides)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(cv.ConfigError) as err:
    cv.validate(config, NUM_DEVICES)
  message = str(err.value)
  assert message.startswith(f'config.{named}: '), message
  assert allowed in message, message
  assert '\n' not in message
  assert os.listdir(tmp_path) == []


def test_warmup_as_long_as_the_run_is_accepted():
  # 320 examples / 32 unique = 10 steps per epoch, 2 epochs, b = 2.
  config = with_fields(tiny_digits_config(),
                       {'optimizer.warmup_steps_per_repetition': 10})
  cv.validate(config, NUM_DEVICES)


def test_every_problem_is_reported_in_one_pass():
  config = with_fields(
      tiny_digits_config(), {
          'mixing.p': float('nan'),
          'seed': -1,
          'eval_batch_size': -1,
          'optimizer.base_learning_rate': float('inf'),
          'model.width': 0
      })
  with pytest.raises(cv.ConfigError) as err:
    cv.validate(config, NUM_DEVICES)
  lines = str(err.value).splitlines()
  assert sorted(l.split('=')[0] for l in lines) == sorted([
      'config.mixing.p', 'config.seed', 'config.eval_batch_size',
      'config.optimizer.base_learning_rate', 'config.model.width'
  ]), lines
  assert err.value.problems == lines


def test_unknown_and_missing_fields_of_a_config_file(tmp_path):
  """A typo in a config file is refused where the file makes it (the base
  config is locked), with ml_collections' "did you mean"; a field removed
  from an unlocked copy is refused by the validator."""
  path = tmp_path / 'exp.py'
  path.write_text('from mixmo_jax.configs import digits\n'
                  'def get_config(arg=None):\n'
                  '  config = digits.get_config("mimo")\n'
                  '  if arg == "typo":\n'
                  '    config.optimizer.base_learing_rate = 0.2\n'
                  '  with config.unlocked():\n'
                  '    del config.mixing["r"]\n'
                  '  return config\n')
  from mixmo_jax import configs
  with pytest.raises(ValueError) as err:
    configs.load(f'{path}:typo')
  assert str(err.value) == (
      f"config file {path} sets config field 'base_learing_rate', which "
      "does not exist (did you mean 'base_learning_rate'?); every field "
      'must exist in mixmo_jax/configs/base.py')
  config = configs.load(f'{path}:mimo')
  with pytest.raises(cv.ConfigError) as err:
    cv.validate(config, NUM_DEVICES)
  lines = str(err.value).splitlines()
  assert lines == [
      'config.mixing.r=None: missing field (start from a config '
      'of mixmo_jax/configs, which sets every field)'
  ], lines

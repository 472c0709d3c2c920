"""Resuming a workdir with a config (mixmo_jax/resume_config.py): checked on
a workdir holding a config.json and a checkpoint folder, in-process."""
import json
import os

import pytest

from conftest import tiny_digits_config, with_fields
from mixmo_jax import config_validation as cv
from mixmo_jax import resume_config as rc
from mixmo_jax import workdir as workdir_lib


def _workdir_with(config, tmp_path, stored=None):
  """A workdir with config.json and a checkpoint folder (step 10) holding,
  if given, `stored` as the config saved with the checkpoint."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with open(workdir / 'config.json', 'w') as f:
    json.dump(workdir_lib.config_to_dict(config), f)
  step = workdir / 'checkpoints' / '10'
  step.mkdir(parents=True)
  if stored is not None:
    (step / 'config').mkdir()
    with open(step / 'config' / 'metadata', 'w') as f:
      json.dump(workdir_lib.config_to_dict(stored), f)
  return str(workdir)


def test_workdir_without_checkpoint_is_fresh(tmp_path):
  """A start that failed before its first checkpoint blocks nothing."""
  workdir = _workdir_with(tiny_digits_config(), tmp_path)
  os.rmdir(os.path.join(workdir, 'checkpoints', '10'))
  config = tiny_digits_config()
  config.model.width = 2
  assert rc.check_resume(workdir, config) == []


def test_stored_config_is_compared_without_config_json(tmp_path):
  workdir = _workdir_with(tiny_digits_config(), tmp_path,
                          stored=tiny_digits_config())
  os.remove(os.path.join(workdir, 'config.json'))
  config = tiny_digits_config()
  config.mixing.p = 0.6
  with pytest.raises(cv.ConfigError, match=r'mixing\.p: 0\.5 -> 0\.6'):
    rc.check_resume(workdir, config)
  assert rc.check_resume(workdir, tiny_digits_config()) == []


def test_new_workdir_has_no_changes(tmp_path):
  assert rc.check_resume(str(tmp_path / 'new'), tiny_digits_config()) == []
  assert not os.path.exists(tmp_path / 'new')


def test_same_config_resumes(tmp_path):
  workdir = _workdir_with(tiny_digits_config(), tmp_path)
  assert rc.check_resume(workdir, tiny_digits_config()) == []


def test_changed_trajectory_field_is_refused(tmp_path):
  workdir = _workdir_with(tiny_digits_config(), tmp_path)
  config = tiny_digits_config()
  config.mixing.p = 0.6
  config.model.width = 2
  config.eval_every_epochs = 2  # Allowed, but the others block.
  with pytest.raises(cv.ConfigError) as err:
    rc.check_resume(workdir, config)
  message = str(err.value)
  assert '\n' not in message
  assert 'mixing.p: 0.5 -> 0.6' in message
  assert 'model.width: 1 -> 2' in message
  assert 'eval_every_epochs' not in message  # Only the blocking fields.
  assert '--allow_config_change' in message


@pytest.mark.parametrize('field,value', [('eval_every_epochs', 2),
                                         ('checkpoint_every_epochs', 2),
                                         ('keep_checkpoints', 5),
                                         ('log_every_steps', 7),
                                         ('eval_batch_size', 400),
                                         ('evaluation.calibration_seed', 3)])
def test_allow_listed_change_is_accepted(field, value, tmp_path):
  assert field in rc.RESUME_ALLOWED_CHANGES
  workdir = _workdir_with(tiny_digits_config(), tmp_path)
  config = with_fields(tiny_digits_config(), {field: value})
  changes = rc.check_resume(workdir, config)
  assert len(changes) == 1 and changes[0].startswith(f'{field}: ')


def test_allow_list_has_no_trajectory_field():
  trajectory = ('seed', 'dataset', 'num_members', 'batch_size',
                'batch_repetitions', 'num_epochs', 'num_train_examples',
                'data_seed', 'mixing.p', 'mixing.alpha', 'mixing.r',
                'mixing.method', 'model.width', 'model.depth', 'model.dtype',
                'optimizer.base_learning_rate', 'augment.pixel_mix')
  assert not set(trajectory) & set(rc.RESUME_ALLOWED_CHANGES)


def test_flag_accepts_deliberate_change(tmp_path):
  workdir = _workdir_with(tiny_digits_config(), tmp_path)
  config = tiny_digits_config()
  config.mixing.p = 0.6
  assert rc.check_resume(workdir, config,
                         allow_changes=True) == ['mixing.p: 0.5 -> 0.6']


def test_unreadable_config_json_is_a_config_error(tmp_path):
  workdir = _workdir_with(tiny_digits_config(), tmp_path)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write('{"seed": ')  # Cut short.
  with pytest.raises(cv.ConfigError, match='not valid JSON'):
    rc.check_resume(workdir, tiny_digits_config())

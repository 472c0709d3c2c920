"""The README recipe: register a mixing block, train from a script with
`mixmo_jax.train`, and open the workdir with evaluate, predict and
analysis (for M = 2 and M = 3)."""
import importlib.util
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from conftest import REPO, tiny_digits_config
import mixmo_jax


def _json(path):
  with open(path) as f:
    return json.load(f)


def _stripes():
  spec = importlib.util.spec_from_file_location(
      'stripes_block', os.path.join(REPO, 'examples', 'stripes_block.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.stripes


@pytest.mark.parametrize('m', [2, 3, 5])
def test_stripes_block_contract(m):
  import jax
  weights, kappa = _stripes()(jax.random.PRNGKey(0), 4, m, 8, 8, alpha=2.0,
                              p=0.5)
  weights, kappa = np.asarray(weights), np.asarray(kappa)
  assert weights.shape == (4, m, 8, 8) and kappa.shape == (4, m)
  np.testing.assert_allclose(weights.sum(1), 1.0)
  np.testing.assert_allclose(kappa, weights.mean(axis=(2, 3)))
  # Member i owns the columns x with x * m // 8 == i (planted layout).
  for x in range(8):
    assert weights[0, x * m // 8, 0, x] == 1.0


def _run(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('m', [2, 3])
def test_script_recipe_workdir_opens_everywhere(tmp_path, m, capsys):
  _stripes()  # Registers 'stripes'.
  config = tiny_digits_config()
  config.mixing.method = 'stripes'
  config.num_members = m
  config.num_epochs = 1
  workdir = str(tmp_path / f'stripes_m{m}')
  record = mixmo_jax.train(config, workdir)
  assert record['step'] == 10 and len(record['members']) == m
  out = capsys.readouterr().out
  assert 'eval epoch 1 step 10 | ensemble top1' in out
  assert 'final: epoch 1 step 10' in out
  saved = _json(os.path.join(workdir, 'config.json'))
  assert saved['mixing']['method'] == 'stripes'
  if m == 2:  # The fresh processes once (they do not depend on M).
    # Evaluation and analysis in fresh processes, where 'stripes' is unknown.
    done = _run('mixmo_jax.evaluate', f'--workdir={workdir}')
    assert done.returncode == 0, done.stderr[-2000:]
    result = _json(os.path.join(workdir, 'eval.json'))
    assert len(result['members']) == m
    assert result['ensemble']['top1'] == pytest.approx(
        record['ensemble']['top1'])
    done = _run('mixmo_jax.analysis', f'--workdir={workdir}')
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.exists(os.path.join(workdir, 'utilisation.json'))
  from mixmo_jax import predict
  model = predict.load(workdir)
  size = config.image_size
  out = model(np.zeros((3, size, size, 3), np.uint8))
  assert out['member_probs'].shape[:2] == (3, m)
  np.testing.assert_allclose(out['probs'].sum(-1), 1.0, rtol=1e-5)


def test_train_warns_when_jax_has_fewer_cpu_devices(tmp_path):
  import jax
  config = tiny_digits_config()
  config.cpu_devices = jax.local_device_count() + 8
  with mock.patch('mixmo_jax.training.train_and_evaluate') as api_train, \
      mock.patch('absl.logging.warning') as warn:
    mixmo_jax.train(config, str(tmp_path))
  api_train.assert_called_once()
  assert 'cpu_devices' in warn.call_args[0][0]


def test_main_help_lists_variants_and_fields():
  done = _run('mixmo_jax.main', '--help')  # absl exits 1 after --help.
  from mixmo_jax import configs
  for name in configs.METHODS + configs.MODIFIERS + configs.DATASET_CONFIGS:
    assert name in done.stdout
  assert "'--config.optimizer.decay_epochs=(3,4)'" in done.stdout
  assert 'mixmo_jax/configs/base.py' in done.stdout

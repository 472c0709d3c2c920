"""Train step, schedules and data parallelism (mixmo_jax.train, sharding)."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config, tiny_digits_config
from mixmo_jax import data, feed, models, optim, sharding, training
from mixmo_jax.data import pipeline


class TestLearningRateSchedule:
  """lr = 0.1 / b * batch / 128, warm-up over epoch 1, x0.1 at 100/200/225."""

  def test_cifar_reference_steps(self):
    config = load_config('cifar100', 'cut_mixmo+b4')
    spe = pipeline.steps_per_epoch(config, 50_000)
    assert spe == 50_000 * 4 // 64
    lr = optim.learning_rate_schedule(config, spe)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(
        float(lr(spe // 2)), 0.0125 * (spe // 2) / spe, rtol=1e-6)
    np.testing.assert_allclose(float(lr(spe)), 0.0125, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100 * spe - 1)), 0.0125, rtol=1e-6)
    for epoch, factor in ((100, 0.1), (200, 0.01), (225, 0.001)):
      np.testing.assert_allclose(
          float(lr(epoch * spe)), 0.0125 * factor, rtol=1e-5)
      np.testing.assert_allclose(
          float(lr(epoch * spe - 1)), 0.0125 * factor * 10, rtol=1e-5)

  def test_peak_follows_b(self):
    for b, expected in ((1, 0.05), (2, 0.025), (4, 0.0125)):
      config = load_config('cifar100', f'cut_mixmo+b{b}')
      assert optim.peak_learning_rate(config) == pytest.approx(expected)

  def test_tiny_imagenet_recipe(self):
    config = load_config('tiny_imagenet', 'cut_mixmo+b2')
    spe = pipeline.steps_per_epoch(config, 100_000)
    assert optim.warmup_steps(config, spe) == 2000
    lr = optim.learning_rate_schedule(config, spe)
    np.testing.assert_allclose(float(lr(2000)), 0.2 / 2, rtol=1e-6)
    np.testing.assert_allclose(float(lr(600 * spe)), 0.01, rtol=1e-5)


def _setup(config, mesh):
  model = models.get_model(config)
  spe = 10
  state = training.create_train_state(config, model, spe, mesh)
  step_fn = training.make_train_step(config, model, spe, mesh)
  return state, step_fn


def _batch(config, step, mesh):
  images, labels = data.load_split(config, 'train')
  n = pipeline.unique_per_step(config)
  idx = pipeline.train_indices(config.seed, step, 320, n)
  return sharding.global_batch((images[idx], labels[idx]), mesh)


@pytest.fixture(scope='module')
def config():
  return tiny_digits_config()


def _run(config, mesh, steps):
  state, step_fn = _setup(config, mesh)
  losses = []
  for step in range(steps):
    state, metrics = step_fn(state, *_batch(config, step, mesh))
    losses.append(float(metrics['loss']))
  return state, losses, step_fn


@pytest.fixture(scope='module')
def eight_device_run(config):
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  return _run(config, mesh, 3)


class TestDataParallel:

  def test_batch_is_sharded_and_params_replicated(self, config,
                                                  eight_device_run):
    mesh = sharding.make_mesh()
    images, labels = _batch(config, 0, mesh)
    assert len(images.addressable_shards) == 8
    shard_rows = {s.data.shape[0] for s in images.addressable_shards}
    assert shard_rows == {images.shape[0] // 8}
    state = eight_device_run[0]
    for leaf in jax.tree.leaves(state.params):
      assert leaf.sharding.is_fully_replicated
      assert len(leaf.addressable_shards) == 8

  def test_one_device_equals_eight(self, config, eight_device_run):
    state8, losses8, _ = eight_device_run
    state1, losses1, _ = _run(config, sharding.make_mesh(jax.devices()[:1]), 3)
    assert all(np.isfinite(losses8))
    np.testing.assert_allclose(losses1, losses8, rtol=2e-4)
    for a, b in zip(
        jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)

  def test_loss_decreases(self, config, eight_device_run):
    state, losses, step_fn = eight_device_run
    mesh = sharding.make_mesh()
    for step in range(3, 40):
      state, metrics = step_fn(state, *_batch(config, step, mesh))
      losses.append(float(metrics['cross_entropy']))
    assert int(state.step) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


class TestTrainStep:

  def test_deterministic(self, config):
    mesh = sharding.make_mesh()
    results = []
    for _ in range(2):
      state, step_fn = _setup(config, mesh)
      state, metrics = step_fn(state, *_batch(config, 0, mesh))
      results.append((jax.device_get(state.params), float(metrics['loss'])))
    assert results[0][1] == results[1][1]
    for a, b in zip(
        jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
      assert np.array_equal(a, b)

  def test_patch_probability_follows_algorithm_1(self, config,
                                                 eight_device_run):
    """E = 24 epochs of 10 steps: p until epoch 22, p/2 in 23, 0 in 24."""
    mesh = sharding.make_mesh()
    config = tiny_digits_config()
    config.num_epochs = 24
    state, step_fn = _setup(config, mesh)
    batch = _batch(config, 0, mesh)
    seen = {}
    for step in (0, 219, 220, 230):
      start = state.replace(
          step=jax.device_put(np.int32(step), sharding.replicated(mesh)))
      _, metrics = step_fn(jax.tree.map(lambda x: x.copy(), start), *batch)
      seen[step] = float(metrics['patch_probability'])
    assert seen == pytest.approx({0: 0.5, 219: 0.5, 220: 0.25, 230: 0.0})
    assert step_fn._cache_size() == 1  # p is traced: no recompilation.


def test_main_on_mock_cifar100(tmp_path, monkeypatch):
  """`main` end to end on tfds mock CIFAR-100, tiny WRN, 8 devices, 2 epochs."""
  import tensorflow_datasets as tfds
  from mixmo_jax import main
  workdir = str(tmp_path / 'run')
  argv = [
      'main', '--config=' + os.path.join(
          os.path.dirname(__file__), '..', 'configs',
          'cifar100.py:cut_mixmo+local'), f'--workdir={workdir}',
      '--config.num_train_examples=64', '--config.eval_batch_size=32',
      '--config.batch_size=32'
  ]
  monkeypatch.setattr('sys.argv', argv)  # config_flags reads overrides there.
  main.parse_flags(argv)
  with tfds.testing.mock_data(num_examples=64):
    main.main(['main'])
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['dataset'] == 'cifar100' and config['model']['depth'] == 10
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  with open(os.path.join(workdir, 'eval_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert [h['epoch'] for h in history] == [1, 2]
  assert history[-1]['step'] == 2 * 64 * 2 // 32
  assert len(history[-1]['members']) == 2
  steps = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert str(history[-1]['step']) in steps


@pytest.mark.parametrize(
    'variant,overrides',
    [
        ('cut_mixmo+cutmix', {}),  # In-pixel CutMix with MixMo: soft targets.
        ('mixup', {}),  # Single-network baselines (M = 1).
        ('cutmix', {}),
        ('cut_mixmo+m3', {
            'batch_size': 48
        }),  # M = 3, eq. 7.
        ('mimo+augmix', {
            'augment.per_copy': False,
            'mixing.input_repetition': 0.5
        }),
    ])
def test_variants_train(variant, overrides):
  """Every method and option of the configs runs through the train step."""
  config = tiny_digits_config(variant)
  for field, value in overrides.items():
    node, *path = field.split('.')
    if path:
      config[node][path[0]] = value
    else:
      config[node] = value
  from mixmo_jax import config_validation
  config_validation.validate(config)
  mesh = sharding.make_mesh()
  state, step_fn = _setup(config, mesh)
  images, labels = data.load_split(config, 'train')
  batch = feed.Feeder(config, images, labels, mesh).batch(0)
  state, _ = step_fn(state, *batch)  # Step 0 has lr = 0 (warm-up).
  before = jax.device_get(state.params)
  state, metrics = step_fn(state, *batch)
  assert np.isfinite(float(metrics['loss']))
  changed = [
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))
  ]
  assert all(changed)  # Every stem, core layer and head was updated.


def test_abstract_state_is_the_state_without_computing_it():
  """`abstract_train_state` gives the shapes, dtypes and shardings of
  `create_train_state` on the 8-device mesh, as ShapeDtypeStructs, and the
  train step lowers from it (ahead-of-time compilation needs no arrays)."""
  config = tiny_digits_config()
  mesh = sharding.make_mesh()
  model = models.get_model(config)
  abstract = training.abstract_train_state(config, model, 10, mesh)
  concrete = training.create_train_state(config, model, 10, mesh)
  a_leaves, a_tree = jax.tree.flatten(training.state_to_tree(abstract))
  c_leaves, c_tree = jax.tree.flatten(training.state_to_tree(concrete))
  assert a_tree == c_tree and len(a_leaves) > 10
  for a, c in zip(a_leaves, c_leaves):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype) == (c.shape, c.dtype)
    assert a.sharding == c.sharding
  b = config.batch_size // config.batch_repetitions
  batch = (jax.ShapeDtypeStruct((b, config.image_size, config.image_size, 3),
                                np.uint8, sharding=sharding.data_sharded(mesh)),
           jax.ShapeDtypeStruct((b,), np.int32,
                                sharding=sharding.data_sharded(mesh)))
  step = training.make_train_step(config, model, 10, mesh)
  assert 'convolution' in step.lower(abstract, *batch).as_text()

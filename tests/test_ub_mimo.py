"""The uncertainty-baselines MIMO options: the MIMO stem and the stride.

The MIMO stem (edward2 / uncertainty-baselines) is ONE dense conv
[3, 3, 3M, C0] over the M images stacked on channels, He-normal with fan-in
27M; checked here against one lax.conv over the stacked channels.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixmo_jax.mixmo import layers
from mixmo_jax.models import WideResNet

M, C0 = 3, 16


def _dense_conv(x, kernel):
  """x [B,H,W,3M] (member-major channels), kernel [3,3,3M,C0] -> [B,H,W,C0]."""
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


def test_mimo_stem_is_one_conv_over_stacked_channels():
  stems = layers.Stems(M, C0, init_rule='mimo')
  xs = jax.random.normal(jax.random.PRNGKey(0), (2, M, 8, 8, 3))
  variables = stems.init(jax.random.PRNGKey(1), xs[:, 0])
  kernel = variables['params']['kernel']  # [M,3,3,3,C0]
  # Independent: K[h, w, 3m + i, c] = kernel[m, h, w, i, c].
  dense = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(3, 3, 3 * M, C0)
  stacked = jnp.transpose(xs, (0, 2, 3, 1, 4)).reshape(2, 8, 8, 3 * M)
  expected = _dense_conv(stacked, dense)
  # Training: sum mixing, w_i = kappa = 1/M (M * sum_i w_i c_i(x_i)).
  weights = jnp.full((2, M, 8, 8), 1.0 / M)
  got = stems.apply(variables, xs, weights)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # Test time: the image tiled M times.
  tiled = jnp.tile(xs[:, 0], (1, 1, 1, M))
  np.testing.assert_allclose(
      stems.apply(variables, xs[:, 0]), _dense_conv(tiled, dense), rtol=1e-4,
      atol=1e-4)


def test_mimo_stem_fan_in_is_27m():
  key = jax.random.PRNGKey(3)
  shape = (M, 3, 3, 3, 256)
  mixmo = layers.stem_init('mixmo', M)(key, shape)
  mimo = layers.stem_init('mimo', M)(key, shape)
  # He-normal: std sqrt(2 / fan_in); mixmo fan_in 27, mimo 27M.
  np.testing.assert_allclose(np.std(mixmo), np.sqrt(2 / 27), rtol=0.05)
  np.testing.assert_allclose(np.std(mimo), np.sqrt(2 / (27 * M)), rtol=0.05)
  with pytest.raises(ValueError, match='model.stem'):
    layers.stem_init('dense', M)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_stride_on_first_keeps_parameters_changes_function():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  second = WideResNet(10, 1, 4, 2)
  first = WideResNet(10, 1, 4, 2, stride_on='first')
  v = second.init(jax.random.PRNGKey(1), x)
  v_first = first.init(jax.random.PRNGKey(1), x)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, v)
  assert shapes == jax.tree_util.tree_map(lambda a: a.shape, v_first)
  assert _count(v) == _count(v_first)
  out_second, out_first = second.apply(v, x), first.apply(v, x)
  assert out_first.shape == out_second.shape == (2, 2, 4)
  assert not np.allclose(out_first, out_second)
  # The strided stage halves at conv1: stage-2 conv1 output is 8x8 already.
  _, inter = first.apply(v, x, mutable=['intermediates'])
  assert inter['intermediates']['stage2'][0].shape == (2, 8, 8, 32)
  with pytest.raises(ValueError, match='stride_on'):
    WideResNet(10, 1, 4, 2, stride_on='third')


@pytest.mark.parametrize('dataset', ['cifar100', 'cifar10'])
def test_ub_mimo_resolves_to_the_uncertainty_baselines_flags(dataset):
  from mixmo_jax import config_validation, configs, models
  config = configs.get(f'{dataset}:ub_mimo')
  config_validation.validate(config, num_devices=1)
  assert config.dataset == dataset
  assert (config.num_members, config.batch_repetitions) == (3, 4)
  assert config.mixing.method == 'sum' and config.mixing.input_repetition == 0
  assert config.batch_size // config.batch_repetitions == 128
  assert (config.model.name, config.model.depth,
          config.model.width) == ('wide_resnet', 28, 10)
  assert (config.model.stem, config.model.stride_on) == ('mimo', 'first')
  # UB's 8 cores of 64 rows, on any device count.
  assert config.model.bn_group_rows == 64
  assert config.mixing.permutation_group_rows == 64
  assert config.augment.per_copy is False and config.augment.crop_padding == 2
  assert tuple(config.image_std) == (0.2470, 0.2435, 0.2616)
  opt = config.optimizer
  # lr = 0.1 * (512 / 4) / 128 = 0.1.
  assert opt.base_learning_rate * (
      config.batch_size / config.batch_repetitions) / (
          opt.reference_batch_size) == pytest.approx(0.1)
  assert opt.warmup_epochs == 1 and opt.warmup_steps_per_repetition == 0
  assert tuple(opt.decay_epochs) == (100, 200, 225)
  assert opt.decay_factor == 0.2 and config.num_epochs == 250
  assert opt.l2 == 3e-4 and opt.weight_decay == 0
  assert opt.momentum == 0.9 and opt.nesterov
  assert config.seed == 42 and config.evaluation.ensemble == 'probs'
  model = models.get_model(config)
  assert (model.stem, model.stride_on, model.num_members) == ('mimo', 'first',
                                                              3)


def test_per_device_batch_norm_equals_per_shard_statistics():
  from jax.sharding import NamedSharding, PartitionSpec as P
  from flax import linen as nn
  from mixmo_jax import sharding
  from mixmo_jax.models import common
  assert jax.device_count() == 8  # conftest: 8 fake CPU devices.
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 5)) * 3 + 1
  grouped = common.batch_norm(True, jnp.float32, groups=8)
  v = grouped.init(jax.random.PRNGKey(1), x)
  v = {
      'params': {
          'scale': jnp.arange(1., 6.),
          'bias': jnp.arange(5.) / 10
      },
      'batch_stats': v['batch_stats']
  }
  mesh = sharding.make_mesh()
  xs = jax.device_put(x, NamedSharding(mesh, P(sharding.DATA_AXIS)))
  fn = jax.jit(lambda v, x: grouped.apply(v, x, mutable=['batch_stats']))
  y, updates = fn(v, xs)
  # Independent: flax's BatchNorm on each device's shard of 2 images.
  plain = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  shards = [
      plain.apply(v, x[2 * g:2 * g + 2], mutable=['batch_stats'])
      for g in range(8)
  ]
  np.testing.assert_allclose(y, jnp.concatenate([s[0] for s in shards]),
                             rtol=1e-4, atol=1e-4)
  for stat in ('mean', 'var'):
    expected = np.mean([s[1]['batch_stats'][stat] for s in shards], 0)
    np.testing.assert_allclose(updates['batch_stats'][stat], expected,
                               rtol=1e-4, atol=1e-5)
  # Not the global-batch statistics.
  global_y, _ = plain.apply(v, x, mutable=['batch_stats'])
  assert not np.allclose(y, global_y, atol=1e-3)
  # Inference: the running statistics, as flax's BatchNorm.
  test_bn = common.batch_norm(False, jnp.float32, groups=8)
  np.testing.assert_allclose(
      test_bn.apply(v, x),
      nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(v, x),
      rtol=1e-5, atol=1e-5)


def test_grouped_batch_norm_keeps_the_parameter_tree():
  x = jnp.zeros((8, 8, 8, 3))
  plain = WideResNet(10, 1, 4, 2).init(jax.random.PRNGKey(0), x)
  grouped = WideResNet(10, 1, 4, 2, bn_groups=8).init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_map(lambda a: a.shape, plain) == (
      jax.tree_util.tree_map(lambda a: a.shape, grouped))


def test_row_groups_hold_their_own_samples_b_times():
  from mixmo_jax.mixmo import batch
  n, b, groups, m = 32, 4, 8, 3
  rows = n * b // groups
  sample = np.asarray(batch.repeat_batch(jnp.arange(n), b, groups))
  idx = np.asarray(
      batch.member_indices(jax.random.key(0), n * b, m, 0.0, groups))
  for g in range(groups):
    block = sample[g * rows:(g + 1) * rows]
    own = np.arange(g * n // groups, (g + 1) * n // groups)
    np.testing.assert_array_equal(
        np.bincount(block - own[0]), np.full(len(own), b))
    for i in range(m):  # Each member permutes the group's rows only.
      np.testing.assert_array_equal(
          np.sort(idx[g * rows:(g + 1) * rows, i]),
          np.arange(g * rows, (g + 1) * rows))
  # One group: the original layout and draws.
  np.testing.assert_array_equal(
      batch.repeat_batch(jnp.arange(n), b), np.tile(np.arange(n), b))


def test_take_rows_is_the_plain_gather():
  """Group by group, the same values as x[idx] and x[idx, cols], for
  indices drawn within each row's group (member inputs and partners)."""
  from mixmo_jax.mixmo import batch
  n, b, m, groups = 16, 4, 3, 8
  rows = n * b // groups
  key = jax.random.key(5)
  x = jax.random.normal(key, (n * b, 2, 3))
  idx = batch.member_indices(key, n * b, m, 0.25, groups)
  q = batch.partner_positions(jax.random.key(6), idx, n, n * b, groups)
  assert np.all(np.asarray(idx) // rows == np.arange(n * b)[:, None] // rows)
  for i in (idx, q, idx[:, :1]):
    np.testing.assert_array_equal(batch.take_rows(x, i, groups), x[i])
    cols = jnp.arange(i.shape[1])[None, :]
    per_member = jax.random.normal(key, (n * b, i.shape[1], 5))
    np.testing.assert_array_equal(
        batch.take_rows(per_member, i, groups, cols), per_member[i, cols])
  labels = jnp.arange(n * b)
  np.testing.assert_array_equal(batch.take_rows(labels, q, groups), labels[q])


def test_permutation_groups_reproduce_ubs_repetition_rate():
  """Two members see the same image at a row with probability b / R: 4 / 64
  = 6.25% with UB's per-core groups of 64 rows, 4 / 512 = 0.78% with the
  global batch of 512 (over many draws)."""
  from mixmo_jax.mixmo import batch
  n, b, m = 128, 4, 3

  def rate(groups, draws=150):
    sample = batch.repeat_batch(jnp.arange(n), b, groups)
    draw = jax.jit(
        jax.vmap(lambda k: batch.member_indices(k, n * b, m, 0.0, groups)))
    idx = np.asarray(draw(jax.random.split(jax.random.key(7), draws)))
    seen = np.asarray(sample)[idx]  # Shape: [draws, B, M].
    pairs = [(0, 1), (0, 2), (1, 2)]
    return np.mean([seen[..., i] == seen[..., j] for i, j in pairs])

  assert rate(8) == pytest.approx(4 / 64, abs=0.003)
  assert rate(1) == pytest.approx(4 / 512, abs=0.001)


def _grouped_config(rows):
  from conftest import tiny_digits_config
  config = tiny_digits_config('mimo')
  config.num_members, config.batch_repetitions = 3, 4
  config.batch_size = 128  # 32 unique samples, 8 groups of 16 rows.
  config.mixing.permutation_group_rows = rows
  config.model.bn_group_rows = rows
  return config


def _one_step(config, mesh):
  from mixmo_jax import data, feed, models, training
  model = models.get_model(config)
  state = training.create_train_state(config, model, 10, mesh)
  x, y = data.load_split(config, 'train')
  batch = feed.Feeder(config, x[:320], y[:320], mesh).batch(0)
  member_batch = jax.jit(
      functools.partial(training.member_inputs, config=config))
  xs, targets = member_batch(
      jax.random.key(3), *batch, jnp.full((128, 3, 16, 16), 1 / 3))
  state, _ = training.make_train_step(config, model, 10, mesh)(state, *batch)
  return (np.asarray(xs), np.asarray(targets),
          jax.device_get(state.batch_stats))


def test_one_and_eight_devices_run_the_same_grouped_step():
  """UB's 8-core semantics on any device count: the same member inputs
  (permutations per group of rows) and the same BatchNorm statistics (per
  group) on 1 and 8 devices, up to rounding; and not the global-batch BN."""
  from mixmo_jax import sharding
  config = _grouped_config(16)
  xs8, t8, stats8 = _one_step(config, sharding.make_mesh())
  xs1, t1, stats1 = _one_step(config, sharding.make_mesh(jax.devices()[:1]))
  np.testing.assert_array_equal(xs1, xs8)
  np.testing.assert_array_equal(t1, t8)
  for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  _, _, global_stats = _one_step(_grouped_config(0), sharding.make_mesh())
  var_grouped = stats8['stage1_block1']['bn2']['var']
  assert not np.allclose(var_grouped,
                         global_stats['stage1_block1']['bn2']['var'], rtol=1e-3)

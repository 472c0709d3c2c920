"""experiments/aot: FLOPs counted from shapes, what compiled HLO launches,
the batch search, the CLI's one-line refusals, and whole cases compiled for
this process's 8 CPU devices (the GPU and TPU targets need the `aot` extra;
.ci/run compiles them)."""
import json
import math
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from experiments.aot import case, flops, hlo, largest
from experiments.aot import baseline as baseline_lib
from experiments.aot import targets as targets_lib
from mixmo_jax import configs, models, sharding, training

NHWC = ('NHWC', 'HWIO', 'NHWC')
CPU8 = targets_lib.Target(key='cpu8', name='this CPU', platform='cpu',
                          memory_bytes=1 << 34, hbm_bytes_per_s=1e11,
                          peak_flops={
                              'float32': 1e12,
                              'bfloat16': 2e12
                          }, link_bytes_per_s=1e10, topologies={
                              '1': '1',
                              '8': '8'
                          })


def _forward_flops(b, h, w, ci, k, co, stride):
  """2 B Ho Wo Co k k Ci: a multiply-add per kernel tap, SAME padding."""
  ho, wo = -(-h // stride), -(-w // stride)
  return 2 * b * ho * wo * co * k * k * ci


@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (1, 1), (1, 2)])
def test_conv_and_its_two_gradients_count_the_forwards_work(k, stride):
  """The forward conv counts 2 B Ho Wo Co k^2 Ci, and the input- and
  weight-gradient convs of its backward pass count as much each (also for
  a strided conv, whose input gradient runs on a stride-dilated input)."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  kernel = jax.ShapeDtypeStruct((k, k, 3, 5), jnp.float32)

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME',
                                        dimension_numbers=NHWC)

  forward = _forward_flops(2, 8, 8, 3, k, 5, stride)
  assert flops.of(conv, x, kernel)['conv'] == forward
  grads = flops.of(jax.grad(lambda x, w: conv(x, w).sum(), (0, 1)), x, kernel)
  assert grads['conv'] == 3 * forward
  weight_only = flops.of(jax.grad(lambda x, w: conv(x, w).sum(), 1), x, kernel)
  assert weight_only['conv'] == 2 * forward


def test_dots_and_the_rest():
  """A dense layer is 2 B Din Dout; elementwise ops one FLOP per output
  element, reductions one per input element; data movement is free."""
  x = jax.ShapeDtypeStruct((4, 6), jnp.float32)
  w = jax.ShapeDtypeStruct((6, 7), jnp.float32)
  counts = flops.of(lambda x, w: jnp.tanh(x @ w).T.reshape(-1).sum(), x, w)
  assert counts['dot'] == 2 * 4 * 6 * 7
  assert counts['rest'] == 4 * 7 + 4 * 7  # tanh, then the sum.
  assert counts['conv'] == 0
  assert counts['total'] == counts['dot'] + counts['rest']


def test_a_cond_counts_its_costliest_branch():
  x = jax.ShapeDtypeStruct((10,), jnp.float32)
  counts = flops.of(
      lambda p, x: jax.lax.cond(p, lambda x: jnp.exp(jnp.exp(x)), jnp.exp, x),
      jax.ShapeDtypeStruct((), jnp.bool_), x)
  assert counts['rest'] == 20


def _conv_eqns(jaxpr):
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      out.append(eqn)
    for sub in flops._sub_jaxprs(eqn):
      out.extend(_conv_eqns(sub))
  return out


def test_the_train_step_counts_three_forwards_but_the_stem_input_grad():
  """WRN-28-10, Cut-MixMo b = 4 (the paper's CIFAR-100 step, traced, not
  compiled): the step's convs are the forward's three times (forward, input
  gradient, weight gradient), less the stems' input gradient, which no
  parameter needs."""
  config = configs.get('cifar100:cut_mixmo+b4')
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = models.get_model(config)
  state = training.abstract_train_state(config, model, 100, mesh)
  step = training.make_train_step(config, model, 100, mesh)
  counts = flops.of(step, state, *case.train_inputs(config, mesh))
  size, b, m = config.image_size, config.batch_size, config.num_members
  xs = jax.ShapeDtypeStruct((b, m, size, size, 3), jnp.float32)
  weights = jax.ShapeDtypeStruct((b, m, *models.stem_resolution(config)),
                                 jnp.float32)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  forward = jax.make_jaxpr(lambda v, x, w: model.apply(
      v, x, mix_weights=w, train=True, mutable=['batch_stats']))(variables, xs,
                                                                 weights)
  convs = [flops.conv_flops(e) for e in _conv_eqns(forward.jaxpr)]
  stems = convs[0]  # The M stems are the first conv, on the raw inputs.
  assert counts['conv'] == 3 * sum(convs) - stems


def test_shape_bytes():
  assert hlo.shape_bytes('f32[8,32]{1,0}') == 8 * 32 * 4
  assert hlo.shape_bytes('(bf16[2,3]{1,0}, u8[0]{0}, s32[])') == 12 + 0 + 4
  assert hlo.shape_bytes('pred[5]') == 5


def test_entry_stats_of_a_real_sharded_program():
  """A sum over a batch sharded on 8 CPU devices: one all-reduce of the
  partial sums; the kernels read at least the shard."""
  mesh = sharding.make_mesh(jax.devices()[:8])
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32,
                           sharding=sharding.data_sharded(mesh))
  text = jax.jit(
      lambda x: jnp.sin(x).sum(0),
      out_shardings=sharding.replicated(mesh)).lower(x).compile().as_text()
  stats = hlo.entry_stats(text)
  assert stats.collectives['all-reduce']['count'] == 1
  assert stats.collectives['all-reduce']['bytes'] == 128 * 4
  assert stats.kernels >= 2
  assert stats.kernel_io_bytes >= 64 // 8 * 128 * 4


def _tiny(rows=0):
  config = configs.get('digits:cut_mixmo')
  config.model.width = 1
  config.batch_size, config.eval_batch_size = 64, 64
  config.model.bn_group_rows = rows
  return config


def test_a_case_compiled_for_eight_devices():
  """The digits train step for 8 devices: memory, work, collectives and the
  bound, each against what it is built from."""
  result = case.run(_tiny(), CPU8, 8, 'float32', label='digits')
  assert result['compiled'], result
  assert result['eval_compiled'], result
  assert result['peak_bytes'] >= result['temp_bytes'] > 0
  assert result['alias_bytes'] > 0  # The donated state.
  bound = max(result['flops_per_step'] / 8 / 1e12,
              result['kernel_io_bytes'] / 1e11)
  reduce = 2 * 7 / 8 * result['collectives']['all-reduce']['bytes'] / 1e10
  assert math.isclose(result['step_lower_bound_s'], bound + reduce)
  assert math.isclose(result['run_lower_bound_h'],
                      result['step_lower_bound_s'] * result['run_steps'] / 3600)
  assert result['collectives']['all-reduce']['count'] >= 1
  json.dumps(result)  # --json prints it.


def test_batchnorm_groups_follow_the_mesh():
  """Global BatchNorm on 8 devices all-reduces its moments; with one group
  of rows per device (bn_group_rows = B / 8, as ub_mimo on 8 cores) the
  statistics stay on their device: only the gradients' all-reduce is
  left; groups that span two devices (B / 4 rows) communicate again."""
  runs = {
      rows: case.run(_tiny(rows=rows), CPU8, 8, 'float32', with_eval=False)
      for rows in (0, 8, 16)
  }
  assert all(r['compiled'] for r in runs.values())
  reduces = {rows: r['collectives']['all-reduce'] for rows, r in runs.items()}
  assert reduces[8]['count'] == 1
  assert reduces[0]['count'] > 1 and reduces[16]['count'] > 1
  assert reduces[8]['bytes'] < min(reduces[0]['bytes'], reduces[16]['bytes'])
  # The one left is the gradients' (and the step's scalar metrics).
  assert reduces[8]['bytes'] >= runs[8]['gradient_bytes']


def test_member_permutations_by_device_gather_nothing():
  """Member inputs and CutMix partners permuted within one group of rows
  per device (permutation_group_rows = B / 8, as ub_mimo on 8 cores) are
  gathered from the device's own rows: no all-gather in the step, while
  permutations of the global batch must collect it."""
  runs = {}
  for rows in (0, 8):
    config = _tiny(rows=8)
    config.mixing.permutation_group_rows = rows
    runs[rows] = case.run(config, CPU8, 8, 'float32', with_eval=False)
  assert all(r['compiled'] for r in runs.values())
  assert 'all-gather' not in runs[8]['collectives']
  assert runs[0]['collectives']['all-gather']['count'] >= 1


def test_no_collective_runs_inside_a_loop():
  """The mixing ratios' Dirichlet draw is a rejection loop; drawn whole on
  each device, its trips need no agreement between devices (an all-reduce
  per trip when the draw is split over them)."""
  result = case.run(_tiny(), CPU8, 8, 'float32', with_eval=False)
  assert result['compiled'] and result['loop_collectives'] == 0, result


def test_the_baseline_fails_growth_and_new_collectives(tmp_path):
  """Written, read back and compared: within 10% passes; more peak or
  kernels, a new kind of collective, or collectives in a loop fail; a case
  the baseline lacks is only reported."""
  row = {
      'target': 'h100',
      'devices': 8,
      'dtype': 'bfloat16',
      'config': 'c',
      'batch_size': 64,
      'compiled': True,
      'peak_bytes': 1000,
      'kernels_per_step': 100,
      'loop_collectives': 0,
      'collectives': {
          'all-reduce': {
              'count': 4,
              'bytes': 10
          }
      }
  }
  path = str(tmp_path / 'baseline.json')
  baseline_lib.write(path, [row])
  base = baseline_lib.read(path)

  def verdict(**change):
    lines, regressed = baseline_lib.compare(base, [dict(row, **change)])
    return regressed, lines[-1]

  assert not verdict(peak_bytes=1100, kernels_per_step=110)[0]
  assert 'REGRESSED' not in verdict(kernels_per_step=90)[1]
  for change, says in [({
      'peak_bytes': 1101
  }, 'peak_bytes'), ({
      'kernels_per_step': 111
  }, 'kernels_per_step'), ({
      'loop_collectives': 2
  }, '2 collectives in loops'),
                       ({
                           'collectives':
                               dict(row['collectives'],
                                    **{'all-gather': {
                                        'count': 1,
                                        'bytes': 8
                                    }})
                       }, 'new collectives all-gather')]:
    regressed, line = verdict(**change)
    assert regressed and says in line, line
  lines, regressed = baseline_lib.compare(base, [dict(row, devices=1)])
  assert not regressed and 'not in the baseline' in lines[-1]


def test_an_invalid_case_is_a_row_with_its_error():
  config = _tiny()
  config.batch_size = 60  # 60 / b = 30 unique samples: not divisible by 8.
  result = case.run(config, CPU8, 8, 'float32')
  assert not result['compiled'] and 'batch_size' in result['error']


def test_the_search_finds_the_largest_fitting_multiple():
  """Exact with resolution 0; within 1/32 (or one step) by default; every
  probe a multiple of the step, and few of them."""
  rng = random.Random(0)
  for _ in range(200):
    step, start = rng.choice([8, 48, 64]), rng.choice([8, 64, 512])
    threshold = rng.randrange(0, 5000)
    expected = threshold // step * step
    for resolution in (0, 1 / 32):
      probes = []

      def fits(batch, threshold=threshold, probes=probes):
        probes.append(batch)
        return batch <= threshold

      found = largest.search(fits, start, step, resolution=resolution)
      assert found <= expected and fits(found) or found == 0
      assert expected - found <= max(step, expected * resolution)
      assert all(p % step == 0 for p in probes)
      assert len(probes) <= 2 * math.log2(5000 / step + 2) + 3


def test_the_unit_respects_devices_repetitions_and_row_groups():
  config = configs.get('cifar100:ub_mimo')
  u = largest.unit(config, 8)
  assert u % (config.batch_repetitions * 8) == 0
  assert u % config.model.bn_group_rows == 0
  assert u % config.mixing.permutation_group_rows == 0


def test_the_targets_are_complete():
  for target in targets_lib.all_targets().values():
    assert set(target.peak_flops) == set(targets_lib.DTYPES)
    assert target.memory_bytes > 0 and target.hbm_bytes_per_s > 0
    for count, name in target.topologies.items():
      assert int(
          targets_lib.with_topology(target,
                                    name).topologies.popitem()[0]) == int(count)
    if target.platform == 'cuda':
      assert os.path.isfile(
          os.path.join(targets_lib.HERE, target.target_config))


def _aot(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'experiments.aot', *args],
                       cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=300)
  return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize('args,says', [
    (['--target=a100'], "--target='a100' is not a target; allowed: h100"),
    (['--target=h100', '--devices=3'
     ], '--devices=3 is not a slice of h100; allowed: 1, 2, 4, 8'),
    (['--dtype=float16'], "--dtype='float16' is not allowed"),
    (['--config=configs/nope.py'], '--config=configs/nope.py: config file'),
    (['--baseline=nope.json'], '--baseline=nope.json: no such file'),
    (['--set=model.nope=1'], "--set=model.nope=1: config.model has no field "
     "'nope' (fields: bn_group_rows, depth,"),
    (['--set=model.depth=deep'], "--set=model.depth=deep: model.depth takes "
     "an integer, not 'deep'"),
    (['--set=model.bn_group_rows'], '--set=model.bn_group_rows: FIELD=VALUE'),
])
def test_bad_flags_get_one_line(args, says):
  code, stdout, stderr = _aot(*args)
  assert code == 2 and not stdout
  assert len(stderr.strip().splitlines()) == 1, stderr
  assert says in stderr


def test_a_missing_plugin_says_what_to_install():
  """Without jax's CUDA plugin (the suite's venv), one line names it."""
  if targets_lib.missing_plugin(targets_lib.get('h100')) == '':
    pytest.skip('jax[cuda12] is installed here: nothing is missing')
  code, _, stderr = _aot('--target=h100')
  assert code == 2
  assert stderr.strip() == (
      'experiments.aot: --target=h100 needs jax[cuda12] (jax_cuda12_plugin '
      'is not installed): pip install -e ".[aot]"')


def test_compiled_numbers_are_numbers():
  result = case.run(_tiny(), CPU8, 1, 'bfloat16', with_eval=False)
  assert result['compiled']
  for key in ('argument_bytes', 'output_bytes', 'temp_bytes', 'peak_bytes',
              'flops_per_step', 'kernels_per_step', 'kernel_io_bytes'):
    assert isinstance(result[key], int) and result[key] > 0, key
  assert np.isfinite(result['step_lower_bound_s'])

"""The compiled H100 programs of the paper's step, checked (issue: compile
the real train step for accelerators on every commit).

These need jax's CUDA plugin (the `aot` extra) and are skipped, saying so,
without it; `.ci/run` installs the extra and runs them. Each program is
compiled once (about 20 s each on 2 cores):

  cut_mixmo+b4, bfloat16, one H100   the headline recipe
  ub_mimo,      bfloat16, 8 H100s    one BatchNorm group of rows per GPU
"""
import os
import re

import jax
import pytest

from experiments.aot import case, hlo
from experiments.aot import targets as targets_lib
from mixmo_jax import configs, models, platform, sharding, training

H100 = targets_lib.get('h100')
pytestmark = [
    pytest.mark.skipif(
        bool(targets_lib.missing_plugin(H100)),
        reason='needs the aot extra (jax CUDA plugin): pip install -e ".[aot]"'
    ),
    # The suite's persistent compilation cache (conftest.py) stores these
    # programs, but without the GPUs jax cannot load them back: on a warm
    # cache it warns and compiles them again, which is all this file needs.
    pytest.mark.filterwarnings(
        'ignore:Error reading persistent compilation cache entry:UserWarning'),
]
# What a step must never do: call back into Python or move data through the
# host (XLA's callback targets, host send / receive, in- and outfeed).
HOST_OPS = re.compile(r'callback|\b(send|recv|infeed|outfeed)(-start|-done)?\(')


def _compile(spec, devices):
  config = configs.get(spec)
  config.model.dtype = 'bfloat16'
  mesh = sharding.make_mesh(targets_lib.devices(H100, devices))
  compiled, _, gradient_bytes = case.compile_train(config, mesh)
  state = training.abstract_train_state(config, models.get_model(config), 1,
                                        mesh)
  state_bytes = sum(
      x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
  return compiled, state_bytes, gradient_bytes


@pytest.fixture(scope='module')
def programs():
  # The GPU's defaults (deterministic kernels) before the backend starts
  # in this process, as experiments.aot applies them.
  added = platform.apply_defaults(platforms=('cpu', 'gpu'))
  return {
      'headline': _compile('cifar100:cut_mixmo+b4', 1),
      'ub_mimo': _compile('cifar100:ub_mimo', 8),
      'added': added
  }


def test_the_donated_state_is_aliased(programs):
  """Every byte of the state is updated in place: alias bytes = state."""
  for name in ('headline', 'ub_mimo'):
    compiled, state_bytes, _ = programs[name]
    assert compiled.memory_analysis().alias_size_in_bytes == state_bytes


def test_bfloat16_configs_convolve_in_bfloat16(programs):
  """Every cuDNN convolution of the step (forward, input and weight
  gradients) produces bfloat16."""
  text = programs['headline'][0].as_text()
  dtypes = re.findall(
      r'= \(([a-z0-9]+)\[[^\n]*custom_call_target='
      r'"__cudnn\$conv', text)
  assert len(dtypes) >= 3 * 25  # WRN-28-10: 25 + 3 convs, 3 kinds each.
  assert set(dtypes) == {'bf16'}


def test_the_deterministic_ops_flag_is_in_effect():
  """The GPU default is in XLA_FLAGS when the backend starts (it was added
  here, or set already: by the user or an earlier apply_defaults)."""
  assert '--xla_gpu_deterministic_ops=true' in os.environ.get('XLA_FLAGS', '')


def test_nothing_goes_through_the_host(programs):
  for name in ('headline', 'ub_mimo'):
    entry = '\n'.join(hlo.entry_lines(programs[name][0].as_text()))
    assert not HOST_OPS.search(entry), HOST_OPS.search(entry).group(0)


def test_eight_gpus_all_reduce_the_gradients_once(programs):
  """ub_mimo on 8 GPUs: BatchNorm stays on each GPU, so the all-reduces
  are the gradients' (XLA combines them into a few large ones, in the
  compute dtype: at least half the float32 gradient bytes, at most all of
  them) and the step's scalars; the member permutations stay within each
  GPU's rows, so nothing is all-gathered; no collective runs in a loop."""
  compiled, _, gradient_bytes = programs['ub_mimo']
  stats = hlo.entry_stats(compiled.as_text())
  reduces = stats.collectives['all-reduce']
  assert reduces['count'] <= 6
  assert gradient_bytes / 2 <= reduces['bytes'] <= gradient_bytes * 1.05
  assert set(stats.collectives) == {'all-reduce'}, stats.collectives
  assert stats.loop_collectives == 0
  gathered = [
      line for line in hlo.entry_lines(compiled.as_text())
      if 'all-gather-start(' in line or ' all-gather(' in line
  ]
  for line in gathered:
    result = line.split(' = ', 1)[1].split(' all-gather', 1)[0]
    assert not re.search(r'\b(f32|bf16|f16)\[', result), line[:300]

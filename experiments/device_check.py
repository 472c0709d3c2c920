"""One-table check of a fresh accelerator (run by experiments/device_check.sh).

  python -m experiments.device_check            # WRN-28-10, M = 2, b = 4
  DEVICE_CHECK_TINY=1 python -m experiments.device_check   # WRN-10-1, CPU

Prints one table: training throughput (images/s, the batch of B = 64 mixed
inputs per step, repetitions included) in float32 and bfloat16, the
Cut-MixMo / MIMO step-time ratio, eval images/s, MFU, peak device memory,
bit-identity of two identical 3-step runs (same seed: parameter digests
equal) and the time of one synthetic CIFAR-shaped epoch (50k random uint8
images, host indexing and transfer included). Data are random: no dataset.
"""
import copy
import hashlib
import importlib.util
import os
import time

import numpy as np

from experiments import benchmark  # Applies mixmo_jax.platform defaults.
from experiments import peak_flops
from experiments.aot import case as aot_case
from experiments.aot import targets as aot_targets

import jax
from mixmo_jax import models, sharding, training
from mixmo_jax.data import pipeline

TINY = os.environ.get('DEVICE_CHECK_TINY', '0') == '1'


def _config():
  path = os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
      'cifar100.py')
  spec = importlib.util.spec_from_file_location('device_check_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('cut_mixmo+b4')
  if TINY:  # Fast to compile and run on a CPU.
    config.model.depth, config.model.width = 10, 1
    config.image_size, config.batch_size, config.eval_batch_size = 16, 16, 32
  return config


def _digest(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


def short_run_digest(config, mesh, step, steps: int) -> str:
  """Parameter digest after `steps` steps from the seed on fixed data."""
  state = training.create_train_state(config, models.get_model(config), 100,
                                      mesh)
  batch = sharding.global_batch(
      benchmark._random_batch(config, np.random.default_rng(0)), mesh)
  for _ in range(steps):
    state, _ = step(state, *batch)
  return _digest(state.params)


def synthetic_epoch(config, mesh, step, steps: int) -> float:
  """Seconds for `steps` train steps fed from a 50k-image host array."""
  size = config.image_size
  rng = np.random.default_rng(0)
  data = rng.integers(0, 256, (50_000, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, config.num_classes, 50_000).astype(np.int32)
  state = training.create_train_state(config, models.get_model(config), 100,
                                      mesh)
  n = pipeline.unique_per_step(config)

  def batch(i):
    idx = pipeline.train_indices(config.seed, i, len(labels), n)
    return sharding.global_batch((data[idx], labels[idx]), mesh)

  state, metrics = step(state, *batch(0))  # Compile outside the timing.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(1, steps + 1):
    state, metrics = step(state, *batch(i))
  jax.block_until_ready(metrics)
  assert np.isfinite(float(metrics['loss'])), 'non-finite loss'
  return time.perf_counter() - start


def main():
  config = _config()
  mesh = sharding.make_mesh()
  device = jax.devices()[0]
  timed = 2 if TINY else 20
  rows = []
  seconds = {}
  # The AOT model's predictions (experiments/aot), beside each measurement:
  # the first lent device calibrates it.
  target = aot_targets.for_device_kind(device.device_kind)
  predicted = {}
  for dtype in ('float32', 'bfloat16'):
    c = copy.deepcopy(config)
    c.model.dtype = dtype
    predicted[dtype] = aot_case.predict(c, mesh, target)
    s, flops, _ = benchmark.bench_train(c, mesh, timed, 1 if TINY else 3)
    seconds[dtype] = s
    peak = peak_flops.peak_flops(device.device_kind, dtype)
    mfu = (f'{100 * flops / s / (peak * jax.device_count()):.1f} %'
           if peak else 'n/a')
    bound = predicted[dtype].get('step_lower_bound_s')
    rows.append((f'train img/s {dtype}', f'{c.batch_size / s:.0f}'))
    rows.append((f'step ms {dtype}', f'{s * 1e3:.1f} (AOT lower bound: ' +
                 (f'{bound * 1e3:.2f}, {predicted[dtype]["bound_by"]}-bound)'
                  if bound else f'n/a, no target for {device.device_kind!r})')))
    rows.append((f'MFU {dtype}', mfu))
    rows.append((f'AOT peak MB / kernels per step {dtype}',
                 f'{predicted[dtype]["peak_bytes"] / 2**20:.0f} / '
                 f'{predicted[dtype]["kernels_per_step"]}'))
  mimo = copy.deepcopy(config)
  mimo.mixing.method = 'sum'
  s_mimo, _, _ = benchmark.bench_train(mimo, mesh, timed, 1 if TINY else 3)
  rows.append(
      ('Cut-MixMo / MIMO step time', f'{seconds["float32"] / s_mimo:.3f}'))
  rows.append(
      ('eval img/s', f'{benchmark.bench_eval(config, mesh, timed):.0f}'))
  stats = device.memory_stats() or {}
  peak_mem = stats.get('peak_bytes_in_use')
  rows.append(('peak device memory MB',
               (f'{peak_mem / 2**20:.0f}' if peak_mem else 'n/a (CPU)') +
               f' (AOT peak of the float32 step: '
               f'{predicted["float32"]["peak_bytes"] / 2**20:.0f})'))
  # One jitted step (compiled once) for the reruns and the epoch.
  step = training.make_train_step(config, models.get_model(config), 100, mesh)
  a = short_run_digest(config, mesh, step, 3)
  b = short_run_digest(config, mesh, step, 3)
  rows.append(('bit-identical reruns (3 steps)',
               f'{"yes" if a == b else "NO"} ({a} vs {b})'))
  steps = int(
      os.environ.get(
          'DEVICE_CHECK_EPOCH_STEPS', 3 if TINY else 50_000 *
          config.batch_repetitions // config.batch_size))
  epoch = synthetic_epoch(config, mesh, step, steps)
  rows.append((f'synthetic epoch ({steps} steps) s', f'{epoch:.1f}'))
  print(f'device check: {config.model.name}-{config.model.depth}-'
        f'{config.model.width}, M {config.num_members}, b '
        f'{config.batch_repetitions}, batch {config.batch_size}, '
        f'{jax.device_count()} x {device.device_kind}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f'{key:{width}s}  {value}')
  if a != b:
    raise SystemExit('device check: reruns are not bit-identical')


if __name__ == '__main__':
  main()

"""Throughput and memory of the jitted train step, eval and host pipeline.

  python -m experiments.benchmark --config=configs/cifar100.py \
      --config.model.depth=10 --config.model.width=2 --steps=20

For one config it times, on the same network and batch, the train step of
Cut-MixMo, MIMO (linear with kappa = 1/M) and the M = 1 network, and prints
images/s, step time, the Cut-MixMo / MIMO step-time ratio (mixing is meant to
be free: < 1.03), eval images/s, the host pipeline's images/s, memory from
XLA's `memory_analysis()` and the process's peak RSS, and the achieved FLOP/s
from XLA's cost analysis. Data are random uint8 images, so no dataset is
needed. Numbers quoted in the README come from this script.
"""
import copy
import resource
import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from mixmo_jax import config_validation, feed, models, sharding, training
from mixmo_jax.data import pipeline
from mixmo_jax.evaluation import inference

config_flags.DEFINE_config_file('config', None, 'Config file to benchmark.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per measurement.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')


def _variants(config):
  """Cut-MixMo, MIMO and M = 1 versions of `config` (same net and batch)."""
  out = {}
  for name, method, members in (('cut_mixmo', 'cut', config.num_members),
                                ('mimo', 'sum', config.num_members),
                                ('single (M=1)', 'sum', 1)):
    c = copy.deepcopy(config)
    c.mixing.method, c.num_members = method, members
    out[name] = c
  return out


def _random_batch(config, rng):
  n = pipeline.unique_per_step(config)
  size = config.image_size
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, config.num_classes, (n,), dtype=np.int32)
  if not pipeline.needs_partners(config):
    return images, labels
  rows = (n * config.batch_repetitions, config.num_members)
  return (images, labels, rng.integers(0, 256, rows + images.shape[1:],
                                       dtype=np.uint8),
          rng.integers(0, config.num_classes, rows, dtype=np.int32))


def _time(fn, steps):
  """Seconds per call of `fn()`, which must return something to block on."""
  out = None
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def bench_train(config, mesh, steps, warmup):
  """Returns (seconds per step, FLOPs per step, memory analysis)."""
  model = models.get_model(config)
  state = training.create_train_state(config, model, 100, mesh)
  batch = sharding.global_batch(_random_batch(config, np.random.default_rng(0)),
                                mesh)
  compiled = training.make_train_step(config, model, 100, mesh).lower(
      state, *batch).compile()
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], *batch)
    return metrics['loss']

  _time(step, warmup)
  seconds = _time(step, steps)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return seconds, float(cost.get('flops', 0.0)), compiled.memory_analysis()


def bench_eval(config, mesh, steps):
  model = models.get_model(config)
  state = training.create_train_state(config, model, 100, mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  predict = inference.make_predict_fn(model, mesh, config.image_mean,
                                      config.image_std)
  size, n = config.image_size, config.eval_batch_size
  images = sharding.global_batch(
      np.zeros((n, size, size, 3), np.uint8), mesh)
  jax.block_until_ready(predict(variables, images))
  return n / _time(lambda: predict(variables, images), steps)


def bench_host_pipeline(config, mesh, steps):
  """Index a 50k-image in-memory dataset and ship the uint8 batch to devices."""
  size = config.image_size
  data = np.zeros((50_000, size, size, 3), np.uint8)
  labels = np.zeros(50_000, np.int32)
  n = pipeline.unique_per_step(config)

  feeder = feed.Feeder(config, data, labels, mesh)

  def host_step(step=[0]):
    step[0] += 1
    return feeder.batch(step[0])

  host_step()
  return n / _time(host_step, steps)


def _mb(x):
  return x / 2**20


def main(argv):
  del argv
  config = flags.FLAGS.config
  config_validation.validate(config)
  mesh = sharding.make_mesh()
  device = jax.devices()[0]
  print(f'{config.model.name} depth {config.model.depth} width '
        f'{config.model.width}, {config.image_size}px, {config.num_classes} '
        f'classes, batch {config.batch_size}, b {config.batch_repetitions}, '
        f'{jax.device_count()} x {device.platform} ({device.device_kind})')
  print(f'{"method":14s} {"step ms":>9s} {"img/s":>9s} {"GFLOP/step":>11s} '
        f'{"GFLOP/s":>9s} {"temp MB":>9s} {"args MB":>9s}')
  times = {}
  for name, c in _variants(config).items():
    seconds, flops, mem = bench_train(c, mesh, _STEPS.value, _WARMUP.value)
    times[name] = seconds
    temp = _mb(mem.temp_size_in_bytes) if mem else float('nan')
    args = _mb(mem.argument_size_in_bytes) if mem else float('nan')
    print(f'{name:14s} {seconds * 1e3:9.1f} {config.batch_size / seconds:9.1f} '
          f'{flops / 1e9:11.2f} {flops / seconds / 1e9:9.2f} {temp:9.1f} '
          f'{args:9.1f}')
  print(f'Cut-MixMo / MIMO step-time ratio: '
        f'{times["cut_mixmo"] / times["mimo"]:.3f}')
  print(f'eval: {bench_eval(config, mesh, _STEPS.value):.1f} img/s '
        f'(batch {config.eval_batch_size})')
  for pix in ('none', 'cutmix'):  # In-pixel CutMix ships B x M partners.
    c = copy.deepcopy(config)
    c.augment.pixel_mix = pix
    print(f'host pipeline (pixel_mix={pix}): '
          f'{bench_host_pipeline(c, mesh, 50):.0f} img/s')
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'peak RSS: {peak:.0f} MB')
  for d in jax.local_devices()[:1]:
    stats = d.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      print(f'device peak memory: {_mb(stats["peak_bytes_in_use"]):.0f} MB')


if __name__ == '__main__':
  app.run(main)

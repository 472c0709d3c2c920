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

Also printed: model FLOPs per step (XLA cost analysis), achieved FLOP/s and
the fraction of the chip's peak (MFU, experiments/peak_flops.py; GPUs and
TPUs only), the device's peak memory and, on accelerators, the largest batch
that fits (doubling search, `--max_batch`), and with `--profile=N` the N
most expensive HLO ops of the Cut-MixMo step (experiments/op_profile.py).

Side by side with PyTorch (`pip install -e .[bench]`):

  python -m experiments.benchmark --config=configs/cifar100.py --peer=torch \
      --peer_nets=16-4,28-10 --rounds=5 --steps=2

times the MIMO step of WRN-d-w (batch 64, b = 2) in mixmo_jax and in
experiments/torch_peer.py INTERLEAVED (rounds of `--steps` steps each,
alternating), so machine drift hits both alike, and prints the medians and
torch_time / jax_time (> 1: mixmo_jax is faster). Both run in this process;
`--peer_process=own` runs the peer in a child process instead, which waits
on a pipe while this one runs (experiments/peer_process.py). The XLA flag
defaults of mixmo_jax.platform apply (override with XLA_FLAGS).
"""
import copy
import os
import resource
import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from mixmo_jax import platform

platform.apply_defaults()  # XLA flags: before the backend starts.

from mixmo_jax import (config_validation, data, feed, models, sharding,
                       training)
from mixmo_jax.data import pipeline
from mixmo_jax.evaluation import inference
from mixmo_jax.models import common as model_common
from experiments import op_profile, peak_flops, peer_process

config_flags.DEFINE_config_file('config', None, 'Config file to benchmark.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per measurement.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_PEER = flags.DEFINE_enum(
    'peer', '', ['', 'torch'], 'Also time this peer '
    'implementation of the MIMO step, interleaved.')
_PEER_NETS = flags.DEFINE_list(
    'peer_nets', ['16-4'], 'WRN depth-width pairs '
    'for --peer (e.g. 16-4,28-10).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Alternating rounds for --peer.')
_PEER_ONLY = flags.DEFINE_bool('peer_only', False, 'With --peer: skip the '
                               'other measurements.')
_PEER_PROCESS = flags.DEFINE_enum(
    'peer_process', 'same', ['same', 'own'], 'With --peer: run the peer in '
    'this process (default) or in its own (experiments/peer_process.py), so '
    "that neither framework's thread pool can slow the other's rounds.")
_PEER_PYTHON = flags.DEFINE_string(
    'peer_python', '', 'With --peer: the Python interpreter that runs the '
    'peer in its own process (implies --peer_process=own), e.g. a venv '
    'with torch while this one has a jax without it.')
_PROFILE = flags.DEFINE_integer(
    'profile', 0, 'Also print the N most expensive HLO ops of the Cut-MixMo '
    'train step (jax.profiler trace of --steps steps; experiments/'
    'op_profile.py) and the totals per opcode; 0: no profile.', lower_bound=0)
_MAX_BATCH = flags.DEFINE_integer(
    'max_batch', -1, 'Cap of the largest-batch search (doubling from '
    'batch_size); 0 skips it; -1: 65536 on accelerators, skipped on CPU.')


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
  return (images, labels,
          rng.integers(0, 256, rows + images.shape[1:], dtype=np.uint8),
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
  step, compiled = _train_step_runner(config, mesh)
  _time(step, warmup)
  seconds = _time(step, steps)
  return seconds, step.flops, compiled.memory_analysis()


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def _train_step_runner(config, mesh):
  """(step_fn, compiled) for the train step of `config` on random data.

  step_fn.flops: the step's FLOPs from XLA's cost analysis. XLA counts none
  for a custom call, so where the convs are oneDNN custom calls (the opt-in
  mixmo_jax/contrib/onednn) they come from the same step lowered
  with XLA's convs (before XLA's optimisations, which leave a conv's FLOPs
  as they are).
  """
  model = models.get_model(config)
  state = training.create_train_state(config, model, 100, mesh)
  batch = sharding.global_batch(
      _random_batch(config, np.random.default_rng(0)), mesh)
  compiled = training.make_train_step(config, model, 100,
                                      mesh).lower(state, *batch).compile()
  flops = _flops(compiled.cost_analysis())
  onednn = model_common.onednn()
  if onednn and onednn.active():
    with onednn.disabled():
      flops = _flops(
          training.make_train_step(config, model, 100,
                                   mesh).lower(state, *batch).cost_analysis())
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], *batch)
    return metrics['loss']

  step.flops = flops
  return step, compiled


def _peer(c, separate, python=''):
  """The torch peer of config `c`: in a child process (of `python`, else
  this interpreter) or in this one."""
  threads = len(os.sched_getaffinity(0))
  kwargs = dict(depth=c.model.depth, width=c.model.width,
                num_classes=c.num_classes, num_members=c.num_members,
                batch_size=c.batch_size, image_size=c.image_size,
                threads=threads)
  if separate or python:
    return peer_process.PeerProcess('experiments.torch_peer:TorchStep',
                                    python=python or None, **kwargs)
  from experiments import torch_peer
  return torch_peer.TorchStep(**kwargs)


def bench_peer(config, mesh, nets, rounds, steps, separate=False, python=''):
  """Interleaved MIMO steps of mixmo_jax and the torch peer; prints ratios.

  separate: the peer runs in its own process (experiments/peer_process.py),
  else in this one; python: that process's interpreter (default: this one).
  """
  ratios = {}
  for i, net in enumerate(nets):
    depth, width = (int(v) for v in net.split('-'))
    c = copy.deepcopy(config)
    c.model.depth, c.model.width, c.mixing.method = depth, width, 'sum'
    jax_step, _ = _train_step_runner(c, mesh)
    peer = _peer(c, separate, python)
    if i == 0:
      where = (f'own process ({python})'
               if python else 'own process' if separate else 'this process')
      print(f'peer: {peer.about()}, {where}, vs '
            f'mixmo_jax (convs: {model_common.conv_kernels()}; '
            f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}); '
            f'MIMO, batch {config.batch_size}, b {config.batch_repetitions}, '
            f'M {config.num_members}, {rounds} rounds of {steps} steps')
      print(f'{"net":10s} {"jax ms":>9s} {"torch ms":>9s} '
            f'{"torch/jax":>10s}')
    _time(jax_step, 1)  # Warm-up of both.
    peer.step()
    jax_times, torch_times = [], []
    for _ in range(rounds):
      jax_times.append(_time(jax_step, steps))
      torch_times.append(peer.time(steps))
    if separate or python:
      peer.close()
    j, t = float(np.median(jax_times)), float(np.median(torch_times))
    ratios[net] = t / j
    print(f'WRN-{net:6s} {j * 1e3:9.0f} {t * 1e3:9.0f} {t / j:10.2f}',
          flush=True)
  return ratios


def largest_batch(config, mesh, cap):
  """Largest batch_size (doubling from config's) whose train step runs."""
  fits, batch = None, config.batch_size
  while batch <= cap:
    c = copy.deepcopy(config)
    c.batch_size = batch
    try:
      step, _ = _train_step_runner(c, mesh)
      jax.block_until_ready(step())
    except Exception as e:
      if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower():
        break
      raise
    fits, batch = batch, batch * 2
  return fits


def bench_eval(config, mesh, steps):
  model = models.get_model(config)
  state = training.create_train_state(config, model, 100, mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  predict = inference.make_predict_fn(model, mesh, config.image_mean,
                                      config.image_std)
  size, n = config.image_size, config.eval_batch_size
  images = sharding.global_batch(np.zeros((n, size, size, 3), np.uint8), mesh)
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
  if _PEER.value:
    bench_peer(config, mesh, _PEER_NETS.value, _ROUNDS.value, _STEPS.value,
               separate=_PEER_PROCESS.value == 'own', python=_PEER_PYTHON.value)
    if _PEER_ONLY.value:
      return
  print(f'{config.model.name} depth {config.model.depth} width '
        f'{config.model.width}, {config.image_size}px, {config.num_classes} '
        f'classes, batch {config.batch_size}, b {config.batch_repetitions}, '
        f'{jax.device_count()} x {device.platform} ({device.device_kind})')
  dtype = config.model.get('dtype', 'float32')
  peak = peak_flops.peak_flops(device.device_kind, dtype)
  print(f'peak {dtype} FLOP/s of one {device.device_kind}: '
        f'{peak / 1e12 if peak else float("nan"):.1f} T (x '
        f'{jax.device_count()} devices)')
  print(f'{"method":14s} {"step ms":>9s} {"img/s":>9s} {"GFLOP/step":>11s} '
        f'{"GFLOP/s":>9s} {"MFU %":>6s} {"temp MB":>9s} {"args MB":>9s}')
  times = {}
  for name, c in _variants(config).items():
    seconds, flops, mem = bench_train(c, mesh, _STEPS.value, _WARMUP.value)
    times[name] = seconds
    temp = _mb(mem.temp_size_in_bytes) if mem else float('nan')
    args = _mb(mem.argument_size_in_bytes) if mem else float('nan')
    # cost_analysis counts the whole (global) program's FLOPs.
    mfu = (100 * flops / seconds /
           (peak * jax.device_count()) if peak else float('nan'))
    print(f'{name:14s} {seconds * 1e3:9.1f} {config.batch_size / seconds:9.1f} '
          f'{flops / 1e9:11.2f} {flops / seconds / 1e9:9.2f} {mfu:6.1f} '
          f'{temp:9.1f} {args:9.1f}')
  print(f'Cut-MixMo / MIMO step-time ratio: '
        f'{times["cut_mixmo"] / times["mimo"]:.3f}')
  if _PROFILE.value:
    step, compiled = _train_step_runner(_variants(config)['cut_mixmo'], mesh)
    _time(step, 1)
    ops = op_profile.profile(lambda: jax.block_until_ready(step()), compiled,
                             _STEPS.value)
    print(f'profile of the cut_mixmo step ({_STEPS.value} steps traced; '
          'concurrent ops can sum past 100%):')
    print(
        op_profile.format_table(ops, 1e3 * times['cut_mixmo'], _PROFILE.value))
  eval_rate = bench_eval(config, mesh, _STEPS.value)
  print(f'eval: {eval_rate:.1f} img/s (batch {config.eval_batch_size})')
  num_test = data.get_dataset(config.dataset).num_test
  print(f'eval of the test set: {num_test / eval_rate:.1f} s per epoch '
        f'({num_test} images; every {config.eval_every_epochs} epoch(s), '
        'the paper protocol evaluates after every epoch)')
  for pix in ('none', 'cutmix'):  # In-pixel CutMix ships B x M partners.
    c = copy.deepcopy(config)
    c.augment.pixel_mix = pix
    print(f'host pipeline (pixel_mix={pix}): '
          f'{bench_host_pipeline(c, mesh, 50):.0f} img/s')
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'peak RSS: {rss:.0f} MB')
  for d in jax.local_devices()[:1]:
    stats = d.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      print(f'device peak memory: {_mb(stats["peak_bytes_in_use"]):.0f} MB')
  cap = _MAX_BATCH.value
  if cap < 0:
    cap = 0 if device.platform == 'cpu' else 65536
  if cap > 0:
    print(f'largest batch that fits (<= {cap}): '
          f'{largest_batch(config, mesh, cap)}')


if __name__ == '__main__':
  app.run(main)

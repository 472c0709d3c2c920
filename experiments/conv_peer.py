"""One 3x3 convolution, forward and both gradients, in XLA and in PyTorch.

  python -m experiments.conv_peer --rounds=3 --steps=5

The layers of a WRN's three stages (batch 64, C -> C channels, stride 1,
'SAME' padding, no bias): loss = sum(conv(x, w)^2) / 2, gradients with
respect to x and w. The two frameworks are timed in alternating rounds in
one process (medians), as in `experiments.benchmark --peer=torch`, and the
ratio torch_time / jax_time is printed (> 1: jax is faster). This isolates
the convolution kernels from everything else of a training step: if a
single layer is slower in jax, the whole network is too, whatever the model
code does. The conv is the models' (mixmo_jax.models.common: XLA's, or
with MIXMO_ONEDNN_CONV=1 and the cpu-onednn extra, oneDNN's kernels for
the forward, the input gradient and the weight gradient on x86 CPUs), and
the XLA flag defaults of mixmo_jax.platform apply.

  python -m experiments.conv_peer --parts

times the three parts separately instead (forward y = conv(x, w), input
gradient dx, weight gradient dw, each its own jitted program; torch's
`conv2d`, `nn.grad.conv2d_input` and `nn.grad.conv2d_weight`), for the
same layers plus WRN-16-4's stride-2 layer (32x32x128 -> 16x16x128, the
second conv of stage 2's first block).
"""
import os
import time

from absl import app, flags
import numpy as np

from mixmo_jax import platform

platform.apply_defaults()  # XLA flags: before the backend starts.

import jax
import jax.numpy as jnp

from mixmo_jax.models import common

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls per round.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')
# (spatial size, channels) of WRN-16-4's three stages.
LAYERS = ((32, 64), (16, 128), (8, 256))
_PARTS = flags.DEFINE_bool(
    'parts', False, 'Time forward, input gradient '
    'and weight gradient separately.')
# (spatial size, channels, stride) for --parts.
PART_LAYERS = ((32, 64, 1), (16, 128, 1), (8, 256, 1), (32, 128, 2))


def _conv(x, w, stride=1):
  """3x3 conv of x [B, S, S, C] with w [3, 3, C, C], one pixel of padding."""
  return common.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _jax_inputs(batch, size, channels):
  """Seeded float32 x [B, S, S, C] and w [3, 3, C, C]."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(
      rng.standard_normal((batch, size, size, channels)), jnp.float32)
  w = jnp.asarray(0.01 * rng.standard_normal((3, 3, channels, channels)),
                  jnp.float32)
  return x, w


def jax_step(batch, size, channels):
  """A blocking call of the jitted forward + both gradients."""

  def loss(x, w):
    y = _conv(x, w)
    return 0.5 * jnp.sum(y * y)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  x, w = _jax_inputs(batch, size, channels)
  return lambda: jax.block_until_ready(grad(x, w))


def torch_step(batch, size, channels):
  """The same computation in PyTorch (NCHW, its native layout)."""
  import torch
  x = torch.randn(batch, channels, size, size, requires_grad=True)
  conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)

  def step():
    x.grad, conv.weight.grad = None, None
    y = conv(x)
    (0.5 * (y * y).sum()).backward()

  return step


def jax_parts(batch, size, channels, stride):
  """{'fwd', 'dx', 'dw'}: blocking calls of the three jitted programs."""

  def conv(x, w):
    return _conv(x, w, stride)

  x, w = _jax_inputs(batch, size, channels)
  dy = jnp.ones_like(conv(x, w))
  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return {
      'fwd': lambda: jax.block_until_ready(fwd(x, w)),
      'dx': lambda: jax.block_until_ready(dx(x, w, dy)),
      'dw': lambda: jax.block_until_ready(dw(x, w, dy))
  }


def torch_parts(batch, size, channels, stride):
  """The same three computations in PyTorch (NCHW, no autograd)."""
  import torch
  conv_input = torch.nn.grad.conv2d_input
  conv_weight = torch.nn.grad.conv2d_weight
  x = torch.randn(batch, channels, size, size)
  w = 0.01 * torch.randn(channels, channels, 3, 3)
  dy = torch.ones_like(
      torch.nn.functional.conv2d(x, w, stride=stride, padding=1))

  def no_grad(fn):

    def call():
      with torch.no_grad():
        fn()

    return call

  return {
      'fwd':
          no_grad(lambda: torch.nn.functional.conv2d(x, w, stride=stride,
                                                     padding=1)),
      'dx':
          no_grad(lambda: conv_input(x.shape, w, dy, stride=stride, padding=1)),
      'dw':
          no_grad(lambda: conv_weight(x, w.shape, dy, stride=stride, padding=1))
  }


def _seconds(fn, steps):
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def _interleaved(j, t):
  """Median seconds per call of j and of t, warmed up, in alternating rounds."""
  j(), t()  # Compile / warm up.
  jax_times, torch_times = [], []
  for _ in range(_ROUNDS.value):
    jax_times.append(_seconds(j, _STEPS.value))
    torch_times.append(_seconds(t, _STEPS.value))
  return float(np.median(jax_times)), float(np.median(torch_times))


def main(argv):
  del argv
  import torch
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  print(f'3x3 conv, forward + both gradients, batch {_BATCH.value}; torch '
        f'{torch.__version__} ({threads} threads) vs jax (convs: '
        f'{common.conv_kernels()}; XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}); {_ROUNDS.value} rounds of '
        f'{_STEPS.value} calls')
  if _PARTS.value:
    _main_parts()
    return
  print(f'{"layer":14s} {"jax ms":>8s} {"torch ms":>9s} {"torch/jax":>10s}')
  for size, channels in LAYERS:
    j = jax_step(_BATCH.value, size, channels)
    t = torch_step(_BATCH.value, size, channels)
    tj, tt = _interleaved(j, t)
    layer = f'{size}x{size}x{channels}'
    print(f'{layer:14s} {tj * 1e3:8.1f} {tt * 1e3:9.1f} {tt / tj:10.2f}',
          flush=True)


def _main_parts():
  """--parts: forward, dx and dw of each layer, jax ms / torch ms (ratio)."""
  print(f'{"layer":18s} ' + ' '.join(
      f'{part + " jax/torch ms (t/j)":>26s}' for part in ('fwd', 'dx', 'dw')))
  for size, channels, stride in PART_LAYERS:
    j = jax_parts(_BATCH.value, size, channels, stride)
    t = torch_parts(_BATCH.value, size, channels, stride)
    cells = []
    for part in ('fwd', 'dx', 'dw'):
      tj, tt = _interleaved(j[part], t[part])
      cells.append(f'{tj * 1e3:8.1f} /{tt * 1e3:7.1f} ({tt / tj:4.2f})')
    layer = f'{size}x{size}x{channels} s{stride}'
    print(f'{layer:18s} ' + ' '.join(f'{c:>26s}' for c in cells), flush=True)


if __name__ == '__main__':
  app.run(main)

"""Layers shared by the backbones: BatchNorm and conv with the reference init.

The MixMo-specific layers (the M stems with the mixing, the M heads) are in
`mixmo_jax.mixmo.layers`.
"""
import os
from types import ModuleType
from typing import Any
from collections.abc import Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = str | Sequence[tuple[int, int]]

# He-normal fan-in init (truncated normal, std sqrt(2 / fan_in) after the
# truncation correction), as in the reference.
he_normal = nn.initializers.he_normal


def batch_norm(train: bool, dtype: Dtype, name: str | None = None,
               groups: int = 1) -> nn.Module:
  """BatchNorm with the reference's settings.

  y = scale * (x - mean) / sqrt(var + 1e-5) + bias; in training mode mean/var
  are the (biased) batch statistics over B, H, W, and the running statistics
  become 0.9 * running + 0.1 * batch (flax momentum 0.9 = PyTorch 0.1).
  Parameters and statistics are float32; the output has the compute dtype.
  groups > 1: the statistics of each of `groups` equal slices of the batch
  (`GroupedBatchNorm`; per device, as uncertainty-baselines computes them
  per TPU core).
  """
  if groups > 1:
    return GroupedBatchNorm(groups, use_running_average=not train, dtype=dtype,
                            name=name)
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


class GroupedBatchNorm(nn.Module):
  """BatchNorm whose training statistics are per slice of the batch.

  x [B, ..., F] is read as [G, B/G, ..., F]; slice g is normalised with its
  own (biased) mean and variance over (B/G, H, W). With the batch sharded
  over G devices along B, slice g is device g's shard: per-device BN with
  no communication. The running statistics move towards the mean over
  slices of the slice statistics (0.9 * running + 0.1 * batch). Same
  parameter and statistic names as flax's BatchNorm (scale, bias; mean,
  var), so checkpoints are interchangeable.
  """
  groups: int
  use_running_average: bool
  dtype: Dtype = jnp.float32
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (f,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (f,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (f,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (f,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
      return (y * scale + bias).astype(self.dtype)
    b = x.shape[0]
    if b % self.groups:
      raise ValueError(f'GroupedBatchNorm: batch {b} is not divisible by '
                       f'{self.groups} groups')
    xg = x.astype(jnp.float32).reshape((self.groups, b // self.groups) +
                                       x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = xg.mean(axes, keepdims=True)  # [G, 1, ..., F]
    var = jnp.maximum((xg * xg).mean(axes, keepdims=True) - mean * mean, 0.)
    y = (xg - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(-1, f).mean(0)
      ra_var.value = m * ra_var.value + (1 - m) * var.reshape(-1, f).mean(0)
    return y.reshape(x.shape).astype(self.dtype)


# Opt-in CPU kernels: MIXMO_ONEDNN_CONV=1 with the `cpu-onednn` extra
# installed sends float32 convs on x86 CPUs to oneDNN
# (mixmo_jax.contrib.onednn); anything else is XLA's own conv.
ONEDNN_ENV = 'MIXMO_ONEDNN_CONV'
_WARNED: list = []


def onednn() -> ModuleType | None:
  """mixmo_jax.contrib.onednn.conv when switched on and importable, else
  None (one warning when switched on but not importable)."""
  if os.environ.get(ONEDNN_ENV, '') != '1':
    return None
  try:
    from mixmo_jax.contrib.onednn import conv as onednn_conv
  except ImportError as e:  # The folder removed, or a jax name it needs.
    if not _WARNED:
      _WARNED.append(e)
      logging.warning(
          '%s=1 but mixmo_jax.contrib.onednn cannot be loaded '
          '(%s): XLA convs', ONEDNN_ENV, e)
    return None
  return onednn_conv


def conv_kernels() -> str:
  """Which kernels a float32 conv traced now runs, for logs and benchmark
  headers: 'XLA', or the oneDNN path's own description."""
  module = onednn()
  return module.describe() if module else 'XLA'


def conv_general_dilated(*args, **kwargs) -> jax.Array:
  """The models' convolution (their convs and stems): the arguments and
  result of `jax.lax.conv_general_dilated`, decided when traced."""
  module = onednn()
  conv_fn = module.conv_general_dilated if module else (
      jax.lax.conv_general_dilated)
  return conv_fn(*args, **kwargs)


def conv(features: int, kernel: int, strides: int, padding: Padding,
         dtype: Dtype, name: str | None = None) -> nn.Conv:
  """Bias-free square conv with He-normal fan-in init, float32 params,
  computed by `conv_general_dilated` above."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=padding, use_bias=False, kernel_init=he_normal(),
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 conv_general_dilated=conv_general_dilated)

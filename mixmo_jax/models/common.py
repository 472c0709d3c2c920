"""Layers shared by the backbones: BatchNorm and conv with the reference init.

The MixMo-specific layers (the M stems with the mixing, the M heads) are in
`mixmo_jax.mixmo.layers`.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
Padding = str | Sequence[tuple[int, int]]

# He-normal fan-in init (truncated normal, std sqrt(2 / fan_in) after the
# truncation correction), as in the reference.
he_normal = nn.initializers.he_normal


def batch_norm(train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with the reference's settings.

  y = scale * (x - mean) / sqrt(var + 1e-5) + bias; in training mode mean/var
  are the (biased) batch statistics over B, H, W, and the running statistics
  become 0.9 * running + 0.1 * batch (flax momentum 0.9 = PyTorch 0.1).
  Parameters and statistics are float32; the output has the compute dtype.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5,
      dtype=dtype, param_dtype=jnp.float32, name=name)


def conv(features: int, kernel: int, strides: int, padding: Padding,
         dtype: Dtype, name: str | None = None) -> nn.Conv:
  """Bias-free square conv with He-normal fan-in init, float32 params."""
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=padding,
      use_bias=False, kernel_init=he_normal(), dtype=dtype,
      param_dtype=jnp.float32, name=name)

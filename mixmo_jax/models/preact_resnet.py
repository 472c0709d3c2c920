"""PreActResNet-18-w (He et al. 2016) as a MixMo network, for Tiny ImageNet.

Architecture, shown for 64x64 inputs, k = base_width = 64:

    M stems: 3x3 conv, k channels, stride 2 (not widened)   [B,32,32,k]  (mixed)
    stage 1: 2 blocks, k*w channels, stride 1                [B,32,32,kw]
    stage 2: 2 blocks, 2k*w channels, stride 2               [B,16,16,2kw]
    stage 3: 2 blocks, 4k*w channels, stride 2               [B,8,8,4kw]
    stage 4: 2 blocks, 8k*w channels, stride 2               [B,4,4,8kw]
    4x4 average pool (no final BN-ReLU), flatten             [B,8kw]
    M dense heads                                             [B,M,C]

Block (pre-activation), stride s on the FIRST conv:

    a   = ReLU(BN(x))
    out = conv3x3_1( ReLU(BN( conv3x3_s(a) )) ) + shortcut

where shortcut = conv1x1_s(a), reading the PRE-ACTIVATED input (unlike the
WRN), when stride or width changes, and x otherwise. 3x3 convs pad one pixel
on every side (PyTorch padding=1), so each stride-2 layer maps H to ceil(H/2).
All convs are bias-free with He-normal fan-in init; BN momentum 0.9 (flax
convention), epsilon 1e-5. Heads: N(0, 0.01^2) kernels, zero biases (as in the
reference).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixmo_jax.mixmo import layers
from mixmo_jax.models import common

PAD1 = ((1, 1), (1, 1))
STAGE_BLOCKS = (2, 2, 2, 2)
STAGE_STRIDES = (1, 2, 2, 2)
POOL = 4


class PreActBlock(nn.Module):
  """Pre-activation basic block; stride on conv1, shortcut on ReLU(BN(x)).

  Args (call): x [B,H,W,Cin]. Returns [B,ceil(H/s),ceil(W/s),features].
  """
  features: int
  strides: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pre = nn.relu(common.batch_norm(train, self.dtype, name='bn1')(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = common.conv(self.features, 1, self.strides, 'VALID',
                             self.dtype, name='shortcut_conv')(
                                 pre)
    out = common.conv(self.features, 3, self.strides, PAD1, self.dtype,
                      name='conv1')(
                          pre)
    out = nn.relu(common.batch_norm(train, self.dtype, name='bn2')(out))
    out = common.conv(self.features, 3, 1, PAD1, self.dtype, name='conv2')(out)
    return out + shortcut


def _half(size: int) -> int:
  """Output size of a stride-2 layer here: ceil(size / 2)."""
  return (size + 1) // 2


class PreActResNet18(nn.Module):
  """MixMo PreActResNet-18-width with M stride-2 stems and M heads.

  Calls: as `WideResNet` (x [B,H,W,3] at inference; xs [B,M,H,W,3] with
  mix_weights w [B,M,ceil(H/2),ceil(W/2)] for the mixed call) -> logits
  [B,M,C] float32. Sows 'stem', 'stage1'..'stage4', 'features' into
  'intermediates'.

  Image size: the last stage's map is ceil(H/16); the reference's 4x4 average
  pool (stride 4, no padding) must reduce it to 1x1, so 49 <= H, W <= 112
  (64 for Tiny ImageNet, where the pool is a global average).

  Attributes:
    width: widening factor w of the stages (1, 2, 3 in the paper).
    num_classes: C.
    num_members: M (1 = the plain network, same code path).
    dtype: compute dtype; params and BN statistics stay float32.
    base_width: k, the stem's channels and stage 1's channels at w = 1 (64;
      smaller values only for quick tests).
  """
  width: int
  num_classes: int
  num_members: int
  dtype: Any = jnp.float32
  base_width: int = 64

  def stem_resolution(self, height: int, width: int) -> tuple[int, int]:
    """Stem output size: stride 2 with padding 1, so ceil(H/2), ceil(W/2)."""
    return _half(height), _half(width)

  def check_image_size(self, height: int, width: int) -> None:
    """Raises ValueError unless the final 4x4 pool gives a 1x1 map."""
    for size in (height, width):
      final = _half(_half(_half(_half(size))))
      if not POOL <= final < 2 * POOL:
        raise ValueError(
            f'preact_resnet18 needs image_size in [49, 112] (its last map, '
            f'ceil(size/16) = {final}, must give 1x1 after the 4x4 pool); '
            f'got {(height, width)}')

  @nn.compact
  def __call__(self, x: jax.Array, mix_weights: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    self.check_image_size(x.shape[-3], x.shape[-2])
    k = self.base_width
    h = layers.Stems(self.num_members, k, strides=2, padding=PAD1,
                     dtype=self.dtype, name='stems',
                     conv_general_dilated=common.conv_general_dilated)(
                         x, mix_weights)
    self.sow('intermediates', 'stem', h)
    for stage, (blocks,
                stride) in enumerate(zip(STAGE_BLOCKS, STAGE_STRIDES), start=1):
      for block in range(1, blocks + 1):
        h = PreActBlock(k * 2**(stage - 1) * self.width,
                        stride if block == 1 else 1, dtype=self.dtype,
                        name=f'stage{stage}_block{block}')(h, train)
      self.sow('intermediates', f'stage{stage}', h)
    pooled = nn.avg_pool(
        h.astype(jnp.float32), (POOL, POOL), strides=(POOL, POOL))
    features = pooled.reshape(pooled.shape[0], -1)  # Shape: [B,8kw] (1x1 map).
    self.sow('intermediates', 'features', features)
    heads = layers.Heads(self.num_members, self.num_classes,
                         kernel_init=nn.initializers.normal(0.01), name='heads')
    return heads(features)

"""WRN-d-w (Zagoruyko & Komodakis 2016) as a MixMo network, for CIFAR.

Architecture, with n = (d - 4) / 6 blocks per stage:

    M stems: 3x3 conv, 16 channels, stride 1         [B,H,W,16]   (mixed)
    stage 1: n blocks, 16w channels, stride 1          [B,H,W,16w]
    stage 2: n blocks, 32w channels, stride 2          [B,H/2,W/2,32w]
    stage 3: n blocks, 64w channels, stride 2          [B,H/4,W/4,64w]
    BN-ReLU, global average pool                        [B,64w]
    M dense heads                                       [B,M,C]

Block (pre-activation, no dropout):

    out = conv3x3_s( ReLU(BN( conv3x3_1( ReLU(BN(x)) ) )) ) + shortcut(x)

The stride s sits on the SECOND conv of a block, as in the official MixMo code
(stride_on='second'); stride_on='first' puts it on the first conv, as
edward2/uncertainty-baselines do (parameter counts agree).
Its padding is 'SAME', which for even sizes is the reference's pad of one pixel
on the bottom/right only. The shortcut is a 1x1 stride-s conv applied to the
RAW block input x (not the pre-activated one) when stride or width changes,
and the identity otherwise. All convs are bias-free with He-normal fan-in init;
BN momentum 0.9 (flax convention), epsilon 1e-5.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixmo_jax.mixmo import layers
from mixmo_jax.models import common

STEM_FEATURES = 16


class WideBasicBlock(nn.Module):
  """Pre-activation wide block; the stride is on conv2 (stride_on='second')
  or conv1 ('first'), see the module docstring.

  Args (call): x [B,H,W,Cin]. Returns [B,H/s,W/s,features].
  """
  features: int
  strides: int
  dtype: Any = jnp.float32
  stride_on: str = 'second'
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(common.batch_norm, train, self.dtype,
                           groups=self.bn_groups)
    out = nn.relu(bn(name='bn1')(x))
    first = self.strides if self.stride_on == 'first' else 1
    second = self.strides if self.stride_on == 'second' else 1
    out = common.conv(self.features, 3, first, 'SAME', self.dtype,
                      name='conv1')(
                          out)
    out = nn.relu(bn(name='bn2')(out))
    out = common.conv(self.features, 3, second, 'SAME', self.dtype,
                      name='conv2')(
                          out)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = common.conv(self.features, 1, self.strides, 'VALID',
                             self.dtype, name='shortcut_conv')(
                                 x)
    return out + shortcut


def depth_problem(depth: int) -> str | None:
  """Why `depth` is not a WRN depth (6n + 4, n >= 1), or None."""
  if depth < 10 or (depth - 4) % 6:
    return 'WRN depth must be 6n+4 (10, 16, 22, 28, ...)'
  return None


class WideResNet(nn.Module):
  """MixMo WRN-depth-width with M stems and M heads.

  Calls:
    apply(v, x, train=False): x [B,H,W,3] -> logits [B,M,C] float32; the core
      input is sum_i stem_i(x) (paper sec. 3.1).
    apply(v, xs, mix_weights=w, train=True, mutable=['batch_stats']):
      xs [B,M,H,W,3], w [B,M,h,w] (h, w = H, W: the stem has stride 1)
      -> (logits [B,M,C], updates); the core
      input is M * sum_i w_i * stem_i(x_i) (paper eq. 2, 6).
    Any other train/mix_weights combination also works (train only switches
    BatchNorm between batch and running statistics).
  Sows into 'intermediates': 'stem' (mixed core input), 'stage1'..'stage3',
  'features' (pooled [B,64w] float32).

  Attributes:
    depth: d = 6n + 4 (28 for WRN-28-10).
    width: widening factor w.
    num_classes: C.
    num_members: M (1 = the plain network, same code path).
    dtype: compute dtype; params and BN statistics stay float32.
    stem: 'mixmo' | 'mimo', the stem kernel's init (`layers.stem_init`).
    stride_on: 'second' (MixMo) | 'first' (uncertainty-baselines), the conv
      of a block that carries its stride.
    bn_groups: G > 1: BatchNorm training statistics per 1/G of the batch
      (per device, `common.GroupedBatchNorm`).
  """
  depth: int
  width: int
  num_classes: int
  num_members: int
  dtype: Any = jnp.float32
  stem: str = 'mixmo'
  stride_on: str = 'second'
  bn_groups: int = 1

  STRIDE_ON = ('second', 'first')

  def __post_init__(self):
    self.blocks_per_stage()  # Raises ValueError early for a bad depth.
    if self.stride_on not in self.STRIDE_ON:
      raise ValueError(f'model.stride_on must be one of {self.STRIDE_ON}, '
                       f'got {self.stride_on!r}')
    super().__post_init__()

  def blocks_per_stage(self) -> int:
    """n = (depth - 4) / 6; raises ValueError unless depth = 6n + 4, n >= 1."""
    problem = depth_problem(self.depth)
    if problem:
      raise ValueError(f'WideResNet depth {self.depth}: {problem}')
    return (self.depth - 4) // 6

  def stem_resolution(self, height: int, width: int) -> tuple[int, int]:
    """Stem output size: stride 1, so (H, W)."""
    return height, width

  def check_image_size(self, height: int, width: int) -> None:
    """Any positive size works ('SAME' padding); raises ValueError otherwise.

    Sizes divisible by 4 reproduce the reference's padding exactly.
    """
    if height < 1 or width < 1:
      raise ValueError(
          f'wide_resnet needs a positive image size, got {(height, width)}')

  @nn.compact
  def __call__(self, x: jax.Array, mix_weights: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    n = self.blocks_per_stage()
    h = layers.Stems(self.num_members, STEM_FEATURES, strides=1, padding='SAME',
                     dtype=self.dtype, init_rule=self.stem, name='stems',
                     conv_general_dilated=common.conv_general_dilated)(
                         x, mix_weights)
    self.sow('intermediates', 'stem', h)
    for stage, (mult,
                stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), start=1):
      for block in range(1, n + 1):
        h = WideBasicBlock(mult * self.width, stride if block == 1 else 1,
                           dtype=self.dtype, stride_on=self.stride_on,
                           bn_groups=self.bn_groups,
                           name=f'stage{stage}_block{block}')(h, train)
      self.sow('intermediates', f'stage{stage}', h)
    h = nn.relu(
        common.batch_norm(train, self.dtype, name='final_bn',
                          groups=self.bn_groups)(h))
    features = h.astype(jnp.float32).mean(axis=(1, 2))  # Shape: [B,64w].
    self.sow('intermediates', 'features', features)
    return layers.Heads(self.num_members, self.num_classes, name='heads')(
        features)

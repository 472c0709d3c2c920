"""The MixMo layers: the M input stems with the mixing, and the M heads.

A MixMo network (paper Sec. 3.1, Fig. 1) is

    logits_i = d_i( C( M * sum_j w_j * c_j(x_j) ) ),  i < M,

with M input stems ("encoders") c_i, a shared core C (any backbone, see
`mixmo_jax.models`) and M dense heads d_i.  `Stems` holds the c_i and applies
the mixing weights w drawn by a mixing block (`mixmo.registry`); `Heads` the
d_i.  At test time every stem sees the same image and the core gets
sum_i c_i(x) (Algorithm 1 line 38).

Shape letters: B batch, M members, H, W image size, h, w stem output size,
C0 stem channels, F feature size, C classes.
"""
from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = str | Sequence[tuple[int, int]]

# He-normal fan-in init of the stacked [M, ...] stems and heads (truncated
# normal, std sqrt(2 / fan_in) after the truncation correction, as in the
# reference); axis 0 indexes members and is excluded from the fan.
stacked_he_normal = nn.initializers.variance_scaling(2.0, 'fan_in',
                                                     'truncated_normal',
                                                     in_axis=-2, out_axis=-1,
                                                     batch_axis=(0,))

STEM_INITS = ('mixmo', 'mimo')


def stem_init(kind: str, num_members: int):
  """Initializer of the [M, 3, 3, 3, C0] stem kernel.

  'mixmo': M separate He-normal stems, fan-in 3*3*3 = 27 each (MixMo).
  'mimo': the MIMO stem (edward2 / uncertainty-baselines), ONE dense conv
    [3, 3, 3M, C0] over the M images stacked on channels, He-normal with
    fan-in 27M. Its output sum_i conv(x_i, K_i) is what `Stems` computes
    with w_i = 1/M (sum mixing) and, at test time, with the image tiled M
    times, so only the init differs: std divided by sqrt(M).
  """
  if kind not in STEM_INITS:
    raise ValueError(f'model.stem must be one of {STEM_INITS}, got {kind!r}')
  scale = 2.0 if kind == 'mixmo' else 2.0 / num_members
  return nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal',
                                          in_axis=-2, out_axis=-1,
                                          batch_axis=(0,))


class Stems(nn.Module):
  """The M input stems c_i (3x3 convs, no bias) followed by the mixing block.

  One parameter `kernel` of shape [M, 3, 3, 3, C0] holds all stems.

  * Mixed call (training, paper eq. 2 and 6), `mix_weights` w given:
      xs [B, M, H, W, 3], w [B, M, h, w]
      -> M * sum_i w_i * c_i(x_i)   [B, h, w, C0].
    The M convs run as one conv with a block-diagonal kernel. w is
    anything the mixing block drew (kappa broadcast for Linear-MixMo, binary
    masks for Cut-MixMo); this module does not care.
  * Inference call (paper sec. 3.1), `mix_weights=None`:
      x [B, H, W, 3] -> sum_i c_i(x) = conv(x, sum_i K_i)   [B, h, w, C0],
    one conv with the summed kernel (convolution is linear in the kernel).
    This equals the mixed call with x_i = x and w_i = 1/M.

  Attributes:
    num_members: M.
    features: C0.
    strides: stem stride s (h = H / s).
    padding: conv padding ('SAME' or explicit pairs).
    dtype: compute dtype.
    init_rule: 'mixmo' | 'mimo', the kernel's init (`stem_init`).
    conv_general_dilated: the conv, with `jax.lax.conv_general_dilated`'s
      signature (the models pass theirs, e.g. oneDNN's on x86 CPUs).
  """
  num_members: int
  features: int
  strides: int = 1
  padding: Padding = 'SAME'
  dtype: Dtype = jnp.float32
  init_rule: str = 'mixmo'
  conv_general_dilated: Callable[..., jax.Array] = jax.lax.conv_general_dilated

  def _conv(self, x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    return self.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides),
        padding=self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups)

  @nn.compact
  def __call__(self, x: jax.Array,
               mix_weights: jax.Array | None = None) -> jax.Array:
    m, c0 = self.num_members, self.features
    kernel = self.param('kernel', stem_init(self.init_rule, m),
                        (m, 3, 3, 3, c0), jnp.float32)
    if mix_weights is None:
      if x.ndim != 4:
        raise ValueError(f'inference input must be [B,H,W,3], got {x.shape}')
      # sum_i c_i(x) as one conv with the summed kernel. Shape: [3,3,3,C0].
      summed = kernel.sum(axis=0).astype(self.dtype)
      return self._conv(x.astype(self.dtype), summed, groups=1)
    b = x.shape[0]
    if x.ndim != 5 or x.shape[1] != m:
      raise ValueError(f'mixed input must be [B,M={m},H,W,3], got {x.shape}')
    # Stack members along channels: [B,M,H,W,3] -> [B,H,W,M*3] (member-major).
    stacked = jnp.moveaxis(x, 1, 3).reshape(b, x.shape[2], x.shape[3], m * 3)
    # Block-diagonal kernel [3,3,M*3,M*C0]: member i's 3 input channels feed
    # only its C0 outputs. Same result as a grouped conv (M groups), but XLA's
    # CPU grouped-conv gradient is ~30x slower; the extra zeros cost M times
    # the (tiny) stem FLOPs.
    eye = jnp.eye(m, dtype=kernel.dtype)
    block = jnp.einsum('mhwic,mn->hwminc', kernel,
                       eye).reshape(3, 3, m * 3, m * c0)
    feats = self._conv(
        stacked.astype(self.dtype), block.astype(self.dtype), groups=1)
    h, w = feats.shape[1], feats.shape[2]
    if mix_weights.shape != (b, m, h, w):
      raise ValueError(
          f'mix_weights must be [B,M,h,w]={(b, m, h, w)} (stem output size), '
          f'got {mix_weights.shape}')
    feats = feats.reshape(b, h, w, m, c0)  # Shape: [B,h,w,M,C0].
    mixed = jnp.einsum('bhwmc,bmhw->bhwc', feats,
                       mix_weights.astype(self.dtype),
                       preferred_element_type=jnp.float32)
    return (m * mixed).astype(self.dtype)


class Heads(nn.Module):
  """The M dense heads d_i: logits_i = f @ kernel_i + bias_i.

  Params: kernel [M, F, C], bias [M, C] (zeros). Computed in float32 (it is
  tiny), so logits are float32 whatever the core's compute dtype.

  Args (call): features [B, F]. Returns: logits [B, M, C] float32.
  """
  num_members: int
  num_classes: int
  kernel_init: Any = stacked_he_normal

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    f = features.shape[-1]
    kernel = self.param('kernel', self.kernel_init,
                        (self.num_members, f, self.num_classes), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros,
                      (self.num_members, self.num_classes), jnp.float32)
    features = features.astype(jnp.float32)
    return jnp.einsum('bf,mfc->bmc', features, kernel) + bias

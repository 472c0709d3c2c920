"""MixMo networks and their registry by `config.model.name`.

    model = get_model(config)
    variables = model.init(key, jnp.zeros((1, H, W, 3)), train=False)
    logits = model.apply(variables, x, train=False)                    # [B,M,C]
    logits, updates = model.apply(variables, xs, mix_weights=w, train=True,
                                  mutable=['batch_stats'])             # xs [B,M,H,W,3]

w is [B,M,h,w] with (h, w) = stem_resolution(config).

To add a model, register a builder `fn(config) -> flax.linen.Module`:

    @register_model('my_net')
    def _build(config):
        return MyNet(num_classes=config.num_classes, num_members=config.num_members)

The module must follow the calls above and have a method
`stem_resolution(height, width) -> (h, w)`; it may have
`check_image_size(height, width)` raising ValueError.
"""
from typing import Any
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from mixmo_jax.models.preact_resnet import PreActResNet18
from mixmo_jax.models.wide_resnet import WideResNet

__all__ = [
    'PreActResNet18',
    'WideResNet',
    'MODEL_NAMES',
    'DTYPES',
    'register_model',
    'model_names',
    'get_model',
    'stem_resolution',
    'check_image_size',
    'compute_dtype',
    'num_params',
    'parameter_table',
]

Builder = Callable[[Any], nn.Module]
_REGISTRY: dict[str, Builder] = {}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def register_model(name: str) -> Callable[[Builder], Builder]:
  """Decorator registering `builder(config) -> nn.Module` under `name`."""

  def decorator(builder: Builder) -> Builder:
    if name in _REGISTRY:
      raise ValueError(f'model {name!r} is already registered')
    _REGISTRY[name] = builder
    return builder

  return decorator


def model_names() -> tuple[str, ...]:
  """Registered names (includes models registered after import)."""
  return tuple(sorted(_REGISTRY))


def compute_dtype(config) -> Any:
  """config.model.dtype ('float32' | 'bfloat16', default float32) -> jnp dtype."""
  name = config.model.get('dtype', 'float32')
  if name not in DTYPES:
    raise ValueError(
        f'model.dtype must be one of {sorted(DTYPES)}, got {name!r}')
  return DTYPES[name]


def get_model(config) -> nn.Module:
  """Builds the network named by config.model.name (see `model_names()`)."""
  name = config.model.name
  if name not in _REGISTRY:
    raise ValueError(
        f'unknown model.name {name!r}; choose one of {model_names()}')
  return _REGISTRY[name](config)


def bn_groups(config) -> int:
  """BatchNorm groups G = batch_size / model.bn_group_rows (1 when 0: the
  global batch); from the config alone, never from the device count."""
  rows = config.model.get('bn_group_rows', 0)
  return config.batch_size // rows if rows else 1


def num_params(params: Any) -> int:
  """The number of parameters: the sum of the sizes of the leaves of `params`
  (arrays or `jax.ShapeDtypeStruct`s), e.g. 36,601,416 for WRN-28-10, M = 2,
  CIFAR-100 (`clu.parameter_overview.count_parameters`)."""
  from clu import parameter_overview  # On use: importing clu takes seconds.
  return int(parameter_overview.count_parameters(params))


def parameter_table(params: Any) -> str:
  """clu's table of `params`: each leaf's name, shape, dtype and size, and
  the total (what `training` logs at the start of a run)."""
  from clu import parameter_overview
  return parameter_overview.get_parameter_overview(params, include_stats=False)


def _image_hw(config) -> tuple[int, int]:
  size = config.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


def stem_resolution(config) -> tuple[int, int]:
  """(h, w) of the stems' output, i.e. of the mixing weights, for config.image_size."""
  return get_model(config).stem_resolution(*_image_hw(config))


def check_image_size(config) -> None:
  """Raises ValueError (one line) if the model cannot take config.image_size."""
  model = get_model(config)
  if hasattr(model, 'check_image_size'):
    model.check_image_size(*_image_hw(config))


@register_model('wide_resnet')
def _wide_resnet(config) -> nn.Module:
  """WRN-depth-width; needs config.model.depth (6n+4) and config.model.width."""
  return WideResNet(depth=config.model.depth, width=config.model.width,
                    num_classes=config.num_classes,
                    num_members=config.num_members, dtype=compute_dtype(config),
                    stem=config.model.get('stem', 'mixmo'),
                    stride_on=config.model.get('stride_on', 'second'),
                    bn_groups=bn_groups(config))


@register_model('preact_resnet18')
def _preact_resnet18(config) -> nn.Module:
  """PreActResNet-18-width; needs config.model.width (model.depth is ignored)."""
  return PreActResNet18(width=config.model.width,
                        num_classes=config.num_classes,
                        num_members=config.num_members,
                        dtype=compute_dtype(config))


MODEL_NAMES = model_names(
)  # The built-in names; call model_names() for later ones.

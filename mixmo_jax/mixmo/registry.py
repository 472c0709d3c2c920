"""The registry of mixing blocks and their shape contract.

A *mixing block* decides, for every sample of a batch, how the M member
encodings l_i = c_i(x_i) are combined into the shared representation

    l = M * sum_i weights_i * l_i                       (paper eqs. 2, 6, 7)

at the stem's output resolution h x w.  It is a function

    fn(key, batch_size, num_members, height, width, *, alpha, p)
        -> (weights [B, M, h, w] float32, kappa [B, M] float32)

with sum_i weights[b, i] == 1 at every location and kappa[b, i] the mean of
weights[b, i] over (h, w) (member i's effective share, the input of the loss
reweighting w_r, eq. 5).  `alpha` is the concentration of the Dirichlet /
Beta mixing ratios and `p` the probability of patch (binary) mixing; both may
be traced scalars: changing them does not recompile a jitted caller.

A researcher adds a block from their own code, without editing the package:

    from mixmo_jax import mixmo

    @mixmo.register_mixing('my_block')
    def my_block(key, batch_size, num_members, height, width, *, alpha, p):
        ...
        return weights, kappa

and selects it with `--config.mixing.method=my_block`.  `mixmo.blocks` has
the pieces the built-in blocks are made of (`sample_kappa`, `mask_weights`,
`mask_block`).

Shapes: B batch, M members, h x w the mixing map (stem output).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
MixingFn = Callable[..., tuple[Array, Array]]

_REGISTRY: dict[str, MixingFn] = {}
_ALIASES: dict[str, str] = {}


class UnknownMixingError(KeyError, ValueError):
  """Raised by `get_mixing` for a name that is not registered.

  Subclasses both KeyError and ValueError so either `except` catches it.
  """

  def __str__(self):  # KeyError would quote the whole message.
    return str(self.args[0]) if self.args else ''


def register_mixing(name: str, *, overwrite: bool = False):
  """Decorator registering a mixing block under `name`.

  The block has signature
  `fn(key, batch_size, num_members, height, width, *, alpha, p)
   -> (weights [B, M, h, w], kappa [B, M])`.
  Registering an existing name raises ValueError unless `overwrite=True`
  (useful when a notebook cell is re-run).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'Mixing name must be a non-empty string, got {name!r}.')

  def decorator(fn: MixingFn) -> MixingFn:
    if (name in _REGISTRY or name in _ALIASES) and not overwrite:
      raise ValueError(f'Mixing block {name!r} is already registered; pass '
                       'overwrite=True to replace it.')
    _ALIASES.pop(name, None)
    _REGISTRY[name] = fn
    return fn

  return decorator


def register_alias(alias: str, name: str) -> None:
  """Makes `alias` another name of the registered block `name`."""
  if name not in _REGISTRY:
    raise ValueError(f'Cannot alias unknown mixing block {name!r}.')
  _ALIASES[alias] = name


def mixing_names() -> tuple[str, ...]:
  """Sorted names (aliases included) of all registered mixing blocks."""
  return tuple(sorted(set(_REGISTRY) | set(_ALIASES)))


def get_mixing(name: str) -> MixingFn:
  """Returns the mixing block registered as `name` (or aliased to it).

  Raises:
    UnknownMixingError (a KeyError and a ValueError) listing the known names.
  """
  try:
    return _REGISTRY[_ALIASES.get(name, name)]
  except KeyError:
    raise UnknownMixingError(
        f'Unknown mixing method {name!r}; known: {", ".join(mixing_names())}. '
        'Register new ones with mixmo_jax.mixmo.register_mixing(name).'
    ) from None


def sample_mixing_weights(key: Array, batch_size: int, num_members: int,
                          height: int, width: int, *, method: str, alpha,
                          p) -> tuple[Array, Array]:
  """Samples mixing weights with the block registered as `method`.

  Args:
    key: PRNG key.
    batch_size, num_members, height, width: static ints B, M, h, w.
    method: registered block name (static).
    alpha: Dirichlet / Beta concentration (float or traced scalar).
    p: probability of patch mixing (float or traced scalar).

  Returns:
    weights [B, M, h, w] float32 (sum over M is 1 everywhere) and
    kappa [B, M] float32 (mean of weights over h, w).

  Raises:
    ValueError: the block returned other shapes than the contract's.
  """
  weights, kappa = get_mixing(method)(key, batch_size, num_members, height,
                                      width, alpha=alpha, p=p)
  expected_w = (batch_size, num_members, height, width)
  if tuple(weights.shape) != expected_w or tuple(kappa.shape) != expected_w[:2]:
    raise ValueError(
        f'Mixing block {method!r} returned weights {tuple(weights.shape)} and '
        f'kappa {tuple(kappa.shape)}; expected {expected_w} and '
        f'{expected_w[:2]}.')
  return weights.astype(jnp.float32), kappa.astype(jnp.float32)

"""FLOPs of a traced program, counted from the shapes in its jaxpr.

XLA's cost analysis counts nothing for the convolutions it hands to cuDNN
(`cost_analysis()` is None for a GPU executable), so the work is counted
here, before compilation, from global (unsharded) shapes:

  convolution (every `conv_general_dilated`: the forward convs and the
    input- and weight-gradient convs of the backward pass):
    2 * |out| * kh * kw * C_in_per_group / prod(lhs_dilation)
    (a multiply-add per kernel tap that meets data: the input gradient of
    a strided conv runs on its output gradient dilated by the stride, whose
    inserted zeros take 1 - 1 / prod(stride) of the taps; so each of the
    forward, input- and weight-gradient convs counts the forward's work)
  dot_general:  2 * |out| * prod(contracted dims)
  the rest, as XLA's HloCostAnalysis counts it: one FLOP per output element
    of an arithmetic elementwise op, one per input element of a reduction;
    data movement (reshape, transpose, slice, gather, convert, ...) is free.

Sub-jaxprs (jit, custom_jvp / custom_vjp, remat, cond branches at their
maximum) are entered; loops are not expected in a train step (a while loop
raises, as its trip count is unknown).
"""
import math
from typing import Any

import jax
from jax.extend import core as jex_core

ELEMENTWISE = frozenset({
    'add', 'sub', 'mul', 'div', 'rem', 'neg', 'max', 'min', 'abs', 'sign',
    'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'logistic', 'sqrt', 'rsqrt',
    'cbrt', 'pow', 'integer_pow', 'square', 'sin', 'cos', 'erf', 'erf_inv',
    'floor', 'ceil', 'round', 'select_n', 'clamp', 'eq', 'ne', 'lt', 'le', 'gt',
    'ge', 'and', 'or', 'not', 'xor', 'nextafter', 'atan2', 'is_finite',
    'add_any', 'reciprocal'
})
REDUCTIONS = frozenset({
    'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod', 'argmax', 'argmin',
    'reduce_and', 'reduce_or', 'cumsum', 'cumlogsumexp', 'cummax'
})


def _size(aval) -> int:
  return math.prod(getattr(aval, 'shape', ()))


def conv_flops(eqn) -> int:
  """2 * |out| * (kernel taps * input features per group) / prod(lhs
  dilation) of one conv (module docstring)."""
  rhs = eqn.invars[1].aval
  dims = eqn.params['dimension_numbers']
  rhs_spec = dims.rhs_spec  # (out feature, in feature, *spatial) indices.
  taps = math.prod(rhs.shape[d] for d in rhs_spec[2:])
  dilation = math.prod(eqn.params.get('lhs_dilation') or (1,))
  return (2 * _size(eqn.outvars[0].aval) * taps * rhs.shape[rhs_spec[1]] //
          dilation)


def dot_flops(eqn) -> int:
  """2 * |out| * prod(contracted dims) of one dot_general."""
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval
  return 2 * _size(eqn.outvars[0].aval) * math.prod(
      lhs.shape[d] for d in lhs_contract)


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, jex_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex_core.Jaxpr):
        yield v


def count(jaxpr) -> dict[str, int]:
  """{'conv', 'dot', 'rest'} FLOPs of a (Closed)Jaxpr."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = {'conv': 0, 'dot': 0, 'rest': 0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'while':
      raise ValueError('a while loop: FLOPs depend on its trip count')
    if name == 'conv_general_dilated':
      total['conv'] += conv_flops(eqn)
    elif name == 'dot_general':
      total['dot'] += dot_flops(eqn)
    elif name in ELEMENTWISE:
      total['rest'] += sum(_size(v.aval) for v in eqn.outvars)
    elif name in REDUCTIONS:
      total['rest'] += _size(eqn.invars[0].aval)
    subs = [count(sub) for sub in _sub_jaxprs(eqn)]
    if name == 'cond' and subs:  # One branch runs: the costliest bounds it.
      subs = [max(subs, key=lambda s: sum(s.values()))]
    for sub in subs:
      for key in total:
        total[key] += sub[key]
  return total


def of(fn, *args: Any) -> dict[str, int]:
  """FLOPs of `fn(*args)` (args may be jax.ShapeDtypeStruct): its conv,
  dot and remaining FLOPs and their 'total'."""
  counts = count(jax.make_jaxpr(fn)(*args))
  counts['total'] = sum(counts.values())
  return counts

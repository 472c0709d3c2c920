"""A CPU-only kernel as a jax primitive: XLA's ops elsewhere, a mesh split.

The oneDNN convolution (conv.py) and its weight gradient
(dw.py) are primitives whose CPU lowering is a custom call, and
whose every other lowering, eager call and vmap is XLA's equivalent. Under
a device mesh the custom call is wrapped in `custom_partitioning` (left to
XLA's SPMD partitioner, an opaque custom call would have its operands
all-gathered onto every device); a lowering rule knows which case it is in
from the module's axis context.
"""
from typing import Callable

from jax.interpreters import batching
from jax.interpreters import mlir

Lowering = Callable[..., object]  # (ctx, *operands, **params) -> IR values.


def register(prim, *, xla: Lowering, one_device: Lowering,
             mesh: Lowering, batch: Callable) -> None:
  """Registers prim's lowerings and batching rule.

  Args:
    prim: the primitive (abstract eval and impl already defined).
    xla: XLA's equivalent, the lowering on every backend but the CPU.
    one_device: the CPU lowering for a program on one device.
    mesh: the CPU lowering for a program over several devices (a
      custom_partitioning op); where jax gives the lowering no devices, xla.
    batch: the vmap rule.
  """
  def cpu(ctx, *args, **params):
    axis_context = ctx.module_context.axis_context
    if getattr(axis_context, 'num_devices', 0) == 1:
      return one_device(ctx, *args, **params)
    if getattr(axis_context, 'device_assignment', ()) is None:
      # custom_partitioning needs the devices, which jax passes to lowerings
      # only for primitives registered below; where that failed: XLA's.
      return xla(ctx, *args, **params)
    return mesh(ctx, *args, **params)

  mlir.register_lowering(prim, xla)
  mlir.register_lowering(prim, cpu, platform='cpu')
  batching.primitive_batchers[prim] = batch
  try:  # As jax registers custom_partitioning itself (a private registry).
    from jax._src import dispatch
    dispatch.prim_requires_devices_during_lowering.add(prim)
  except (ImportError, AttributeError):
    pass

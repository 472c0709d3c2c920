"""Data parallelism with `jax.jit` over a one-axis device mesh.

The global batch is one array sharded along the mesh axis 'data'; parameters,
optimizer state and BatchNorm statistics are replicated. XLA inserts the
gradient all-reduce and computes BatchNorm moments over the global batch, so a
run is the same algorithm on 1 device, 8 GPUs or a TPU pod.
"""
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
  """The mesh of this process's devices (evaluation, prediction)."""
  return make_mesh(jax.local_devices())


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a fully replicated array (parameters, keys, scalars)."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  """Places a host pytree on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local_arrays, mesh: Mesh):
  """Assembles each process's slice [n_local, ...] into global sharded arrays.

  Args:
    local_arrays: pytree of NumPy arrays [n_local, ...], this process's
      contiguous slice of the global batch (see `data.pipeline.process_slice`).
    mesh: the training mesh.

  Returns:
    pytree of `jax.Array` [n_local * process_count, ...] sharded on 'data'.
  """
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_arrays)


def to_host(tree):
  """Fetches a pytree of (replicated or fully addressable) arrays as NumPy."""

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a collective with several
  processes: every process must call it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.array(flag, np.int32))
  return bool(np.asarray(flags).any())

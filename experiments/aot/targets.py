"""Compile targets: an accelerator described as data (targets.json), and
its devices made without the hardware.

    target = targets.get('h100')
    devices = targets.devices(target, 8)    # compile-only devices
    mesh = sharding.make_mesh(devices)

jax compiles for such devices ("deviceless AOT") through
`jax.experimental.topologies.get_topology_desc`: the GPU from a
GpuTargetConfig text proto (h100.textproto, jax's CUDA plugin), a TPU slice
by its topology name (libtpu). Nothing runs on them.
"""
import dataclasses
import functools
import json
import os
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ('float32', 'bfloat16')
# What each platform needs installed (the `aot` extra installs both).
PLUGINS = {
    'cuda': ('jax_cuda12_plugin', 'jax[cuda12]'),
    'tpu': ('libtpu', 'jax[tpu]')
}


class TargetError(ValueError):
  """A target, device count or plugin that cannot be used (one line)."""


@dataclasses.dataclass(frozen=True)
class Target:
  """One accelerator chip and the slices it comes in (targets.json).

  Attributes:
    key: the --target name ('h100', 'tpu-v5e', ...).
    name: the product's name.
    platform: 'cuda' or 'tpu', as jax names it ('cpu': this process's
      own CPU devices, which the tests compile for).
    memory_bytes: HBM per chip.
    hbm_bytes_per_s: HBM bandwidth per chip.
    peak_flops: dtype -> dense FLOP/s per chip at jax's default precision.
    link_bytes_per_s: interconnect bandwidth per chip, one direction.
    topologies: device count (str) -> topology name.
    target_config: GPU only: the GpuTargetConfig text proto file.
  """
  key: str
  name: str
  platform: str
  memory_bytes: int
  hbm_bytes_per_s: float
  peak_flops: dict[str, float]
  link_bytes_per_s: float
  topologies: dict[str, str]
  target_config: str = ''


@functools.cache
def all_targets() -> dict[str, Target]:
  with open(os.path.join(HERE, 'targets.json'), encoding='utf-8') as f:
    data = json.load(f)
  return {
      key: Target(key=key, **value)
      for key, value in data.items()
      if not key.startswith('_')
  }


def get(key: str) -> Target:
  targets = all_targets()
  if key not in targets:
    raise TargetError(f'--target={key!r} is not a target; allowed: '
                      f'{", ".join(sorted(targets))} (experiments/aot/'
                      'targets.json)')
  return targets[key]


def missing_plugin(target: Target) -> str:
  """'' when jax can compile for `target` here, else one line saying what
  to install."""
  import importlib.util
  if target.platform not in PLUGINS:  # This host's CPU (tests).
    return ''
  module, package = PLUGINS[target.platform]
  if importlib.util.find_spec(module) is not None:
    return ''
  return (f'--target={target.key} needs {package} ({module} is not '
          'installed): pip install -e ".[aot]"')


def topology_name(target: Target, num_devices: int) -> str:
  if str(num_devices) not in target.topologies:
    raise TargetError(
        f'--devices={num_devices} is not a slice of {target.key}; allowed: '
        f'{", ".join(sorted(target.topologies, key=int))}')
  return target.topologies[str(num_devices)]


def devices(target: Target, num_devices: int) -> Sequence:
  """`num_devices` compile-only devices of `target` (jax.Device objects)."""
  from jax.experimental import topologies
  name = topology_name(target, num_devices)
  if target.platform == 'cpu':  # This process's own devices (tests).
    import jax
    topology = jax.devices('cpu')[:num_devices]
    if len(topology) != num_devices:
      raise TargetError(f'{num_devices} CPU devices wanted, '
                        f'{len(topology)} here')
    return topology
  if target.platform == 'cuda':
    with open(os.path.join(HERE, target.target_config), encoding='utf-8') as f:
      topology = topologies.get_topology_desc(platform='cuda',
                                              target_config=f.read(),
                                              topology=name)
  else:
    topology = topologies.get_topology_desc(platform='tpu', topology_name=name)
  found = list(topology.devices)
  if len(found) != num_devices:
    raise TargetError(f'topology {name} of {target.key} has {len(found)} '
                      f'devices, not {num_devices}')
  return found


def with_topology(target: Target, name: str) -> Target:
  """`target` with one slice: the topology `name` ('v5e:2x4', '1x1x8'),
  whose device count is the product of its dimensions."""
  dims = name.rpartition(':')[2].split('x')
  if not all(d.isdigit() and int(d) > 0 for d in dims):
    raise TargetError(f'--topology={name!r}: dimensions like 2x4 or 1x1x8 '
                      '(after the chip name for a TPU, e.g. v5e:2x4)')
  count = 1
  for d in dims:
    count *= int(d)
  return dataclasses.replace(target, topologies={str(count): name})


# jax's device_kind (lowercase substring) -> target, most specific first.
_KINDS = (('h100 pcie', None), ('h100', 'h100'), ('tpu v5 lite', 'tpu-v5e'),
          ('tpu v5e', 'tpu-v5e'), ('tpu v6 lite', 'tpu-v6e'),
          ('tpu v6e', 'tpu-v6e'), ('tpu v5p', 'tpu-v5p'), ('tpu v5', 'tpu-v5p'))


def for_device_kind(device_kind: str):
  """The target describing a real device (jax's `device_kind`), or None."""
  kind = device_kind.lower()
  for pattern, key in _KINDS:
    if pattern in kind:
      return all_targets()[key] if key else None
  return None

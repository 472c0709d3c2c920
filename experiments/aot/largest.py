"""The largest global batch whose compiled train step fits a device.

The search, stated in every result: global batch sizes B are multiples of
a unit u (the least B that the config allows on n devices: B / b unique
samples divisible by n, and by the row groups' size when the config sets
`permutation_group_rows` / `bn_group_rows`); B doubles from the config's
own until the compiled step's peak memory exceeds the limit (or it fails
to compile), then bisects between the last fitting and the first failing
multiple of u, until the two are within 1/32 of the fitting one (or one
unit apart). It assumes peak memory grows with B (it does: activations
scale with it); the answer fits and is within 3% of the largest that does.
Each probe is one compilation.
"""
import math
from typing import Any
from collections.abc import Callable

from experiments.aot import case


def unit(config, num_devices: int) -> int:
  """The least global batch step the config allows on `num_devices`."""
  b = config.batch_repetitions
  u = b * num_devices
  for rows in (config.mixing.permutation_group_rows,
               config.model.get('bn_group_rows', 0)):
    if rows:
      u = math.lcm(u, rows)
  return u


def search(fits: Callable[[int], bool], start: int, step: int,
           limit: int = 1 << 20, resolution: float = 1 / 32) -> int:
  """A multiple of `step` <= `limit` for which `fits` holds, within a
  `resolution` fraction (or one `step`) of the largest; doubling from
  `start` then bisecting (0 when `step` does not fit)."""
  good, bad = 0, None
  size = max(step, start // step * step)
  while size <= limit:
    if not fits(size):
      bad = size
      break
    good, size = size, size * 2
  if bad is None:
    return good
  lo, hi = good // step, bad // step  # In units: lo fits (or 0), hi not.
  while hi - lo > max(1, int(lo * resolution)):
    mid = (lo + hi) // 2
    if fits(mid * step):
      lo = mid
    else:
      hi = mid
  return lo * step


def largest_batch(
    config, target, num_devices: int, dtype: str,
    fractions=(case.JAX_MEMORY_FRACTION, 1.0)) -> dict[str, Any]:
  """For each fraction f, the largest B whose peak fits f of the device's
  memory; probes are compiled once and shared by the fractions."""
  peaks: dict[int, Any] = {}  # B -> peak bytes, or the compile error.

  def peak(batch: int):
    if batch not in peaks:
      trial = config.copy_and_resolve_references()
      trial.batch_size = batch
      result = case.run(trial, target, num_devices, dtype, with_eval=False)
      peaks[batch] = (
          result['peak_bytes'] if result['compiled'] else result['error'])
    return peaks[batch]

  u = unit(config, num_devices)
  out: dict[str, Any] = {
      'unit':
          u,
      'search':
          ('doubling from the config batch, then bisection in multiples of '
           f'{u} to within 1/32; one compilation per probe')
  }
  for fraction in fractions:
    limit = fraction * target.memory_bytes
    best = search(
        lambda b, limit=limit: isinstance(peak(b), int) and peak(b) <= limit,
        config.batch_size, u)
    out[f'largest_batch_{round(fraction * 100)}pct'] = best
  out['probes'] = dict(sorted(peaks.items()))
  return out

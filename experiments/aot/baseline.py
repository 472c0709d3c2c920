"""The committed baseline of the compiled programs (experiments/aot_baseline.json).

    {"h100 8 bfloat16 cifar100.py:ub_mimo 512": {"peak_bytes": ..., "kernels_per_step": ...,
                                                "collectives": {...}}, ...}

`.ci/run` compiles the headline cases on every commit and compares them
with it: a case whose peak memory or kernels per step grew by more than
`TOLERANCE`, or that has a kind of collective the baseline's lacks (an
all-gather of the batch, say) or more collectives inside loops, fails,
with the comparison printed. A case missing from the
baseline is only reported; `--write_baseline` adds it (after a deliberate
change, commit the new file with the reason).
"""
import json
import os
from typing import Any
from collections.abc import Sequence

TOLERANCE = 0.10
CHECKED = ('peak_bytes', 'kernels_per_step')


def key(row: dict[str, Any]) -> str:
  return (f'{row["target"]} {row["devices"]} {row["dtype"]} {row["config"]} '
          f'{row["batch_size"]}')


def read(path: str) -> dict[str, dict[str, Any]]:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def write(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """Adds (or replaces) the compiled rows' entries in the file at `path`."""
  data = read(path) if os.path.exists(path) else {}
  for row in rows:
    if row['compiled']:
      data[key(row)] = {
          'peak_bytes': row['peak_bytes'],
          'kernels_per_step': row['kernels_per_step'],
          'collectives': row['collectives'],
          'loop_collectives': row['loop_collectives']
      }
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(dict(sorted(data.items())), f, indent=1)
    f.write('\n')


def compare(baseline: dict[str, dict[str, Any]],
            rows: Sequence[dict[str, Any]]) -> tuple[list[str], bool]:
  """(a table of each case against the baseline, whether one regressed)."""
  lines = [
      f'{"case against experiments/aot_baseline.json":48} '
      f'{"peak GB":>15} {"kernels":>11} {"all-reduces":>11}'
  ]
  regressed = False
  for row in rows:
    if not row['compiled']:
      continue
    base = baseline.get(key(row))
    if base is None:
      lines.append(f'{key(row):48} not in the baseline')
      continue
    bad = [
        f'{name} > +{TOLERANCE:.0%}' for name in CHECKED
        if row[name] > (1 + TOLERANCE) * base[name]
    ]
    new = sorted(set(row['collectives']) - set(base['collectives']))
    if new:
      bad.append(f'new collectives {", ".join(new)}')
    if row['loop_collectives'] > base.get('loop_collectives', 0):
      bad.append(f'{row["loop_collectives"]} collectives in loops')
    regressed |= bool(bad)
    reduces = [
        r.get('collectives', {}).get('all-reduce', {}).get('count', 0)
        for r in (base, row)
    ]
    lines.append(
        f'{key(row):48} {base["peak_bytes"] / 1e9:6.2f} -> '
        f'{row["peak_bytes"] / 1e9:5.2f} {base["kernels_per_step"]:>4} -> '
        f'{row["kernels_per_step"]:<4} {reduces[0]:>4} -> {reduces[1]:<4}' +
        (f' REGRESSED: {"; ".join(bad)}' if bad else ''))
  return lines, regressed

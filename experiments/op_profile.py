"""Where a compiled step's time goes: a per-HLO-op table from jax.profiler.

  ops = op_profile.profile(step, compiled, steps=3)
  print(op_profile.format_table(ops, step_ms, top=15))

`step()` runs the compiled program once and blocks; it is run `steps` times
under `jax.profiler.trace`, whose Perfetto trace (`*.trace.json.gz`) holds
one complete ('X') event per executed HLO instruction, named as in the
optimized HLO (`compiled.as_text()`). XLA's CPU runtime runs convolutions
and dots asynchronously: their event only covers the launch, and a later
'end: <name>' event marks the completion, so an op's time is from its event's
start to the first matching 'end:' event's end (its own event's duration
when there is none). Times are summed per instruction name (host-side
events, which have no HLO name, are left out) and divided by `steps`;
concurrent ops overlap, so the sum can pass the step time. Each instruction
gets its opcode and, from its metadata op_name, its pass: 'bwd' when jax
named it in a transposed computation ('transpose(jvp(...))'), 'fwd'
otherwise, '-' when XLA's rewrites left it no metadata (the weight-gradient
convolutions often).
"""
import bisect
import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import NamedTuple
from collections.abc import Callable

import jax

_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$')
_OPCODE = re.compile(r'(?:^|\s)(?P<op>[a-z][\w\-]*)\(')
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_KIND = re.compile(r'kind=(?P<kind>k\w+)')
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]*)"')


class Op(NamedTuple):
  name: str  # HLO instruction name.
  opcode: str  # e.g. 'convolution', 'fusion(kLoop)'.
  phase: str  # 'fwd', 'bwd' or '-' (no metadata).
  ms: float  # Milliseconds per step (summed over its executions).


def instructions(hlo_text: str) -> dict[str, tuple]:
  """{instruction name: (opcode, phase)} of an optimized HLO module."""
  out = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    rest = match.group('rest')
    opcode = _OPCODE.search(rest)
    if not opcode:
      continue
    op = opcode.group('op')
    kind = _KIND.search(rest)
    if op == 'fusion' and kind:
      op = f'fusion({kind.group("kind")})'
    op_name = _OP_NAME.search(rest)
    if not op_name:
      phase = '-'
    else:
      phase = 'bwd' if 'transpose(' in op_name.group('op_name') else 'fwd'
    out[match.group('name')] = (op, phase)
  return out


def event_names(hlo_text: str) -> dict[str, str]:
  """{trace event name: instruction name} where the two differ.

  XLA's CPU runtime names a custom call's event after the instruction and
  its target ('ffi_call.1' calling 'mixmo_onednn_conv' ->
  'ffi_call.1mixmo_onednn_conv').
  """
  out = {}
  for line in hlo_text.splitlines():
    match, target = _INSTRUCTION.match(line), _TARGET.search(line)
    if match and target:
      out[match.group('name') + target.group('target')] = match.group('name')
  return out


def _trace_events(folder: str) -> list[dict]:
  paths = glob.glob(
      os.path.join(folder, '**', '*.trace.json.gz'), recursive=True)
  if not paths:
    raise RuntimeError(f'jax.profiler wrote no *.trace.json.gz under {folder}')
  with gzip.open(paths[0]) as f:
    data = json.load(f)
  return data['traceEvents'] if isinstance(data, dict) else data


def _durations(events: list[dict], known,
               aliases: dict[str, str] | None = None) -> dict[str, list[float]]:
  """{op name: [microseconds of each execution]}, launch to completion."""
  aliases = aliases or {}
  starts = collections.defaultdict(list)
  ends = collections.defaultdict(list)
  for event in events:
    if event.get('ph') != 'X':
      continue
    name = event.get('name', '')
    # GPU kernels carry their HLO instruction in args; CPU events are named
    # after it.
    name = (event.get('args') or {}).get('hlo_op', name)
    end = name.startswith('end: ')
    name = name[5:] if end else name
    name = aliases.get(name, name)
    if name not in known:
      continue
    if end:
      ends[name].append(float(event['ts']) + float(event.get('dur', 0.0)))
    else:
      starts[name].append((float(event['ts']), float(event.get('dur', 0.0))))
  out = {}
  for name, spans in starts.items():
    done = sorted(ends.get(name, []))
    out[name] = []
    for ts, dur in sorted(spans):
      i = bisect.bisect_left(done, ts)
      out[name].append(done[i] - ts if i < len(done) else dur)
  return out


def profile(step: Callable[[], None], compiled, steps: int = 3) -> list[Op]:
  """Per-instruction milliseconds per step, largest first."""
  text = compiled.as_text()
  known = instructions(text)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      for _ in range(steps):
        step()
    events = _trace_events(folder)
  total_us = collections.Counter()
  for name, spans in _durations(events, known, event_names(text)).items():
    total_us[name] += sum(spans)
  ops = [
      Op(name, *known[name], us / 1e3 / steps) for name, us in total_us.items()
  ]
  return sorted(ops, key=lambda op: -op.ms)


def format_table(ops: list[Op], step_ms: float, top: int = 15) -> str:
  """The `top` instructions and the totals per opcode, as % of `step_ms`."""
  lines = [
      f'{"HLO op":34s} {"opcode":22s} {"pass":4s} {"ms/step":>8s} '
      f'{"% step":>7s}'
  ]
  for op in ops[:top]:
    lines.append(f'{op.name[:34]:34s} {op.opcode[:22]:22s} '
                 f'{op.phase:4s} {op.ms:8.1f} '
                 f'{100 * op.ms / step_ms:7.1f}')
  by_kind = collections.Counter()
  for op in ops:
    by_kind[(op.opcode, op.phase)] += op.ms
  lines.append(f'{"totals per opcode":34s}')
  for (opcode, phase), ms in by_kind.most_common(8):
    lines.append(f'{"":34s} {opcode[:22]:22s} {phase:4s} {ms:8.1f} '
                 f'{100 * ms / step_ms:7.1f}')
  covered = sum(op.ms for op in ops)
  lines.append(f'{"all HLO ops":34s} {"":22s} {"":4s} {covered:8.1f} '
               f'{100 * covered / step_ms:7.1f}')
  return '\n'.join(lines)

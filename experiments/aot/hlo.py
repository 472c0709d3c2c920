"""What a compiled program launches, read from its optimised HLO text.

    stats = hlo.entry_stats(compiled.as_text())
    stats.kernels        # kernels per step
    stats.kernel_io_bytes   # bytes the kernels read and write (HBM traffic)
    stats.collectives    # {'all-reduce': {'count': 54, 'bytes': ...}, ...}
    stats.kernel_kinds   # {'fusion': 484, 'convolution': 83, 'copy': 56, ...}
    stats.loop_collectives  # collectives inside loops (run on every trip)

The entry computation of an SPMD program is what one device runs, so every
shape is per device. A kernel is an instruction of the entry computation
that launches work (a fusion, a library call such as a cuDNN convolution or
a GEMM, a copy, a collective); parameters, constants, tuples, bitcasts and
the `-done` halves of asynchronous collectives launch nothing. A kernel's
I/O is its operands' bytes plus its result's: a lower bound on the HBM
traffic, as each kernel reads its inputs and writes its output at least
once (caches ignored).
"""
import dataclasses
import math
import re

# Bytes per element of XLA's element types.
_BYTES = {
    'pred': 1,
    's4': 0.5,
    'u4': 0.5,
    's8': 1,
    'u8': 1,
    's16': 2,
    'u16': 2,
    'f16': 2,
    'bf16': 2,
    's32': 4,
    'u32': 4,
    'f32': 4,
    's64': 8,
    'u64': 8,
    'f64': 8,
    'c64': 8,
    'c128': 16,
    'f8e4m3fn': 1,
    'f8e5m2': 1
}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%(\S+)\s+=\s+(.*)$')
_FREE = frozenset({
    'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast',
    'partition-id', 'replica-id', 'after-all', 'opt-barrier', 'copy-done',
    'send-done', 'recv-done'
})
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute', 'collective-broadcast')


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape, 'f32[8,32]{1,0}' or a tuple of them."""
  total = 0.
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return int(total)


def _split_shape(rest: str) -> tuple[str, str]:
  """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (shape, 'op(...)')."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(' ')
  return shape, tail


@dataclasses.dataclass
class EntryStats:
  kernels: int = 0
  kernel_io_bytes: int = 0
  collectives: dict[str, dict[str,
                              int]] = dataclasses.field(default_factory=dict)
  kernel_kinds: dict[str, int] = dataclasses.field(default_factory=dict)
  loop_collectives: int = 0
  opcodes: dict[str, int] = dataclasses.field(default_factory=dict)


def kernel_kind(opcode: str) -> str:
  """What a launching instruction is: 'convolution' (a library call such as
  cuDNN's, or XLA's own), 'gemm', 'fusion', 'copy' (a layout change, or a
  buffer XLA duplicates around an in-place update), 'collective', 'while'
  (a loop: on a GPU each trip reads its condition back to the host), or
  'other'."""
  if 'conv' in opcode:
    return 'convolution'
  if 'gemm' in opcode or 'cublas' in opcode or opcode == 'dot':
    return 'gemm'
  if opcode.removesuffix('-start') in COLLECTIVES:
    return 'collective'
  if opcode in ('fusion', 'copy', 'while'):
    return opcode
  return 'copy' if opcode == 'copy-start' else 'other'


def _split(text: str) -> tuple[list[str], list[str]]:
  """(the ENTRY computation's lines, every other computation's lines)."""
  entry, others, inside = [], [], False
  for line in text.splitlines():
    if line.startswith('ENTRY '):
      inside = True
    elif inside and line.startswith('}'):
      inside = False
    else:
      (entry if inside else others).append(line)
  return entry, others


def entry_lines(text: str) -> list[str]:
  """The instruction lines of the module's ENTRY computation."""
  return _split(text)[0]


def _opcode(line: str) -> tuple[str, str, str] | None:
  """(name, result shape, 'op(operands...)...') of an instruction line."""
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  return (name, *_split_shape(rest))


def entry_stats(text: str) -> EntryStats:
  """Kernels, their I/O bytes and the collectives of one device's step."""
  sizes: dict[str, int] = {}
  entry, others = _split(text)
  stats = EntryStats()
  # Collectives outside the entry computation are in a while loop's body or
  # condition (collectives are never fused): each trip runs them.
  for parsed in filter(None, map(_opcode, others)):
    opcode = parsed[2].partition('(')[0]
    stats.loop_collectives += opcode.removesuffix('-start') in COLLECTIVES
  for parsed in filter(None, map(_opcode, entry)):
    name, shape, call = parsed
    opcode = call.partition('(')[0]
    operands = re.findall(r'%([^\s,()]+)',
                          call.partition('(')[2].partition(')')[0])
    result = shape_bytes(shape)
    sizes[name] = result
    if opcode == 'custom-call':
      target = re.search(r'custom_call_target="([^"]+)"', call)
      opcode = f'custom-call:{target.group(1) if target else "?"}'
    stats.opcodes[opcode] = stats.opcodes.get(opcode, 0) + 1
    if opcode in _FREE or opcode.endswith('-done'):
      continue
    stats.kernels += 1
    launched = kernel_kind(opcode)
    stats.kernel_kinds[launched] = stats.kernel_kinds.get(launched, 0) + 1
    stats.kernel_io_bytes += result + sum(sizes.get(o, 0) for o in operands)
    kind = opcode.removesuffix('-start')
    if kind in COLLECTIVES:
      entry = stats.collectives.setdefault(kind, {'count': 0, 'bytes': 0})
      entry['count'] += 1
      entry['bytes'] += result
  return stats

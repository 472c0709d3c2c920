"""Compile the real train step for an accelerator that is not here.

  python -m experiments.aot --target=h100 --devices=1,8 \\
      --dtype=float32,bfloat16 --config=configs/cifar100.py:cut_mixmo+b4
  python -m experiments.aot --target=tpu-v5e --devices=4 --json
  python -m experiments.aot --target=h100 --largest_batch
  python -m experiments.aot --print_target_config   # on a real GPU

For each (config, device count, dtype) it compiles the train step and the
evaluation step for the target's devices (jax's deviceless AOT: nothing
runs), and prints one table, or with --json one JSON object per line and
case: the compiled program's memory (argument, output, alias, temp, peak
bytes per device), FLOPs per step (convolutions counted from their shapes,
the rest as XLA's cost analysis counts it: experiments/aot/flops.py),
kernels and collectives per step and the kernels' HBM traffic (from the
optimised HLO: experiments/aot/hlo.py), a lower bound on the step time and
on the config's whole run (experiments/aot/case.py), and with
--largest_batch the largest global batch that fits the device
(experiments/aot/largest.py). A case that fails to compile is a row with
its error; the exit code is then 1.

Needs the `aot` extra (jax's CUDA and TPU plugins at the core's jax
version): pip install -e ".[aot]". Targets are data: targets.json and the
H100's h100.textproto beside this file.
"""
import ast
import json
import os
import sys

# Compile-only: the accelerators are described, never started.
os.environ['JAX_PLATFORMS'] = 'cpu'
# An executable compiled for devices that are not here cannot be read back
# from jax's persistent compilation cache (jax warns and compiles again):
# leave it out of a cache the user may have set.
os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'

from absl import app, flags

from experiments.aot import baseline as baseline_lib
from experiments.aot import targets as targets_lib

_CONFIG = flags.DEFINE_multi_string(
    'config', ['configs/cifar100.py:cut_mixmo+b4'],
    'Config file[:variant], as --config of mixmo_jax.main (repeatable).')
_TARGET = flags.DEFINE_string(
    'target', 'h100',
    'Compile target: ' + ', '.join(sorted(targets_lib.all_targets())) +
    ' (experiments/aot/targets.json).')
_DEVICES = flags.DEFINE_list(
    'devices', ['1'], 'Device counts (slices of '
    'the target, see --topology).')
_TOPOLOGY = flags.DEFINE_string(
    'topology', '', 'A topology name for one device count instead of '
    "targets.json's (e.g. v5e:2x4, 1x1x8); implies its device count.")
_SET = flags.DEFINE_multi_string(
    'set', [], 'FIELD=VALUE: set a config field in every --config, e.g. '
    "--set=model.bn_group_rows=8 (repeatable); the case's label names it.")
_DTYPE = flags.DEFINE_list('dtype', ['float32', 'bfloat16'],
                           'Compute dtypes (config.model.dtype).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Global batch size (0: the '
                              "config's).")
_LARGEST = flags.DEFINE_bool(
    'largest_batch', False, 'Also search the largest global batch whose '
    "peak fits 75% (jax's default preallocation) and 100% of the "
    "device's memory.")
_EVAL = flags.DEFINE_bool(
    'eval', True, 'Also compile the evaluation step '
    "(at the config's eval_batch_size).")
_BASELINE = flags.DEFINE_string(
    'baseline', '', 'A baseline file (experiments/aot_baseline.json): each '
    'case found in it fails when its peak memory or kernels per step grew '
    'by more than 10%.')
_WRITE_BASELINE = flags.DEFINE_string(
    'write_baseline', '', 'Add the compiled cases to this baseline file.')
_JSON = flags.DEFINE_bool(
    'json', False, 'One JSON object per line and '
    'case instead of the table.')
_PRINT_TARGET = flags.DEFINE_bool(
    'print_target_config', False, 'Print the GpuTargetConfig of this '
    "machine's GPU (run where a GPU is), to replace h100.textproto.")


def _fail(message: str) -> None:
  print(f'experiments.aot: {message}', file=sys.stderr)
  sys.exit(2)


def _print_target_config() -> None:
  os.environ.pop('JAX_PLATFORMS', None)
  import jax
  from jax.lib import xla_client
  if jax.default_backend() != 'gpu':
    _fail(f'--print_target_config needs a GPU; this machine runs '
          f'{jax.default_backend()}')
  print(xla_client.get_topology_for_devices(jax.devices()).target_config)


def _set_field(config, assignment: str) -> None:
  """Applies one --set=FIELD=VALUE, VALUE read as the field's type."""
  from mixmo_jax import cli
  field, sep, text = assignment.partition('=')
  if not sep:
    _fail(f'--set={assignment}: FIELD=VALUE with FIELD a config field')
  problem = cli.field_problem(config, field)
  if problem:
    _fail(f'--set={assignment}: {problem}')
  *path, name = field.split('.')
  node = config
  for part in path:
    node = node[part]
  old = node[name]
  kinds = {
      bool: 'true or false',
      int: 'an integer',
      float: 'a number',
      str: 'a string'
  }
  try:
    if isinstance(old, bool):
      if text.lower() not in ('true', 'false'):
        raise ValueError(text)
      value = text.lower() == 'true'
    elif type(old) in kinds:
      value = type(old)(text)
    else:
      value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    _fail(f'--set={assignment}: {field} takes '
          f'{kinds.get(type(old), "a Python literal")}, not {text!r}')
  node[name] = value


def _cases():
  """(target, device counts, [(config label, config)]) from the flags,
  each checked first (one line and exit 2 for a bad one)."""
  from mixmo_jax import configs
  target = targets_lib.get(_TARGET.value)
  for dtype in _DTYPE.value:
    if dtype not in targets_lib.DTYPES:
      _fail(f'--dtype={dtype!r} is not allowed; allowed: '
            f'{", ".join(targets_lib.DTYPES)}')
  try:
    counts = [int(d) for d in _DEVICES.value]
  except ValueError:
    _fail(f'--devices={",".join(_DEVICES.value)}: integers, comma-separated')
  if _TOPOLOGY.value:
    counts = [None]
  else:
    for count in counts:
      targets_lib.topology_name(target, count)
  loaded = []
  for spec in _CONFIG.value:
    try:
      config = configs.load(spec)
    except (ValueError, FileNotFoundError) as e:
      _fail(f'--config={spec}: {e}')
    for assignment in _SET.value:
      _set_field(config, assignment)
    if _BATCH.value:
      config.batch_size = _BATCH.value
    loaded.append((' '.join([spec.rpartition('/')[2]] + _SET.value), config))
  return target, counts, loaded


def _table(rows) -> str:
  width = max([26] + [len(r['config']) for r in rows])
  head = (f'{"target":8} {"dev":>3} {"dtype":8} {"config":{width}} '
          f'{"batch":>6} '
          f'{"peak GB":>7} {"temp MB":>8} {"TFLOP":>7} {"IO GB":>6} '
          f'{"kernels":>7} {"all-red":>7} {"bound ms":>8} {"by":7} '
          f'{"run h":>6} {"eval GB":>7} {"compile s":>9}')
  lines = [head]
  for r in rows:
    if not r['compiled']:
      lines.append(f'{r["target"]:8} {r["devices"]:>3} {r["dtype"]:8} '
                   f'{r["config"]:{width}} {r["batch_size"]:>6} '
                   f'FAILED: {r["error"]}')
      continue
    reduce = r['collectives'].get('all-reduce', {}).get('count', 0)
    evaluation = (f'{r["eval_peak_bytes"] / 1e9:7.2f}' if r.get('eval_compiled')
                  else f'{"-" if "eval_compiled" not in r else "FAILED":>7}')
    lines.append(
        f'{r["target"]:8} {r["devices"]:>3} {r["dtype"]:8} '
        f'{r["config"]:{width}} {r["batch_size"]:>6} '
        f'{r["peak_bytes"] / 1e9:7.2f} {r["temp_bytes"] / 1e6:8.0f} '
        f'{r["flops_per_step"] / 1e12:7.3f} '
        f'{r["kernel_io_bytes"] / 1e9:6.1f} {r["kernels_per_step"]:>7} '
        f'{reduce:>7} {r["step_lower_bound_s"] * 1e3:8.2f} '
        f'{r["bound_by"]:7} {r["run_lower_bound_h"]:6.2f} {evaluation} '
        f'{r["compile_s"]:9.1f}')
    if 'largest_batch_75pct' in r:
      lines.append(f'{"":12}largest batch: {r["largest_batch_75pct"]} within '
                   f'75% of {r["memory_bytes"] / 2**30:.0f} GiB, '
                   f'{r["largest_batch_100pct"]} within all of it '
                   f'({r["search"]})')
  return '\n'.join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}')
  if _PRINT_TARGET.value:
    _print_target_config()
    return
  try:
    target, counts, loaded = _cases()
  except targets_lib.TargetError as e:
    _fail(str(e))
  if _BASELINE.value and not os.path.isfile(_BASELINE.value):
    _fail(f'--baseline={_BASELINE.value}: no such file')
  missing = targets_lib.missing_plugin(target)
  if missing:
    _fail(missing)
  from mixmo_jax import platform
  # The target's XLA flag defaults (deterministic GPU kernels), not this
  # host's: XLA_FLAGS is read when the first backend starts, just below.
  platform.apply_defaults(
      platforms=('cpu',
                 'gpu' if target.platform == 'cuda' else target.platform))
  from experiments.aot import case, largest
  if _TOPOLOGY.value:
    target = targets_lib.with_topology(target, _TOPOLOGY.value)
    counts = [int(next(iter(target.topologies)))]
  rows, failed = [], False
  for label, config in loaded:
    for count in counts:
      for dtype in _DTYPE.value:
        row = case.run(config, target, count, dtype, label=label,
                       with_eval=_EVAL.value)
        row['memory_bytes'] = target.memory_bytes
        if row['compiled'] and _LARGEST.value:
          row.update(largest.largest_batch(config, target, count, dtype))
        failed |= not row['compiled']
        rows.append(row)
        if _JSON.value:
          row.pop('traceback', None)
          print(json.dumps(row), flush=True)
  if not _JSON.value:
    print(f'{target.name}: {target.peak_flops["bfloat16"] / 1e12:.0f} bf16 '
          f'/ {target.peak_flops["float32"] / 1e12:.0f} float32 TFLOP/s, '
          f'{target.hbm_bytes_per_s / 1e12:.2f} TB/s, '
          f'{target.memory_bytes / 2**30:.0f} GiB per chip; per device, '
          'per step (TFLOP: all devices)')
    print(_table(rows))
    for row in rows:
      if not row['compiled'] and 'traceback' in row:
        print(row['traceback'], file=sys.stderr)
  if _WRITE_BASELINE.value:
    baseline_lib.write(_WRITE_BASELINE.value, rows)
  if _BASELINE.value:
    lines, regressed = baseline_lib.compare(
        baseline_lib.read(_BASELINE.value), rows)
    print('\n'.join(lines), file=sys.stderr if _JSON.value else sys.stdout)
    failed |= regressed
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  app.run(main)

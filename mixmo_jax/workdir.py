"""The files of a run's workdir, and the one reader / writer of each.

    WORKDIR/
      config.json           the resolved config (`write_config`, `read_config`)
      config_changes.jsonl  one line per resume with a changed config
      eval_history.jsonl    one line per periodic evaluation (`append_history`,
                            `read_history`, `truncate_history`)
      eval.json             `python -m mixmo_jax.evaluate`'s result
                            (`write_json`, `to_json`)
      checkpoints/          orbax checkpoints (owned by `checkpointing`)
      checkpoints_corrupt/  checkpoints that failed to verify, moved aside
      events.out.tfevents.* TensorBoard (clu)

Every write is atomic (a temporary file renamed over the target), so a kill
leaves the old or the new content, never a mix.  Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Optional

CONFIG = 'config.json'
CONFIG_CHANGES = 'config_changes.jsonl'
HISTORY = 'eval_history.jsonl'
EVAL = 'eval.json'
CHECKPOINTS = 'checkpoints'
CORRUPT_CHECKPOINTS = 'checkpoints_corrupt'


def path(workdir: str, name: str) -> str:
  """WORKDIR/name."""
  return os.path.join(workdir, name)


def _atomic_write(target: str, text: str) -> None:
  folder = os.path.dirname(os.path.abspath(target))
  os.makedirs(folder, exist_ok=True)
  tmp = f'{target}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ---------------------------------------------------------------- config.json


def config_to_dict(config) -> Dict[str, Any]:
  """The JSON form of a ConfigDict (tuples become lists), as in config.json."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def read_config_dict(workdir: str) -> Optional[Dict[str, Any]]:
  """config.json as a dict, or None when the file does not exist.

  Raises:
    ValueError: the file exists but is not valid JSON.
  """
  target = path(workdir, CONFIG)
  if not os.path.exists(target):
    return None
  with open(target) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f'{target} is not valid JSON ({e})') from e


def read_config(workdir: str):
  """config.json as a ConfigDict (FileNotFoundError when missing)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  tree = read_config_dict(workdir)
  if tree is None:
    raise FileNotFoundError(f'{path(workdir, CONFIG)} is missing: not a '
                            'training workdir')
  return ml_collections.ConfigDict(tree)


def write_config(workdir: str, config) -> None:
  """Writes config.json atomically."""
  _atomic_write(path(workdir, CONFIG),
                json.dumps(config_to_dict(config), indent=2) + '\n')


def record_config_changes(workdir: str, changes: List[str],
                          allowed: bool) -> None:
  """Appends one line {time, changes, allow_config_change} to
  config_changes.jsonl."""
  record = {'time': time.strftime('%Y-%m-%dT%H:%M:%S'), 'changes': changes,
            'allow_config_change': allowed}
  os.makedirs(workdir, exist_ok=True)
  with open(path(workdir, CONFIG_CHANGES), 'a') as f:
    f.write(json.dumps(record) + '\n')


# ---------------------------------------------------------------- history


def append_history(workdir: str, record: Dict[str, Any]) -> None:
  """Appends one evaluation record (one JSON line) to eval_history.jsonl."""
  with open(path(workdir, HISTORY), 'a') as f:
    f.write(json.dumps(record) + '\n')


def _parse_line(line: str) -> Optional[Dict[str, Any]]:
  """A complete history line as a dict with an int 'step', else None (a
  line cut short by a kill has no newline)."""
  if not line.endswith('\n'):
    return None
  try:
    record = json.loads(line)
    record['step'] = int(record['step'])
  except (ValueError, KeyError, TypeError):
    return None
  return record


def read_history(workdir: str) -> List[Dict[str, Any]]:
  """The evaluation records of eval_history.jsonl, in file order.

  Blank, malformed or truncated lines are skipped; [] without a file.
  """
  target = path(workdir, HISTORY)
  if not os.path.isfile(target):
    return []
  with open(target) as f:
    records = [_parse_line(line) for line in f]
  return [r for r in records if r is not None]


def truncate_history(workdir: str, step: int) -> None:
  """Drops the records newer than `step` (written before a kill, after the
  last checkpoint), and any malformed line."""
  target = path(workdir, HISTORY)
  if not os.path.exists(target):
    return
  with open(target) as f:
    lines = [l for l in f if (_parse_line(l) or {'step': math.inf})['step']
             <= step]
  _atomic_write(target, ''.join(lines))


# ---------------------------------------------------------------- eval.json


def to_json(result: Dict[str, Any]) -> str:
  """Deterministic strict JSON: sorted keys, indent 2, trailing newline."""
  return json.dumps(result, sort_keys=True, indent=2, allow_nan=False) + '\n'


def write_json(result: Dict[str, Any], target: str) -> str:
  """Writes `to_json(result)` atomically at `target`; returns the path."""
  _atomic_write(target, to_json(result))
  return target

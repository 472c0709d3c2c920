"""The files of a run's workdir, and the one reader / writer of each.

    WORKDIR/
      config.json           the resolved config (`write_config`, `read_config`)
      config_changes.jsonl  one line per resume with a changed config
      eval_history.jsonl    one line per periodic evaluation (`append_history`,
                            `read_history`, `truncate_history`)
      eval.json             `python -m mixmo_jax.evaluate`'s result
                            (`write_json`, `to_json`)
      .lock                 held by the one trainer of the workdir (flock
                            locally, a lease object in a bucket); its pid
                            and host (owned by `locking`)
      run.json              the run id, written at the first start and bound
                            into every checkpoint's digest (`run_id`)
      checkpoints/          orbax checkpoints (owned by `checkpointing`);
                            STEP/config/metadata is the run's config as JSON
                            (`stored_config`)
      checkpoints_corrupt/  checkpoints that failed to verify, moved aside
      events.out.tfevents.* TensorBoard (owned by `events`)

A workdir is a local folder or a gs:// URL (`storage` reads and writes
both; orbax and tensorstore take the URL as it is). Every write is atomic
(a temporary file renamed over the target, or one object written whole),
so a kill leaves the old or the new content, never a mix.  Only process 0
writes.
"""
from __future__ import annotations

import json
import os
import hashlib
import time
import uuid
from typing import Any

from absl import logging

from mixmo_jax import storage

CONFIG = 'config.json'
CONFIG_CHANGES = 'config_changes.jsonl'
HISTORY = 'eval_history.jsonl'
EVAL = 'eval.json'
CHECKPOINTS = 'checkpoints'
CORRUPT_CHECKPOINTS = 'checkpoints_corrupt'
LOCK = '.lock'
RUN = 'run.json'
# Orbax's JSON item file inside a checkpoint's step folder.
_ITEM_FILE = 'metadata'


def path(workdir: str, name: str) -> str:
  """WORKDIR/name."""
  return os.path.join(workdir, name)


def url_problem(workdir: str) -> str | None:
  """Why a workdir URL cannot be used (an unsupported scheme, a missing
  package), or None (a local path, or gs:// with gcsfs installed)."""
  return storage.url_problem(workdir)


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not a folder, unwritable, full, a bad name
  or a lock file that is not a regular file (one-line message)."""


def cannot_write(target: str, error: OSError) -> WorkdirError:
  return WorkdirError(f'cannot write {target} ({error.strerror or error}); '
                      'nothing of it was written: free space (or fix the '
                      'folder) and rerun')


def _atomic_write_bytes(target: str, data: bytes) -> None:
  """Writes `data` at `target` through a renamed temporary file.

  Raises:
    WorkdirError: it cannot be written (full disk, read-only folder); the
      old content, if any, is unchanged and no temporary file is left.
  """
  try:
    storage.write_bytes(target, data)
  except OSError as e:
    raise cannot_write(target, e) from None


def _append(target: str, text: str) -> None:
  """Appends `text` to `target`, all of it or nothing (a failed write is
  cut back to the old size).

  Raises:
    WorkdirError: it cannot be written (full disk, read-only folder).
  """
  try:
    storage.append_bytes(target, text.encode())
  except OSError as e:
    raise cannot_write(target, e) from None


def _atomic_write(target: str, text: str) -> None:
  _atomic_write_bytes(target, text.encode())


# ---------------------------------------------------------------- config.json


def config_to_dict(config) -> dict[str, Any]:
  """The JSON form of a ConfigDict (tuples become lists), as in config.json."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def read_config_dict(workdir: str) -> dict[str, Any] | None:
  """config.json as a dict, or None when the file does not exist.

  Raises:
    ValueError: the file exists but is not valid JSON.
  """
  target = path(workdir, CONFIG)
  try:
    data = storage.read_bytes(target)
  except FileNotFoundError:
    return None
  try:
    return json.loads(data.decode())
  except ValueError as e:
    raise ValueError(f'{target} is not valid JSON ({e})') from e


def read_config(workdir: str):
  """config.json as a ConfigDict (FileNotFoundError when missing)."""
  import ml_collections
  tree = read_config_dict(workdir)
  if tree is None:
    raise FileNotFoundError(f'{path(workdir, CONFIG)} is missing: not a '
                            'training workdir')
  return ml_collections.ConfigDict(tree)


def write_config(workdir: str, config) -> None:
  """Writes config.json atomically."""
  _atomic_write(
      path(workdir, CONFIG),
      json.dumps(config_to_dict(config), indent=2) + '\n')


def record_config_changes(workdir: str, changes: list[str],
                          allowed: bool) -> None:
  """Appends one line {time, changes, allow_config_change} to
  config_changes.jsonl."""
  record = {
      'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
      'changes': changes,
      'allow_config_change': allowed
  }
  _append(path(workdir, CONFIG_CHANGES), json.dumps(record) + '\n')


# ---------------------------------------------------------------- run id


def run_id(workdir: str) -> str | None:
  """The run id of run.json, or None (no file, or not a run id)."""
  try:
    value = json.loads(storage.read_bytes(path(workdir,
                                               RUN)).decode()).get('run_id')
  except (OSError, ValueError, AttributeError):
    return None
  return value if isinstance(value, str) and value else None


def ensure_run_id(workdir: str) -> str:
  """The workdir's run id; at the first start a new one (or, when run.json
  is gone, the one its newest checkpoint carries) is written to run.json."""
  existing = run_id(workdir)
  if existing:
    return existing
  adopted = next((d.get('run_id')
                  for s in reversed(checkpoint_steps(workdir))
                  for d in [checkpoint_item(workdir, s, 'digest')]
                  if isinstance(d, dict) and d.get('run_id')), None)
  new = adopted or uuid.uuid4().hex
  _atomic_write(path(workdir, RUN), json.dumps({'run_id': new}) + '\n')
  return new


# ---------------------------------------------------------------- history


def append_history(workdir: str, record: dict[str, Any]) -> None:
  """Appends one evaluation record (one JSON line) to eval_history.jsonl,
  all of it or nothing (`WorkdirError` when it cannot be written)."""
  _append(path(workdir, HISTORY), json.dumps(record) + '\n')


def _parse_line(line: bytes) -> dict[str, Any] | None:
  """A history line as a record, or None when it is not one: not UTF-8, not
  a JSON object, or a 'step' that is not an integer >= 0, an 'epoch' that is
  not one, or an ensemble top-1 outside [0, 1] (a hand-edited or damaged
  line)."""
  try:
    record = json.loads(line.decode('utf-8'))
  except (UnicodeDecodeError, ValueError, RecursionError):
    return None
  if not isinstance(record, dict):
    return None
  step, epoch = record.get('step'), record.get('epoch', 0)
  if type(step) is not int or step < 0 or type(epoch) is not int or epoch < 0:
    return None
  ensemble = record.get('ensemble', {})
  if not isinstance(ensemble, dict):
    return None
  top1 = ensemble.get('top1')  # None: a non-finite evaluation, kept.
  if top1 is not None and not (type(top1) in (int, float) and
                               0.0 <= top1 <= 1.0):
    return None
  return record


def _history_lines(workdir: str) -> list[tuple[bytes, dict[str, Any] | None]]:
  """(line, record or None) of every complete line of eval_history.jsonl
  (a last line cut short by a kill has no newline and is dropped); one
  warning names the file when any complete line is not a record."""
  target = path(workdir, HISTORY)
  try:
    lines = storage.read_bytes(target).split(b'\n')[:-1]  # Cut-short tail.
  except (FileNotFoundError, IsADirectoryError):
    return []
  parsed = [(line + b'\n', _parse_line(line)) for line in lines if line.strip()]
  bad = sum(record is None for _, record in parsed)
  if bad:
    logging.warning(
        '%s: skipped %d line(s) that are not evaluation records '
        '(not UTF-8 JSON, or a step, epoch or top-1 out of '
        'range).', target, bad)
  return parsed


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The evaluation records of eval_history.jsonl, in file order.

  Blank, malformed, out-of-range or truncated lines are skipped (one
  warning); [] without a file.
  """
  return [r for _, r in _history_lines(workdir) if r is not None]


def truncate_history(workdir: str, step: int) -> None:
  """Drops the records newer than `step` (written before a kill, after the
  last checkpoint), and any line that is not a record; a file with nothing
  to drop is left as it is (not rewritten)."""
  target = path(workdir, HISTORY)
  if not storage.exists(target):
    return
  kept = b''.join(line for line, record in _history_lines(workdir)
                  if record is not None and record['step'] <= step)
  if storage.read_bytes(target) != kept:
    _atomic_write_bytes(target, kept)


# ---------------------------------------------------------------- eval.json


def to_json(result: dict[str, Any]) -> str:
  """Deterministic strict JSON: sorted keys, indent 2, trailing newline."""
  return json.dumps(result, sort_keys=True, indent=2, allow_nan=False) + '\n'


def write_json(result: Any, target: str) -> str:
  """Writes `to_json(result)` atomically at `target`; returns the path."""
  _atomic_write(target, to_json(result))
  return target


# ---------------------------------------------------------------- outputs

# The files and folders of a workdir that runs read back: an output
# (`evaluate --output`, plots, `analysis --output`) never replaces them.
_INPUTS = (CONFIG, CONFIG_CHANGES, HISTORY, LOCK, CHECKPOINTS,
           CORRUPT_CHECKPOINTS)
_EVENTS_PREFIX = 'events.out.tfevents.'


def owned_input(workdirs: list[str], target: str) -> str | None:
  """The workdir file or folder that writing `target` would replace or
  write into (e.g. 'run/config.json'), or None when `target` is free.

  Args:
    workdirs: the runs read by the command.
    target: the path it is about to write.
  """
  real = _real(target)
  for workdir in workdirs:
    root = _real(workdir)
    if os.path.dirname(real) == root and os.path.basename(real).startswith(
        _EVENTS_PREFIX):
      return real
    for name in _INPUTS:
      owned = os.path.join(root, name)
      if real == owned or real.startswith(owned + '/'):
        return owned
  return None


def _real(target: str) -> str:
  """A local path resolved (symlinks, '..'); a URL without trailing '/'."""
  return (target.rstrip('/')
          if storage.is_url(target) else os.path.realpath(target))


def check_writable(folder: str) -> None:
  """Writes and removes a probe file in `folder`, or, while it does not
  exist yet, in its nearest existing parent (nothing is created).

  Raises:
    OSError: the folder cannot be written (read-only, full).
  """
  if storage.is_url(folder):  # A bucket: an object written and removed.
    probe = storage.join(folder, f'.write_probe{os.getpid()}')
    storage.write_bytes(probe, b'ok')
    storage.filesystem(probe).rm(probe)
    return
  folder = os.path.abspath(folder)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise NotADirectoryError(20, 'Not a directory', folder)
  probe = os.path.join(folder, f'.write_probe{os.getpid()}')
  with open(probe, 'w') as f:
    f.write('ok')
  os.remove(probe)


# ---------------------------------------------------------------- checkpoints


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoint folders (complete or not), ascending."""
  return sorted(
      int(n)
      for n in storage.listdir(path(workdir, CHECKPOINTS))
      if n.isdigit())


def available_steps(workdir: str) -> list[int]:
  """Steps whose checkpoint is complete on disk (state and digest written,
  orbax's commit marker present), ascending; the bytes are not verified
  here (`checkpointing.restore_variables` does)."""
  folder = path(workdir, CHECKPOINTS)
  steps = []
  for step in checkpoint_steps(workdir):
    step_dir = storage.join(folder, str(step))
    if (storage.isfile(storage.join(step_dir, 'digest', _ITEM_FILE)) and
        storage.isdir(storage.join(step_dir, 'state')) and
        storage.exists(storage.join(step_dir, 'commit_success.txt'))):
      steps.append(step)
  return steps


def checkpoint_item(workdir: str, step: int, item: str) -> Any:
  """A JSON item ('config', 'digest') of the checkpoint folder `step`, or
  None when it is missing or not JSON (the digest check reports damage)."""
  target = storage.join(path(workdir, CHECKPOINTS), str(step), item, _ITEM_FILE)
  try:
    return json.loads(storage.read_bytes(target).decode())
  except (OSError, ValueError):
    return None


def binding_problem(workdir: str, step: int, record: dict[str,
                                                          Any]) -> str | None:
  """Why a checkpoint's digest record does not belong to the folder `step`
  of this workdir, or None when it does.

  The step it was saved at must be the folder's name (a renamed folder), its
  run id the workdir's run.json (another run's checkpoint copied in), and the
  config stored beside it must hash as it did when saved. Fields a record
  lacks (older checkpoints) are not checked.
  """
  if record.get('step', step) != step:
    return (f'the folder {step} holds the checkpoint saved at step '
            f'{record["step"]} (a renamed folder)')
  ours = run_id(workdir)
  if record.get('run_id') and ours and record['run_id'] != ours:
    return (f'the checkpoint at step {step} belongs to another run (run id '
            f'{record["run_id"][:12]}, this workdir\'s is {ours[:12]})')
  if 'config_sha256' in record:
    stored = checkpoint_item(workdir, step, 'config')
    if not isinstance(stored, dict) or (config_sha256(stored)
                                        != record['config_sha256']):
      return (f'the config stored with the checkpoint at step {step} was '
              'changed or removed after the save')
  return None


def stored_config(workdir: str) -> dict[str, Any] | None:
  """The config stored with the newest checkpoint that has one and belongs
  to this workdir (`binding_problem`), or None."""
  for step in reversed(checkpoint_steps(workdir)):
    config = checkpoint_item(workdir, step, 'config')
    record = checkpoint_item(workdir, step, 'digest')
    if isinstance(config, dict) and not (isinstance(
        record, dict) and binding_problem(workdir, step, record)):
      return config
  return None


def config_sha256(config: dict[str, Any]) -> str:
  """SHA-256 of a config dict's canonical JSON (sorted keys)."""
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

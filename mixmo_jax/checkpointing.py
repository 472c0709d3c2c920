"""Verified orbax checkpoints: atomic, digest-checked, restore-or-init.

Each checkpoint is an orbax `Composite` of the training state (`state`: step,
params, batch_stats, opt_state) and a JSON `digest`: the SHA-256 of every
array's path, dtype, shape and bytes. Orbax writes both atomically (a
temporary folder renamed when complete, so a run killed mid-write leaves no
half checkpoint behind), but it does not notice bytes overwritten inside an
array file later; the digest does. On restore a checkpoint that fails to load
or to verify is skipped with a warning and, once an older one restores,
moved to `checkpoints_corrupt/`; when none is good the error is raised and
nothing is moved, never a silent restart from scratch over an existing
workdir.
"""
import hashlib
import os
import shutil
import time
from typing import Any, Optional, Tuple

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from mixmo_jax import workdir as wd

CHECKPOINT_DIR = wd.CHECKPOINTS
CORRUPT_DIR = wd.CORRUPT_CHECKPOINTS


class CheckpointError(RuntimeError):
  """No checkpoint of an existing run could be restored and verified."""


def tree_digest(tree: Any) -> str:
  """SHA-256 over (path, dtype, shape, bytes) of every leaf, in path order."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)  # Replicated: every process has it all.
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f'{array.dtype.str}{array.shape}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _digest_record(state: Any, step: int) -> dict:
  """The stored digest: of the whole state and of each top-level part."""
  parts = {k: tree_digest(v) for k, v in state.items()}
  return {'sha256': tree_digest(state), 'parts': parts, 'step': step}


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


class Checkpointer:
  """Periodic verified checkpoints of a pytree `state` in `workdir`."""

  def __init__(self, workdir: str, max_to_keep: int = 3,
               read_only: bool = False):
    """Opens the workdir's checkpoints.

    Args:
      workdir: the run directory (checkpoints live in workdir/checkpoints).
      max_to_keep: checkpoints kept (at least 2, a fallback for a bad one).
      read_only: for evaluation and prediction, possibly while the run is
        still training: create nothing and never clean up the temporary
        folder of a checkpoint that the trainer is writing.
    """
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(max_to_keep, 2),
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Saves `state` at `step` with its digest (every process must call)."""
    if step in self.manager.all_steps():
      return
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        digest=ocp.args.JsonSave(_digest_record(state, step)))
    self.manager.save(step, args=args, force=True)
    self.manager.wait_until_finished()

  def _restore_step(self, step: int, abstract_state: Any) -> Any:
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        digest=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    expected = restored['digest']['sha256']
    actual = tree_digest(restored['state'])
    if actual != expected:
      raise CheckpointError(
          f'digest mismatch at step {step}: stored {expected[:12]}..., '
          f'restored bytes give {actual[:12]}...')
    return restored['state']

  def _quarantine(self, step: int, reason: Exception) -> None:
    logging.warning('Checkpoint at step %d is unusable (%s); moving it to %s; '
                    'resuming from the previous one.', step, reason,
                    CORRUPT_DIR)
    if jax.process_index() == 0:
      target = os.path.join(self.workdir, CORRUPT_DIR, f'{step}-{int(time.time())}')
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()

  def restore_latest(self, abstract_state: Any,
                     step: Optional[int] = None) -> Tuple[Optional[Any], int]:
    """Restores the newest verified checkpoint (or exactly `step`).

    Args:
      abstract_state: pytree of arrays or `jax.ShapeDtypeStruct`s with the
        target shardings (e.g. the freshly initialised state).
      step: restore this step only (no fallback) if given.

    Returns:
      (state, step), or (None, 0) when the workdir has no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none restores and verifies.
    """
    abstract_state = _abstract(abstract_state)
    if step is not None:
      return self._restore_step(step, abstract_state), step
    steps = self.all_steps()
    failures = []
    for candidate in reversed(steps):
      try:
        state = self._restore_step(candidate, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint at step %d does not restore or verify: '
                        '%s', candidate, e)
        failures.append((candidate, e))
        continue
      # Only once an older one is good: the newer ones are moved aside (a
      # target that fits none, e.g. a changed model, moves nothing).
      for bad, reason in failures:
        self._quarantine(bad, reason)
      return state, candidate
    if steps:
      reasons = '; '.join(f'step {s}: {" ".join(str(e).split())[:200]}'
                          for s, e in failures)
      raise CheckpointError(
          f'none of the checkpoints {steps} in {self.directory} restores and '
          f'verifies ({reasons}); refusing to start from scratch over an '
          'existing run (move the checkpoints away to do that deliberately)')
    return None, 0

  def close(self):
    self.manager.close()


def restore_variables(workdir: str, abstract_variables: Any,
                      step: Optional[int] = None) -> Tuple[Any, int]:
  """Reads only {'params', 'batch_stats'} of a checkpoint, verified.

  Read-only (for evaluation and prediction, possibly while the run trains).

  Args:
    workdir: a training workdir.
    abstract_variables: {'params', 'batch_stats'} trees of
      `jax.ShapeDtypeStruct`s with the target shardings.
    step: the checkpoint step (default: the latest).

  Returns:
    (variables, step).

  Raises:
    CheckpointError: no checkpoint (at `step`), or a digest mismatch.
  """
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
      raise CheckpointError(f'no checkpoint at step {step} in '
                            f'{ckpt.directory}; available: {steps}')
    step = steps[-1] if step is None else step
    item = dict(abstract_variables)
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
        digest=ocp.args.JsonRestore())
    restored = ckpt.manager.restore(step, args=args)
  finally:
    ckpt.close()
  parts = restored['digest']['parts']
  for name, tree in restored['state'].items():
    if tree_digest(tree) != parts[name]:
      raise CheckpointError(f'digest mismatch for {name} at step {step} in '
                            f'{ckpt.directory}: the checkpoint is corrupt')
  return restored['state'], step

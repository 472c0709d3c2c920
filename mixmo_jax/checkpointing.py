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

Rotation keeps the newest `max_to_keep` checkpoints and, beyond them, the
one of best ensemble test top-1 (the paper's best-epoch protocol, Appendix
6.5): a checkpoint saved with `metrics={'top1': ...}` competes in orbax's
`BestN` preservation policy (the latest one on ties, as `best_on_test`),
and `Checkpointer.best` / `step='best'` find it.
"""
import hashlib
import os
import re
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from mixmo_jax import cli, storage, workdir as wd

CHECKPOINT_DIR = wd.CHECKPOINTS
CORRUPT_DIR = wd.CORRUPT_CHECKPOINTS
BEST = 'best'  # The step name of the checkpoint of best test top-1.
_SETTLE_S = 1.0  # After a failed write, for the writes still in flight.
# A checkpoint step: a number, BEST, or None for the newest that verifies.
Step = int | str | None


class CheckpointError(RuntimeError):
  """No checkpoint of an existing run could be restored and verified, or a
  checkpoint could not be written (one-line message)."""


class NonFiniteStateError(RuntimeError):
  """The state to save has NaN or inf values: it is never saved."""


def first_nonfinite(tree: Any) -> str | None:
  """The path of the first floating leaf with a NaN or inf, or None."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)
    array = np.asarray(leaf)
    if (np.issubdtype(array.dtype, np.inexact) and
        not np.isfinite(array).all()):
      return jax.tree_util.keystr(path)
  return None


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


def _digest_record(state: Any, step: int, run_id: str | None,
                   config: dict[str, Any] | None) -> dict:
  """The stored digest: of the whole state and of each top-level part, with
  what it belongs to: its step, the run id and the SHA-256 of the config
  stored beside it (`check_binding`)."""
  parts = {k: tree_digest(v) for k, v in state.items()}
  record = {'sha256': tree_digest(state), 'parts': parts, 'step': step}
  if run_id:
    record['run_id'] = run_id
  if config is not None:
    record['config_sha256'] = wd.config_sha256(config)
  return record


def check_binding(workdir: str, step: int, record: dict[str, Any]) -> None:
  """A restored digest record belongs to this folder, run and config
  (`workdir.binding_problem`).

  Raises:
    CheckpointError: one line naming what does not belong.
  """
  problem = wd.binding_problem(workdir, step, record)
  if problem:
    raise CheckpointError(problem)


def _check_stored_binding(workdir: str, step: int) -> None:
  """`check_binding` of the digest file on disk, if it reads: a renamed or
  foreign checkpoint is refused before its arrays are read (a failed array
  restore leaves tensorstore work behind). The restored digest is checked
  again."""
  record = wd.checkpoint_item(workdir, step, 'digest')
  if isinstance(record, dict):
    check_binding(workdir, step, record)


def storage_reason(error: Exception) -> str:
  """The short cause of a storage error: the OS's words for its errno (also
  inside tensorstore's "... [os_error_code='28']"), else its first 200
  characters on one line."""
  code = getattr(error, 'errno', None)
  found = re.search(r"os_error_code='(\d+)'", str(error))
  if code is None and found:
    code = int(found.group(1))
  if code:
    return os.strerror(code)
  return ' '.join(str(error).split())[:200] or type(error).__name__


def _top1(metrics: dict[str, float] | None) -> float:
  """A checkpoint's rank: its ensemble test top-1, -inf without one."""
  top1 = (metrics or {}).get('top1')
  return float(top1) if isinstance(top1, (int, float)) else -float('inf')


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


class Checkpointer:
  """Periodic verified checkpoints of a pytree `state` in `workdir`."""

  def __init__(self, workdir: str, max_to_keep: int = 3,
               read_only: bool = False, config: Any = None):
    """Opens the workdir's checkpoints.

    Args:
      workdir: the run directory (checkpoints live in workdir/checkpoints).
      max_to_keep: checkpoints kept (at least 2, a fallback for a bad one).
      read_only: for evaluation and prediction, possibly while the run is
        still training: create nothing and never clean up the temporary
        folder of a checkpoint that the trainer is writing.
      config: the run's ConfigDict, stored with each checkpoint (a JSON item
        `config`) so that a resume is compared with it even without
        config.json (`workdir.stored_config`).

    Raises:
      CheckpointError: (not read_only) the checkpoint folder is not writable,
        found at start rather than after an epoch of work.
    """
    self.workdir = workdir
    # A gs:// URL goes to orbax as it is (never made absolute).
    self.directory = storage.join(storage.absolute(workdir), CHECKPOINT_DIR)
    self.config = None if config is None else wd.config_to_dict(config)
    self.run_id = None if read_only else wd.run_id(workdir)
    if read_only:  # orbax's notes on read-only managers: noise for readers.
      cli.quiet_orbax_logs()
    if not read_only and jax.process_index() == 0:
      try:
        wd.check_writable(self.directory)
      except OSError as e:
        raise CheckpointError(
            f'cannot write checkpoints in {self.directory} ({e.strerror or e})'
            '; make it writable or use another --workdir') from e
    # The newest max_to_keep and the best top-1 (a stable sort: the latest of
    # equal ones is kept); checkpoints saved without a top-1 rotate. best_fn
    # makes orbax write each checkpoint's metrics (read back by a resumed
    # run's manager); the policy alone decides what is kept.
    keep = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max(max_to_keep, 2)),
        ocp.checkpoint_managers.BestN(get_metric_fn=_top1, n=1)
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep, best_fn=_top1, best_mode='max',
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def _last_good(self) -> str:
    steps = self.all_steps()
    return (f'step {steps[-1]} in {self.directory}'
            if steps else f'none (no checkpoint in {self.directory} yet)')

  def best(self) -> tuple[float, int] | None:
    """(top1, step) of the best test top-1 among the checkpoints saved with
    metrics (the latest on ties), or None."""
    scored = [(_top1(self.manager.metrics(s)), s) for s in self.all_steps()]
    scored = [(top1, s) for top1, s in scored if top1 > -float('inf')]
    return max(scored) if scored else None

  def save(self, step: int, state: Any,
           metrics: dict[str, float] | None = None) -> None:
    """Saves `state` at `step` with its digest (every process must call).

    `metrics` ({'top1': ensemble test top-1}, when the step was evaluated;
    else none) ranks the checkpoint for the best one's preservation.

    Raises:
      NonFiniteStateError: a parameter (or any float of the state) is NaN or
        inf; nothing is written, the older checkpoints stay.
      CheckpointError: the write failed (e.g. disk full); its temporary
        folder is removed and the older checkpoints stay.
    """
    if step in self.manager.all_steps():
      return
    bad = first_nonfinite(state)
    if bad is not None:
      raise NonFiniteStateError(
          f'non-finite values (nan or inf) in the state{bad} at step {step}: '
          f'not saved; the last good checkpoint is {self._last_good()} '
          '(lower optimizer.base_learning_rate, then resume from it)')
    items = dict(
        state=ocp.args.StandardSave(state), digest=ocp.args.JsonSave(
            _digest_record(state, step, self.run_id, self.config)))
    if self.config is not None:
      items['config'] = ocp.args.JsonSave(self.config)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                        metrics=dict(metrics or {}))
      self.manager.wait_until_finished()
    except Exception as e:
      # OSError from orbax, ValueError('RESOURCE_EXHAUSTED: ...') and the
      # like from tensorstore: any storage error is the same one line. The
      # writes still in flight fail within moments and tensorstore's threads
      # report each ("Event loop is closed"): let them finish first, so that
      # the one-line error comes after them, whole.
      time.sleep(_SETTLE_S)
      self._remove_tmp(step)
      raise CheckpointError(
          f'cannot write the checkpoint at step {step} in {self.directory} '
          f'({storage_reason(e)}); the last good checkpoint is '
          f'{self._last_good()}; free space (or fix the folder) and rerun '
          'the same command to resume from it') from e

  def _remove_tmp(self, step: int) -> None:
    """Removes the temporary folder of a failed write of `step`."""
    if jax.process_index() != 0:
      return
    for name in storage.listdir(self.directory):
      if name.startswith(f'{step}.') and 'tmp' in name:
        storage.remove_tree(storage.join(self.directory, name))
    self.manager.reload()

  def _restore_step(self, step: int, abstract_state: Any) -> Any:
    _check_stored_binding(self.workdir, step)  # Before reading any array.
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
    check_binding(self.workdir, step, restored['digest'])
    return restored['state']

  def _quarantine(self, step: int, reason: Exception) -> None:
    logging.warning(
        'Checkpoint at step %d is unusable (%s); moving it to %s; '
        'resuming from the previous one.', step, reason, CORRUPT_DIR)
    if jax.process_index() == 0:
      target = storage.join(self.workdir, CORRUPT_DIR,
                            f'{step}-{int(time.time())}')
      storage.move(storage.join(self.directory, str(step)), target)
    self.manager.reload()

  def restore_latest(self, abstract_state: Any,
                     step: int | None = None) -> tuple[Any | None, int]:
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
      except Exception as e:
        logging.warning(
            'Checkpoint at step %d does not restore or verify: '
            '%s', candidate, e)
        failures.append((candidate, e))
        continue
      # Only once an older one is good: the newer ones are moved aside (a
      # target that fits none, e.g. a changed model, moves nothing).
      for bad, reason in failures:
        self._quarantine(bad, reason)
      return state, candidate
    if steps:
      reasons = '; '.join(
          f'step {s}: {" ".join(str(e).split())[:200]}' for s, e in failures)
      raise CheckpointError(
          f'none of the checkpoints {steps} in {self.directory} restores and '
          f'verifies ({reasons}); refusing to start from scratch over an '
          'existing run (move the checkpoints away to do that deliberately)')
    return None, 0

  def close(self):
    # orbax starts removing leftover temporary folders in a thread when the
    # manager is built and only waits for it in save(); close() does not. A
    # run stopped before its first save (SIGINT during start-up) would exit
    # under that thread, which then prints a traceback at interpreter
    # shutdown. Wait for it here.
    wait = getattr(self.manager, '_maybe_await_cleanup_tmp_directory', None)
    if wait is not None:
      try:
        wait()
      except Exception as e:
        logging.warning('Cleaning temporary folders in %s failed: %s',
                        self.directory, e)
    self.manager.close()


def _restore_variables_at(ckpt: Checkpointer, step: int,
                          abstract_variables: Any) -> Any:
  _check_stored_binding(ckpt.workdir, step)  # Before reading any array.
  item = dict(abstract_variables)
  args = ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=item, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
      digest=ocp.args.JsonRestore())
  restored = ckpt.manager.restore(step, args=args)
  check_binding(ckpt.workdir, step, restored['digest'])
  parts = restored['digest']['parts']
  for name, tree in restored['state'].items():
    if tree_digest(tree) != parts[name]:
      raise CheckpointError(f'digest mismatch for {name} at step {step} in '
                            f'{ckpt.directory}: the checkpoint is corrupt')
  return restored['state']


def _one_line(error: Exception, limit: int = 200) -> str:
  return ' '.join(str(error).split())[:limit]


def restore_variables(workdir: str, abstract_variables: Any,
                      step: Step = None) -> tuple[Any, int]:
  """Reads only {'params', 'batch_stats'} of a checkpoint, verified.

  Read-only (for evaluation and prediction, possibly while the run trains):
  a damaged newest checkpoint (truncated array file, missing digest, empty
  step folder) is skipped with a one-line warning for the newest one that
  verifies, as training does; nothing is moved.

  Args:
    workdir: a training workdir.
    abstract_variables: {'params', 'batch_stats'} trees of
      `jax.ShapeDtypeStruct`s with the target shardings.
    step: exactly this checkpoint step (no fallback), or BEST: the one of
      best test top-1 (`Checkpointer.best`); default: the newest that
      verifies.

  Returns:
    (variables, step).

  Raises:
    CheckpointError: no checkpoint (at `step`), `step` damaged, or none
      verifies; no checkpoint ranked by test top-1 for BEST.
  """
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if step == BEST:
      best = ckpt.best()
      step = None if best is None else best[1]
      if step is None:
        raise CheckpointError(
            f'no checkpoint in {ckpt.directory} was saved with its test '
            f'top-1 (steps {steps}): --step=best needs a run that evaluates '
            'every epoch (eval_every_epochs) with keep_best_checkpoint')
    if not steps or (step is not None and step not in steps):
      raise CheckpointError(f'no checkpoint at step {step} in '
                            f'{ckpt.directory}; available: {steps}')
    if step is not None:
      step = int(step)  # An int here: BEST was resolved above.
      try:
        return _restore_variables_at(ckpt, step, abstract_variables), step
      except Exception as e:
        raise CheckpointError(
            f'the checkpoint at step {step} in {ckpt.directory} does not '
            f'restore or verify ({_one_line(e)}); other steps: '
            f'{[s for s in steps if s != step]}') from e
    failures = []
    for candidate in reversed(steps):
      try:
        variables = _restore_variables_at(ckpt, candidate, abstract_variables)
      except Exception as e:
        failures.append(f'step {candidate}: {_one_line(e)}')
        continue
      if failures:
        logging.warning(
            'Checkpoint(s) in %s skipped (%s); using step %d, '
            'the newest that verifies.', ckpt.directory, '; '.join(failures),
            candidate)
      return variables, candidate
    raise CheckpointError(f'none of the checkpoints {steps} in '
                          f'{ckpt.directory} restores and verifies '
                          f'({"; ".join(failures)})')
  finally:
    ckpt.close()

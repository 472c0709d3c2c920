"""Restoring trained runs for evaluation, and their members' predictions.

A `Run` is read from its workdir alone (config.json and the newest verified
checkpoint).  Several runs form one ensemble: their members' logits are
concatenated along the member axis, [N, sum_r M_r, C], so a deep ensemble
of M = 1 networks and an ensemble of N MixMo networks (paper Sec. 4.6)
average all N x M predictions.
"""
import dataclasses
import os
from typing import Any
from collections.abc import Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from mixmo_jax import (checkpointing, config_validation, data, models,
                       resume_config, storage, sharding, workdir as wd)
from mixmo_jax.evaluation import inference

# Fields every run of an ensemble must share (same test set, same classes);
# a dataset's spec may add more (`DatasetSpec.test_set_fields`).
SHARED_FIELDS = ('dataset', 'num_classes', 'image_size')


class EvaluationError(ValueError):
  """An input of the evaluation is missing or unusable (one-line message)."""


class NonFiniteOutputError(EvaluationError):
  """A checkpoint predicts NaN or inf logits: it never gets a score."""


def check_finite(logits: np.ndarray, where: str) -> None:
  """Raises `NonFiniteOutputError` naming `where` (the checkpoint) when any
  logit is NaN or inf."""
  logits = np.asarray(logits)
  if not np.isfinite(logits).all():
    bad = int(
        np.sum(~np.isfinite(logits).all(
            axis=tuple(range(1, logits.ndim))))) if logits.ndim > 1 else 1
    raise NonFiniteOutputError(
        f'the checkpoint {where} predicts NaN or inf logits for {bad} of '
        f'{len(logits)} images: its parameters diverged; it cannot be '
        'scored (evaluate an earlier --step or retrain)')


@dataclasses.dataclass
class Run:
  """A restored run: its workdir, config (from config.json), variables, step."""
  workdir: str
  config: ml_collections.ConfigDict
  variables: Any
  step: int


# ---------------------------------------------------------------- loading


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's checkpoints were trained with.

  The config stored with the newest checkpoint is the source of truth:
  config.json is only compared with it (one warning naming the fields when
  they differ; a missing or unreadable config.json is written again from
  it). Checkpoints without a stored config (older versions) fall back to
  config.json.

  Raises:
    EvaluationError: no such folder, no checkpoint, or no config at all.
  """
  if not storage.isdir(workdir):
    raise EvaluationError(f'workdir {workdir} does not exist')
  ckpt_dir = wd.path(workdir, wd.CHECKPOINTS)
  if not wd.checkpoint_steps(workdir):
    raise EvaluationError(f'no checkpoint in {ckpt_dir}')
  config_json = wd.path(workdir, wd.CONFIG)
  on_disk: dict[str, Any] | None | OSError | ValueError
  try:
    on_disk = wd.read_config_dict(workdir)
  except (OSError, ValueError) as e:
    on_disk = e
  stored = wd.stored_config(workdir)
  if stored is None:
    if on_disk is None:
      raise EvaluationError(f'{config_json} is missing and no checkpoint '
                            'stores its config: not a training workdir')
    if isinstance(on_disk, Exception):
      raise EvaluationError(f'{config_json}: cannot be read ({on_disk})')
    config = ml_collections.ConfigDict(on_disk)
    # Nothing vouches for a hand-editable file: its fields are checked (on
    # one device, which divides every batch) before anything is built.
    found = config_validation.problems(config, num_devices=1)
    if found:
      more = f' (and {len(found) - 1} more)' if len(found) > 1 else ''
      raise EvaluationError(f'{config_json}: {found[0]}{more}; restore the '
                            'file the run wrote')
    return config
  if on_disk is None or isinstance(on_disk, Exception):
    logging.warning(
        '%s is %s: using the config stored with the checkpoints '
        'and writing it back.', config_json,
        'missing' if on_disk is None else 'not valid JSON')
    try:
      wd.write_config(workdir, ml_collections.ConfigDict(stored))
    except wd.WorkdirError as e:
      logging.warning('%s', e)
  else:
    changes = resume_config.config_changes(stored, on_disk)
    if changes:
      logging.warning(
          '%s differs from the config stored with the '
          'checkpoints (%s); using the stored one.', config_json,
          '; '.join(changes))
  return ml_collections.ConfigDict(stored)


def check_compatible(configs: Sequence[Any], workdirs: Sequence[str]) -> None:
  """Runs of an ensemble must share dataset, num_classes, image_size and the
  dataset's own test-set fields (e.g. the digits' data_seed).

  Raises:
    EvaluationError: naming the first field that differs and both values.
  """
  fields = SHARED_FIELDS + data.get_dataset(configs[0].dataset).test_set_fields
  for field in fields:
    first = configs[0].get(field)
    for config, workdir in zip(configs[1:], workdirs[1:]):
      if config.get(field) != first:
        raise EvaluationError(
            f'the runs differ in config.{field}: {workdirs[0]} has '
            f'{first!r}, {workdir} has {config.get(field)!r}; an ensemble '
            'needs the same test set and classes')


def read_configs(workdirs: Sequence[str]) -> list[ml_collections.ConfigDict]:
  """Every workdir's config.json, checked (see `read_config`) and compatible
  (see `check_compatible`); nothing is restored yet."""
  if not workdirs:
    raise EvaluationError('no workdir given')
  seen: dict[str, str] = {}
  for workdir in workdirs:
    real = storage.absolute(workdir) if storage.is_url(workdir) else (
        os.path.realpath(workdir))
    if real in seen:
      raise EvaluationError(
          f'{workdir} is given twice (also as {seen[real]}): an ensemble '
          'needs distinct runs')
    seen[real] = workdir
  configs = [read_config(w) for w in workdirs]
  check_compatible(configs, workdirs)
  return configs


def load_runs(workdirs: Sequence[str],
              step: checkpointing.Step = None) -> list[Run]:
  """Checks every workdir first (`read_configs`), then restores each run.

  Args:
    workdirs: one or more training workdirs.
    step: the checkpoint step of every run, or 'best' (each run's own best,
      `checkpointing.BEST`); default: each run's latest.

  Returns:
    list of `Run`, variables replicated on the local devices.

  Raises:
    EvaluationError: see `read_config`, `check_compatible`.
    checkpointing.CheckpointError: no checkpoint at `step`, or a corrupt one.
  """
  configs = read_configs(workdirs)
  return [restore_run(w, c, step) for w, c in zip(workdirs, configs)]


def restore_run(workdir: str, config=None,
                step: checkpointing.Step = None) -> Run:
  """The run of `workdir` (config.json unless `config` is given) at the
  newest verified checkpoint, or exactly `step`; variables replicated on the
  local devices.

  Raises:
    EvaluationError: see `read_config`.
    checkpointing.CheckpointError: no checkpoint (at `step`), `step` corrupt,
      or none verifies (a corrupt newest one is skipped with a warning).
  """
  if config is None:
    config = read_config(workdir)
  model = models.get_model(config)
  size = config.image_size
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros(
          (1, size, size, 3), np.float32), train=False))
  replicated = sharding.replicated(sharding.local_mesh())
  abstract = {
      k:
          jax.tree.map(
              lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                             sharding=replicated), shapes[k])
      for k in ('params', 'batch_stats')
  }
  variables, restored = checkpointing.restore_variables(workdir, abstract, step)
  return Run(workdir, config, variables, int(restored))


# ---------------------------------------------------------------- prediction


def predict_members(runs: Sequence[Run], images: np.ndarray, mesh,
                    eval_batch_size: int | None = None) -> np.ndarray:
  """Member logits of every run on `images`, concatenated over members.

  Args:
    runs: restored runs (each with its own model and normalisation).
    images: uint8 [N, H, W, 3] (a memory map is fine: read batch by batch).
    mesh: the mesh the variables live on.
    eval_batch_size: override of config.eval_batch_size.

  Returns:
    float32 [N, sum_r M_r, C], members in run order.

  Raises:
    NonFiniteOutputError: a run predicts NaN or inf (named by its step).
  """
  outputs = []
  for run in runs:
    logits = inference.predict_with_config(
        models.get_model(run.config), run.config, run.variables, images, mesh,
        eval_batch_size)
    check_finite(logits, f'at step {run.step} in {run.workdir}')
    outputs.append(logits)
  return np.concatenate(outputs, axis=1)

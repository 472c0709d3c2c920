"""May a workdir be resumed with this config? The config a run resumes with
is compared, field by field, with the one its checkpoints were trained with;
a change that alters the training trajectory is refused before anything is
written, unless asked for (`--allow_config_change`), and every accepted change
is recorded in the workdir (config_changes.jsonl)."""
from typing import Any

from mixmo_jax import config_validation
from mixmo_jax import workdir as wd

# Fields that do not change the training trajectory: they may differ when a
# workdir is resumed (the change is logged and recorded in the workdir).
RESUME_ALLOWED_CHANGES = (
    'eval_every_epochs',
    'checkpoint_every_epochs',
    'keep_checkpoints',
    'keep_best_checkpoint',
    'log_every_steps',
    'eval_batch_size',
    'data_dir',
    'manual_dir',
    'evaluation.ensemble',
    'evaluation.calibration_seed',
    'cpu_devices',
)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Fields whose values differ, as 'field: old -> new' lines."""
  a = config_validation.field_values(old)
  b = config_validation.field_values(new)
  return [
      f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in sorted(set(a) | set(b))
      if a.get(k) != b.get(k)
  ]


def check_resume(workdir: str, config,
                 allow_changes: bool = False) -> list[str]:
  """Compares `config` with the workdir's before resuming.

  The reference is the config stored with the newest checkpoint (so that a
  deleted config.json lets no changed config through), else config.json.
  A workdir without any checkpoint is fresh: a start that failed before its
  first checkpoint blocks no later run.

  Returns the changed fields (empty for a new workdir). Changes outside
  `RESUME_ALLOWED_CHANGES` raise `config_validation.ConfigError` unless
  `allow_changes`.
  """
  path = wd.path(workdir, wd.CONFIG)
  if not wd.checkpoint_steps(workdir):
    return []  # Never trained (e.g. a start that failed): a fresh workdir.
  old = wd.stored_config(workdir)
  if old is not None:
    path = f'the config stored with the checkpoints in {workdir}'
  else:
    try:
      old = wd.read_config_dict(workdir)
    except ValueError as e:
      raise config_validation.ConfigError(
          f'{e}; restore it or start a new workdir') from e
  if old is None:
    return []
  changes = config_changes(old, wd.config_to_dict(config))
  blocked = [
      c for c in changes if c.split(':')[0] not in RESUME_ALLOWED_CHANGES
  ]
  if blocked and not allow_changes:
    raise config_validation.ConfigError(
        f'config differs from {path} in fields that change training: '
        f'{"; ".join(blocked)} (rerun with the same config, or pass '
        '--allow_config_change to accept deliberately)')
  return changes

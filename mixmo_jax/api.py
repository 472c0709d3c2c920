"""The Python API of a complete training run: `mixmo_jax.train(config, workdir)`.

    import mixmo_jax
    config = mixmo_jax.configs.get('digits:mimo')
    config.num_epochs = 5
    mixmo_jax.train(config, '/tmp/digits_mimo')

does what `python -m mixmo_jax.main` does, so the workdir opens with
`python -m mixmo_jax.evaluate`, `mixmo_jax.predict.load` and
`python -m mixmo_jax.analysis`: validate every field (before anything is
compiled), refuse a resume with a changed config, write config.json, use
`config.cpu_devices` XLA devices on a CPU-only machine, then train
(`mixmo_jax.loop.train_and_evaluate`).
"""
import contextlib
import os
import signal
from typing import Any, Dict

from absl import logging

from mixmo_jax import config_validation, platform, workdir as wd


def split_cpu(config) -> None:
  """XLA's flags for this machine, set before jax starts its backend.

  The library's XLA defaults (`platform.apply_defaults`: CPU kernels, GPU
  determinism; the user's XLA_FLAGS win), and `config.cpu_devices` XLA CPU
  devices where XLA_FLAGS does not already set the host device count (GPUs
  and TPUs are unaffected: the flag applies to the host platform).  Once
  jax's backend is running (e.g. a notebook that already used jax) nothing
  can change any more and the run uses the devices it has.
  """
  platform.apply_defaults()
  xla_flags = os.environ.get('XLA_FLAGS', '')
  count = config.get('cpu_devices', 0)
  if (type(count) is int and count > 0  # Bad values: reported by validate.
      and not platform.backend_started()
      and 'xla_force_host_platform_device_count' not in xla_flags):
    os.environ['XLA_FLAGS'] = (
        f'{xla_flags} --xla_force_host_platform_device_count='
        f'{count}').strip()


def prepare(config, workdir: str, allow_config_change: bool = False) -> None:
  """Compares a valid `config` (`train` validates it first) with the
  workdir's and writes it.

  Raises:
    config_validation.ConfigError: a resume with a changed config (unless
      allow_config_change).
  """
  import jax  # pylint: disable=import-outside-toplevel
  changes = config_validation.check_resume(workdir, config,
                                           allow_config_change)
  if jax.process_index() != 0:
    return
  if changes:
    logging.warning('Config changed since the last run: %s', changes)
    wd.record_config_changes(workdir, changes, allow_config_change)
  wd.write_config(workdir, config)
  wd.ensure_run_id(workdir)


def _check_checkpoint_folder(workdir: str) -> None:
  from mixmo_jax import checkpointing  # pylint: disable=import-outside-toplevel
  folder = wd.path(workdir, wd.CHECKPOINTS)
  try:
    wd.check_writable(folder)
  except OSError as e:
    raise checkpointing.CheckpointError(
        f'cannot write checkpoints in {folder} ({e.strerror or e}); make it '
        'writable or use another --workdir') from e


def train(config, workdir: str, *,
          allow_config_change: bool = False) -> Dict[str, Any]:
  """Validates, locks the workdir, writes config.json and trains (resuming).

  Every config field is validated before the workdir is touched; then the
  workdir's lock is taken (one trainer per workdir, `workdir.trainer_lock`),
  the config compared with the one stored with the checkpoints, config.json
  written and the run trained.  SIGINT / SIGTERM save a checkpoint and stop;
  the previous signal handlers are restored on return.

  Args:
    config: a ConfigDict, e.g. from `mixmo_jax.configs.get('digits')`.
    workdir: the run's folder (created if needed).
    allow_config_change: resume even though fields that change training
      differ from the workdir's config (the change is recorded).

  Returns:
    The last evaluation record, see `loop.train_and_evaluate` ({'step': s,
    'finished': True} when the run had already finished).

  Raises:
    config_validation.ConfigError: see `prepare`; or a workdir named by a
      URL (`workdir.url_problem`).
    workdir.WorkdirBusyError: another trainer holds the workdir.
    workdir.WorkdirError: the workdir (or its lock file) cannot be used.
    data.DatasetUnavailableError, checkpointing.CheckpointError (also a
    failed or impossible checkpoint write), checkpointing.NonFiniteStateError,
    loop.NonFiniteLossError: from training.
  """
  if wd.url_problem(workdir):
    raise config_validation.ConfigError(wd.url_problem(workdir))
  split_cpu(config)
  config_validation.validate(config)  # Before the workdir is touched.
  import jax  # pylint: disable=import-outside-toplevel
  lock = (wd.trainer_lock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  from mixmo_jax import preemption  # pylint: disable=import-outside-toplevel
  preemption.reset()
  preemption.Preemption()  # A Ctrl-C during the slow start stops cleanly.
  try:
    with lock:
      prepare(config, workdir, allow_config_change)
      if jax.process_index() == 0:  # A read-only folder: now, not later.
        _check_checkpoint_folder(workdir)
      from mixmo_jax import loop  # pylint: disable=import-outside-toplevel
      return loop.train_and_evaluate(config, workdir)
  finally:
    preemption.reset()
    for signum, handler in handlers.items():
      if handler is not None:
        signal.signal(signum, handler)

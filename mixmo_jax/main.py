"""Entry point: `python -m mixmo_jax.main --config=configs/cifar100.py --workdir=DIR`.

Validates the config before anything heavy is imported or compiled (a bad
field exits with code 2 and a one-line message, leaving the workdir
untouched), refuses to resume a workdir with a different config, writes the
resolved config to WORKDIR/config.json and trains (mixmo_jax.trainer).
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mixmo_jax import config_validation

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config.json, '
                               'checkpoints, TensorBoard events, eval history.')
config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a variant: '
    'configs/cifar100.py:mimo+b4. Override fields with --config.FIELD=VALUE.')
_ALLOW_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume a workdir even though the config '
    'changed in fields that alter training (the change is recorded).')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call jax.distributed.initialize() (automatic on TPU '
    'pods and SLURM; pass the three flags below elsewhere).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process index (multi-process).')
EXIT_USAGE, EXIT_NONFINITE = 2, 3


def fail(message: str, code: int = EXIT_USAGE):
  """Prints one line to stderr and exits."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl flag parsing with bad overrides reported in one line, exit 2."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(f'{type(e).__name__}: {e}')


def _initialize_distributed():
  if _MULTIHOST.value or _COORDINATOR.value:
    import jax
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)


def _write_config(workdir: str, config, changes) -> None:
  import jax
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  if changes:
    logging.warning('Config changed since the last run: %s', changes)
    with open(os.path.join(workdir, config_validation.CONFIG_CHANGES_FILE),
              'a') as f:
      f.write(json.dumps({'changes': changes}) + '\n')
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config_validation.config_to_dict(config), f, indent=2)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}')
  if not _WORKDIR.value or FLAGS.config is None:
    fail('--config and --workdir are required')
  _initialize_distributed()
  config = FLAGS.config
  try:
    config_validation.validate(config)
    changes = config_validation.check_resume(_WORKDIR.value, config,
                                             _ALLOW_CHANGE.value)
  except config_validation.ConfigError as e:
    fail(e)
  _write_config(_WORKDIR.value, config, changes)

  from mixmo_jax import checkpointing, input_pipeline, trainer  # Heavy: TF.
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except trainer.NonFiniteLossError as e:
    fail(e, EXIT_NONFINITE)
  except (input_pipeline.DatasetUnavailableError,
          checkpointing.CheckpointError) as e:
    fail(e, 1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

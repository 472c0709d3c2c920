"""Entry point: `python -m mixmo_jax.main --config=configs/cifar100.py --workdir=DIR`.

Validates the config before anything is compiled (bad fields exit with code
2 and one line each, leaving the workdir untouched), takes the workdir's
lock (a second trainer exits with code 2), refuses to resume a workdir with
a different config, writes the resolved config to WORKDIR/config.json and
trains: `mixmo_jax.training.train_and_evaluate`, which `mixmo_jax.train`
calls from Python too.

Exit codes: 0 done (or already finished, or stopped by SIGTERM / SIGINT
after saving); 2 a usage error (flags, config, a busy workdir); 3 NaN or
inf in the loss or the state (never saved); 1 data unavailable or a
checkpoint that cannot be read or written.
"""
from absl import app, flags
from ml_collections import config_flags

from mixmo_jax import cli, config_validation, configs, platform
from mixmo_jax.cli import fail

__doc__ += f"""
Configs: --config=configs/DATASET.py[:METHOD[+MODIFIER...]], DATASET one of
{', '.join(configs.DATASET_CONFIGS)}; METHOD one of {', '.join(configs.METHODS)};
MODIFIER any of {', '.join(configs.MODIFIERS)} (e.g. configs/cifar100.py:cut_mixmo+b4).
Every hyperparameter is a field, set with --config.FIELD=VALUE; the fields,
their defaults and comments are in mixmo_jax/configs/base.py (print them with
python -c "import mixmo_jax; print(mixmo_jax.configs.get('digits'))").
Quote tuple values: '--config.optimizer.decay_epochs=(3,4)'; a shorter run
(--config.num_epochs=5) needs decay epochs below it, or '...decay_epochs=()'.
"""

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory: config.json, '
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
EXIT_USAGE, EXIT_NONFINITE = cli.EXIT_USAGE, 3
EXIT_INTERRUPTED = 128 + 2  # The shell's code for a SIGINT.


def parse_flags(argv):
  """absl flag parsing with bad overrides reported in one line, exit 2.

  Also loads the config file here (ml_collections defers a missing file's
  error to the first access).
  """
  try:
    remaining = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()  # A config file that failed to load raises here.
    return remaining
  except Exception as e:
    fail(cli.describe_flag_error(argv, e))


def _initialize_distributed():
  if _MULTIHOST.value or _COORDINATOR.value:
    import jax
    # Cross-process collectives on CPU hosts (no effect on GPU / TPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}')
  if not _WORKDIR.value or FLAGS.config is None:
    fail('--config and --workdir are required')
  from mixmo_jax import workdir
  if workdir.url_problem(_WORKDIR.value):
    fail(f'--workdir={workdir.url_problem(_WORKDIR.value)}')
  config = FLAGS.config
  platform.setup(config)  # XLA flags, before jax starts.
  _initialize_distributed()
  cli.start_backend()
  from mixmo_jax import locking, training
  try:  # It validates first: a bad field fails in a second.
    training.train_and_evaluate(config, _WORKDIR.value,
                                allow_config_change=_ALLOW_CHANGE.value)
  except (config_validation.ConfigError, locking.WorkdirBusyError) as e:
    fail(e)
  except workdir.WorkdirError as e:  # The folder itself: the environment.
    fail(e, 1)
  except KeyboardInterrupt:  # A second Ctrl-C (preemption.py): at once.
    fail(
        'stopped at once by a second Ctrl-C, without saving the current '
        'step; the checkpoints already written are kept: rerun the same '
        'command to resume', EXIT_INTERRUPTED)
  except Exception as e:
    # Imported only now: a refused start stays quiet (no TensorFlow logs).
    from mixmo_jax import checkpointing, data, progress  # Heavy: TF.
    if isinstance(
        e, (progress.NonFiniteLossError, checkpointing.NonFiniteStateError)):
      fail(e, EXIT_NONFINITE)
    if isinstance(
        e, (data.DatasetUnavailableError, checkpointing.CheckpointError)):
      fail(e, 1)
    raise


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

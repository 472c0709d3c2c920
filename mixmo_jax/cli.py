"""Small pieces shared by the command-line programs (main, evaluate)."""
import logging as pylogging
import os
import sys
from typing import NoReturn

from absl import flags, logging

EXIT_USAGE = 2


def fail(message, code: int = EXIT_USAGE) -> NoReturn:
  """Prints `error: ...` to stderr and exits with `code`.

  One line, or one line per problem for a `ConfigError` (its `problems`).
  """
  lines = getattr(message, 'problems', None) or [str(message)]
  for line in lines:
    print(f'error: {" ".join(str(line).split())}', file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  # At once: interpreter shutdown would print orbax's leftover coroutines of a
  # failed restore ('Event loop is closed') after the one line.
  os._exit(code)


# orbax's warnings when a reader opens checkpoints read-only, as evaluate
# and predict always do: they say nothing to the user.
_READ_ONLY_NOTES = ('Given directory is read only',
                    'CheckpointManagerOptions.read_only=True')


def start_backend() -> None:
  """Starts jax's backend, or exits with one line (code 1) when it cannot
  start, e.g. JAX_PLATFORMS naming a platform this machine lacks (jax then
  fails with a bare AssertionError)."""
  import jax
  try:
    jax.devices()
  except Exception as e:
    reason = ' '.join(str(e).split())[:200] or type(e).__name__
    fail(
        f'jax cannot start a backend with JAX_PLATFORMS='
        f'{os.environ.get("JAX_PLATFORMS") or "(unset)"} ({reason}): name '
        'a platform this machine has (e.g. cpu), or install the jax '
        'plugin of the one it names', 1)


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's INFO lines (several per checkpoint save or restore), its
  notes on read-only managers and the tracebacks its worker threads log for
  an error that the calling thread raises again (e.g. a full disk: the
  one-line error says it)."""

  def filter(self, record):
    if '/orbax/' not in record.pathname:
      return True
    if record.exc_info and record.threadName != 'MainThread':
      return False
    if str(record.msg).startswith(_READ_ONLY_NOTES):
      return False
    return record.levelno >= pylogging.WARNING


_FILTER = _QuietOrbax()


class _AbandonedOrbaxTasks(pylogging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports of orbax's
  write tasks: after a failed save (a full disk) the remaining writes fail
  too, and the save's own one-line error says it."""

  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith('Task exception was never retrieved') and
                '/orbax/' in message)


_ASYNCIO_FILTER = _AbandonedOrbaxTasks()


def _closed_loop_callback(unraisable) -> bool:
  """Whether an unraisable exception is tensorstore completing a write after
  orbax has given up on it: the future's callback finds orbax's asyncio loop
  closed. It follows a failed save, which raises its own one-line error."""
  error = unraisable.exc_value
  return (isinstance(error, RuntimeError) and
          str(error) == 'Event loop is closed')


# The hook `_quiet_unraisable_hook` passes every other report to.
_chained_unraisable_hook = sys.unraisablehook


def _quiet_unraisable_hook(unraisable) -> None:
  if not _closed_loop_callback(unraisable):
    _chained_unraisable_hook(unraisable)


def quiet_orbax_logs() -> None:
  """Keeps orbax's INFO chatter out of the logs (idempotent).

  The filter sits on absl's logger, so it also works in notebooks, where
  absl's handler is not installed. After a failed write, tensorstore's
  "Event loop is closed" reports (dozens, through `sys.unraisablehook`) and
  asyncio's reports of orbax's abandoned write tasks are dropped; every
  other unraisable exception goes to the previous hook.
  """
  logger = logging.get_absl_logger()
  if _FILTER not in logger.filters:
    logger.addFilter(_FILTER)
  asyncio_logger = pylogging.getLogger('asyncio')
  if _ASYNCIO_FILTER not in asyncio_logger.filters:
    asyncio_logger.addFilter(_ASYNCIO_FILTER)
  global _chained_unraisable_hook
  if sys.unraisablehook is not _quiet_unraisable_hook:
    _chained_unraisable_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable_hook


def _config_path(argv):
  """The value of the last --config=PATH[:variant] in argv, or None."""
  for arg in reversed(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


def _load_config_file(spec: str):
  """get_config([variant]) of the file in 'PATH[:variant]', as config_flags."""
  from mixmo_jax import configs
  return configs.load(spec)


def field_problem(config, field: str) -> str | None:
  """Why the dotted `field` is not a field of `config` ("config.model has no
  field 'x' (fields: ...)"), or None if it is."""
  node, parts = config, field.split('.')
  for i, part in enumerate(parts):
    parent = '.'.join(['config'] + parts[:i])
    if not hasattr(node, 'keys') or part not in node:
      known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else ''
      return (f'{parent} has no field {part!r} '
              f'(fields: {known or "none, it is a " + type(node).__name__})')
    node = node[part]
  return None


def _override_problem(config, arg: str):
  """Why `--config.FIELD=VALUE` does not fit `config`, or None if it does."""
  field, _, value = arg[len('--config.'):].partition('=')
  problem = field_problem(config, field)
  return f'--config.{field}={value}: {problem}' if problem else None


def describe_flag_error(argv, error: Exception) -> str:
  """One line for a failed flag parse, naming the flag, value and what fits.

  An unknown `--config.FIELD` surfaces from ml_collections as a bare
  AttributeError/KeyError of the last name; the override is found again by
  loading the config file and walking each `--config.` path.
  """
  message = str(error)
  if 'Traceback (most recent call last)' in message:  # Config file raised.
    head = message.split('Traceback')[0]
    last = [l for l in message.splitlines() if l.strip()][-1]
    message = f'{head.strip()} {last.strip()}'
  path = _config_path(argv)
  from mixmo_jax import configs
  problem = configs.unknown_field(error)
  if problem and path:
    return f'--config={path}: the config file {problem}'
  if isinstance(error, (AttributeError, KeyError)) and path:
    try:
      config = _load_config_file(path)
      problems = [
          p for p in (_override_problem(config, a)
                      for a in argv
                      if a.startswith('--config.')) if p
      ]
    except Exception:
      problems = []
    if problems:
      return f'unknown config field: {"; ".join(problems)}'
  flag = message.split('=', 1)[0].replace('flag --', '')
  if (isinstance(error, flags.IllegalFlagValueError) and path and
      flag.startswith('config.')):
    try:  # Wrong type: say which type the field takes.
      default = _load_config_file(path)
      for part in flag.split('.')[1:]:
        default = default[part]
      message += (f' ({flag} takes a {type(default).__name__}, like its '
                  f'default {default!r})')
    except Exception:
      pass
  return f'{type(error).__name__}: {message}'

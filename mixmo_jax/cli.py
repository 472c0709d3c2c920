"""Small pieces shared by the command-line programs (main, evaluate)."""
import logging as pylogging
import sys

from absl import logging

EXIT_USAGE = 2


def fail(message, code: int = EXIT_USAGE):
  """Prints one line `error: ...` to stderr and exits with `code`."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(code)


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's INFO lines (several per checkpoint save or restore)."""

  def filter(self, record):
    return (record.levelno >= pylogging.WARNING
            or '/orbax/' not in record.pathname)


_FILTER = _QuietOrbax()


def quiet_orbax_logs() -> None:
  """Keeps orbax's INFO chatter out of the logs (idempotent).

  The filter sits on absl's logger, so it also works in notebooks, where
  absl's handler is not installed.
  """
  logger = logging.get_absl_logger()
  if _FILTER not in logger.filters:
    logger.addFilter(_FILTER)

"""Why a command ends early, and what the command line prints for it.

A UserError is a mistake the user can fix (config, data, workdir, a missing
or misfit checkpoint): the command prints its message alone, no traceback,
and exits with status 2. `Stopped` is a run that a signal stopped after it
saved its step (exit status 128 + the signal's number). Every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
import signal


class UserError(ValueError):
  """A mistake in the config, the data, the workdir or the command; the
  message names it and says what to do."""


class ConfigError(UserError):
  """A config value that cannot work, named with its field."""


class DivergedError(UserError, FloatingPointError):
  """A NaN or infinite training metric; says how to go on."""


class Stopped(KeyboardInterrupt):
  """A run stopped by a signal after saving its step."""

  def __init__(self, signal_name: str, step: int, workdir: Path):
    """signal_name: 'SIGTERM' or 'SIGINT', or '' for a signal that another
    process of the run received (exit status as SIGTERM's)."""
    super().__init__(
        f'stopped by {signal_name or "a signal to another process"} at step '
        f'{step}, which is saved in {str(workdir)!r}; rerun the same '
        'command to resume.'
    )
    self.exit_code = 128 + signal.Signals[signal_name or 'SIGTERM'].value

"""Stopping a run on request: SIGTERM (a scheduler's preemption) or Ctrl-C.

The first signal lets the step finish; the loop then saves it and raises
`Stopped`, which the command line turns into exit status 128 + the signal's
number. A second signal kills at once.
"""

from __future__ import annotations

from pathlib import Path
import signal

from absl import logging


class Stopped(KeyboardInterrupt):
  """A run stopped by a signal after saving its step."""

  def __init__(self, signal_name: str, step: int, workdir: Path):
    super().__init__(
        f'stopped by {signal_name} at step {step}, which is saved in '
        f'{str(workdir)!r}; rerun the same command to resume.'
    )
    self.exit_code = 128 + signal.Signals[signal_name].value


class StopRequest:
  """SIGTERM or a first Ctrl-C: finish the step, save, stop; a second one
  kills at once. Signals are left alone off the main thread."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = ''  # the signal's name, once one came
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    try:
      self._previous = {
          s: signal.signal(s, self._handle) for s in self._SIGNALS
      }
    except ValueError:  # not the main thread
      self._previous = {}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    logging.warning(
        '%s: saving the latest step, then stopping.', self.requested
    )
    signal.signal(signum, signal.SIG_DFL)

"""Stopping a run: on request (SIGTERM, a scheduler's preemption, or
Ctrl-C), or when its loss diverges.

The first signal lets the step finish (one while the run starts: its first
step; with several processes, their next log step); the loop then saves it
and raises `Stopped`, which the command line turns into exit status 128 +
the signal's number. A second signal kills at once. Once training is done
and saved, the final evaluation gets signals as a program normally does. A NaN or infinite training metric
raises `DivergedError`, which says how to continue from the last good
checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
import signal

from absl import logging
from ml_collections import ConfigDict

from vitjax import distributed, errors


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
    self.release()

  def release(self) -> None:
    """Gives the signals back to their previous handlers."""
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def agreed(self) -> str | None:
    """Whether any process of the run received a stop signal: its name here,
    '' if another process did, None if none did. Every process calls it at
    the same step."""
    if not distributed.any_process(bool(self.requested)):
      return None
    return self.requested

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    logging.warning(
        '%s: saving the latest step, then stopping.', self.requested
    )
    signal.signal(signum, signal.SIG_DFL)


class DivergedError(errors.UserError, FloatingPointError):
  """A NaN or infinite training metric; says how to go on."""


def stop_if_diverged(
    scalars: dict[str, float],
    window_start: int,
    step: int,
    ckpts,
    config: ConfigDict,
) -> None:
  """Raises DivergedError if a training metric is not finite; `ckpts`: the
  run's checkpoint.Checkpoints, for where it can continue from."""
  if all(math.isfinite(v) for v in scalars.values()):
    return
  lr, clip = config.optim.lr, config.optim.grad_clip_norm
  last = ckpts.latest_step()
  where = (
      f'The last good checkpoint, step {last}, is kept in '
      f'{str(ckpts.directory)!r}. A rerun of this config diverges again; '
      'continue from that checkpoint in a new workdir'
      if last is not None
      else 'No checkpoint was saved before; start again'
  )
  resume = (
      f' --config.train.resume_from={str(ckpts.directory.parent)!r}'
      if last is not None
      else ''
  )
  raise DivergedError(
      f'training diverged: loss {scalars["loss"]} over steps '
      f'{window_start + 1}-{step}. {where} with a lower peak learning rate '
      f'(optim.lr, now {lr:g}) or tighter gradient clipping '
      f'(optim.grad_clip_norm, now {clip:g}), e.g. python -m vitjax.main '
      '--config=<the same config and overrides> --workdir=<a new workdir>'
      f'{resume} --config.optim.lr={lr / 2:g}'
  )

"""A time budget as a deadline (`train.time_budget_minutes`).

The budget bounds the whole command, from the process's start to the final
report written. The schedules are functions of a position along them
(vitjax/optimizers.py), and a `Plan` says at which position each step runs:
a run of fixed length runs step s at position s. A budgeted run

- first times a few steps and a validation on a throwaway state; the steps
  that fit in the budget are the schedules' horizon and its first plan;
- then re-plans at every log step: from the measured time of its recent
  steps and of its validations, and the time left before the deadline less
  the final evaluation's expected time, it moves its last step, and spaces
  the positions of the steps left evenly from where it is to the horizon.
  The learning rate goes on from its current value and ends where the
  schedule ends, on a machine that slows down or speeds up midway;
- keeps the plan, the timings and the budget used in every checkpoint, so a
  resumed run continues the plan with what the budget has left.

How many steps a budgeted run takes depends on the machine and on what else
runs on it; a run of fixed length (`train.epochs`) is the reproducible one.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import numpy as np

from vitjax import errors

# tf.data's autotuning settles over the first steps; time after it does.
_WARMUP_STEPS, _TIMED_STEPS = 6, 30
STEPS_TIMED = _WARMUP_STEPS + _TIMED_STEPS  # the batches first_plan takes
# The step time is the mean over the latest log windows that span this
# long: long enough to average out a log line's jitter, short enough to
# follow a machine that slows down within a few windows.
_RECENT_SECONDS = 10.0
# Held back at the end against the estimates' errors: this share of the
# budget, and at least _MIN_SLACK_SECONDS.
_SLACK, _MIN_SLACK_SECONDS = 0.01, 5.0


def process_start() -> float:
  """time.monotonic() when this process started (imports count against a
  budget too); where /proc is missing, when this module was imported."""
  try:
    with open('/proc/self/stat') as f:
      # Field 22, after the parenthesised command name: start time in
      # clock ticks since boot.
      started = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
  except (OSError, IndexError, ValueError):
    return _IMPORTED
  age = uptime - started / os.sysconf('SC_CLK_TCK')
  return time.monotonic() - max(age, 0.0)


_IMPORTED = time.monotonic()


@dataclasses.dataclass(frozen=True)
class Plan:
  """Steps anchor_step .. end_step run at positions evenly spaced from
  anchor_position to `horizon`, the schedules' length."""

  horizon: int
  end_step: int
  anchor_step: int = 0
  anchor_position: float = 0.0

  @classmethod
  def fixed(cls, steps: int) -> Plan:
    """Step s at position s."""
    return cls(steps, steps)

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> Plan:
    # Checkpoints saved before plans were kept ran fixed schedules.
    if 'plan' not in meta:
      return cls.fixed(int(meta['total_steps']))
    return cls(**meta['plan'])

  def position(self, step: int) -> float:
    """The schedule position of the update that step `step` + 1 makes
    (optax's convention: the first update is at position 0)."""
    if step >= self.end_step:  # exactly, whatever the rounding on the way
      return float(self.horizon)
    if step < self.anchor_step:
      raise ValueError(
          f'Step {step} ran under an earlier plan: this one starts at step '
          f'{self.anchor_step}.'
      )
    pace = (self.horizon - self.anchor_position) / (
        self.end_step - self.anchor_step
    )
    return self.anchor_position + (step - self.anchor_step) * pace

  def ending_at(self, step: int, end_step: int) -> Plan:
    """The same schedule, from where step `step` is, ending at end_step."""
    return Plan(self.horizon, end_step, step, self.position(step))


@dataclasses.dataclass
class Timings:
  """What a budgeted run measures of itself."""

  step_seconds: float
  # One validation pass and its checkpoint save. Until the run times one,
  # the planning's validation, which compiled too, stands in.
  validation_seconds: float
  planning_validation_seconds: float
  validations_timed: int = 0

  @property
  def compile_seconds(self) -> float:
    """What compiling a forward pass (the validation's) takes."""
    if not self.validations_timed:
      return self.planning_validation_seconds  # an overestimate
    return max(self.planning_validation_seconds - self.validation_seconds, 0)


class Deadline:
  """When a budgeted run must have written its report, and how many steps
  still fit before then.

  final_seconds(timings) is the final evaluation's expected time (0 without
  one); the steps must leave it, and the last step's validation, room.
  """

  def __init__(
      self,
      ends_at: float,
      budget_seconds: float,
      timings: Timings,
      *,
      eval_every: int,
      final_seconds: Callable[[Timings], float],
  ):
    self.ends_at = ends_at
    self.timings = timings
    self._eval_every = eval_every
    self._final_seconds = final_seconds
    self._slack = max(_SLACK * budget_seconds, _MIN_SLACK_SECONDS)
    self._windows = collections.deque()  # (steps, seconds), latest last
    self._first_window = True
    self._validations = collections.deque(maxlen=3)  # the latest

  def observe_window(self, steps: int, seconds: float) -> None:
    """A log window's steps and training seconds (without validation)."""
    if self._first_window:
      # A resumed run's first window holds its train step's compilation.
      self._first_window = False
      return
    self._windows.append((steps, seconds))
    while (
        len(self._windows) > 1
        and sum(s for _, s in list(self._windows)[1:]) >= _RECENT_SECONDS
    ):
      self._windows.popleft()
    steps_sum = sum(n for n, _ in self._windows)
    self.timings.step_seconds = sum(s for _, s in self._windows) / steps_sum

  def observe_validation(self, seconds: float) -> None:
    """A validation's seconds, with its checkpoint save."""
    self._validations.append(seconds)
    self.timings.validation_seconds = float(np.median(self._validations))
    self.timings.validations_timed += 1

  def reserved_seconds(self) -> float:
    """Held back for the final evaluation, and as slack."""
    return self._final_seconds(self.timings) + self._slack

  def last_step(
      self, step: int, *, validating: bool, now: float | None = None
  ) -> int:
    """The last step that, from step `step` at `now`, ends in time;
    validating: step `step`'s own validation is still to run."""
    now = time.monotonic() if now is None else now
    seconds = self.ends_at - now - self.reserved_seconds()
    if validating:
      seconds -= self.timings.validation_seconds
    return step + steps_that_fit(seconds, self.timings, self._eval_every, step)

  def as_meta(self, used_seconds: float) -> dict[str, Any]:
    return {
        'timings': dataclasses.asdict(self.timings),
        'budget_seconds_used': used_seconds,
    }


def validations(step: int, end_step: int, eval_every: int) -> int:
  """The validations of steps step + 1 .. end_step: every eval_every-th,
  and the last."""
  regular = end_step // eval_every - step // eval_every
  return regular + (end_step > step and end_step % eval_every != 0)


def steps_that_fit(
    seconds: float, timings: Timings, eval_every: int, step: int = 0
) -> int:
  """How many steps after `step`, with their validations, take at most
  `seconds`."""
  cost = lambda n: n * timings.step_seconds + timings.validation_seconds * (
      validations(step, step + n, eval_every)
  )
  per_step = timings.step_seconds + timings.validation_seconds / eval_every
  n = max(math.floor((seconds - timings.validation_seconds) / per_step), 0)
  # From that estimate to the exact count: validations fall unevenly.
  while n > 0 and cost(n) > seconds:
    n -= 1
  while cost(n + 1) <= seconds:
    n += 1
  return n


def first_plan(
    budget_minutes: float,
    t_start: float,
    *,
    run_step: Callable[[dict[str, jax.Array]], Any],
    batches: Iterator[dict[str, jax.Array]],
    validate: Callable[[], Any],
    eval_every: int,
    final_seconds: Callable[[Timings], float],
    start: int = 0,
) -> tuple[int, Deadline]:
  """The last step that fits in the budget from step `start`, and the
  deadline.

  run_step(batch) runs one step of a throwaway state and returns something
  to wait for; validate() runs one validation pass of it; `batches` yields
  STEPS_TIMED batches.
  """
  budget = budget_minutes * 60.0
  t0 = time.monotonic()
  times = []
  for _, batch in zip(range(STEPS_TIMED), batches):
    t = time.monotonic()
    jax.block_until_ready(run_step(batch))
    times.append(time.monotonic() - t)
  t = time.monotonic()
  validate()
  t_validate = time.monotonic() - t
  # A busy moment on the host only slows some steps: the median estimates
  # the step itself; the re-planning corrects the rest as the run goes.
  timings = Timings(
      step_seconds=float(np.median(times[_WARMUP_STEPS:])),
      validation_seconds=t_validate,
      planning_validation_seconds=t_validate,
  )
  deadline = Deadline(
      t_start + budget,
      budget,
      timings,
      eval_every=eval_every,
      final_seconds=final_seconds,
  )
  end_step = deadline.last_step(start, validating=False)
  if end_step <= start:
    left = deadline.ends_at - time.monotonic()
    raise errors.ConfigError(
        f'train.time_budget_minutes={budget_minutes:g} leaves '
        f'{max(left, 0):.0f} s after set-up and timing '
        f'({time.monotonic() - t0:.0f} s of it went to timing), too little '
        f'for a step ({timings.step_seconds:.2f} s), a validation '
        f'({t_validate:.1f} s) and the final evaluation '
        f'({deadline.reserved_seconds():.0f} s with slack); raise it.'
    )
  logging.info(
      'Time budget %g min: %.3f s/step, validation %.1f s every %d '
      'steps, %.0f s left, %.0f s of it kept for the final evaluation -> '
      '%d steps, re-planned as the run goes.',
      budget_minutes,
      timings.step_seconds,
      t_validate,
      eval_every,
      deadline.ends_at - time.monotonic(),
      deadline.reserved_seconds(),
      end_step - start,
  )
  return end_step, deadline

"""How long a run trains, behind one object: `Budget`. A fixed number of
steps (`train.epochs`), or a deadline (`train.time_budget_minutes`) for the
whole command, from the process's start to the final report written.

The schedules are functions of a position along them, and a `Plan` says
at which position each step runs (vitjax/trainer.py): a run of fixed
length runs step s at position s. A budgeted run first times a few steps
(each with its batch), a validation and a checkpoint save on a throwaway
state (`time_steps`): the steps that fit, leaving room for the
validations and for the final evaluation's expected time
(evaluate.expected_seconds), are the schedules' horizon and the first
plan. At every log step it re-plans (`Budget.observe_window`) from the
measured time of its recent steps and validations: it moves its last step
and spaces the positions of the steps left evenly from where it is to the
horizon, so the learning rate goes on from its current value and ends
where the schedule ends, on a machine that slows down or speeds up midway.
Every checkpoint keeps the plan, the timings and the budget used
(`Budget.meta`): a resumed run continues with what the budget has left.
One stopped between validations (a stop saves its step unvalidated) and
resumed with its budget spent trains one more step, to validate it.

How many steps a budgeted run takes depends on the machine and on what else
runs on it; a run of fixed length is the reproducible one. With several
processes, process 0's clock decides for all.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from pathlib import Path
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
from ml_collections import ConfigDict
import numpy as np
import psutil

from vitjax import checkpoint, errors, evaluate, parallel, trainer
from vitjax.data import sources

# tf.data's autotuning settles over the first steps; time after it does.
_WARMUP_STEPS, _TIMED_STEPS = 6, 30
STEPS_TIMED = _WARMUP_STEPS + _TIMED_STEPS  # the batches time_steps takes
# The step time is the mean over the latest log windows that span this
# long: long enough to average out a log line's jitter, short enough to
# follow a machine that slows down within a few windows.
_RECENT_SECONDS = 10.0
# Held back at the end against the estimates' errors: this share of the
# budget, and at least _MIN_SLACK_SECONDS.
_SLACK, _MIN_SLACK_SECONDS = 0.01, 5.0
# A re-plan is logged when it moves the end by more than this share.
_LOGGED_MOVE = 0.05


def process_start() -> float:
  """time.monotonic() when this process started: imports count against a
  budget too."""
  age = time.time() - psutil.Process().create_time()
  return time.monotonic() - max(age, 0.0)


@dataclasses.dataclass
class Timings:
  """What a budgeted run measures of itself."""

  step_seconds: float  # a training step, with its batch
  # One validation pass and its checkpoint save. Until the run times one,
  # the planning's, whose validation compiled too, stands in.
  validation_seconds: float
  # The first validation and save of a process: compilation included.
  planning_validation_seconds: float
  validations_timed: int = 0

  @property
  def compile_seconds(self) -> float:
    """What compiling a forward pass (the validation's) takes."""
    if not self.validations_timed:
      return self.planning_validation_seconds  # an overestimate
    return max(self.planning_validation_seconds - self.validation_seconds, 0)


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


def time_steps(
    train: trainer.Trainer,
    key: jax.Array,
    batches: Iterator[dict[str, jax.Array]],
    validate: Callable[[Any], Any],
    workdir: Path,
) -> Timings:
  """Times STEPS_TIMED steps of `batches` (each with its batch's wait, as
  the run's windows count it), a validation (params -> metrics) and a
  checkpoint save (into a scratch folder of workdir) on a throwaway state;
  every process times the same steps."""
  rates = train.rates_along(1)(0.0)  # any position costs the same
  state, window, times = train.init(key), train.metrics.empty(), []
  batches = iter(batches)
  for _ in range(STEPS_TIMED):
    t = time.monotonic()
    state, window = train.step(state, next(batches), window, rates, 0.0)
    jax.block_until_ready(state.step)
    times.append(time.monotonic() - t)
  with checkpoint.scratch_saver(workdir) as save:
    t = time.monotonic()
    validate(state.params)
    save(state)
    t_validate = time.monotonic() - t
  # A busy moment on the host only slows some steps: the median estimates
  # the step itself; the re-planning corrects the rest as the run goes.
  return Timings(
      step_seconds=float(np.median(times[_WARMUP_STEPS:])),
      validation_seconds=t_validate,
      planning_validation_seconds=t_validate,
  )


class Budget:
  """Where a run's steps end, and the schedule position of each (`plan`).

  With a deadline (`ends_at`, on time.monotonic()'s clock), also how many
  steps still fit before it: the steps must leave room for their
  validations, the final evaluation (final_seconds(timings), its expected
  time) and some slack. Build it with `start`.
  """

  def __init__(
      self,
      plan: trainer.Plan,
      *,
      ends_at: float | None = None,
      budget_seconds: float = 0.0,
      timings: Timings | None = None,
      eval_every: int,
      final_seconds: Callable[[Timings], float] | None = None,
      t_start: float = 0.0,
      used_before: float = 0.0,
      resumed: bool = False,
  ):
    self.plan, self.ends_at, self.timings = plan, ends_at, timings
    self._eval_every, self._final_seconds = eval_every, final_seconds
    self._slack = max(_SLACK * budget_seconds, _MIN_SLACK_SECONDS)
    self._windows = collections.deque()  # (steps, seconds), latest last
    self._first_window = True
    self._validations = collections.deque(maxlen=3)  # the latest
    # A resumed process compiles at its first validation; a fresh one did
    # in time_steps.
    self._first_validation_compiles = resumed
    self._logged = plan  # the plan last logged
    # The budget used: used_before, and this process's time since t_start.
    self._t_start, self._used_before = t_start, used_before

  @property
  def replans(self) -> bool:
    """Whether the end moves: a deadline, not a fixed length."""
    return self.ends_at is not None

  @property
  def end_step(self) -> int:
    return self.plan.end_step

  def position(self, step: int) -> float:
    return self.plan.position(step)

  def validates(self, step: int) -> bool:
    """Whether step `step` is validated (and saved): every eval_every-th
    and the last."""
    return step % self._eval_every == 0 or step == self.end_step

  def observe_window(
      self, step: int, steps: int, seconds: float, *, validating: bool
  ) -> None:
    """A log window of `steps` steps, `seconds` of training, ending at
    step `step`, whose validation is still to run if `validating`: a
    deadline re-plans its end from it."""
    if not self.replans:
      return
    if self._first_window:
      # A resumed run's first window holds its train step's compilation.
      self._first_window = False
    else:
      self._windows.append((steps, seconds))
      while (
          len(self._windows) > 1
          and sum(s for _, s in list(self._windows)[1:]) >= _RECENT_SECONDS
      ):
        self._windows.popleft()
      self.timings.step_seconds = sum(s for _, s in self._windows) / sum(
          n for n, _ in self._windows
      )
    end_step = self.plan.end_step
    self._replan(step, validating=validating)
    if self.plan.end_step == step != end_step and not validating:
      # Every plan reserves its last step's validation; this one found no
      # room left even for one more step with it.
      logging.warning(
          'The time budget ran short at step %d: the run ends there, and '
          'its validation (%.1f s) runs past the plan.',
          step,
          self.timings.validation_seconds,
      )
    self._log_move(step)

  def observe_validation(self, seconds: float) -> None:
    """A validation's seconds, with its checkpoint save."""
    if not self.replans:
      return
    if self._first_validation_compiles:
      self._first_validation_compiles = False
      self.timings.planning_validation_seconds = seconds
    else:
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
    if self._first_validation_compiles:
      seconds -= self.timings.compile_seconds
    return step + steps_that_fit(seconds, self.timings, self._eval_every, step)

  def meta(self) -> dict[str, Any]:
    """What a checkpoint keeps of the budget, for a resume."""
    meta = {'total_steps': self.end_step, 'plan': dataclasses.asdict(self.plan)}
    if self.replans:
      meta['timings'] = dataclasses.asdict(self.timings)
      meta['budget_seconds_used'] = (
          self._used_before + time.monotonic() - self._t_start
      )
    return meta

  def log_final_evaluation(self, seconds: float) -> None:
    """Says how the final evaluation's time compares with its reserve."""
    if self.replans:
      now = time.monotonic()
      logging.info(
          'The final evaluation took %.0f s (%.0f s were kept for it); the '
          'run ends %.0f s %s its time budget.',
          seconds,
          self._final_seconds(self.timings),
          abs(self.ends_at - now),
          'inside' if now <= self.ends_at else 'past',
      )

  def _replan(self, step: int, *, validating: bool) -> None:
    """The plan that ends in time from `step` (validating: the step's own
    validation is still to run), by process 0's clock. A plan at its end
    stays there."""
    if step >= self.plan.end_step:
      return
    end_step = parallel.from_process_0(
        self.last_step(step, validating=validating)
    )
    if end_step != self.plan.end_step:
      self.plan = self.plan.ending_at(step, end_step)

  def _log_move(self, step: int) -> None:
    """Logs a plan that moved the end by over _LOGGED_MOVE since the last
    logged."""
    logged, plan = self._logged, self.plan
    if abs(plan.end_step - logged.end_step) <= _LOGGED_MOVE * logged.end_step:
      return
    logging.info(
        'Re-planned at step %d: the run ends at step %d (was %d), %.0f s '
        'from now at %.3f s/step, %.1f s per validation, %.0f s kept for '
        'the final evaluation and slack; the schedule goes on from position '
        '%.0f of %d.',
        step,
        plan.end_step,
        logged.end_step,
        self.ends_at - time.monotonic(),
        self.timings.step_seconds,
        self.timings.validation_seconds,
        self.reserved_seconds(),
        plan.position(step),
        plan.horizon,
    )
    self._logged = plan


def start(
    config: ConfigDict,
    data: sources.Dataset,
    *,
    t_start: float,
    has_teacher: bool,
    eval_every: int,
    saved: dict[str, Any] | None,
    start_step: int,
    timed: Callable[[], Timings],
) -> Budget:
  """The run's budget: a resume's (`saved`: its latest checkpoint's meta),
  a fixed one of train.epochs, or with train.time_budget_minutes the steps
  that fit from `start_step` before t_start + the budget, at the speed
  that timed() measures (time_steps)."""
  minutes = config.train.time_budget_minutes
  if minutes <= 0:
    if saved is not None:
      return Budget(trainer.Plan(**saved['plan']), eval_every=eval_every)
    steps = config.train.epochs * len(data.train) / config.train.batch_size
    return Budget(trainer.Plan.fixed(math.ceil(steps)), eval_every=eval_every)
  used = float(saved['budget_seconds_used']) if saved is not None else 0.0
  budget = Budget(
      trainer.Plan(**saved['plan'])
      if saved is not None
      else trainer.Plan.fixed(0),
      ends_at=t_start + 60 * minutes - used,
      budget_seconds=60 * minutes,
      timings=Timings(**saved['timings']) if saved is not None else timed(),
      eval_every=eval_every,
      final_seconds=functools.partial(
          evaluate.expected_seconds, config, data, has_teacher
      ),
      t_start=t_start,
      used_before=used,
      resumed=saved is not None,
  )
  if saved is not None:
    step = int(saved['step'])
    validated = budget.validates(step)  # by the plan it was saved under
    budget._replan(step, validating=False)  # pylint: disable=protected-access
    if budget.end_step <= step and not validated:
      # A stop saved it unvalidated: one more step, validated and saved,
      # rather than a final evaluation that never sees the last steps.
      budget.plan = budget.plan.ending_at(step, step + 1)
    logging.info(
        'The time budget has %.0f s left of %.0f: the run goes on to step %d.',
        budget.ends_at - time.monotonic(),
        60 * minutes,
        budget.end_step,
    )
    return budget
  t = budget.timings
  end_step = budget.last_step(start_step, validating=False)
  error = None
  if end_step <= start_step:
    error = errors.ConfigError(
        f'train.time_budget_minutes={minutes:g} leaves '
        f'{max(budget.ends_at - time.monotonic(), 0):.0f} s after set-up '
        f'and timing, too little for a step ({t.step_seconds:.2f} s), a '
        f'validation ({t.validation_seconds:.1f} s) and the final evaluation '
        f'({budget.reserved_seconds():.0f} s with slack); raise it.'
    )
  parallel.raise_together(error, 'the time budget is too short (process 0).')
  budget.plan = budget._logged = trainer.Plan.fixed(parallel.from_process_0(end_step))  # pylint: disable=protected-access
  logging.info(
      'Time budget %g min: %.3f s/step, validation %.1f s every %d steps, '
      '%.0f s left, %.0f s of it kept for the final evaluation -> %d steps, '
      're-planned as the run goes.',
      minutes,
      t.step_seconds,
      t.validation_seconds,
      eval_every,
      budget.ends_at - time.monotonic(),
      budget.reserved_seconds(),
      budget.end_step - start_step,
  )
  return budget

"""How long a run trains: a fixed number of steps (`train.epochs`), or a
deadline (`train.time_budget_minutes`), behind one object, `Budget`.

The schedules are functions of a position along them (vitjax/trainer.py),
and a `Plan` says at which position each step runs: a run of fixed length
runs step s at position s. A budget bounds the whole command, from the
process's start to the final report written. A budgeted run

- first times a few steps and a validation on a throwaway state
  (`time_steps`); the steps that fit in the budget are the schedules'
  horizon and its first plan;
- then re-plans at every log step (`Budget.observe_window`): from the
  measured time of its recent steps and of its validations, and the time
  left before the deadline less the final evaluation's expected time
  (`final_evaluation_seconds`), it moves its last step, and spaces the
  positions of the steps left evenly from where it is to the horizon. The
  learning rate goes on from its current value and ends where the schedule
  ends, on a machine that slows down or speeds up midway;
- keeps the plan, the timings and the budget used in every checkpoint
  (`Budget.meta`), so a resumed run continues the plan with what the
  budget has left.

How many steps a budgeted run takes depends on the machine and on what else
runs on it; a run of fixed length is the reproducible one. With several
processes, process 0's clock decides for all.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
from ml_collections import ConfigDict
import numpy as np
import psutil

from vitjax import errors, parallel
from vitjax.data import sources
from vitjax.models import avit

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
# The final evaluation's restore, report and figures: 2.1 s on the 2-core
# AMD EPYC Zen 4 for the CPU preset; kept with room.
_OTHER_SECONDS = 3.0


def process_start() -> float:
  """time.monotonic() when this process started: imports count against a
  budget too."""
  age = time.time() - psutil.Process().create_time()
  return time.monotonic() - max(age, 0.0)


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

  def final_seconds(self) -> float:
    """The final evaluation's expected time."""
    return self._final_seconds(self.timings)

  def reserved_seconds(self) -> float:
    """Held back for the final evaluation, and as slack."""
    return self.final_seconds() + self._slack

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


def time_steps(
    run_step: Callable[[dict[str, jax.Array]], Any],
    batches: Iterator[dict[str, jax.Array]],
    validate: Callable[[], Any],
) -> Timings:
  """Times STEPS_TIMED steps and a validation. run_step(batch) runs one
  step of a throwaway state and returns something to wait for; validate()
  runs one validation pass of it."""
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
  return Timings(
      step_seconds=float(np.median(times[_WARMUP_STEPS:])),
      validation_seconds=t_validate,
      planning_validation_seconds=t_validate,
  )


def final_evaluation_seconds(
    config: ConfigDict,
    data: sources.Dataset,
    has_teacher: bool,
    timings: Timings,
) -> float:
  """What the final evaluation (evaluate.evaluate_checkpoint) should take,
  from the timing of one validation pass and of its compilation; 0 for a
  run without one. Counted from what it runs: its forward passes in
  images, a compilation per function it jits, the speed timing as
  configured, and the rest."""
  if not config.train.final_evaluation:
    return 0.0
  ev = config.eval
  n_val, n_test = len(data.val), len(data.test)
  per_image = timings.validation_seconds / n_val
  predictors = 2 if has_teacher else 1
  # Each predictor: val and test, and two warm-up calls at the timed batch.
  images = predictors * (n_val + n_test + 2 * ev.speed_batch)
  # Each: its accuracy, cost analysis, and two timed batch sizes; the
  # model's decisions figure.
  compiles = 4 * predictors + 1
  # A timing round runs each candidate for speed_seconds, or one call.
  batch_call = max(ev.speed_seconds, ev.speed_batch * per_image)
  round_seconds = predictors * (batch_call + ev.speed_seconds)
  if config.model.name == 'avit':
    images += 2 * n_test  # its sparsity report runs both paths
    compiles += 3
    # Its batch-1 program holds every block after the first once per
    # compact width (AViT._compact_block): about that many forwards more.
    depth = config.model.depth
    tokens = (sources.IMAGE_SHAPE[0] // config.model.patch_size) ** 2 + 1
    compiles += (depth - 1) * (len(avit.compact_widths(tokens)) - 2) / depth
    round_seconds += batch_call  # its masked path, beside token removal
  if ev.quant == 'int8':
    # Calibration, conversion and the agreement with float on test.
    images += ev.quant_calibration_images + 2 * n_test
    compiles += 3
  return (
      images * per_image
      + compiles * timings.compile_seconds
      + ev.speed_rounds * round_seconds
      + _OTHER_SECONDS
  )


class Budget:
  """Where a run's steps end, and the schedule position of each: a fixed
  plan, or one re-planned against a deadline (see top). Build it with
  `start`."""

  def __init__(
      self,
      plan: Plan,
      deadline: Deadline | None = None,
      *,
      t_start: float = 0.0,
      used_before: float = 0.0,
  ):
    self.plan = plan
    self.deadline = deadline
    self._logged = plan  # the plan last logged
    self._t_start, self._used_before = t_start, used_before

  @property
  def end_step(self) -> int:
    return self.plan.end_step

  @property
  def horizon(self) -> int:
    return self.plan.horizon

  def position(self, step: int) -> float:
    return self.plan.position(step)

  def observe_window(
      self, step: int, steps: int, seconds: float, *, validating: bool
  ) -> None:
    """A log window of `steps` steps that took `seconds` to step `step`,
    whose validation is still to run if `validating`: a deadline re-plans
    its end from it."""
    if self.deadline is None:
      return
    self.deadline.observe_window(steps, seconds)
    self._replan(step, validating=validating)
    self._log_move(step)

  def observe_validation(self, seconds: float) -> None:
    """A validation's seconds, with its checkpoint save."""
    if self.deadline is not None:
      self.deadline.observe_validation(seconds)

  def meta(self) -> dict[str, Any]:
    """What a checkpoint keeps of the budget, for a resume."""
    meta = {'total_steps': self.end_step, 'plan': dataclasses.asdict(self.plan)}
    if self.deadline is not None:
      used = self._used_before + time.monotonic() - self._t_start
      meta |= self.deadline.as_meta(used)
    return meta

  def log_final_evaluation(self, seconds: float) -> None:
    """Says how the final evaluation's time compares with its reserve."""
    if self.deadline is None:
      return
    now = time.monotonic()
    logging.info(
        'The final evaluation took %.0f s (%.0f s were kept for it); the '
        'run ends %.0f s %s its time budget.',
        seconds,
        self.deadline.final_seconds(),
        abs(self.deadline.ends_at - now),
        'inside' if now <= self.deadline.ends_at else 'past',
    )

  def _replan(self, step: int, *, validating: bool) -> None:
    """The plan that ends in time from `step` (validating: the step's own
    validation is still to run): process 0's clock decides for every
    process. A plan at its end stays there."""
    if step >= self.plan.end_step:
      return
    end_step = parallel.from_process_0(
        self.deadline.last_step(step, validating=validating)
    )
    if end_step != self.plan.end_step:
      self.plan = self.plan.ending_at(step, end_step)

  def _log_move(self, step: int) -> None:
    """Logs a plan that moved the end by over _LOGGED_MOVE since the last
    logged."""
    logged, plan = self._logged, self.plan
    if abs(plan.end_step - logged.end_step) <= _LOGGED_MOVE * logged.end_step:
      return
    t = self.deadline.timings
    logging.info(
        'Re-planned at step %d: the run ends at step %d (was %d), %.0f s '
        'from now at %.3f s/step, %.1f s per validation, %.0f s kept for '
        'the final evaluation and slack; the schedule goes on from position '
        '%.0f of %d.',
        step,
        plan.end_step,
        logged.end_step,
        self.deadline.ends_at - time.monotonic(),
        t.step_seconds,
        t.validation_seconds,
        self.deadline.reserved_seconds(),
        plan.position(step),
        plan.horizon,
    )
    self._logged = plan


def start(
    config: ConfigDict,
    *,
    t_start: float,
    num_train: int,
    eval_every: int,
    final_seconds: Callable[[Timings], float],
    saved: dict[str, Any] | None,
    start_step: int,
    timed: Callable[[], Timings],
) -> Budget:
  """The run's budget: a resume's saved one (`saved`: its latest
  checkpoint's meta), a fixed one of train.epochs, or, with
  train.time_budget_minutes, the steps that fit from `start_step` as
  timed by timed() (time_steps on a throwaway state)."""
  minutes = config.train.time_budget_minutes
  seconds = minutes * 60.0
  if saved is not None:
    plan = Plan(**saved['plan'])
    if minutes <= 0:
      return Budget(plan)
    used = float(saved['budget_seconds_used'])
    deadline = Deadline(
        t_start + seconds - used,
        seconds,
        Timings(**saved['timings']),
        eval_every=eval_every,
        final_seconds=final_seconds,
    )
    budget = Budget(plan, deadline, t_start=t_start, used_before=used)
    budget._replan(int(saved['step']), validating=False)  # pylint: disable=protected-access
    logging.info(
        'The time budget has %.0f s left of %.0f: the run goes on to step %d.',
        deadline.ends_at - time.monotonic(),
        seconds,
        budget.end_step,
    )
    return budget
  if minutes <= 0:
    epochs = config.train.epochs
    return Budget(
        Plan.fixed(math.ceil(epochs * num_train / config.train.batch_size))
    )
  timings = timed()
  deadline = Deadline(
      t_start + seconds,
      seconds,
      timings,
      eval_every=eval_every,
      final_seconds=final_seconds,
  )
  end_step = deadline.last_step(start_step, validating=False)
  error = None
  if end_step <= start_step:
    error = errors.ConfigError(
        f'train.time_budget_minutes={minutes:g} leaves '
        f'{max(deadline.ends_at - time.monotonic(), 0):.0f} s after set-up '
        f'and timing, too little for a step ({timings.step_seconds:.2f} s), '
        f'a validation ({timings.validation_seconds:.1f} s) and the final '
        f'evaluation ({deadline.reserved_seconds():.0f} s with slack); raise '
        'it.'
    )
  parallel.raise_together(error, 'the time budget is too short (process 0).')
  end_step = parallel.from_process_0(end_step)
  logging.info(
      'Time budget %g min: %.3f s/step, validation %.1f s every %d steps, '
      '%.0f s left, %.0f s of it kept for the final evaluation -> %d steps, '
      're-planned as the run goes.',
      minutes,
      timings.step_seconds,
      timings.validation_seconds,
      eval_every,
      deadline.ends_at - time.monotonic(),
      deadline.reserved_seconds(),
      end_step - start_step,
  )
  return Budget(Plan.fixed(end_step), deadline, t_start=t_start)

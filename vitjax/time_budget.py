"""Sizing a schedule to a time budget (`train.time_budget_minutes`).

The budget counts from the start of the run, data loading included. A few
real steps and one validation pass are timed on a throwaway state, and the
step count is fitted so that steps * t_step + validations * t_val fills
what is left, with a margin.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import numpy as np

from vitjax import errors

# tf.data's autotuning settles over the first steps; time after it does.
_WARMUP_STEPS, _TIMED_STEPS = 6, 30
STEPS_TIMED = _WARMUP_STEPS + _TIMED_STEPS  # the batches fit_steps takes
# Logging, checkpoints and a busier machine make real steps slower than
# timed ones, the more so the smaller the step (measured on the 2-core
# CPU: 5-9% at batch 64, 13% at batch 32).
_MARGIN = 0.85


def fit_steps(
    budget_minutes: float,
    t_start: float,
    *,
    run_step: Callable[[dict[str, jax.Array]], Any],
    batches: Iterator[dict[str, jax.Array]],
    validate: Callable[[], Any],
    eval_every: int,
) -> int:
  """The number of steps that ends training inside the budget.

  run_step(batch) runs one step of a throwaway state and returns something
  to wait for; validate() runs one validation pass of it; `batches` yields
  STEPS_TIMED batches.
  """
  budget = budget_minutes * 60.0
  t0 = time.monotonic()
  times = []
  for _, batch in zip(range(_WARMUP_STEPS + _TIMED_STEPS), batches):
    t = time.monotonic()
    jax.block_until_ready(run_step(batch))
    times.append(time.monotonic() - t)
  compile_seconds = times[0]
  # A busy moment on the host only slows some steps: the lower quartile
  # estimates the step itself; the margin covers the rest.
  t_step = float(np.percentile(times[_WARMUP_STEPS:], 25))
  t = time.monotonic()
  validate()
  t_eval = time.monotonic() - t
  left = budget - (time.monotonic() - t_start) - compile_seconds
  steps = int(_MARGIN * left / (t_step + t_eval / eval_every))
  # The last step always validates: the budget must hold a step and one.
  if steps < 1 or _MARGIN * left < t_step + t_eval:
    raise errors.ConfigError(
        f'train.time_budget_minutes={budget_minutes:g} leaves '
        f'{max(left, 0):.0f} s after set-up and timing '
        f'({time.monotonic() - t0:.0f} s of it went to timing), too little '
        f'for a step ({t_step:.2f} s) and a validation ({t_eval:.1f} s); '
        'raise it.'
    )
  logging.info(
      'Time budget %.1f min: %.3f s/step, validation %.1f s every %d '
      'steps, %.0f s left -> %d steps.',
      budget_minutes,
      t_step,
      t_eval,
      eval_every,
      left,
      steps,
  )
  return steps

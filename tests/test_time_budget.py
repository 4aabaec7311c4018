"""A time budget is a deadline: plans, re-planning, and a run that slows."""

import json
import os
import re
import signal
import time
import types

import jax
import numpy as np
import pytest

from vitjax import checkpoint, errors, time_budget, train, trainer
from vitjax.data import pipelines

from tests.conftest import smoke_trainer


def test_a_fixed_plan_runs_step_s_at_position_s():
  plan = trainer.Plan.fixed(100)
  assert [plan.position(s) for s in (0, 1, 57, 99)] == [0.0, 1.0, 57.0, 99.0]


@pytest.mark.parametrize('new_end', [60, 130])
def test_a_new_plan_goes_on_from_where_the_schedule_is(new_end):
  plan = trainer.Plan.fixed(100)
  later = plan.ending_at(40, new_end)
  # The same position at the step it was made, the horizon at its end,
  # evenly between: the learning rate continues, and the schedule ends.
  assert later.position(40) == plan.position(40) == 40.0
  assert later.position(new_end) == pytest.approx(100.0)
  steps = np.arange(40, new_end + 1)
  np.testing.assert_allclose(
      np.diff([later.position(s) for s in steps]), 60 / (new_end - 40)
  )
  # As a checkpoint keeps it, and a resume reads it.
  assert trainer.Plan(**json.loads(json.dumps(later.__dict__))) == later


def test_a_plan_that_stops_where_it_stands_ends_its_schedule_there():
  plan = trainer.Plan.fixed(100).ending_at(40, 40)
  assert plan.position(40) == 100.0
  # Steps before a plan's anchor ran under the plan it replaced.
  with pytest.raises(ValueError, match='earlier plan'):
    plan.position(39)


def _deadline(ends_at, step_seconds=0.1, validation_seconds=1.0):
  """A budget of 100 s, validating every 10 steps, whose final evaluation
  takes 5 validations."""
  return time_budget.Budget(
      trainer.Plan.fixed(10_000),
      ends_at=ends_at,
      budget_seconds=100.0,
      timings=time_budget.Timings(step_seconds, validation_seconds, 3.0),
      eval_every=10,
      final_seconds=lambda t: 5 * t.validation_seconds,
  )


def test_the_last_step_leaves_room_for_validations_and_the_final_evaluation():
  deadline = _deadline(ends_at=100.0)
  # 100 s less 5 s of final evaluation and 5 s of slack: 90 s for steps of
  # 0.1 s, a 1 s validation every 10 steps and one after the last.
  assert deadline.last_step(0, validating=False, now=0.0) == 450
  assert time_budget.validations(0, 450, 10) == 45  # 45 + 45 = 90 s
  # From step 305, 12.5 s: 55 steps to 360 take 5.5 s and 6 validations;
  # 56 would end at 361 and validate once more (12.6 s).
  assert deadline.last_step(305, validating=False, now=77.5) == 360
  assert time_budget.validations(305, 361, 10) == 7
  # A validation due at this step comes first: 11.75 s from step 300 fit
  # 57 steps and 6 validations.
  assert deadline.last_step(300, validating=True, now=77.25) == 357
  # Past the deadline: no more steps.
  assert deadline.last_step(300, validating=False, now=96.0) == 300


def test_the_step_time_follows_the_recent_windows():
  deadline = _deadline(ends_at=time.monotonic() + 1000.0)
  window = lambda seconds: deadline.observe_window(
      50, 50, seconds, validating=False
  )
  window(50.0)  # the first, with compilation: ignored
  assert deadline.timings.step_seconds == 0.1
  for _ in range(20):
    window(5.0)
  assert deadline.timings.step_seconds == pytest.approx(0.1)
  for _ in range(3):  # the machine slows down 3 times
    window(15.0)
  assert deadline.timings.step_seconds == pytest.approx(0.3)
  deadline.observe_validation(0.5)
  assert deadline.timings.validation_seconds == 0.5
  # The planning's validation (3 s) compiled, the run's did not.
  assert deadline.timings.compile_seconds == 2.5


def test_a_resumed_run_takes_its_first_validation_as_compilation():
  def budget(resumed):
    return time_budget.Budget(
        trainer.Plan.fixed(10_000),
        ends_at=100.0,
        budget_seconds=100.0,
        timings=time_budget.Timings(0.1, 1.0, 3.0, validations_timed=4),
        eval_every=10,
        final_seconds=lambda t: 0.0,
        resumed=resumed,
    )

  deadline = budget(resumed=True)
  # 95 s after the slack: 2 s for each 10 steps with their validation; the
  # resumed run keeps 2 s (3 s less a validation's 1) for compiling it.
  assert budget(resumed=False).last_step(0, validating=False, now=0.0) == 470
  assert deadline.last_step(0, validating=False, now=0.0) == 460
  deadline.observe_validation(4.0)  # compiled the evaluator, then ran
  assert deadline.timings.validation_seconds == 1.0
  assert deadline.timings.compile_seconds == 3.0
  deadline.observe_validation(1.2)
  assert deadline.timings.validation_seconds == 1.2


def test_a_plan_cut_to_a_step_that_was_not_validating_says_so(caplog):
  deadline = _deadline(ends_at=time.monotonic() + 10.0)  # all reserved
  with caplog.at_level('WARNING'):
    deadline.observe_window(305, 5, 0.5, validating=False)
  assert deadline.end_step == 305 and deadline.validates(305)
  assert 'ran short at step 305' in caplog.text


@pytest.mark.slow  # compiles a train step, saves a checkpoint
def test_planning_times_each_step_with_its_batch_and_a_save(
    smoke_config, tmp_path, monkeypatch
):
  train_, batch = smoke_trainer(smoke_config)

  def late_batches():  # each batch 50 ms late, as a slow input pipeline
    while True:
      time.sleep(0.05)
      yield batch

  save = checkpoint.Checkpoints.save
  saved = []

  def slow_save(self, state, meta, score):
    saved.append(self.directory)
    time.sleep(0.3)
    save(self, state, meta, score)

  monkeypatch.setattr(checkpoint.Checkpoints, 'save', slow_save)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  timings = time_budget.time_steps(
      train_, jax.random.key(0), late_batches(), lambda p: None, workdir
  )
  assert timings.step_seconds >= 0.05
  assert timings.validation_seconds >= 0.3  # the save is in it
  assert timings.planning_validation_seconds == timings.validation_seconds
  # Saved like the run's steps, into a scratch folder that is gone.
  assert len(saved) == 1 and saved[0].is_relative_to(workdir)
  assert list(workdir.iterdir()) == []


def test_a_budget_without_room_for_a_validation_is_refused(smoke_config):
  smoke_config.train.time_budget_minutes = 0.1  # 6 s, from now
  smoke_config.train.final_evaluation = False
  # Room for steps, not for a validation (nor the slack).
  timed = lambda: time_budget.Timings(0.001, 6.0, 6.0)
  with pytest.raises(errors.ConfigError, match='too little for a step'):
    time_budget.start(
        smoke_config,
        None,
        t_start=time.monotonic(),
        has_teacher=False,
        eval_every=10_000,
        saved=None,
        start_step=0,
        timed=timed,
    )


def _before_each_step(monkeypatch, hook):
  """Calls hook(step, timing) before the next runs take the batch of each
  step; timing: a step of the throwaway state timed at the start (or of the
  log of sampled classes)."""
  make_pipeline = pipelines.make

  def hooked_pipeline(*args, **kwargs):
    pipeline = make_pipeline(*args, **kwargs)
    batches = pipeline.batches

    def hooked(start, end):
      for i, b in enumerate(batches(start, end)):
        hook(start + i, end <= time_budget.STEPS_TIMED)
        yield b

    pipeline.batches = hooked
    return pipeline

  monkeypatch.setattr(pipelines, 'make', hooked_pipeline)


def _clock_that_skips(monkeypatch):
  """The clock the run reads, and skip(seconds), which moves that clock on
  as if the run had worked that long: slow steps that cost no wall time."""
  skipped = 0.0

  def monotonic():
    return time.monotonic() + skipped

  def skip(seconds):
    nonlocal skipped
    skipped += seconds

  clock = types.SimpleNamespace(monotonic=monotonic, time=time.time)
  for module in (train, time_budget):
    monkeypatch.setattr(module, 'time', clock)
  return monotonic, skip


def _recording_first_plans(monkeypatch) -> list[int]:
  """The last steps that the next runs' first plans choose."""
  plans = []
  start = time_budget.start

  def recording(*args, **kwargs):
    budget = start(*args, **kwargs)
    if kwargs['saved'] is None:  # not a resume's
      plans.append(budget.end_step)
    return budget

  monkeypatch.setattr(time_budget, 'start', recording)
  return plans


@pytest.mark.slow
def test_a_run_that_slows_down_still_ends_in_its_budget(
    smoke_config, tmp_path, monkeypatch
):
  budget_minutes = 0.75
  smoke_config.train.time_budget_minutes = budget_minutes
  # Slow steps: re-planned at each, so that the last plan can end the
  # schedule close to the deadline.
  smoke_config.train.log_every_steps = 1
  first = _recording_first_plans(monkeypatch)
  # Every batch comes 100 ms late, and from step 40 250 ms late: the run is
  # slower than the steps the plan timed, and then slower again.
  now, skip = _clock_that_skips(monkeypatch)
  slow_from = 40
  _before_each_step(
      monkeypatch,
      lambda step, timing: skip(0.1 if timing or step < slow_from else 0.25),
  )
  t_start = now()
  report = train.train_and_evaluate(smoke_config, str(tmp_path), t_start)
  elapsed = now() - t_start
  assert report['test']['num_images'] == 80  # the final report is written
  assert elapsed <= budget_minutes * 60
  with checkpoint.Checkpoints(tmp_path) as ckpts:
    meta = ckpts.read_meta('latest')
  plan = trainer.Plan(**meta['plan'])
  # Re-planned after the slow-down began, and the schedule completed on
  # the last step.
  assert slow_from < plan.anchor_step <= meta['step'] == plan.end_step
  assert plan.horizon == first[0]
  schedule = trainer.learning_rate_schedule(
      smoke_config.optim, plan.horizon, 16, smoke_config.train.batch_size
  )
  records = [
      json.loads(l)
      for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  ]
  last = [r for r in records if r['split'] == 'train'][-1]
  assert last['step'] == plan.end_step
  # Within the last 5% of the schedule (the rate only falls there) ...
  assert last['learning_rate'] <= schedule(0.95 * plan.horizon)
  # ... and exactly where the last plan put it, unless that plan, finding
  # no room for another step, stopped the run where it stood.
  if plan.anchor_step < plan.end_step:
    np.testing.assert_allclose(
        last['learning_rate'],
        schedule(plan.position(plan.end_step - 1)),
        rtol=1e-5,
    )


@pytest.mark.slow
def test_a_budgeted_run_resumes_its_plan_with_what_is_left(
    smoke_config, tmp_path, monkeypatch
):
  budget_minutes = 0.5
  smoke_config.train.time_budget_minutes = budget_minutes
  smoke_config.train.final_evaluation = False
  first = _recording_first_plans(monkeypatch)
  _, skip = _clock_that_skips(monkeypatch)
  killed = []

  def killed_once_at_step_40(step, timing):
    if step == 40 and not timing and not killed:
      killed.append(step)
      raise RuntimeError('simulated kill')
    skip(0.1)

  _before_each_step(monkeypatch, killed_once_at_step_40)
  with pytest.raises(RuntimeError, match='simulated kill'):
    train.train_and_evaluate(smoke_config, str(tmp_path))
  with checkpoint.Checkpoints(tmp_path) as ckpts:
    saved = ckpts.read_meta('latest')
  assert saved['step'] == 32 and saved['budget_seconds_used'] > 0
  # The rerun does not plan afresh: it goes on with the saved plan's
  # schedule and the budget that is left.
  train.train_and_evaluate(smoke_config, str(tmp_path))
  assert len(first) == 1
  with checkpoint.Checkpoints(tmp_path) as ckpts:
    meta = ckpts.read_meta('latest')
  plan = trainer.Plan(**meta['plan'])
  assert plan.horizon == trainer.Plan(**saved['plan']).horizon == first[0]
  assert 32 < meta['step'] == plan.end_step
  assert meta['budget_seconds_used'] <= budget_minutes * 60


@pytest.mark.slow
def test_a_run_stopped_with_its_budget_spent_validates_its_last_step(
    smoke_config, tmp_path, monkeypatch
):
  smoke_config.train.time_budget_minutes = 0.5
  smoke_config.train.final_evaluation = False
  _, skip = _clock_that_skips(monkeypatch)

  def spent_and_stopped_at_step_20(step, timing):
    if step == 20 and not timing:
      skip(60.0)  # the budget is spent ...
      os.kill(os.getpid(), signal.SIGTERM)  # ... and the run stopped

  _before_each_step(monkeypatch, spent_and_stopped_at_step_20)
  with pytest.raises(errors.Stopped) as stopped:
    train.train_and_evaluate(smoke_config, str(tmp_path))
  step = int(re.search(r'at step (\d+)', str(stopped.value)).group(1))
  assert step % 16  # saved between validations (16 steps an epoch)
  monkeypatch.setattr(pipelines, 'make', pipelines.make)
  # The rerun has no time left: it trains one step, validated and saved,
  # for the best checkpoint to be chosen from every step trained.
  train.train_and_evaluate(smoke_config, str(tmp_path))
  with checkpoint.Checkpoints(tmp_path) as ckpts:
    assert ckpts.latest_step() == step + 1
  records = [
      json.loads(l)
      for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  ]
  assert [r['step'] for r in records if r['split'] == 'val'] == [16, step + 1]

"""Training: the jitted step and the loop, `train_and_evaluate`.

A run is a pure function of (config, seed): batches, dropout and mixing keys
all derive from the step number, so killing a run and rerunning the same
command resumes from the latest checkpoint and ends with the same
parameters and metrics as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
import time
from typing import Any, Callable

from absl import logging
from clu import metrics, parameter_overview, periodic_actions
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
import optax

from vitjax import checkpoint, distributed, errors, evaluate, families
from vitjax import metric_writers, models, optimizers
from vitjax import mixing, sharding, stopping, time_budget, train_state
from vitjax import workdir as workdir_lib
from vitjax.data import pipelines, sources
from vitjax.evaluators import classification

# What each validation logs (the report has more: per-class recall, ...).
VAL_METRICS = ('loss', 'accuracy', 'balanced_accuracy', 'worst_class_recall')


def make_metrics_cls(extra: tuple[str, ...]) -> type[metrics.Collection]:
  """Loss, accuracy, gradient norm and the objective's extras, averaged over
  a log window; the learning rate at its end."""
  names = ('loss', 'accuracy', 'grad_norm') + tuple(extra)
  fields = {n: metrics.Average.from_output(n) for n in names}
  fields['learning_rate'] = metrics.LastValue.from_output('learning_rate')
  return metrics.Collection.create(**fields)


def make_train_step(
    objective,
    optimizer: optimizers.Optimizer,
    config: ConfigDict,
    num_classes: int,
    base_key: jax.Array,
    mesh,
) -> Callable:
  """The jitted (state, batch, metrics, rates) -> (state, metrics) update;
  rates: the optimizer's learning rates for the step (its schedules at the
  step's position, vitjax/time_budget.py)."""
  aug = config.aug
  ema_decay = config.optim.ema_decay
  metrics_cls = make_metrics_cls(objective.extra_metrics)

  def step_fn(state: train_state.TrainState, batch, metrics_acc, rates):
    # Every random choice of the step derives from the step number alone.
    key = jax.random.fold_in(base_key, state.step)
    k_mix, k_dropout, k_model = jax.random.split(key, 3)
    labels = batch['label']
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, num_classes), aug.label_smoothing
    )
    images, targets = mixing.mix(k_mix, batch['image'], targets, aug)
    rngs = {'dropout': k_dropout, 'gumbel': k_model}

    def loss_of(params):
      return objective(params, images, targets, state.step, rngs)

    (loss, (logits, extras)), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state.params
    )
    new_state = state.apply_gradients_with(optimizer.at(rates), grads)
    if state.ema_params is not None:
      new_state = new_state.replace(
          ema_params=optax.incremental_update(
              new_state.params, state.ema_params, 1.0 - ema_decay
          )
      )
    step_metrics = metrics_cls.single_from_model_output(
        loss=loss,
        accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
        grad_norm=optax.tree.norm(grads),
        learning_rate=rates['learning_rate'],
        **extras,
    )
    return new_state, metrics_acc.merge(step_metrics)

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(
      step_fn,
      donate_argnums=(0, 2),
      in_shardings=(repl, data, repl, repl),
      out_shardings=(repl, repl),
  )


def train_and_evaluate(
    config: ConfigDict, workdir: str | Path, t_start: float | None = None
) -> dict[str, Any]:
  """Trains (or resumes) in workdir, then evaluates the best checkpoint
  (unless train.final_evaluation is off) and returns the report.

  t_start: time.monotonic() when the command started, from which a time
  budget counts (by default, now).
  """
  t_start = time.monotonic() if t_start is None else t_start
  workdir = Path(workdir).expanduser()
  if config.train.distributed:
    distributed.initialize()  # main.py has, before its first JAX call
  config = models.with_machine_choices(config)
  # Closes what the run opened in reverse, also when it fails: the signal
  # handlers, the lock, the checkpoints (after the save in flight), the
  # metric writers.
  with contextlib.ExitStack() as run:
    # From here a stop signal waits for the next step to save and stop.
    stop = run.enter_context(stopping.StopRequest())
    start_error, mesh, data = None, None, None
    try:
      mesh, data = _open_run(config, workdir, run)
    except (errors.UserError, OSError) as e:
      start_error = e
    # With several processes, none goes on alone into the collectives.
    distributed.raise_together(
        start_error, 'the run did not start on another process (see its log).'
    )
    distributed.check_same(
        repr(
            (
                config.to_json_best_effort(),
                data.split_id,
                checkpoint.saved_steps(workdir),
            )
        ),
        'config, data split or saved checkpoints',
    )
    data.log_counts()
    batch_size = config.train.batch_size
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    eval_every = max(1, round(config.train.eval_every_epochs * steps_per_epoch))
    log_every = config.train.log_every_steps
    family = families.build(config, data, steps_per_epoch, mesh, workdir)
    pipeline = pipelines.make(config, data, mesh)
    pipelines.log_sampled_classes(pipeline, config, data)
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    use_ema = config.optim.ema_decay > 0
    metrics_cls = make_metrics_cls(family.objective.extra_metrics)
    predict_fn = classification.make_predict_fn(
        classification.model_logits(family.model), mesh
    )

    def validate(params) -> dict[str, Any]:
      return classification.evaluate_split(
          predict_fn,
          {'params': params},
          data.val,
          config.eval.batch_size,
          mesh,
          data.num_classes,
      )

    def final_seconds(timings: time_budget.Timings) -> float:
      if not config.train.final_evaluation:
        return 0.0
      return evaluate.expected_seconds(
          config,
          data,
          has_teacher=family.teacher is not None,
          validation_seconds=timings.validation_seconds,
          compile_seconds=timings.compile_seconds,
      )

    optimizer = family.optimizer
    tx = optimizer.structure()
    train_step = make_train_step(
        family.objective, optimizer, config, data.num_classes, step_key, mesh
    )
    init = jax.jit(
        lambda key: train_state.create(
            family.model, family.init_params(key), tx, use_ema
        ),
        out_shardings=sharding.replicated(mesh),
    )

    def rates_along(horizon: int) -> Callable:
      return jax.jit(
          optimizer.schedules(horizon),
          out_shardings=sharding.replicated(mesh),
      )

    ckpts = run.enter_context(
        checkpoint.Checkpoints(workdir, config.train.keep_checkpoints)
    )
    origin, origin_meta = _starting_point(ckpts, config, workdir, data)
    if origin is not None and origin is not ckpts:
      run.enter_context(origin)  # closed once restored, or on a failure
    budget = config.train.time_budget_minutes * 60.0
    deadline, budget_used = None, 0.0
    if origin is ckpts:  # a resume: the plan it made
      plan = time_budget.Plan.from_meta(origin_meta)
      if budget > 0 and 'timings' in origin_meta:
        budget_used = float(origin_meta['budget_seconds_used'])
        deadline = time_budget.Deadline(
            t_start + budget - budget_used,
            budget,
            time_budget.Timings(**origin_meta['timings']),
            eval_every=eval_every,
            final_seconds=final_seconds,
        )
        start = int(origin_meta['step'])
        plan = _replan(plan, deadline, start, validating=False)
        logging.info(
            'The time budget has %.0f s left of %.0f: the run goes on to '
            'step %d.',
            deadline.ends_at - time.monotonic(),
            budget,
            plan.end_step,
        )
      elif budget > 0:
        logging.info(
            'This run was saved before time budgets were re-planned: it '
            'resumes its fixed plan of %d steps.',
            plan.end_step,
        )
    elif budget > 0:
      end_step, deadline = _first_plan(
          config,
          train_step,
          init,
          rates_along,
          init_key,
          metrics_cls,
          pipeline,
          validate,
          eval_every,
          len(data.train),
          t_start,
          final_seconds,
          # train.resume_from: the steps from the other run's on.
          start=int(origin_meta['step']) if origin is not None else 0,
      )
      plan = time_budget.Plan.fixed(end_step)
    else:
      plan = time_budget.Plan.fixed(
          math.ceil(config.train.epochs * len(data.train) / batch_size)
      )
    rates_at = rates_along(plan.horizon)
    best = ckpts.best_score()  # -inf before the first validation
    if origin is not None:
      state, meta = origin.restore(
          train_state.abstract(
              family.model, tx, use_ema, sharding.replicated(mesh)
          ),
          'latest',
      )
      start, train_seconds = int(meta['step']), float(meta['train_seconds'])
      if origin is not ckpts and start >= plan.end_step:
        raise errors.ConfigError(
            f'train.resume_from={config.train.resume_from!r} is at step '
            f'{start}, and this config trains {plan.end_step} steps; raise '
            'train.epochs or train.time_budget_minutes.'
        )
      logging.info(
          'Resuming from step %d of %d%s (best validation balanced '
          'accuracy so far %s).',
          start,
          plan.end_step,
          '' if origin is ckpts else f' of {origin.directory.parent}',
          f'{best:.4f}' if best > -math.inf else 'none yet',
      )
    else:
      state, start, train_seconds = init(init_key), 0, 0.0
    parameter_overview.log_parameter_overview(state.params, include_stats=False)
    logging.info(
        'Model %s: %d steps of %d images (%.1f epochs, %d steps per epoch)%s.',
        config.model.name,
        plan.end_step,
        batch_size,
        plan.end_step / steps_per_epoch,
        steps_per_epoch,
        ', re-planned against the time budget as the run goes'
        if deadline
        else '',
    )

    writer = metric_writers.create(workdir, resume_step=start)
    run.callback(writer.close)
    # A budgeted run's end moves: the plan's log lines stand for the ETA.
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=None if deadline else plan.end_step,
        every_steps=log_every,
        every_secs=None,
    )
    # A window: the steps between two log lines, whose metrics accumulate.
    window, window_start = metrics_cls.empty(), start
    t_window = time.monotonic()
    # Several processes agree on a stop at log steps only: asking the others
    # waits for the step, which one process need not do.
    stop_every_step = jax.process_count() == 1
    # A budgeted run's batches go on until its plan ends.
    batches = pipeline.batches(start, _UNBOUNDED if deadline else plan.end_step)
    step, logged_plan = start, plan
    while step < plan.end_step:
      state, window = train_step(
          state, next(batches), window, rates_at(plan.position(step))
      )
      step += 1
      log_now = step % log_every == 0
      validate_now = step % eval_every == 0 or step == plan.end_step
      stop_now = (
          stop.agreed() if stop_every_step or log_now or validate_now else None
      )
      stopping_now = stop_now is not None
      if log_now or validate_now or stopping_now:
        # Steps run asynchronously: float() waits for them, then the clock.
        scalars = {k: float(v) for k, v in window.compute().items()}
        now = time.monotonic()
        seconds = now - t_window
        stopping.stop_if_diverged(scalars, window_start, step, ckpts, config)
        train_seconds += seconds
        scalars.update(
            epoch=step / steps_per_epoch,
            images_per_second=(step - window_start)
            * batch_size
            / max(seconds, 1e-9),
        )
        writer.write_scalars(
            step, {f'train/{k}': v for k, v in scalars.items()}
        )
        if deadline and (log_now or validate_now):
          deadline.observe_window(step - window_start, seconds)
          plan = _replan(
              plan, deadline, step, validating=step % eval_every == 0
          )
          logged_plan = _log_plan(logged_plan, plan, deadline, step)
          validate_now = step % eval_every == 0 or step == plan.end_step
        window, window_start = metrics_cls.empty(), step
        # The windows tile the clock: logging and re-planning count as
        # training time.
        t_window = now
      report_progress(step)
      if validate_now or stopping_now:
        val_score = None
        if validate_now:
          with report_progress.timed('validation', False):
            val = validate(state.eval_params(config.eval.use_ema))
          val_score = val['balanced_accuracy']
          best = max(best, val_score)
          writer.write_scalars(
              step,
              {f'val/{k}': val[k] for k in VAL_METRICS}
              | {
                  'val/epoch': step / steps_per_epoch,
                  'val/best_balanced_accuracy': best,
              },
          )
        meta = {
            'step': step,
            'total_steps': plan.end_step,
            'plan': dataclasses.asdict(plan),
            'train_seconds': train_seconds,
        }
        if deadline:
          meta |= deadline.as_meta(budget_used + time.monotonic() - t_start)
        ckpts.save(state, meta, val_score)
        writer.flush()
        if deadline and validate_now:
          deadline.observe_validation(time.monotonic() - t_window)
        t_window = time.monotonic()  # validating and saving are not training
      if stopping_now:
        ckpts.wait()  # the save is asynchronous; finish it first
        raise stopping.Stopped(stop_now, step, workdir)
    ckpts.wait()
    writer.flush()
    if not config.train.final_evaluation:
      # A recipe trial: it is judged on validation alone (logged above).
      return {'step': step, 'best_val_balanced_accuracy': best}
    # A signal after the last step's check: training is saved, stop before
    # evaluating. From here signals act as they normally do.
    if (stop_now := stop.agreed()) is not None:
      raise stopping.Stopped(stop_now, step, workdir)
    stop.release()
    t_eval = time.monotonic()
    report = evaluate.evaluate_checkpoint(
        config, workdir, 'best', data=data, mesh=mesh, family=family
    )
    if deadline:
      now = time.monotonic()
      logging.info(
          'The final evaluation took %.0f s (%.0f s were kept for it); the '
          'run ends %.0f s %s its time budget.',
          now - t_eval,
          final_seconds(deadline.timings),
          abs(deadline.ends_at - now),
          'inside' if now <= deadline.ends_at else 'past',
      )
    return report


# A budgeted run's batches: the pipelines make them step by step, this far.
_UNBOUNDED = 2**31 - 1


def _replan(
    plan: time_budget.Plan,
    deadline: time_budget.Deadline,
    step: int,
    *,
    validating: bool,
) -> time_budget.Plan:
  """The plan that ends in time from `step` (validating: the step's own
  validation is still to run): process 0's clock decides for every process.
  A plan at its end stays there."""
  if step >= plan.end_step:
    return plan
  end_step = distributed.from_process_0(
      deadline.last_step(step, validating=validating)
  )
  if end_step == plan.end_step:
    return plan
  return plan.ending_at(step, end_step)


def _log_plan(
    logged: time_budget.Plan,
    plan: time_budget.Plan,
    deadline: time_budget.Deadline,
    step: int,
) -> time_budget.Plan:
  """Logs a plan that moved the end by over 5% since the last logged;
  returns the plan last logged."""
  if abs(plan.end_step - logged.end_step) <= 0.05 * logged.end_step:
    return logged
  t = deadline.timings
  logging.info(
      'Re-planned at step %d: the run ends at step %d (was %d), %.0f s from '
      'now at %.3f s/step, %.1f s per validation, %.0f s kept for the '
      'final evaluation and slack; the schedule goes on from position '
      '%.0f of %d.',
      step,
      plan.end_step,
      logged.end_step,
      deadline.ends_at - time.monotonic(),
      t.step_seconds,
      t.validation_seconds,
      deadline.reserved_seconds(),
      plan.position(step),
      plan.horizon,
  )
  return plan


def _first_plan(
    config: ConfigDict,
    train_step: Callable,
    init: Callable,
    rates_along: Callable,
    key,
    metrics_cls,
    pipeline: pipelines.Pipeline,
    validate: Callable,
    eval_every: int,
    num_train: int,
    t_start: float,
    final_seconds: Callable,
    start: int,
) -> tuple[int, time_budget.Deadline]:
  """The last step that fits from step `start`, timed on steps of a
  throwaway state (see vitjax/time_budget.py). Every process times the same
  steps; process 0's clock decides for all."""
  provisional = math.ceil(
      config.train.epochs * num_train / config.train.batch_size
  )
  rates = rates_along(provisional)(0.0)
  state, window = init(key), metrics_cls.empty()

  def run_step(batch):
    nonlocal state, window
    state, window = train_step(state, batch, window, rates)
    return state.step

  steps, deadline, error = 0, None, None
  try:
    steps, deadline = time_budget.first_plan(
        config.train.time_budget_minutes,
        t_start,
        run_step=run_step,
        batches=pipeline.batches(0, time_budget.STEPS_TIMED),
        validate=lambda: validate(state.params),
        eval_every=eval_every,
        final_seconds=final_seconds,
        start=start,
    )
  except errors.UserError as e:
    error = e
  distributed.raise_together(error, 'the time budget is too short (process 0).')
  return distributed.from_process_0(steps), deadline


def _open_run(
    config: ConfigDict, workdir: Path, run: contextlib.ExitStack
) -> tuple[Any, sources.Dataset]:
  """Locks the workdir (process 0), checks it against the config and the
  data; returns the mesh and the data."""
  if jax.process_index() == 0:
    run.enter_context(workdir_lib.WorkdirLock(workdir))
  checkpoint.check_layout(workdir)  # before the config: its fields moved
  fresh = not checkpoint.has_steps(workdir)
  workdir_lib.save_or_check_config(config, workdir, fresh=fresh)
  mesh = sharding.make_mesh()
  _check_before_start(config, mesh)
  data = sources.load(config.data, config.seed)
  workdir_lib.check_split(workdir, data.split_id, record=fresh)
  if jax.process_index() == 0:
    workdir_lib.record_class_names(workdir, data.class_names)
  return mesh, data


def _check_before_start(config: ConfigDict, mesh) -> None:
  """What would otherwise fail hours into a run."""
  if config.data.val_fraction <= 0:
    raise errors.ConfigError(
        f'data.val_fraction={config.data.val_fraction:g} leaves no '
        'validation images, on which training picks its best checkpoint; '
        'use e.g. 0.1.'
    )
  sharding.check_batch(config.train.batch_size, mesh, 'train.batch_size')
  sharding.check_batch(config.eval.batch_size, mesh, 'eval.batch_size')


def _starting_point(
    ckpts: checkpoint.Checkpoints,
    config: ConfigDict,
    workdir: Path,
    data: sources.Dataset,
) -> tuple[checkpoint.Checkpoints | None, dict[str, Any] | None]:
  """The checkpoints to start from and their latest step's meta: this
  run's own (a resume), another run's (train.resume_from, at a first start),
  or none (a fresh start)."""
  meta = ckpts.read_meta('latest')
  if meta or not config.train.resume_from:
    return (ckpts, meta) if meta else (None, None)
  source = Path(config.train.resume_from).expanduser()
  if not checkpoint.has_steps(source):
    raise checkpoint.CheckpointError(
        f'train.resume_from={config.train.resume_from!r} holds no checkpoint.'
    )
  workdir_lib.check_split(source, data.split_id, record=False)
  origin = checkpoint.Checkpoints(source)
  meta = origin.read_meta('latest')
  # Its training curves up to that step continue in this run's.
  metric_writers.copy_records(
      source / 'metrics.jsonl', workdir / 'metrics.jsonl', int(meta['step'])
  )
  return origin, meta

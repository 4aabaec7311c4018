"""Training: `train_and_evaluate`, the loop, then the final evaluation.

A run of fixed length (`train.epochs`) is a function of its config: batches,
dropout and mixing keys all derive from (seed, step), so killing it and
rerunning the same command resumes from the latest checkpoint and ends with
the same parameters and the same validation and test figures as a run that
was never stopped. A time-budgeted run resumes too, with its steps
re-planned from its clock (vitjax/time_budget.py), so how many it takes
depends on the machine and its load.

SIGTERM or a first Ctrl-C lets the step finish (one while the run starts:
its first step; with several processes, their next log step); the loop then
saves it and raises errors.Stopped. A second signal kills at once. Once
training is done and saved, the final evaluation gets signals as a program
normally does. A NaN or infinite training metric raises DivergedError,
which says how to continue from the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
import signal
import time
from typing import Any, Callable

from absl import logging
from clu import parameter_overview
import jax
from ml_collections import ConfigDict

from vitjax import checkpoint, errors, evaluate, families, models, parallel
from vitjax import time_budget, trainer, workdir as workdir_lib
from vitjax.data import pipelines, sources
from vitjax.evaluators import classification

# What each validation logs (the report has more: per-class recall, ...).
VAL_METRICS = ('loss', 'accuracy', 'balanced_accuracy', 'worst_class_recall')
# A budgeted run's batches: the pipelines make them step by step, this far.
_UNBOUNDED = 2**31 - 1


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
    parallel.initialize()  # main.py has, before its first JAX call
  config = models.with_machine_choices(config)
  # Closes what the run opened in reverse, also when it fails: the signal
  # handlers, the lock, the checkpoints (after the save in flight), the
  # metric writers.
  with contextlib.ExitStack() as run:
    # From here a stop signal waits for the next step to save and stop.
    stop = run.enter_context(StopRequest())
    mesh, data = _open_run(config, workdir, run)
    steps_per_epoch = math.ceil(len(data.train) / config.train.batch_size)
    eval_every = max(1, round(config.train.eval_every_epochs * steps_per_epoch))
    log_every = config.train.log_every_steps
    family = families.build(config, data, steps_per_epoch, mesh, workdir)
    pipeline = pipelines.make(config, data, mesh)
    pipelines.log_sampled_classes(pipeline, config, data)
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    train = trainer.build(config, family, data.num_classes, mesh, step_key)
    validate = classification.split_evaluator(
        family.model, data.val, config.eval.batch_size, mesh, data.num_classes
    )
    ckpts = run.enter_context(
        checkpoint.Checkpoints(workdir, config.train.keep_checkpoints)
    )
    origin, saved = _starting_point(ckpts, config, workdir, data, run)
    budget = time_budget.start(
        config,
        data,
        t_start=t_start,
        has_teacher=family.teacher is not None,
        eval_every=eval_every,
        saved=saved if origin is ckpts else None,
        start_step=int(saved['step']) if saved else 0,
        timed=lambda: time_budget.time_steps(
            train,
            init_key,
            pipeline.batches(0, time_budget.STEPS_TIMED),
            validate,
            workdir,
        ),
    )
    rates_at = train.rates_along(budget.plan.horizon)
    best = ckpts.best_score()  # -inf before the first validation
    state, start, train_seconds = _first_state(
        train, init_key, origin, ckpts, config, budget, best, steps_per_epoch
    )
    # A budgeted run's end moves: its re-plans stand for the ETA.
    writer, report_progress = workdir_lib.writers(
        workdir, start, None if budget.replans else budget.end_step, log_every
    )
    run.callback(writer.close)
    # A window: the steps between two log lines, whose metrics accumulate.
    window, window_start = train.metrics.empty(), start
    t_window = time.monotonic()
    # Several processes agree on a stop at log steps only: asking the others
    # waits for the step, which one process need not do.
    stop_every_step = jax.process_count() == 1
    batches = pipeline.batches(
        start, _UNBOUNDED if budget.replans else budget.end_step
    )
    step = start
    while step < budget.end_step:
      position = budget.position(step)
      state, window = train.step(
          state, next(batches), window, rates_at(position), position
      )
      step += 1
      log_now = step % log_every == 0
      validate_now = budget.validates(step)
      stop_now = (
          stop.agreed() if stop_every_step or log_now or validate_now else None
      )
      if log_now or validate_now or stop_now is not None:
        # Steps run asynchronously: float() waits for them, then the clock.
        scalars = {k: float(v) for k, v in window.compute().items()}
        seconds = time.monotonic() - t_window
        _stop_if_diverged(scalars, window_start, step, ckpts, config)
        train_seconds += seconds
        scalars['epoch'] = step / steps_per_epoch
        scalars['images_per_second'] = (
            (step - window_start)
            * config.train.batch_size
            / max(seconds, 1e-9)  # a clock too coarse for a short window
        )
        writer.write_scalars(
            step, {f'train/{k}': v for k, v in scalars.items()}
        )
        if log_now or validate_now:
          budget.observe_window(
              step, step - window_start, seconds, validating=validate_now
          )
          validate_now = budget.validates(step)
        # The windows tile the clock: logging and re-planning count as
        # training time.
        window, window_start = train.metrics.empty(), step
        t_window += seconds
      report_progress(step)
      if validate_now or stop_now is not None:
        score = None
        if validate_now:
          with report_progress.timed('validation', False):
            score, best = _validate(
                validate, state, config, step / steps_per_epoch, best, writer
            )
        meta = {'step': step, 'train_seconds': train_seconds}
        ckpts.save(state, meta | budget.meta(), score)
        writer.flush()
        if validate_now:
          budget.observe_validation(time.monotonic() - t_window)
        t_window = time.monotonic()  # validating and saving are not training
      if stop_now is not None:
        ckpts.wait()  # the save is asynchronous; finish it first
        raise errors.Stopped(stop_now, step, workdir)
    ckpts.wait()
    writer.flush()
    if not config.train.final_evaluation:
      # A recipe trial: it is judged on validation alone (logged above).
      return {'step': step, 'best_val_balanced_accuracy': best}
    # A signal after the last step's check: training is saved, stop before
    # evaluating. From here signals act as they normally do.
    if (stop_now := stop.agreed()) is not None:
      raise errors.Stopped(stop_now, step, workdir)
    stop.release()
    t_eval = time.monotonic()
    report = evaluate.evaluate_checkpoint(
        config, workdir, 'best', data=data, mesh=mesh, family=family
    )
    budget.log_final_evaluation(time.monotonic() - t_eval)
    return report


def _open_run(
    config: ConfigDict, workdir: Path, run: contextlib.ExitStack
) -> tuple[Any, sources.Dataset]:
  """Locks the workdir (process 0), checks it against the config and the
  data, records a fresh run; returns the mesh and the data. With several
  processes, none goes on alone into the collectives: a start that fails
  on one fails on all, and processes whose configs, data splits or saved
  checkpoints differ refuse to start."""
  error, mesh, data = None, None, None
  try:
    if jax.process_index() == 0:
      run.enter_context(workdir_lib.WorkdirLock(workdir))
    fresh = not checkpoint.has_steps(workdir)
    if not fresh:
      workdir_lib.check_config(config, workdir)
    mesh = parallel.make_mesh()
    if config.data.val_fraction <= 0:
      raise errors.ConfigError(
          f'data.val_fraction={config.data.val_fraction:g} leaves no '
          'validation images, on which training picks its best checkpoint; '
          'use e.g. 0.1.'
      )
    parallel.check_batch(config.train.batch_size, mesh, 'train.batch_size')
    parallel.check_batch(config.eval.batch_size, mesh, 'eval.batch_size')
    data = sources.load(config.data, config.seed)
    if fresh:
      workdir_lib.record(workdir, config, data)
    else:
      workdir_lib.check_split(workdir, data.split_id)
  except errors.UserError as e:
    error = e
  except OSError as e:  # an unwritable or misplaced workdir, mostly
    error = errors.UserError(
        f'{e.filename or str(workdir)!r}: {e.strerror or e}: the run cannot'
        ' use its workdir there; check the --workdir path and its permissions.'
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    error = e  # a bug: its traceback here, and the other processes stop too
  parallel.raise_together(
      error, 'the run did not start on another process (see its log).'
  )
  what = (config.to_json_best_effort(), data.split_id)
  what += (checkpoint.saved_steps(workdir),)
  parallel.check_same(repr(what), 'config, data split or saved checkpoints')
  data.log_counts()
  return mesh, data


def _starting_point(
    ckpts: checkpoint.Checkpoints,
    config: ConfigDict,
    workdir: Path,
    data: sources.Dataset,
    run: contextlib.ExitStack,
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
  workdir_lib.check_split(source, data.split_id)
  origin = run.enter_context(checkpoint.Checkpoints(source))
  meta = origin.read_meta('latest')
  # Its training curves up to that step continue in this run's.
  workdir_lib.copy_records(source, workdir, int(meta['step']))
  return origin, meta


def _first_state(
    train: trainer.Trainer,
    key: jax.Array,
    origin: checkpoint.Checkpoints | None,
    ckpts: checkpoint.Checkpoints,
    config: ConfigDict,
    budget: time_budget.Budget,
    best: float,
    steps_per_epoch: int,
) -> tuple[trainer.TrainState, int, float]:
  """The state the loop starts from (fresh, or the latest of `origin`),
  its step and the training seconds so far; logs what the run does."""
  if origin is None:
    state, start, train_seconds = train.init(key), 0, 0.0
  else:
    state, saved = origin.restore(train.abstract(), 'latest')
    start, train_seconds = int(saved['step']), float(saved['train_seconds'])
    if origin is not ckpts and start >= budget.end_step:
      raise errors.ConfigError(
          f'train.resume_from={config.train.resume_from!r} is at step '
          f'{start}, and this config trains {budget.end_step} steps; raise '
          'train.epochs or train.time_budget_minutes.'
      )
    logging.info(
        'Resuming from step %d of %d%s (best validation balanced accuracy '
        'so far %s).',
        start,
        budget.end_step,
        '' if origin is ckpts else f' of {config.train.resume_from}',
        f'{best:.4f}' if best > -math.inf else 'none yet',
    )
  parameter_overview.log_parameter_overview(state.params, include_stats=False)
  logging.info(
      'Model %s: %d steps of %d images (%.1f epochs, %d steps per epoch)%s.',
      config.model.name,
      budget.end_step,
      config.train.batch_size,
      budget.end_step / steps_per_epoch,
      steps_per_epoch,
      ', re-planned against the time budget' if budget.replans else '',
  )
  return state, start, train_seconds


def _validate(
    validate: Callable[[Any], dict[str, Any]],
    state: trainer.TrainState,
    config: ConfigDict,
    epoch: float,
    best: float,
    writer,
) -> tuple[float, float]:
  """Validates the weights config.eval.use_ema names and logs it; returns
  its balanced accuracy and the best so far."""
  val = validate(state.eval_params(config.eval.use_ema))
  score = val['balanced_accuracy']
  best = max(best, score)
  writer.write_scalars(
      int(state.step),
      {f'val/{k}': val[k] for k in VAL_METRICS}
      | {'val/epoch': epoch, 'val/best_balanced_accuracy': best},
  )
  return score, best


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
    if not parallel.any_process(bool(self.requested)):
      return None
    return self.requested

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    logging.warning(
        '%s: saving the latest step, then stopping.', self.requested
    )
    signal.signal(signum, signal.SIG_DFL)


def _stop_if_diverged(
    scalars: dict[str, float],
    window_start: int,
    step: int,
    ckpts: checkpoint.Checkpoints,
    config: ConfigDict,
) -> None:
  """Raises DivergedError if a training metric is not finite, saying where
  the run can continue from."""
  if all(math.isfinite(v) for v in scalars.values()):
    return
  lr, clip = config.optim.lr, config.optim.grad_clip_norm
  last = ckpts.latest_step()
  if last is None:
    where, resume = 'No checkpoint was saved before; start again', ''
  else:
    where = (
        f'The last good checkpoint, step {last}, is kept in '
        f'{str(ckpts.directory)!r}. A rerun of this config diverges again; '
        'continue from that checkpoint in a new workdir'
    )
    resume = f' --config.train.resume_from={str(ckpts.directory.parent)!r}'
  raise errors.DivergedError(
      f'training diverged: loss {scalars["loss"]} over steps '
      f'{window_start + 1}-{step}. {where} with a lower peak learning rate '
      f'(optim.lr, now {lr:g}) or tighter gradient clipping '
      f'(optim.grad_clip_norm, now {clip:g}), e.g. python -m vitjax.main '
      '--config=<the same config and overrides> --workdir=<a new workdir>'
      f'{resume} --config.optim.lr={lr / 2:g}'
  )

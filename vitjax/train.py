"""Training: the jitted step, the loop, checkpoints, resume, time budget.

A run is a pure function of (config, seed): batches, dropout and mixing keys
all derive from the step number, so killing a run and rerunning the same
command resumes from the latest checkpoint and ends with the same
parameters and metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

from absl import logging
from clu import metrics
import flax
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
import numpy as np
import optax

from vitjax import checkpoint, evaluate, mixing, parallel, quantization
from vitjax import recipes, train_state, writers
from vitjax.data import sampling, sources

IMAGE_SHAPE = (32, 32, 3)


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in workdir, then evaluates the best checkpoint."""
  t_start = time.monotonic()
  workdir = Path(workdir).expanduser()
  if config.train.distributed:
    jax.distributed.initialize()
  lock = checkpoint.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    return _train(config, workdir, t_start)
  finally:
    if lock:
      lock.release()


def _train(config: ConfigDict, workdir: Path, t_start: float) -> dict:
  _save_or_check_config(config, workdir)
  data = sources.load(config.data, config.seed)
  _log_data(data)
  mesh = parallel.make_mesh()
  batch = config.train.batch_size
  parallel.check_batch(batch, mesh, 'train.batch_size')
  n_train = len(data.train)
  steps_per_epoch = math.ceil(n_train / batch)
  eval_every = max(1, round(config.train.eval_every_epochs * steps_per_epoch))
  recipe = recipes.build(config, data, steps_per_epoch, mesh, workdir)
  model, objective = recipe.model, recipe.objective
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  use_ema = config.optim.ema_decay > 0
  ckpts = checkpoint.Checkpoints(workdir, config.train.keep_checkpoints)
  plan = sampling.make_plan(data.train.labels, data.num_classes,
                            config.data.sampling)
  engine = make_engine(config, data.train, plan, mesh)
  _log_sampled_classes(engine, config, data)

  def build(total_steps: int):
    tx, schedule = recipe.make_tx(total_steps)
    step = make_train_step(objective, tx, schedule, config, data.num_classes,
                           step_key, mesh)
    init = jax.jit(lambda key: train_state.from_params(
        recipe.initial_params(key), tx, use_ema),
                   out_shardings=parallel.replicated(mesh))
    return tx, step, init

  resumed = ckpts.read_meta('latest')
  if resumed:
    total_steps = int(resumed['total_steps'])
  elif config.train.time_budget_minutes > 0:
    total_steps = _steps_for_budget(
        config, build, model, objective.extra_metrics, init_key, engine, mesh,
        data, eval_every, t_start)
  else:
    total_steps = math.ceil(config.train.epochs * n_train / batch)
  tx, train_step, init = build(total_steps)
  repl = parallel.replicated(mesh)
  if resumed:
    abstract = _with_sharding(train_state.abstract_state(
        model, tx, IMAGE_SHAPE, use_ema), repl)
    state, meta = ckpts.restore(abstract, 'latest')
    start, best = int(meta['step']), float(meta['best_val_balanced_accuracy'])
    train_time = float(meta['train_seconds'])
    logging.info('Resuming from step %d of %d (best validation balanced '
                 'accuracy so far %.4f).', start, total_steps, best)
  else:
    state = init(init_key)
    start, best, train_time = 0, -1.0, 0.0
  logging.info('Model %s: %s parameters; %d steps of %d images '
               '(%.1f epochs, %d steps per epoch).', config.model.name,
               f'{sum(np.size(p) for p in jax.tree.leaves(state.params)):,}',
               total_steps, batch, total_steps / steps_per_epoch,
               steps_per_epoch)

  writer = writers.create_writer(workdir)
  log = writers.JsonlLog(workdir / 'metrics.jsonl')
  log.trim_after(start)
  predict_fn = evaluate.make_predict_fn(
      evaluate.Predictor(model, None), mesh)
  loop = _Loop(config, workdir, ckpts, writer, log, predict_fn, data, mesh,
               steps_per_epoch, total_steps, eval_every, best, train_time,
               objective.extra_metrics)
  loop.run(state, train_step, engine, start)
  ckpts.wait()
  ckpts.close()
  writer.flush()
  return evaluate_checkpoint(config, workdir, 'best', data=data, mesh=mesh,
                             recipe=recipe, tx=tx)


class _Loop:
  """The step loop with its periodic logging, validation and saving."""

  def __init__(self, config, workdir, ckpts, writer, log, predict_fn, data,
               mesh, steps_per_epoch, total_steps, eval_every, best,
               train_time, extra_metrics):
    self.config, self.workdir, self.ckpts = config, workdir, ckpts
    self.writer, self.log, self.predict_fn = writer, log, predict_fn
    self.data, self.mesh = data, mesh
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.eval_every, self.best, self.train_time = eval_every, best, train_time
    self.metrics_cls = make_metrics_cls(extra_metrics)

  def run(self, state, train_step, engine, start: int):
    cfg = self.config.train
    metrics_acc = self.metrics_cls.empty()
    window_start, t_window = start, time.monotonic()
    step = start
    stop = _StopRequest()
    try:
      for batch in engine.batches(start, self.total_steps):
        if isinstance(batch['image'], np.ndarray):
          batch = parallel.host_batch_to_global(batch, self.mesh)
        state, metrics_acc = train_step(state, batch, metrics_acc)
        step += 1
        last = step == self.total_steps
        evaluate_now = step % self.eval_every == 0 or last
        if step % cfg.log_every_steps == 0 or evaluate_now or stop.requested:
          # Steps run asynchronously: wait for them before reading the clock.
          window = jax.block_until_ready(metrics_acc.compute())
          now = time.monotonic()
          self.train_time += now - t_window
          self._log_train(step, window, window_start, now - t_window)
          metrics_acc = self.metrics_cls.empty()
          window_start, t_window = step, time.monotonic()
        if evaluate_now or stop.requested:
          self._validate_and_save(state, step, save_only=stop.requested and
                                  not evaluate_now)
          t_window = time.monotonic()
        if stop.requested:
          self.ckpts.wait()  # the save is asynchronous; finish it first
          raise KeyboardInterrupt(f'stopped by {stop.requested}')
    finally:
      stop.restore()
    return state

  def _log_train(self, step: int, m: dict, window_start: int, seconds: float):
    m = {k: float(v) for k, v in m.items()}
    if not all(math.isfinite(v) for v in m.values()):
      last = self.ckpts.latest_step()
      raise FloatingPointError(
          f'training diverged: loss {m["loss"]} over steps {window_start + 1}'
          f'-{step}. The last good checkpoint (step {last}) is kept in '
          f'{str(self.workdir / "checkpoints")!r}; lower optim.lr or raise '
          'optim.warmup_epochs and start a fresh --workdir, or rerun to '
          'resume from it.')
    images_per_s = (step - window_start) * self.config.train.batch_size / max(
        seconds, 1e-9)
    eta = (self.total_steps - step) * seconds / max(step - window_start, 1)
    epoch = step / self.steps_per_epoch
    extras = ' | '.join(f'{k} {v:.4f}' for k, v in m.items()
                        if k not in ('loss', 'accuracy', 'learning_rate',
                                     'grad_norm'))
    logging.info(
        'step %d/%d | epoch %.2f | loss %.4f | acc %.4f | lr %.2e | '
        'grad %.3f | %.0f img/s | ETA %s%s', step, self.total_steps, epoch,
        m['loss'], m['accuracy'], m['learning_rate'], m['grad_norm'],
        images_per_s, _duration(eta), (' | ' + extras) if extras else '')
    self.writer.write_scalars(step, {f'train/{k}': v for k, v in m.items()} |
                              {'train/images_per_second': images_per_s})
    self.log.write({'split': 'train', 'step': step, 'epoch': epoch, **m,
                    'images_per_second': images_per_s})

  def _validate_and_save(self, state, step: int, save_only: bool = False):
    meta = {'step': step, 'total_steps': self.total_steps,
            'train_seconds': self.train_time,
            'best_val_balanced_accuracy': self.best}
    is_best = False
    if not save_only:
      params = state.eval_params(self.config.eval.use_ema)
      m = evaluate.evaluate_split(self.predict_fn, {'params': params},
                                  self.data.val,
                                  self.config.eval.batch_size, self.mesh,
                                  self.data.num_classes)
      is_best = m['balanced_accuracy'] > self.best
      if is_best:
        self.best = m['balanced_accuracy']
      meta.update(best_val_balanced_accuracy=self.best,
                  val_balanced_accuracy=m['balanced_accuracy'])
      epoch = step / self.steps_per_epoch
      logging.info('validation at step %d (epoch %.2f): loss %.4f | top-1 '
                   '%.4f | balanced %.4f%s', step, epoch, m['loss'],
                   m['accuracy'], m['balanced_accuracy'],
                   ' | new best' if is_best else '')
      scalars = {k: m[k] for k in ('loss', 'accuracy', 'balanced_accuracy',
                                   'worst_class_recall')}
      self.writer.write_scalars(step, {f'val/{k}': v
                                       for k, v in scalars.items()})
      self.log.write({'split': 'val', 'step': step, 'epoch': epoch,
                      **scalars})
    self.ckpts.save(state, meta, best=is_best)
    self.writer.flush()


def make_metrics_cls(extra: tuple[str, ...]) -> type[metrics.Collection]:
  names = ('loss', 'accuracy', 'grad_norm') + tuple(extra)
  fields = {n: metrics.Average.from_output(n) for n in names}
  fields['learning_rate'] = metrics.LastValue.from_output('learning_rate')
  return metrics.Collection.create(**fields)


def make_train_step(objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ConfigDict,
                    num_classes: int, base_key: jax.Array, mesh
                    ) -> Callable:
  """The jitted (state, batch, metrics) -> (state, metrics) update."""
  aug = config.aug
  ema_decay = config.optim.ema_decay
  metrics_cls = make_metrics_cls(objective.extra_metrics)

  def step_fn(state: train_state.TrainState, batch, metrics_acc):
    # Every random choice of the step derives from the step number alone.
    key = jax.random.fold_in(base_key, state.step)
    k_mix, k_dropout, k_model = jax.random.split(key, 3)
    labels = batch['label']
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                  aug.label_smoothing)
    images, targets = mixing.mix(k_mix, batch['image'], targets, aug)
    rngs = {'dropout': k_dropout, 'gumbel': k_model}

    def loss_of(params):
      return objective(params, images, targets, state.step, rngs)

    (loss, (logits, extras)), grads = jax.value_and_grad(
        loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
    new = metrics_cls.single_from_model_output(
        loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
        grad_norm=optax.tree.norm(grads),
        learning_rate=schedule(state.step), **extras)
    state = state.replace(step=state.step + 1, params=params,
                          opt_state=opt_state, ema_params=ema)
    return state, metrics_acc.merge(new)

  repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(step_fn, donate_argnums=(0, 2),
                 in_shardings=(repl, data, repl), out_shardings=(repl, repl))


def make_engine(config: ConfigDict, split: sources.Split, plan, mesh):
  """The configured input engine: 'tf' (tf.data) or 'device' (JAX)."""
  common = dict(seed=config.seed, global_batch=config.train.batch_size)
  if config.data.pipeline == 'tf':
    from vitjax.data import tf_pipeline  # pylint: disable=g-import-not-at-top
    return tf_pipeline.TfTrainInput(split, plan, config.aug,
                                    host_id=jax.process_index(),
                                    num_hosts=jax.process_count(), **common)
  if config.data.pipeline == 'device':
    from vitjax.data import device_pipeline  # pylint: disable=g-import-not-at-top
    return device_pipeline.DeviceTrainInput(
        split, plan, config.aug, batch_sharding=parallel.batch_sharding(mesh),
        **common)
  raise ValueError(f"data.pipeline={config.data.pipeline!r}: expected 'tf' "
                   "or 'device'.")


def evaluate_checkpoint(config: ConfigDict, workdir: str | Path,
                        which: str | int, *, data=None, mesh=None,
                        recipe=None, tx=None) -> dict[str, Any]:
  """Restores a checkpoint, evaluates it on val and test, writes the report.

  With eval.quant='int8' the checkpoint is evaluated in int8 (see
  vitjax.quantization), with its float predictions for comparison. Sparse
  models also report their dense teacher's accuracy and speed.
  """
  workdir = Path(workdir).expanduser()
  data = data or sources.load(config.data, config.seed)
  mesh = mesh or parallel.make_mesh()
  if recipe is None:
    recipe = recipes.build(config, data, 1, mesh, workdir)
  model = recipe.model
  if tx is None:  # the optimizer's structure, not its schedule, matters here
    tx = recipe.make_tx(1)[0]
  use_ema = config.optim.ema_decay > 0
  abstract = _with_sharding(train_state.abstract_state(
      model, tx, IMAGE_SHAPE, use_ema), parallel.replicated(mesh))
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    state, meta = ckpts.restore(abstract, which)
    # The run's whole training time is in its latest checkpoint.
    train_seconds = ckpts.read_meta('latest')['train_seconds']
  finally:
    ckpts.close()
  params = state.eval_params(config.eval.use_ema)
  ev = config.eval
  float_predictor = evaluate.Predictor(model, {'params': params})
  name = str(which)
  report = {'checkpoint': f'{which} (step {meta["step"]})',
            'workdir': str(workdir), 'step': int(meta['step']),
            'model': config.model.name,
            'class_names': list(data.class_names),
            'train_seconds': float(train_seconds)}
  if ev.quant == 'int8':
    predictor, report['quantization'] = _int8_predictor(
        config, float_predictor, data, mesh, workdir / 'int8' / name)
    name += '_int8'
  elif ev.quant == 'none':
    predictor = float_predictor
  else:
    raise ValueError(f"eval.quant={ev.quant!r}: expected 'none' or 'int8'.")
  report['precision'] = 'int8' if ev.quant == 'int8' else 'float'
  sparsity = evaluate.sparsity_report(predictor, data.test.images,
                                      ev.batch_size, ev.speed_batch,
                                      ev.speed_seconds)
  predict_fn = evaluate.make_predict_fn(predictor, mesh)
  for split_name, split in (('val', data.val), ('test', data.test)):
    report[split_name] = evaluate.evaluate_split(
        predict_fn, predictor.variables, split, ev.batch_size, mesh,
        data.num_classes)
  report['cost'] = evaluate.cost_report(
      predictor, mesh, ev.speed_batch, IMAGE_SHAPE, ev.speed_seconds,
      # A-ViT's cost depends on the images: count what the test set ran.
      sparsity.get('tokens_per_block') if config.model.name == 'avit'
      else None, float_params=params)
  report['sparsity'] = sparsity
  if recipe.teacher is not None:
    teacher = evaluate.Predictor(recipe.teacher.model,
                                 {'params': recipe.teacher.params})
    t_predict = evaluate.make_predict_fn(teacher, mesh)
    report['teacher'] = {
        'workdir': config.sparse.init_from, 'step': recipe.teacher.step,
        **{n: evaluate.evaluate_split(t_predict, teacher.variables, split,
                                      ev.batch_size, mesh, data.num_classes)
           for n, split in (('val', data.val), ('test', data.test))},
        'cost': evaluate.cost_report(teacher, mesh, ev.speed_batch,
                                     IMAGE_SHAPE, ev.speed_seconds)}
  if jax.process_index() == 0:
    path = evaluate.write_report(report, workdir / 'eval', name,
                                 data.class_names, workdir / 'metrics.jsonl')
    logging.info('Wrote %s', path)
    evaluate.print_report(report, data.class_names)
  return report


def _int8_predictor(config, float_predictor, data, mesh, save_dir: Path):
  """The int8 predictor of eval.quant_path, and what to report about it."""
  ev = config.eval
  model, params = float_predictor.model, float_predictor.params
  info = {'path': ev.quant_path, 'backend': ev.quant_backend,
          'head': ev.quant_head, 'attention_einsums': ev.quant_attention}
  if ev.quant_path == 'fake':
    predictor = evaluate.Predictor(
        quantization.quantized_model(model, ev, 'fake'), {'params': params})
  else:
    server = quantization.Int8Server.convert(model, ev, params, IMAGE_SHAPE)
    info.update(quantization.weight_bytes(params, server))
    if jax.process_index() == 0:
      info['checkpoint_bytes_on_disk'] = server.save(save_dir)
      info['checkpoint'] = str(save_dir)
    # Serve what was saved: the round trip is part of the check.
    server = quantization.Int8Server.load(save_dir, model, ev, params,
                                          IMAGE_SHAPE)
    predictor = evaluate.Predictor(
        server.model, {'params': server.params, 'aqt': server.frozen},
        prepare=server.prepare)
  # How often int8 and float agree, image by image, on the test set.
  preds = []
  for p in (float_predictor, predictor):
    logits = evaluate.predict(evaluate.make_predict_fn(p, mesh), p.variables,
                              data.test.images, ev.batch_size, mesh)
    preds.append(np.argmax(logits, -1))
  info['test_agreement_with_float'] = float(np.mean(preds[0] == preds[1]))
  return predictor, info


def _steps_for_budget(config, build, model, objective_metrics, init_key,
                      engine, mesh, data, eval_every, t_start) -> int:
  """Sizes the schedule so that training ends within the time budget.

  Times a few real steps and one validation pass on a throwaway state,
  then fits steps * t_step + evaluations * t_eval into what is left of the
  budget (which counts from the start of the run, data loading included).
  """
  budget = config.train.time_budget_minutes * 60.0
  provisional = math.ceil(config.train.epochs * len(data.train)
                          / config.train.batch_size)
  _, train_step, init = build(provisional)
  t0 = time.monotonic()
  state = init(init_key)
  metrics_acc = make_metrics_cls(objective_metrics).empty()
  # tf.data's autotuning settles over the first steps; time after it does.
  warmup, timed = 6, 30
  times = []
  for batch in engine.batches(0, warmup + timed):
    if isinstance(batch['image'], np.ndarray):
      batch = parallel.host_batch_to_global(batch, mesh)
    t = time.monotonic()
    state, metrics_acc = train_step(state, batch, metrics_acc)
    jax.block_until_ready(state.step)
    times.append(time.monotonic() - t)
  compile_seconds = times[0]
  # A busy moment on the host only slows some steps: the lower quartile
  # estimates the step itself; the margin below covers the rest.
  t_step = float(np.percentile(times[warmup:], 25))
  predict_fn = evaluate.make_predict_fn(evaluate.Predictor(model, None),
                                       mesh)
  t = time.monotonic()
  evaluate.evaluate_split(predict_fn, {'params': state.params}, data.val,
                          config.eval.batch_size, mesh, data.num_classes)
  t_eval = time.monotonic() - t
  del state
  left = budget - (time.monotonic() - t_start) - compile_seconds
  # Logging, checkpoints and a busier machine make real steps slower than
  # timed ones, the more so the smaller the step (measured on the 2-core
  # CPU: 5-9% at batch 64, 13% at batch 32); keep margin.
  steps = int(0.85 * left / (t_step + t_eval / eval_every))
  if steps < 1:
    raise ValueError(f'train.time_budget_minutes={budget / 60:g} leaves no '
                     f'time to train ({time.monotonic() - t0:.0f} s went to '
                     'set-up and timing); raise it.')
  logging.info('Time budget %.1f min: %.3f s/step, validation %.1f s every %d '
               'steps, %.0f s left -> %d steps.', budget / 60, t_step, t_eval,
               eval_every, left, steps)
  return steps


def _with_sharding(tree: Any, sharding) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                     sharding=sharding), tree)


def _save_or_check_config(config: ConfigDict, workdir: Path) -> None:
  """Writes config.json; a rerun must use the same training config."""
  path = workdir / 'config.json'
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = json.loads(path.read_text())
    diffs = _config_diff(saved, current)
    # Evaluation settings may change between runs without harm.
    diffs = [d for d in diffs if not d.startswith('eval.')]
    if diffs:
      raise ValueError(
          f'workdir {str(workdir)!r} holds a run with another config: '
          + '; '.join(diffs[:5]) + '. Rerun with the same config and '
          'overrides to resume it, or pass a new --workdir.')
  elif jax.process_index() == 0:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
    tmp.replace(path)


def _config_diff(saved: dict, current: dict, prefix: str = '') -> list[str]:
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, '<absent>'), current.get(k, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k} was {a!r}, now {b!r}')
  return out


def _log_data(data: sources.Dataset) -> None:
  for name in ('train', 'val', 'test'):
    split = getattr(data, name)
    counts = split.counts(data.num_classes)
    logging.info('%s: %d images; per class %s', name, len(split),
                 dict(zip(data.class_names, counts.tolist())))


def _log_sampled_classes(engine, config: ConfigDict, data) -> None:
  n = config.data.log_sampled_images
  if n <= 0:
    return
  steps = math.ceil(n / config.train.batch_size)
  labels = np.concatenate([np.asarray(parallel.to_host(b['label']))
                           for b in engine.batches(0, steps)])[:n]
  counts = np.bincount(labels, minlength=data.num_classes)
  logging.info('first %d sampled images (%s sampling), per class %s', n,
               config.data.sampling,
               dict(zip(data.class_names, counts.tolist())))


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class _StopRequest:
  """SIGTERM or a first Ctrl-C: finish the step, save, stop; a second one
  kills at once."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = ''
    try:
      self._previous = {s: signal.signal(s, self._handle)
                        for s in self._SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
      self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    logging.warning('%s: saving the latest step, then stopping.',
                    self.requested)
    signal.signal(signum, signal.SIG_DFL)

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

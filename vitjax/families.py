"""What each model family trains: its model, objective, optimizer and first
weights (`config.model.name` picks the family), and the trained ViT that a
fine-tune starts from.

- vit: classification loss; AdamW on every parameter; random init. With a
  `sparse` config section (configs/dynamic_vit.py:cpu_dense), the control
  for DynamicViT: its whole recipe, the ViT's weights and teacher included,
  without token dropping.
- dynamic_vit: classification + ratio + distillation losses; predictors at
  the full schedule, the backbone at a fraction of it and frozen at first,
  class token and position embedding fixed (the official recipe).
- avit: classification + ponder + halting prior (+ optional distillation);
  every parameter trained at the full schedule (the official recipe); the
  gate's beta calibrated on the ViT (models/avit.py, `calibrate_gate`).

Both papers fine-tune from a trained dense model: here the ViT workdir
`config.sparse.init_from`. Its config.json says how it was built; its best
checkpoint's weights initialise the sparse model's shared parameters and
serve, frozen, as the distillation teacher.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from absl import logging
import jax
from ml_collections import ConfigDict
import numpy as np

from vitjax import checkpoint, errors, models, objectives, parallel, trainer
from vitjax import workdir as workdir_lib
from vitjax.data import sources
from vitjax.models import avit

CALIBRATION_FILE = 'calibration.json'


@dataclasses.dataclass(frozen=True)
class Teacher:
  model: Any  # the dense ViT module
  params: Any  # its (EMA, if it has one) weights
  config: ConfigDict  # the ViT run's full config
  step: int


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  model: Any
  objective: Any
  optimizer: trainer.Optimizer
  # key -> parameters to start from (jittable)
  init_params: Callable[[jax.Array], Any]
  teacher: Teacher | None = None


def build(
    config: ConfigDict,
    data: sources.Dataset,
    steps_per_epoch: int,
    mesh,
    workdir: Path | None,
    teacher: Teacher | None = None,
) -> ModelFamily:
  """The family of config.model.name. A fine-tune (a config with a
  `sparse` section) starts from `teacher`, by default the ViT workdir
  sparse.init_from; A-ViT keeps its gate calibration in `workdir`."""
  name = config.model.name
  if name not in models.MODELS:
    raise errors.ConfigError(
        f'model.name={name!r}: expected one of {sorted(models.MODELS)}.'
    )
  finetuned = 'sparse' in config
  if finetuned and config.model.patch_dropout:
    # Their objective compares every token with the teacher's; the control
    # (configs/dynamic_vit.py:cpu_dense) is DynamicViT without dropping.
    raise errors.ConfigError(
        f'model.patch_dropout={config.model.patch_dropout:g}: a fine-tune '
        'from a ViT (a config with a sparse section) keeps every token; '
        'set it to 0.'
    )
  if finetuned and teacher is None:
    teacher = load_teacher(
        config.sparse.init_from, data.num_classes, mesh, data.split_id
    )
  if teacher is not None:
    check_backbone_matches(config.model, teacher, config.sparse.init_from)
  overrides = {}
  if name == 'avit':
    overrides = {
        'gate_center': _gate_center(config, teacher, data, workdir),
        'faithful': config.sparse.faithful,
    }
  model = models.create(config.model, data.num_classes, **overrides)
  loss_fn = objectives.make_classification_loss(
      config.loss,
      data.train.counts(data.num_classes),
      steps_per_epoch,
      config.data.sampling,
  )
  _log_corrections(config)
  batch = config.train.batch_size
  adamw = trainer.adamw(config.optim, steps_per_epoch, batch)
  fresh = lambda key: trainer.init_params(model, key)
  if not finetuned:
    return ModelFamily(
        model, objectives.Classification(model, loss_fn), adamw, fresh
    )

  def from_teacher(key):
    return merge_params(fresh(key), teacher.params)

  sp = config.sparse
  distilled = teacher if sp.distill else None
  if name == 'avit':
    objective = objectives.AViTObjective(
        model,
        loss_fn,
        distilled,
        ponder_weight=sp.ponder_weight,
        distr_weight=sp.distr_weight,
        prior_mean=sp.prior_mean
        if sp.prior_mean >= 0
        else round(2 * model.depth / 3),
        prior_std=sp.prior_std,
        faithful=sp.faithful,
        kl_weight=sp.kl_weight,
    )
    return ModelFamily(model, objective, adamw, from_teacher, teacher)
  # DynamicViT, or 'vit': the control, trained as DynamicViT is.
  objective = objectives.DynamicViTObjective(
      model,
      loss_fn,
      distilled,
      ratio_weight=sp.ratio_weight,
      kl_weight=sp.kl_weight,
      token_weight=sp.token_weight,
  )
  groups = trainer.finetune(
      config.optim,
      sp,
      jax.eval_shape(fresh, jax.random.key(0)),
      steps_per_epoch,
      batch,
      dense=teacher.params,
      frozen_names=('cls', 'pos_embedding'),
  )
  return ModelFamily(model, objective, groups, from_teacher, teacher)


def inference_model(config: ConfigDict, num_classes: int, workdir: Path):
  """The model a trained run in `workdir` infers with (A-ViT: with the gate
  it calibrated)."""
  overrides = {}
  if config.model.name == 'avit':
    overrides = {
        'gate_center': _gate_center(config, None, None, workdir),
        'faithful': config.sparse.faithful,
    }
  return models.create(config.model, num_classes, **overrides)


def load_teacher(
    init_from: str, num_classes: int, mesh, split_id: dict[str, Any]
) -> Teacher:
  """The inference weights of the best checkpoint of the ViT workdir
  `init_from`, which must have trained on the data split `split_id`."""
  workdir = Path(init_from).expanduser()
  train_cmd = (
      f'python -m vitjax.main --config=configs/vit.py --workdir={init_from}'
  )
  if not (workdir / 'config.json').exists():
    raise checkpoint.CheckpointError(
        f'sparse.init_from={init_from!r} holds no ViT run (no config.json). '
        f'Train the ViT first: {train_cmd} (with the same preset, e.g. '
        'configs/vit.py:cpu), or point --config.sparse.init_from at its '
        'workdir.'
    )
  vit_cfg = workdir_lib.saved_config(workdir)
  if vit_cfg.model.name != 'vit':
    raise checkpoint.CheckpointError(
        f'sparse.init_from={init_from!r} is a {vit_cfg.model.name!r} run; it '
        f'must be a dense ViT run ({train_cmd}).'
    )
  workdir_lib.check_split(workdir, split_id)
  model = models.create(vit_cfg.model, num_classes)
  abstract = parallel.with_sharding(
      trainer.abstract_params(model),
      parallel.replicated(mesh),
  )
  with checkpoint.Checkpoints(workdir) as ckpts:
    if ckpts.best_step() is None:
      raise checkpoint.CheckpointError(
          f'sparse.init_from={init_from!r} has no validated checkpoint yet. '
          f'Train the ViT first: {train_cmd}'
      )
    params, step = ckpts.restore_weights(
        abstract, 'best', ema=uses_ema(vit_cfg)
    )
  return Teacher(model, params, vit_cfg, step)


def untrained_teacher(config: ConfigDict, num_classes: int) -> Teacher:
  """A ViT of config's backbone with random weights, standing in for a
  trained one where only the cost of a fine-tune's step matters
  (scripts/benchmark.py)."""
  vit_cfg = {k: v for k, v in config.model.items() if k in models.fields('vit')}
  model = models.create(vit_cfg | {'name': 'vit'}, num_classes)
  params = trainer.init_params(model, jax.random.key(0))
  return Teacher(model, params, config, 0)


def uses_ema(config: ConfigDict) -> bool:
  """Whether the run evaluates (and so validates) its EMA weights."""
  return config.optim.ema_decay > 0 and config.eval.use_ema


def check_backbone_matches(
    sparse_model_cfg: ConfigDict, teacher: Teacher, init_from: str
) -> None:
  """The sparse model must have the teacher's backbone sizes."""
  keys = ('patch_size', 'hidden_dim', 'depth', 'num_heads', 'mlp_ratio', 'stem')
  diffs = [
      f'model.{k} is {sparse_model_cfg[k]!r} here but '
      f'{teacher.config.model[k]!r} in {init_from!r}'
      for k in keys
      if sparse_model_cfg[k] != teacher.config.model[k]
  ]
  if diffs:
    raise checkpoint.CheckpointError(
        'the ViT checkpoint does not fit the model: '
        + '; '.join(diffs)
        + '. Use the same sizes (the same preset) as the ViT run.'
    )


def merge_params(fresh: Any, dense: Any) -> Any:
  """The sparse model's params with every shared array taken from `dense`."""
  fresh = dict(fresh)
  for name, value in dense.items():
    if name not in fresh:
      raise checkpoint.CheckpointError(
          f'the ViT checkpoint has {name!r}, which the sparse model lacks.'
      )
    if isinstance(value, dict):
      fresh[name] = merge_params(fresh[name], value)
    else:
      if fresh[name].shape != value.shape:
        raise checkpoint.CheckpointError(
            f'the ViT checkpoint does not fit the model: {name} is '
            f'{value.shape} there but {fresh[name].shape} here.'
        )
      fresh[name] = value
  return fresh


def _log_corrections(config: ConfigDict) -> None:
  """Says what the loss corrects for when the sampler already rebalances."""
  corrects = config.loss.name == 'logit_adjusted' or (
      config.loss.class_weights != 'none'
  )
  if config.data.sampling == 'natural' or not corrects:
    return
  logging.info(
      'data.sampling=%r already rebalances the classes; loss.name=%r and '
      'loss.class_weights=%r are computed from the distribution it draws%s, '
      'so they do not correct twice.',
      config.data.sampling,
      config.loss.name,
      config.loss.class_weights,
      ' (uniform: logit adjustment and class weights change nothing)'
      if config.data.sampling == 'balanced'
      else '',
  )


def _gate_center(
    config: ConfigDict,
    teacher: Teacher | None,
    data: sources.Dataset | None,
    workdir: Path | None,
) -> float:
  """A-ViT's beta: the config's, or calibrated once on the dense ViT
  (avit.calibrate_gate) on a seeded sample of `sparse.calibration_images`
  training images stratified by class (the training arrays are sorted by
  class), at the first start; kept in <workdir>/calibration.json, which
  resumes and evaluations reuse."""
  sp = config.sparse
  if not sp.calibrate_gate_center:
    return config.model.gate_center
  path = None if workdir is None else Path(workdir) / CALIBRATION_FILE
  if path is not None and path.exists():
    return float(json.loads(path.read_text())['gate_center'])
  if teacher is None:
    raise checkpoint.CheckpointError(
        f'{str(path)!r} is missing: the A-ViT run in {str(workdir)!r} has '
        'not started. Train it first (python -m vitjax.main '
        f'--config=configs/avit.py --workdir={workdir}).'
    )
  probe = models.create(config.model, data.num_classes)
  n = len(data.train)
  sample = np.arange(n)
  if sp.calibration_images < n:
    _, sample = sources.stratified_split(
        data.train.labels, sp.calibration_images / n, config.seed
    )
  record = avit.calibrate_gate(
      probe,
      merge_params(
          trainer.init_params(probe, jax.random.key(0)), teacher.params
      ),
      data.train.images[sample],
      data.train.labels[sample],
      data.class_names,
      sp.initial_halting_sum,
  )
  if path is not None and jax.process_index() == 0:  # all computed the same
    workdir_lib.write_json(path, record)
  logging.info(
      'A-ViT gate_center calibrated to %.4f (gate_scale %.1f, mean halting '
      'sum %.2f over the first D-1 blocks of the ViT, on %d training images '
      'across the classes); per class %s.',
      record['gate_center'],
      record['gate_scale'],
      record['initial_halting_sum'],
      record['images'],
      {k: round(v, 3) for k, v in record['halting_sum_per_class'].items()},
  )
  return record['gate_center']

"""What each model family trains: its model, objective, optimizer and first
weights (`config.model.name` picks the family).

- vit: classification loss; AdamW on every parameter; random init.
- dynamic_vit: classification + ratio + distillation losses; predictors at
  the full schedule, the backbone at a fraction of it and frozen at first,
  class token and position embedding fixed (the official recipe); weights
  from the ViT workdir `sparse.init_from`, which is also the teacher.
- avit: classification + ponder + halting prior (+ optional distillation);
  every parameter trained at the full schedule (the official recipe);
  weights from the ViT; gate_center calibrated on it (see `_gate_center`).
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
import optax

from vitjax import checkpoint, finetune, losses, models, objectives
from vitjax import optimizers, train_state
from vitjax.data.sources import Dataset
from vitjax.models import avit


@dataclasses.dataclass
class ModelFamily:
  model: Any
  objective: Any
  # total_steps -> (optimizer, its main learning-rate schedule)
  make_optimizer: Callable[
      [int], tuple[optax.GradientTransformation, optax.Schedule]
  ]
  # key -> parameters to start from (jittable)
  init_params: Callable[[jax.Array], Any]
  teacher: finetune.Teacher | None = None


def build(
    config: ConfigDict, data: Dataset, steps_per_epoch: int, mesh, workdir: Path
) -> ModelFamily:
  """The family of config.model.name; sparse models load their ViT."""
  name = config.model.name
  if name not in models.MODELS:
    raise ValueError(
        f'model.name={name!r}: expected one of ' f'{sorted(models.MODELS)}.'
    )
  num_classes = data.num_classes
  teacher = None
  if name != 'vit':
    teacher = finetune.load_teacher(config.sparse.init_from, num_classes, mesh)
    finetune.check_backbone_matches(
        config.model, teacher, config.sparse.init_from
    )
  overrides = {}
  if name == 'avit':
    overrides['gate_center'] = _gate_center(config, teacher, data, workdir)
  model = models.create(config.model, num_classes, **overrides)
  loss_fn = losses.make_classification_loss(
      config.loss, data.train.counts(num_classes), steps_per_epoch
  )
  batch = config.train.batch_size

  def adamw_everywhere(total_steps):
    schedule = optimizers.learning_rate_schedule(
        config.optim, total_steps, steps_per_epoch, batch
    )
    return optimizers.make_optimizer(config.optim, schedule), schedule

  fresh = lambda key: train_state.init_params(model, key)
  if name == 'vit':
    return ModelFamily(
        model,
        objectives.Classification(model, loss_fn),
        adamw_everywhere,
        fresh,
    )

  def from_teacher(key):
    return finetune.merge_params(fresh(key), teacher.params)

  sp = config.sparse
  if name == 'dynamic_vit':
    objective = objectives.DynamicViTObjective(
        model,
        loss_fn,
        teacher if sp.distill else None,
        ratio_weight=sp.ratio_weight,
        kl_weight=sp.kl_weight,
        token_weight=sp.token_weight,
    )

    def split_optimizer(total_steps):
      params = jax.eval_shape(fresh, jax.random.key(0))
      return optimizers.finetune_optimizer(
          config.optim,
          sp,
          params,
          total_steps,
          steps_per_epoch,
          batch,
          dense=teacher.params,
          frozen_names=('cls', 'pos_embedding'),
      )

    return ModelFamily(model, objective, split_optimizer, from_teacher, teacher)
  objective = objectives.AViTObjective(
      model,
      loss_fn,
      teacher if sp.distill else None,
      ponder_weight=sp.ponder_weight,
      distr_weight=sp.distr_weight,
      prior_mean=sp.prior_mean
      if sp.prior_mean >= 0
      else round(2 * model.depth / 3),
      prior_std=sp.prior_std,
      faithful=sp.faithful,
      kl_weight=sp.kl_weight,
  )
  return ModelFamily(model, objective, adamw_everywhere, from_teacher, teacher)


def _gate_center(
    config: ConfigDict,
    teacher: finetune.Teacher | None,
    data: Dataset,
    workdir: Path,
) -> float:
  """A-ViT's beta: the config's, or calibrated once on the dense ViT.

  The paper's constants saturate the sigmoid on a fresh CIFAR model (h ~
  1e-13, no ponder gradient), so by default beta is chosen so that the
  dense model's mean per-token halting sum over the first D-1 blocks is
  `sparse.initial_halting_sum`. It is computed at the first start and kept
  in <workdir>/calibration.json, which resumes and evaluations reuse.
  """
  sp = config.sparse
  if not sp.calibrate_gate_center:
    return config.model.gate_center
  path = workdir / 'calibration.json'
  if path.exists():
    return float(json.loads(path.read_text())['gate_center'])
  if teacher is None:
    raise checkpoint.CheckpointError(
        f'{str(path)!r} is missing: the A-ViT run in {str(workdir)!r} has '
        'not started. Train it first (python -m vitjax.main '
        f'--config=configs/avit.py --workdir={workdir}).'
    )
  probe = models.create(config.model, data.num_classes, gate_center=1e9)
  images = data.train.images[: sp.calibration_images]
  gate_inputs = jax.jit(
      lambda p, x: probe.apply({'params': p}, x, train=False)[1]['gate_inputs']
  )(
      finetune.merge_params(
          train_state.init_params(probe, jax.random.key(0)), teacher.params
      ),
      images,
  )
  beta = avit.calibrate_gate_center(
      np.asarray(gate_inputs), config.model.gate_scale, sp.initial_halting_sum
  )
  record = {
      'gate_center': beta,
      'gate_scale': config.model.gate_scale,
      'initial_halting_sum': sp.initial_halting_sum,
      'images': int(len(images)),
      'gate_input_mean': float(np.mean(gate_inputs)),
      'gate_input_std': float(np.std(gate_inputs)),
  }
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(path)
  logging.info(
      'A-ViT gate_center calibrated to %.4f (gate_scale %.1f, mean '
      'halting sum %.2f over the first D-1 blocks of the ViT, on '
      '%d training images).',
      beta,
      config.model.gate_scale,
      sp.initial_halting_sum,
      len(images),
  )
  return beta

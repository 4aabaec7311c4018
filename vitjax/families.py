"""What each model family trains: its model, objective, optimizer and first
weights (`config.model.name` picks the family).

- vit: classification loss; AdamW on every parameter; random init. With a
  `sparse` config section (configs/dynamic_vit.py:cpu_dense), the control
  for DynamicViT: its whole recipe, the ViT's weights and teacher included,
  without token dropping.
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

from vitjax import checkpoint, errors, finetune, losses, models
from vitjax import objectives, optimizers, train_state
from vitjax.data import sources
from vitjax.data.sources import Dataset
from vitjax.models import avit


@dataclasses.dataclass
class ModelFamily:
  model: Any
  objective: Any
  optimizer: optimizers.Optimizer
  # key -> parameters to start from (jittable)
  init_params: Callable[[jax.Array], Any]
  teacher: finetune.Teacher | None = None


def build(
    config: ConfigDict, data: Dataset, steps_per_epoch: int, mesh, workdir: Path
) -> ModelFamily:
  """The family of config.model.name; sparse models load their ViT."""
  name = config.model.name
  if name not in models.MODELS:
    raise errors.ConfigError(
        f'model.name={name!r}: expected one of {sorted(models.MODELS)}.'
    )
  num_classes = data.num_classes
  # DynamicViT, A-ViT, and the ViT trained as a DynamicViT control, start
  # from a ViT run (config.sparse.init_from).
  finetuned = 'sparse' in config
  if finetuned and config.model.patch_dropout:
    # Their objective compares every token with the teacher's; the control
    # (configs/dynamic_vit.py:cpu_dense) is DynamicViT without dropping.
    raise errors.ConfigError(
        f'model.patch_dropout={config.model.patch_dropout:g}: a fine-tune '
        'from a ViT (a config with a sparse section) keeps every token; '
        'set it to 0.'
    )
  teacher = None
  if finetuned:
    teacher = finetune.load_teacher(
        config.sparse.init_from, num_classes, mesh, data.split_id
    )
    finetune.check_backbone_matches(
        config.model, teacher, config.sparse.init_from
    )
  model = models.create(
      config.model,
      num_classes,
      **model_overrides(config, workdir, teacher, data),
  )
  loss_fn = losses.make_classification_loss(
      config.loss,
      data.train.counts(num_classes),
      steps_per_epoch,
      config.data.sampling,
  )
  _log_corrections(config)
  batch = config.train.batch_size

  adamw_everywhere = optimizers.make_optimizer(
      config.optim, steps_per_epoch, batch
  )
  fresh = lambda key: train_state.init_params(model, key)
  if not finetuned:
    return ModelFamily(
        model,
        objectives.Classification(model, loss_fn),
        adamw_everywhere,
        fresh,
    )

  def from_teacher(key):
    return finetune.merge_params(fresh(key), teacher.params)

  sp = config.sparse
  if name in ('dynamic_vit', 'vit'):  # 'vit': the control, as DynamicViT
    objective = objectives.DynamicViTObjective(
        model,
        loss_fn,
        teacher if sp.distill else None,
        ratio_weight=sp.ratio_weight,
        kl_weight=sp.kl_weight,
        token_weight=sp.token_weight,
    )

    split_optimizer = optimizers.finetune_optimizer(
        config.optim,
        sp,
        jax.eval_shape(fresh, jax.random.key(0)),
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


def model_overrides(
    config: ConfigDict,
    workdir: Path,
    teacher: finetune.Teacher | None = None,
    data: Dataset | None = None,
) -> dict[str, Any]:
  """What the family sets on its model beyond config.model: A-ViT's gate
  (calibrated at the first start, from the teacher and the data; read
  back from the workdir after) and its forward's mode."""
  if config.model.name != 'avit':
    return {}
  return {
      'gate_center': _gate_center(config, teacher, data, workdir),
      'faithful': config.sparse.faithful,
  }


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
    teacher: finetune.Teacher | None,
    data: Dataset | None,
    workdir: Path,
) -> float:
  """A-ViT's beta: the config's, or calibrated once on the dense ViT.

  The paper's constants saturate the sigmoid on a fresh CIFAR model (h ~
  1e-13, no ponder gradient), so by default beta is chosen so that the
  dense model's mean per-token halting sum over the first D-1 blocks is
  `sparse.initial_halting_sum`, on a seeded sample of
  `sparse.calibration_images` training images stratified by class (the
  training arrays are sorted by class). It is computed at the first start
  and kept in <workdir>/calibration.json, with the sum per class, which
  resumes and evaluations reuse.
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
  n = len(data.train)
  sample = np.arange(n)
  if sp.calibration_images < n:
    _, sample = sources.stratified_split(
        data.train.labels, sp.calibration_images / n, config.seed
    )
  images, labels = data.train.images[sample], data.train.labels[sample]
  gate_inputs = jax.jit(
      lambda p, x: probe.apply({'params': p}, x, train=False)[1]['gate_inputs']
  )(
      finetune.merge_params(
          train_state.init_params(probe, jax.random.key(0)), teacher.params
      ),
      images,
  )
  gate_inputs = np.asarray(gate_inputs)
  beta = avit.calibrate_gate_center(
      gate_inputs, config.model.gate_scale, sp.initial_halting_sum
  )
  sums = avit.halting_sums(gate_inputs, config.model.gate_scale, beta)
  per_class = {
      name: float(sums[labels == c].mean())
      for c, name in enumerate(data.class_names)
      if np.any(labels == c)
  }
  record = {
      'gate_center': beta,
      'gate_scale': config.model.gate_scale,
      'initial_halting_sum': sp.initial_halting_sum,
      'images': int(len(images)),
      'halting_sum_per_class': per_class,
      'gate_input_mean': float(np.mean(gate_inputs)),
      'gate_input_std': float(np.std(gate_inputs)),
  }
  if jax.process_index() == 0:  # every process calibrated the same
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
  logging.info(
      'A-ViT gate_center calibrated to %.4f (gate_scale %.1f, mean '
      'halting sum %.2f over the first D-1 blocks of the ViT, on '
      '%d training images across the classes); per class %s.',
      beta,
      config.model.gate_scale,
      sp.initial_halting_sum,
      len(images),
      {k: round(v, 3) for k, v in per_class.items()},
  )
  return beta

"""Starting a sparse model (DynamicViT, A-ViT) from a trained ViT workdir.

Both papers fine-tune from a trained dense model; here that is a ViT workdir
named by `config.sparse.init_from`. Its config.json says how it was built,
its best checkpoint gives the weights, which initialise the sparse model's
shared parameters and serve, frozen, as the distillation teacher.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict
import optax

from vitjax import checkpoint, models, parallel, train_state

IMAGE_SHAPE = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class Teacher:
  model: Any  # the dense ViT module
  params: Any  # its (EMA, if it has one) weights
  config: ConfigDict  # the ViT run's full config
  step: int


def load_teacher(init_from: str, num_classes: int, mesh) -> Teacher:
  """Restores the best checkpoint of the ViT workdir `init_from`."""
  workdir = Path(init_from).expanduser()
  train_cmd = ('python -m vitjax.main --config=configs/vit.py '
               f'--workdir={init_from}')
  cfg_path = workdir / 'config.json'
  if not cfg_path.exists():
    raise checkpoint.CheckpointError(
        f'sparse.init_from={init_from!r} holds no ViT run (no config.json). '
        f'Train the ViT first: {train_cmd} (with the same preset, e.g. '
        'configs/vit.py:cpu), or point --config.sparse.init_from at its '
        'workdir.')
  vit_cfg = ConfigDict(json.loads(cfg_path.read_text()))
  if vit_cfg.model.name != 'vit':
    raise checkpoint.CheckpointError(
        f'sparse.init_from={init_from!r} is a {vit_cfg.model.name!r} run; it '
        f'must be a dense ViT run ({train_cmd}).')
  model = models.create(vit_cfg.model, num_classes)
  tx = train_state.make_optimizer(vit_cfg.optim, optax.constant_schedule(0.))
  use_ema = vit_cfg.optim.ema_decay > 0
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                     sharding=parallel.replicated(mesh)),
      train_state.abstract_state(model, tx, IMAGE_SHAPE, use_ema))
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    if ckpts.best_step() is None:
      raise checkpoint.CheckpointError(
          f'sparse.init_from={init_from!r} has no checkpoint yet. Train the '
          f'ViT first: {train_cmd}')
    state, meta = ckpts.restore(abstract, 'best')
  finally:
    ckpts.close()
  return Teacher(model, state.eval_params(vit_cfg.eval.use_ema), vit_cfg,
                 int(meta['step']))


def check_backbone_matches(sparse_model_cfg: ConfigDict, teacher: Teacher,
                           init_from: str) -> None:
  """The sparse model must have the teacher's backbone sizes."""
  keys = ('patch_size', 'hidden_dim', 'depth', 'num_heads', 'mlp_ratio',
          'stem')
  diffs = [f'model.{k} is {sparse_model_cfg[k]!r} here but '
           f'{teacher.config.model[k]!r} in {init_from!r}'
           for k in keys if sparse_model_cfg[k] != teacher.config.model[k]]
  if diffs:
    raise checkpoint.CheckpointError(
        'the ViT checkpoint does not fit the model: ' + '; '.join(diffs) +
        '. Use the same sizes (the same preset) as the ViT run.')


def merge_params(fresh: Any, dense: Any) -> Any:
  """The sparse model's params with every shared array taken from `dense`."""
  fresh = dict(fresh)
  for name, value in dense.items():
    if name not in fresh:
      raise checkpoint.CheckpointError(
          f'the ViT checkpoint has {name!r}, which the sparse model lacks.')
    if isinstance(value, dict):
      fresh[name] = merge_params(fresh[name], value)
    else:
      if fresh[name].shape != value.shape:
        raise checkpoint.CheckpointError(
            f'the ViT checkpoint does not fit the model: {name} is '
            f'{value.shape} there but {fresh[name].shape} here.')
      fresh[name] = value
  return fresh


def param_groups(params: Any, dense: Any, frozen_names: tuple[str, ...]
                 ) -> Any:
  """'new' (absent from the dense ViT's params), 'frozen' or 'backbone' per
  leaf. Membership, not module names, decides what is new."""
  def label(path, _):
    node = dense
    for key in path:
      if not isinstance(node, dict) or key.key not in node:
        return 'new'
      node = node[key.key]
    return 'frozen' if path[-1].key in frozen_names else 'backbone'
  return jax.tree_util.tree_map_with_path(label, params)


def finetune_optimizer(optim_cfg, sparse_cfg, params: Any, total_steps: int,
                       steps_per_epoch: int, batch_size: int,
                       dense: Any, frozen_names: tuple[str, ...] = ()
                       ) -> tuple[optax.GradientTransformation,
                                  optax.Schedule]:
  """Modules absent from `dense` (the ViT's params) at the full schedule;
  the backbone at backbone_lr_mult of it, held at zero for the first
  freeze_backbone_fraction of the steps."""
  schedule = train_state.learning_rate_schedule(
      optim_cfg, total_steps, steps_per_epoch, batch_size)
  freeze = int(round(sparse_cfg.freeze_backbone_fraction * total_steps))
  mult = sparse_cfg.backbone_lr_mult

  def backbone_schedule(step):
    return jax.numpy.where(step < freeze, 0.0, mult * schedule(step))

  groups = {'new': train_state.adamw(optim_cfg, schedule),
            'backbone': train_state.adamw(optim_cfg, backbone_schedule),
            'frozen': optax.set_to_zero()}
  labels = param_groups(params, dense, frozen_names)
  return train_state.with_clipping(
      optim_cfg, optax.multi_transform(groups, labels)), schedule

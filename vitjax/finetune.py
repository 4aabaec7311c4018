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

from ml_collections import ConfigDict

from vitjax import checkpoint, models, optimizers, sharding, train_state
from vitjax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Teacher:
  model: Any  # the dense ViT module
  params: Any  # its (EMA, if it has one) weights
  config: ConfigDict  # the ViT run's full config
  step: int


def load_teacher(
    init_from: str, num_classes: int, mesh, split_id: dict[str, Any]
) -> Teacher:
  """Restores the best checkpoint of the ViT workdir `init_from`, which
  must have trained on the data split `split_id`."""
  workdir = Path(init_from).expanduser()
  train_cmd = (
      f'python -m vitjax.main --config=configs/vit.py --workdir={init_from}'
  )
  cfg_path = workdir / 'config.json'
  if not cfg_path.exists():
    raise checkpoint.CheckpointError(
        f'sparse.init_from={init_from!r} holds no ViT run (no config.json). '
        f'Train the ViT first: {train_cmd} (with the same preset, e.g. '
        'configs/vit.py:cpu), or point --config.sparse.init_from at its '
        'workdir.'
    )
  vit_cfg = ConfigDict(json.loads(cfg_path.read_text()))
  if vit_cfg.model.name != 'vit':
    raise checkpoint.CheckpointError(
        f'sparse.init_from={init_from!r} is a {vit_cfg.model.name!r} run; it '
        f'must be a dense ViT run ({train_cmd}).'
    )
  workdir_lib.check_split(workdir, split_id, record=False)
  model = models.create(vit_cfg.model, num_classes)
  # The optimizer's structure, not its schedule, shapes the saved state.
  tx = optimizers.make_optimizer(vit_cfg.optim, 1, 1).structure()
  abstract = train_state.abstract(
      model, tx, vit_cfg.optim.ema_decay > 0, sharding.replicated(mesh)
  )
  with checkpoint.Checkpoints(workdir) as ckpts:
    if ckpts.best_step() is None:
      raise checkpoint.CheckpointError(
          f'sparse.init_from={init_from!r} has no validated checkpoint yet. '
          f'Train the ViT first: {train_cmd}'
      )
    state, meta = ckpts.restore(abstract, 'best')
  return Teacher(
      model, state.eval_params(vit_cfg.eval.use_ema), vit_cfg, int(meta['step'])
  )


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

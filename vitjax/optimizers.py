"""The optimizers: AdamW under a warmup-cosine schedule, and the fine-tunes'.

`optim.lr` is the peak learning rate at `optim.lr_base_batch` images per
step; a run at another `train.batch_size` scales it linearly (the configs
state it at the batch they run, so they run it unscaled).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

# Parameters kept out of weight decay besides biases and norms: the learned
# tokens and position embeddings (as DeiT and timm do).
_NO_DECAY_NAMES = ('pos_embedding', 'cls')


def learning_rate_schedule(
    optim_cfg, total_steps: int, steps_per_epoch: int, batch_size: int
) -> optax.Schedule:
  """Linear warmup, then cosine decay to min_lr."""
  peak = optim_cfg.lr * batch_size / optim_cfg.lr_base_batch
  warmup = min(
      int(round(optim_cfg.warmup_epochs * steps_per_epoch)),
      max(total_steps - 1, 0),
  )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=min(optim_cfg.min_lr, peak),
  )


def _decay_mask(params: Any) -> Any:
  def decays(path, leaf):
    name = getattr(path[-1], 'key', '')
    return leaf.ndim > 1 and name not in _NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params)


def adamw(optim_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(
      schedule,
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      weight_decay=optim_cfg.weight_decay,
      mask=_decay_mask,
  )


def with_clipping(
    optim_cfg, tx: optax.GradientTransformation
) -> optax.GradientTransformation:
  """Clips the global gradient norm (over all parameters) before tx."""
  if optim_cfg.grad_clip_norm <= 0:
    return tx
  return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), tx)


def make_optimizer(
    optim_cfg, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """AdamW on every parameter, after gradient clipping."""
  return with_clipping(optim_cfg, adamw(optim_cfg, schedule))


def param_groups(params: Any, dense: Any, frozen_names: tuple[str, ...]) -> Any:
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


def finetune_optimizer(
    optim_cfg,
    sparse_cfg,
    params: Any,
    total_steps: int,
    steps_per_epoch: int,
    batch_size: int,
    dense: Any,
    frozen_names: tuple[str, ...] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Modules absent from `dense` (the ViT's params) at the full schedule;
  the backbone at backbone_lr_mult of it, held at zero for the first
  freeze_backbone_fraction of the steps; `frozen_names` never move."""
  schedule = learning_rate_schedule(
      optim_cfg, total_steps, steps_per_epoch, batch_size
  )
  freeze = int(round(sparse_cfg.freeze_backbone_fraction * total_steps))
  mult = sparse_cfg.backbone_lr_mult

  def backbone_schedule(step):
    return jnp.where(step < freeze, 0.0, mult * schedule(step))

  groups = {
      'new': adamw(optim_cfg, schedule),
      'backbone': adamw(optim_cfg, backbone_schedule),
      'frozen': optax.set_to_zero(),
  }
  labels = param_groups(params, dense, frozen_names)
  return with_clipping(optim_cfg, optax.multi_transform(groups, labels)), (
      schedule
  )

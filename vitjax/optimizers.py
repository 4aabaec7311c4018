"""The optimizers: AdamW under a warmup-cosine schedule, and the fine-tunes'.

`optim.lr` is the peak learning rate at `optim.lr_base_batch` images per
step; a run at another `train.batch_size` scales it linearly (the configs
state it at the batch they run, so they run it unscaled).

The schedules are functions of a position along them, not of the update
count: a time-budgeted run moves along its schedule at the pace its clock
allows (vitjax/time_budget.py). The train step takes the learning rates at
its position as an input, so one compiled step serves every plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

# Parameters kept out of weight decay besides biases and norms: the learned
# tokens and position embeddings (as DeiT and timm do).
_NO_DECAY_NAMES = ('pos_embedding', 'cls')


def learning_rate_schedule(
    optim_cfg, horizon: int, steps_per_epoch: int, batch_size: int
) -> optax.Schedule:
  """Linear warmup, then cosine decay to min_lr at position `horizon`."""
  peak = optim_cfg.lr * batch_size / optim_cfg.lr_base_batch
  warmup = min(
      int(round(optim_cfg.warmup_epochs * steps_per_epoch)),
      max(horizon - 1, 0),
  )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(horizon, warmup + 1),
      end_value=min(optim_cfg.min_lr, peak),
  )


Rates = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """at(rates): the optimizer that applies the given learning rates;
  schedules(horizon)(position): the learning rates at a position (a step,
  possibly fractional) of schedules `horizon` steps long."""

  at: Callable[[Rates], optax.GradientTransformation]
  schedules: Callable[[int], Callable[[Any], Rates]]

  def structure(self) -> optax.GradientTransformation:
    """For init and restore: the state's shape does not depend on rates."""
    return self.at(self.schedules(1)(0.0))


def _at_rate(rate: jax.Array) -> optax.Schedule:
  # A schedule, not a float: optax keeps a step count in the state of a
  # scheduled learning rate, which checkpoints saved before rates were
  # inputs hold.
  return optax.constant_schedule(rate)


def _decay_mask(params: Any) -> Any:
  def decays(path, leaf):
    name = getattr(path[-1], 'key', '')
    return leaf.ndim > 1 and name not in _NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params)


def adamw(optim_cfg, rate: jax.Array) -> optax.GradientTransformation:
  return optax.adamw(
      _at_rate(rate),
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
    optim_cfg, steps_per_epoch: int, batch_size: int
) -> Optimizer:
  """AdamW on every parameter, after gradient clipping."""

  def schedules(horizon):
    schedule = learning_rate_schedule(
        optim_cfg, horizon, steps_per_epoch, batch_size
    )
    return lambda position: {'learning_rate': schedule(position)}

  return Optimizer(
      at=lambda r: with_clipping(
          optim_cfg, adamw(optim_cfg, r['learning_rate'])
      ),
      schedules=schedules,
  )


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
    steps_per_epoch: int,
    batch_size: int,
    dense: Any,
    frozen_names: tuple[str, ...] = (),
) -> Optimizer:
  """Modules absent from `dense` (the ViT's params) at the full schedule
  (its `learning_rate`); the backbone at backbone_lr_mult of it
  (`backbone_learning_rate`), held at zero for the first
  freeze_backbone_fraction of the schedule; `frozen_names` never move."""
  mult = sparse_cfg.backbone_lr_mult
  labels = param_groups(params, dense, frozen_names)

  def schedules(horizon):
    schedule = learning_rate_schedule(
        optim_cfg, horizon, steps_per_epoch, batch_size
    )
    freeze = round(sparse_cfg.freeze_backbone_fraction * horizon)

    def rates(position):
      lr = schedule(position)
      backbone = jnp.where(position < freeze, 0.0, mult * lr)
      return {'learning_rate': lr, 'backbone_learning_rate': backbone}

    return rates

  def at(r):
    groups = {
        'new': adamw(optim_cfg, r['learning_rate']),
        'backbone': adamw(optim_cfg, r['backbone_learning_rate']),
        'frozen': optax.set_to_zero(),
    }
    return with_clipping(optim_cfg, optax.multi_transform(groups, labels))

  return Optimizer(at, schedules)

"""The train state and the optimizer that updates it (optax AdamW).

Used by training, by evaluation (to know the checkpoint's structure) and by
the sparse models' initialisation from a ViT checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Parameters kept out of weight decay besides biases and norms: the learned
# tokens and position embeddings (as DeiT and timm do).
_NO_DECAY_NAMES = ('pos_embedding', 'cls')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # an EMA of params, or None when optim.ema_decay == 0

  def eval_params(self, use_ema: bool = True) -> Any:
    return self.ema_params if use_ema and self.ema_params is not None else (
        self.params)


def learning_rate_schedule(optim_cfg, total_steps: int, steps_per_epoch: int,
                           batch_size: int) -> optax.Schedule:
  """Linear warmup, then cosine decay to min_lr; peak scaled by batch size."""
  peak = optim_cfg.lr * batch_size / optim_cfg.lr_base_batch
  warmup = min(int(round(optim_cfg.warmup_epochs * steps_per_epoch)),
               max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=min(optim_cfg.min_lr, peak))


def _decay_mask(params: Any) -> Any:
  def decays(path, leaf):
    name = getattr(path[-1], 'key', '')
    return leaf.ndim > 1 and name not in _NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def adamw(optim_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                     weight_decay=optim_cfg.weight_decay, mask=_decay_mask)


def with_clipping(optim_cfg, tx: optax.GradientTransformation
                  ) -> optax.GradientTransformation:
  """Clips the global gradient norm (over all parameters) before tx."""
  if optim_cfg.grad_clip_norm <= 0:
    return tx
  return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), tx)


def make_optimizer(optim_cfg, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  return with_clipping(optim_cfg, adamw(optim_cfg, schedule))


def from_params(params: Any, tx: optax.GradientTransformation,
                use_ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    ema_params=params if use_ema else None)


def init_params(model: nn.Module, key: jax.Array,
                image_shape: tuple[int, ...]) -> Any:
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.uint8)
  return model.init({'params': key}, dummy, train=False)['params']


def init_fn(model: nn.Module, tx: optax.GradientTransformation,
            image_shape: tuple[int, ...], use_ema: bool
            ) -> Callable[[jax.Array], TrainState]:
  """A function key -> fresh TrainState, to be jitted with out_shardings."""
  def init(key):
    return from_params(init_params(model, key, image_shape), tx, use_ema)
  return init


def abstract_state(model: nn.Module, tx: optax.GradientTransformation,
                   image_shape: tuple[int, ...], use_ema: bool) -> TrainState:
  """The state's shapes and dtypes, for restoring without initialising."""
  return jax.eval_shape(init_fn(model, tx, image_shape, use_ema),
                        jax.random.key(0))

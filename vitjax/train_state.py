"""The train state: flax's TrainState plus an optional EMA of the weights."""

from __future__ import annotations

from typing import Any

from flax.training import train_state
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vitjax import sharding
from vitjax.data.sources import IMAGE_SHAPE


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, tx, opt_state; apply_fn is the model's
  apply, though the objectives call the model themselves) and an EMA.
  tx is the optimizer's structure; each step brings its own (at its
  learning rates) to apply_gradients_with."""

  ema_params: Any  # an EMA of params, or None when optim.ema_decay == 0

  def apply_gradients_with(
      self, tx: optax.GradientTransformation, grads: Any
  ) -> 'TrainState':
    """One update by `tx` (the optimizer at this step's learning rates,
    vitjax/optimizers.py); self.tx only shapes the state."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=opt_state,
    )

  def eval_params(self, use_ema: bool = True) -> Any:
    """The weights to evaluate: the EMA's when asked and kept."""
    return (
        self.ema_params
        if use_ema and self.ema_params is not None
        else (self.params)
    )


def init_params(model: nn.Module, key: jax.Array) -> Any:
  dummy = jnp.zeros((1,) + IMAGE_SHAPE, jnp.uint8)
  return model.init({'params': key}, dummy, train=False)['params']


def create(
    model: nn.Module,
    params: Any,
    tx: optax.GradientTransformation,
    use_ema: bool,
) -> TrainState:
  # An int32 step (TrainState.create's is a Python int), as it is restored.
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      apply_fn=model.apply,
      params=params,
      tx=tx,
      opt_state=tx.init(params),
      ema_params=params if use_ema else None,
  )


def abstract(
    model: nn.Module,
    tx: optax.GradientTransformation,
    use_ema: bool,
    placement: jax.sharding.Sharding,
) -> TrainState:
  """The state's shapes and dtypes on `placement`, to restore onto."""
  shapes = jax.eval_shape(
      lambda key: create(model, init_params(model, key), tx, use_ema),
      jax.random.key(0),
  )
  return sharding.with_sharding(shapes, placement)

"""What a train step minimises, per model family.

An objective maps (params, images, soft targets, step, rngs) to the total
loss and (logits, named extra scalars). The train step averages the extras
into the logged metrics, so a model's own loss terms (DynamicViT's ratio
loss, A-ViT's ponder loss) show up in the logs without touching the loop.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax


class Classification:
  """The classification loss alone: the dense ViT's objective."""

  extra_metrics: tuple[str, ...] = ()

  def __init__(self, model: nn.Module,
               loss_fn: Callable[[jax.Array, jax.Array, jax.Array],
                                 jax.Array]):
    self.model = model
    self.loss_fn = loss_fn

  def __call__(self, params: Any, images: jax.Array, targets: jax.Array,
               step: jax.Array, rngs: dict[str, jax.Array]
               ) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    logits, _ = self.model.apply({'params': params}, images, train=True,
                                 rngs=rngs)
    return self.loss_fn(logits, targets, step), (logits, {})

"""Weights cast once to the compute dtype, for inference.

A bfloat16 model keeps float32 weights (the optimizer's master copy), and
its matmul layers cast them to bfloat16 on every call. At batch 1 on a CPU
those casts are a fifth of the forward's kernels (the CPU preset's
DynamicViT: 62 of 284), each a launch beside a matmul of a few dozen
tokens. Inference casts them once instead.

Only the parameters that a layer reads through that cast alone are cast:
the kernels and biases of the Dense and Conv layers that compute in the
model's dtype, and the patch embedding's class token and position table.
LayerNorm's scale and bias stay float32, since flax applies them in
float32. On XLA:CPU the logits are bit for bit those of the float32
weights (tests/test_vit.py). That rests on every float matmul returning
the compute dtype, so that Dense's `bias.astype(y.dtype)` is a cast to it
(lax.dot_general and Bf16Dot both do); a backend that may keep a bfloat16
add in float32 (XLA's excess precision, on GPUs without bfloat16 adds)
can differ in the last bits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models.dense import Dense
from vitjax.models.vit import PatchEmbed, compute_dtype

# Modules whose own parameters are read only as `param.astype(self.dtype)`.
_CAST_ON_READ = (Dense, nn.Conv, PatchEmbed)


def cast_for_inference(
    model: nn.Module, params: Any, image_shape: tuple[int, ...]
) -> Any:
  """`params` with the leaves that `model` reads only in its compute dtype
  cast to it; unchanged for a float32 model. image_shape: one image's,
  to trace the model's inference call (no computation runs), for a
  symbolic batch: what holds for any batch size, and every layer traced
  once (A-ViT's compact path, for a known small batch, would trace each
  block once per width)."""
  dtype = compute_dtype(model.dtype)
  if dtype == jnp.float32:
    return params
  casting: set[tuple[str, ...]] = set()

  def record(call, args, kwargs, context):
    module = context.module
    if (
        isinstance(module, _CAST_ON_READ)
        and context.method_name == '__call__'
        and jnp.dtype(module.dtype) == dtype
    ):
      casting.add(tuple(module.path))
    return call(*args, **kwargs)

  (batch,) = jax.export.symbolic_shape('batch')
  images = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.uint8)
  with nn.intercept_methods(record):
    jax.eval_shape(
        lambda p, x: model.apply({'params': p}, x, train=False), params, images
    )

  def cast(path, leaf):
    # A leaf's own module is the path without the leaf's name.
    names = tuple(k.key for k in path[:-1])
    return leaf.astype(dtype) if names in casting else leaf

  return jax.tree_util.tree_map_with_path(cast, params)

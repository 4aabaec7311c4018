"""Cost of a model: parameters and MACs per image.

MACs follow the fvcore / paper convention (DynamicViT and A-ViT count
them so): matmuls and convolutions only; LayerNorm, softmax and GELU are
not counted.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from vitjax.data.sources import IMAGE_SHAPE
from vitjax.evaluators.classification import Predictor


def param_count(params: Any) -> int:
  return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def block_macs(
    tokens: float,
    dim: int,
    mlp_ratio: float,
    token_squares: float,
) -> float:
  """One pre-LN block on `tokens` tokens: qkv + out + MLP + attention.

  Attention costs the square of the count: where the count varies between
  images (A-ViT), `tokens` is its mean and `token_squares` the mean of its
  squares, which the square of the mean under-counts.
  """
  mlp = int(dim * mlp_ratio)
  return (
      4 * tokens * dim * dim + 2 * tokens * dim * mlp + 2 * token_squares * dim
  )


def vit_macs(
    model,
    image_size: int = 32,
    tokens_per_block: Sequence[float] | None = None,
    token_squares_per_block: Sequence[float] | None = None,
) -> float:
  """MACs per image of a ViT-family model, without any token predictors.

  `tokens_per_block` (cls included) is what each block really processed:
  measured for A-ViT (the mean over images, with the mean of the squares in
  `token_squares_per_block`); by default the model's own static count.
  """
  c, p = model.hidden_dim, model.patch_size
  patches = (image_size // p) ** 2
  if model.stem == 'conv':  # log2(p) stride-2 3x3 convolutions
    macs, in_ch, side = 0.0, 3, image_size
    steps = p.bit_length() - 1
    for i in range(steps):
      width = max(c // 2 ** (2 * (steps - 1 - i)), 8)
      side //= 2
      macs += side * side * 9 * in_ch * width
      in_ch = width
  else:
    macs = patches * p * p * 3 * c
  if tokens_per_block is None:
    tokens_per_block = model.tokens_per_block(patches)
  if token_squares_per_block is None:
    token_squares_per_block = [n**2 for n in tokens_per_block]
  macs += sum(
      block_macs(n, c, model.mlp_ratio, n2)
      for n, n2 in zip(tokens_per_block, token_squares_per_block, strict=True)
  )
  return macs + c * model.num_classes


def model_macs(
    model,
    image_size: int = 32,
    tokens_per_block: Sequence[float] | None = None,
    token_squares_per_block: Sequence[float] | None = None,
) -> dict[str, float]:
  """{'macs_per_image': all of it, 'predictor_macs_per_image': the token
  predictors' share (DynamicViT; 0 for other models)}."""
  patches = (image_size // model.patch_size) ** 2
  predictors = (
      model.predictor_macs(patches) if hasattr(model, 'predictor_macs') else 0.0
  )
  backbone = vit_macs(
      model, image_size, tokens_per_block, token_squares_per_block
  )
  return {
      'macs_per_image': backbone + predictors,
      'predictor_macs_per_image': predictors,
  }


def xla_flops(fn: Callable, *args) -> float:
  """FLOPs XLA counts for fn(*args) (2 per MAC, plus elementwise work)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def cost_report(
    predictor: Predictor,
    sparsity: dict[str, Any] | None = None,
    float_params: Any = None,
) -> dict[str, Any]:
  """Parameters and MACs per image, analytic and as XLA counts them.

  sparsity: the model's sparsity report (evaluators/sparsity.py); where it
  measured the tokens each block ran on each image (A-ViT), the MACs are
  the mean over those images. By default the model's static counts. float_params: what to count as the parameters when
  the predictor's own tree lacks some (an int8 server keeps its quantized
  kernels outside 'params'). Speed is measured apart (evaluators/speed.py),
  with the models it is compared with.
  """
  model, variables = predictor.model, predictor.variables
  single = np.zeros((1,) + IMAGE_SHAPE, np.uint8)
  return {
      'parameters': param_count(
          variables['params'] if float_params is None else float_params
      ),
      # What the predictor holds in memory to serve: bfloat16 for the
      # weights cast to it, int8 for quantized kernels.
      'weight_bytes': int(sum(x.nbytes for x in jax.tree.leaves(variables))),
      **model_macs(
          model,
          IMAGE_SHAPE[0],
          (sparsity or {}).get('tokens_per_block'),
          (sparsity or {}).get('token_squares_per_block'),
      ),
      'xla_flops_per_image': xla_flops(predictor.logits, variables, single),
  }

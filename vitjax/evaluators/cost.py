"""Cost of a model: parameters, MACs per image, measured speed.

MACs follow the fvcore / paper convention (DynamicViT and A-ViT count
them so): matmuls and convolutions only; LayerNorm, softmax and GELU are
not counted.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from vitjax import sharding
from vitjax.data.sources import IMAGE_SHAPE
from vitjax.evaluators.classification import Predictor, make_predict_fn


def param_count(params: Any) -> int:
  return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def block_macs(tokens: float, dim: int, mlp_ratio: float) -> float:
  """One pre-LN block on `tokens` tokens: qkv + out + MLP + attention."""
  mlp = int(dim * mlp_ratio)
  return 4 * tokens * dim * dim + 2 * tokens * dim * mlp + 2 * tokens**2 * dim


def vit_macs(
    model, image_size: int = 32, tokens_per_block: Sequence[float] | None = None
) -> float:
  """MACs per image of a ViT-family model, without any token predictors.

  `tokens_per_block` (cls included) is what each block really processed:
  measured for A-ViT; by default the model's own static count.
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
  macs += sum(block_macs(n, c, model.mlp_ratio) for n in tokens_per_block)
  return macs + c * model.num_classes


def model_macs(
    model, image_size: int = 32, tokens_per_block: Sequence[float] | None = None
) -> dict[str, float]:
  """{'macs_per_image': all of it, 'predictor_macs_per_image': the token
  predictors' share (DynamicViT; 0 for other models)}."""
  patches = (image_size // model.patch_size) ** 2
  predictors = (
      model.predictor_macs(patches) if hasattr(model, 'predictor_macs') else 0.0
  )
  backbone = vit_macs(model, image_size, tokens_per_block)
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


def images_per_second(
    fn: Callable, *args, batch: int, repeats: int = 5, min_seconds: float = 0.5
) -> float:
  """Median throughput of an already jitted fn(*args) over `repeats` runs.

  Each run loops long enough (min_seconds) to average out timer noise.
  """
  jax.block_until_ready(fn(*args))  # compile and warm up
  rates = []
  for _ in range(repeats):
    n, start = 0, time.perf_counter()
    while True:
      jax.block_until_ready(fn(*args))
      n += 1
      elapsed = time.perf_counter() - start
      if elapsed >= min_seconds:
        break
    rates.append(n * batch / elapsed)
  return statistics.median(rates)


def cost_report(
    predictor: Predictor,
    mesh,
    speed_batch: int,
    speed_seconds: float = 0.5,
    tokens_per_block=None,
    float_params: Any = None,
) -> dict[str, Any]:
  """Parameters, MACs per image (analytic and XLA's count), speed.

  tokens_per_block: measured per-block token counts (A-ViT); by default the
  model's static ones. float_params: what to count as the parameters when
  the predictor's own tree lacks some (an int8 server keeps its quantized
  kernels outside 'params').
  """
  model, variables = predictor.model, predictor.variables
  predict_fn = make_predict_fn(predictor.logits, mesh)
  batch = max(speed_batch // mesh.size, 1) * mesh.size
  images = jax.device_put(
      np.zeros((batch,) + IMAGE_SHAPE, np.uint8), sharding.batch_sharding(mesh)
  )
  single = np.zeros((1,) + IMAGE_SHAPE, np.uint8)
  one = jax.jit(predictor.logits)
  return {
      'parameters': param_count(
          variables['params'] if float_params is None else float_params
      ),
      **model_macs(model, IMAGE_SHAPE[0], tokens_per_block),
      'xla_flops_per_image': xla_flops(one, variables, single),
      'inference_images_per_second': images_per_second(
          predict_fn, variables, images, batch=batch, min_seconds=speed_seconds
      ),
      'inference_batch': batch,
      'latency_ms_batch1': (
          1000.0
          / images_per_second(
              one, variables, single, batch=1, min_seconds=speed_seconds
          )
      ),
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
  }

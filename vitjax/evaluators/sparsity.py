"""What a sparse model computes on a set of images (the test set).

DynamicViT: its static stage layout. A-ViT: mean depth per token (and of
the class token, and per class), tokens per block (their mean over images
and the mean of their squares), where tokens halt, and
whether its two inference paths agree (their speed: evaluators/speed.py).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vitjax.data.sources import Split
from vitjax.evaluators.classification import Predictor
from vitjax.models import avit, dynamic_vit, token_removal


def sparsity_report(
    predictor: Predictor,
    split: Split,
    batch_size: int,
    num_classes: int,
) -> dict[str, Any]:
  """{} for a dense model."""
  images = split.images
  model = predictor.model
  patches = (images.shape[1] // model.patch_size) ** 2
  if isinstance(model, dynamic_vit.DynamicViT):
    keep = model.keep_counts(patches)
    return {
        'stage_blocks': list(model.stages()),
        'keep_counts': list(keep),
        'keep_ratio_per_stage': [k / patches for k in keep],
        'tokens_per_block': list(model.tokens_per_block(patches)),
    }
  if not isinstance(model, avit.AViT):
    return {}
  masked = jax.jit(predictor.apply)
  ready = jax.jit(predictor.prepare)(predictor.variables)  # for removal
  removal = lambda v, x: token_removal.token_removal_apply(model, v, x)
  preds, removal_preds, depth, active = [], [], [], []
  for start in range(0, len(images), batch_size):
    x = images[start : start + batch_size]
    logits, aux = masked(predictor.variables, x)
    preds.append(np.argmax(logits, -1))
    depth.append(np.asarray(aux['depth']))
    active.append(np.asarray(aux['active']).sum(-1))  # [depth, b]
    removal_preds.append(np.argmax(removal(ready, x)[0], -1))
  depth = np.concatenate(depth)  # [n, tokens]
  per_image = depth[:, 1:].mean(1)  # the patch tokens, as the figure
  depth_per_class = np.bincount(
      split.labels, per_image, num_classes
  ) / np.maximum(split.counts(num_classes), 1)
  active = np.concatenate(active, axis=1).astype(np.float64)  # [depth, n]
  halts_at = (
      np.bincount(depth.astype(int).ravel() - 1, minlength=model.depth)
      / depth.size
  )
  return {
      'gate_center': model.gate_center,
      'mean_depth_per_token': float(depth.mean()),
      'mean_depth_cls_token': float(depth[:, 0].mean()),
      # Do harder classes get more compute? Mean blocks per patch token
      # (the depth figure's bars).
      'mean_depth_per_class': depth_per_class.tolist(),
      # Per image, as attention's cost goes with the square (cost.py).
      'tokens_per_block': active.mean(1).tolist(),
      'token_squares_per_block': (active**2).mean(1).tolist(),
      'halting_distribution': halts_at.tolist(),
      'token_removal_agreement': float(
          np.mean(np.concatenate(preds) == np.concatenate(removal_preds))
      ),
  }

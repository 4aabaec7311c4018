"""What a model decides, patch by patch, on a fixed set of test images.

Each family's figure (drawn by vitjax/evaluators/plots.py) reads the model's own
inference forward pass, the one its accuracy is measured with:
- DynamicViT: the patches each pruning stage keeps (aux['kept_patches']);
- A-ViT: the blocks each patch token runs before it halts (aux['depth']);
- ViT: attention rollout (Abnar & Zuidema 2020) of the class token over the
  patches, from the attention weights the blocks sow when asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from vitjax.evaluators import plots
from vitjax.data.sources import Split
from vitjax.evaluators.classification import Predictor
from vitjax.models import avit, dynamic_vit

IMAGES_PER_CLASS = 2
SEED = 0


def pick_images(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Indices of `per_class` images of every class, seeded, class by class."""
  rng = np.random.default_rng(seed)
  return np.concatenate(
      [
          np.sort(
              rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
          )
          for c in np.unique(labels)
      ]
  )


def kept_patch_grids(kept_patches: Sequence[np.ndarray], grid: int):
  """bool [stages, b, grid, grid] from DynamicViT's per-stage kept positions
  ([b, k_s] indices into the row-major patch grid)."""
  stages = []
  for positions in kept_patches:
    positions = np.asarray(positions)
    keep = np.zeros((positions.shape[0], grid * grid), bool)
    np.put_along_axis(keep, positions, True, axis=1)
    stages.append(keep.reshape(-1, grid, grid))
  return np.stack(stages)


def attention_rollout(weights: Sequence[np.ndarray]) -> np.ndarray:
  """The class token's rollout over the patch tokens, [b, patches].

  weights: per block [b, heads, tokens, tokens]. Each block's head-mean
  attention is mixed half and half with the identity (the residual path)
  and row-normalised; the blocks' matrices multiply from the first up.
  """
  rollout = None
  for w in weights:
    a = np.asarray(w, np.float64).mean(1)
    a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
    a /= a.sum(-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  return rollout[:, 0, 1:]


def _attention_weights(intermediates: Any) -> list[np.ndarray]:
  """Each block's sown weights, in block order."""
  blocks = {
      int(name.rsplit('_', 1)[1]): sub
      for name, sub in intermediates['intermediates'].items()
      if name.startswith('blocks_')
  }
  return [
      np.asarray(blocks[i]['attn']['attention_weights'][0])
      for i in sorted(blocks)
  ]


def decisions(predictor: Predictor, images: np.ndarray) -> dict[str, Any]:
  """Predictions and the model family's per-patch decisions on `images`."""
  model = predictor.model
  grid = images.shape[1] // model.patch_size
  variables = predictor.variables
  if isinstance(model, (dynamic_vit.DynamicViT, avit.AViT)):
    logits, aux = jax.jit(predictor.apply)(variables, images)
    out = {'predicted': np.argmax(logits, -1)}
    if isinstance(model, dynamic_vit.DynamicViT):
      out['kept'] = kept_patch_grids(aux['kept_patches'], grid)
      out['stage_blocks'] = list(model.stages())
    else:
      out['depth'] = np.asarray(aux['depth'])[:, 1:].reshape(-1, grid, grid)
      out['max_depth'] = model.depth
    return out

  def sown(variables, images):
    return model.apply(
        predictor.prepare(variables),
        images,
        train=False,
        mutable=['intermediates'],
    )

  (logits, _), intermediates = jax.jit(sown)(variables, images)
  rollout = attention_rollout(_attention_weights(intermediates))
  return {
      'predicted': np.argmax(logits, -1),
      'rollout': rollout.reshape(-1, grid, grid),
  }


def on_test_images(predictor: Predictor, test: Split) -> dict[str, Any]:
  """decisions() on IMAGES_PER_CLASS seeded test images per class, with the
  images and their labels. Every process runs it (the model's variables
  may span them); process 0 draws (`write_figure`)."""
  idx = pick_images(test.labels, IMAGES_PER_CLASS, SEED)
  images, labels = test.images[idx], test.labels[idx]
  return {'images': images, 'labels': labels, **decisions(predictor, images)}


def write_figure(
    d: dict[str, Any],
    class_names: Sequence[str],
    out_dir: Path,
    suffix: str = '',
    mean_depth_per_class: Sequence[float] | None = None,
) -> Path:
  """Writes tokens.png (DynamicViT), depth.png (A-ViT) or attention.png
  (ViT) from on_test_images' result; returns its path."""
  common = dict(
      images=d['images'],
      labels=d['labels'],
      predicted=d['predicted'],
      class_names=class_names,
  )
  if 'kept' in d:
    path = out_dir / f'tokens{suffix}.png'
    plots.kept_tokens(
        kept=d['kept'], stage_blocks=d['stage_blocks'], out=path, **common
    )
  elif 'depth' in d:
    path = out_dir / f'depth{suffix}.png'
    plots.halting_depth(
        depth=d['depth'],
        max_depth=d['max_depth'],
        mean_depth_per_class=mean_depth_per_class,
        out=path,
        **common,
    )
  else:
    path = out_dir / f'attention{suffix}.png'
    plots.attention_rollout(rollout=d['rollout'], out=path, **common)
  return path

"""Static activation scales: aqtp's static range calibration on training
images (one scale per quantized layer, for its input)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import errors
from vitjax.quant import layers


def _calibration_model(model: nn.Module) -> nn.Module:
  """The model static scales are calibrated through. A-ViT: its faithful
  forward, whose masked LayerNorms feed halted tokens' rows as zeros to the
  layers they feed (query, key, value, fc1), as token removal (its serving
  path) leaves them out; otherwise they would count in those layers'
  maxima (halted rows still count in the attention output's and fc2's).
  Its predictions are the same."""
  if 'faithful' in {f.name for f in dataclasses.fields(model)}:
    return model.clone(faithful=True)
  return model


def _calibration_step(
    model: nn.Module, quant_cfg, params: Any, stats: Any, images: jax.Array
) -> Any:
  """The static-scale statistics after one more batch (from `stats`, or
  created by it if {})."""
  calibrator = layers.quantized_model(
      _calibration_model(model), quant_cfg, 'calibrate'
  )
  _, variables = calibrator.apply(
      {'params': params} | stats,
      images,
      train=False,
      mutable=[layers.CALIBRATION],
  )
  return {layers.CALIBRATION: variables[layers.CALIBRATION]}


def calibration_spec(
    model: nn.Module, quant_cfg, params: Any, image_shape: tuple[int, ...]
) -> Any:
  """The shapes and dtypes of the static-scale statistics."""
  return jax.eval_shape(
      functools.partial(_calibration_step, model, quant_cfg),
      params,
      {},
      jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8),
  )


CALIBRATION_BATCH = 128


def calibrate(
    model: nn.Module, quant_cfg, params: Any, images: np.ndarray
) -> Any:
  """Static activation scales' statistics (aqtp's MeanOfAbsMaxCalibration):
  for each quantized layer, the absolute maximum of its input over each
  batch of CALIBRATION_BATCH images, averaged over the batches of `images`
  (a whole number of them: see calibration_sample)."""
  batches = len(images) // CALIBRATION_BATCH
  if batches < 1:
    raise errors.ConfigError(
        f'Calibrating static int8 scales takes at least {CALIBRATION_BATCH} '
        f'training images, and there are {len(images)}: use '
        "eval.quant_activations='per_token'."
    )
  # The statistics start at zero (aqtp counts no batch when it creates them).
  stats = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      calibration_spec(model, quant_cfg, params, images.shape[1:]),
  )
  step = jax.jit(functools.partial(_calibration_step, model, quant_cfg))
  for b in range(batches):
    batch = images[b * CALIBRATION_BATCH : (b + 1) * CALIBRATION_BATCH]
    stats = step(params, stats, batch)
  return stats


def calibration_sample(images: np.ndarray, quant_cfg, seed: int) -> np.ndarray:
  """The training images static scales are calibrated on: a seeded sample
  of eval.quant_calibration_images of them (fewer if the split is smaller),
  a whole number of calibration batches, in the sample's random order. The
  split is sorted by class: in its own order, each batch's maxima (which
  the scales average) would be those of one or two classes."""
  n = min(int(quant_cfg.quant_calibration_images), len(images))
  n = max(n // CALIBRATION_BATCH, 1) * CALIBRATION_BATCH
  return images[np.random.default_rng(seed).permutation(len(images))[:n]]

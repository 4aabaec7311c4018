"""The two input pipelines behind one call: `data.pipeline` = 'tf' or
'device'.

- 'tf' (vitjax/data/tf_pipeline.py): tf.data draws, gathers and augments
  each batch on the host.
- 'device' (vitjax/data/device_pipeline.py): the decoded split lives in
  accelerator memory and the same sampling and augmentation run as jitted
  JAX; no TensorFlow needed.
Both yield global jax Arrays sharded over the mesh, {'image': uint8 [b, 32,
32, 3], 'label': int32 [b]}, each batch a pure function of (seed, step).
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol

from absl import logging
import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict
import numpy as np

from vitjax import errors, parallel
from vitjax.data import sampling
from vitjax.data.sources import Dataset

PIPELINES = ('tf', 'device')


class Pipeline(Protocol):

  def batches(
      self, start_step: int, end_step: int
  ) -> Iterator[dict[str, jax.Array]]:
    """The batches of steps start_step .. end_step - 1."""


def make(config: ConfigDict, data: Dataset, mesh: Mesh) -> Pipeline:
  """The configured pipeline over the training split, sampled as
  `data.sampling`."""
  split = data.train
  plan = sampling.make_plan(
      split.labels, data.num_classes, config.data.sampling
  )
  common = dict(
      seed=config.seed,
      global_batch=config.train.batch_size,
      batch_sharding=parallel.batch_sharding(mesh),
  )
  # pylint: disable=g-import-not-at-top
  if config.data.pipeline == 'tf':
    from vitjax.data import tf_pipeline

    return tf_pipeline.TfPipeline(
        split,
        plan,
        config.aug,
        rows=parallel.process_rows(mesh, config.train.batch_size),
        **common,
    )
  if config.data.pipeline == 'device':
    from vitjax.data import device_pipeline

    return device_pipeline.DevicePipeline(split, plan, config.aug, **common)
  raise errors.ConfigError(
      f'data.pipeline={config.data.pipeline!r}: expected one '
      f'of {PIPELINES}.'
  )


def log_sampled_classes(
    pipeline: Pipeline, config: ConfigDict, data: Dataset
) -> None:
  """Logs the class counts of the first data.log_sampled_images draws."""
  n = config.data.log_sampled_images
  if n <= 0:
    return
  steps = math.ceil(n / config.train.batch_size)
  labels = np.concatenate(
      [
          np.asarray(parallel.to_host(b['label']))
          for b in pipeline.batches(0, steps)
      ]
  )[:n]
  counts = np.bincount(labels, minlength=data.num_classes)
  logging.info(
      'first %d sampled images (%s sampling), per class %s',
      n,
      config.data.sampling,
      dict(zip(data.class_names, counts.tolist())),
  )

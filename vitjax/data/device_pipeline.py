"""The device input pipeline: the decoded split lives on the accelerator.

Sampling and augmentation run as one jitted JAX function of the step, with
the same semantics as the tf.data pipeline (`vitjax.data.sampling`, and the
very same `vitjax.data.augment` code). Nothing here imports TensorFlow, so
it runs where only JAX is installed.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import errors, parallel
from vitjax.data import augment, sampling
from vitjax.data.sources import Split

_DATA_STREAM = 0x5EED  # keeps data keys apart from the model's keys


class DevicePipeline:
  """Training batches as global jax Arrays: {'image': uint8, 'label': int32}."""

  def __init__(
      self,
      split: Split,
      plan: sampling.Plan,
      aug_cfg,
      *,
      seed: int,
      global_batch: int,
      batch_sharding: jax.sharding.Sharding | None = None,
  ):
    if global_batch > plan.num_examples:
      raise errors.ConfigError(
          f'train.batch_size={global_batch} exceeds the '
          f'{plan.num_examples} training images.'
      )
    replicated = (
        None
        if batch_sharding is None
        else parallel.replicated(batch_sharding.mesh)
    )
    put = lambda a: jax.device_put(a, replicated)
    self._tables = {
        'images': put(split.images),
        'labels': put(split.labels),
        'by_class': put(plan.by_class),
        'starts': put(plan.class_starts),
        'counts': put(plan.class_counts),
        'log_probs': put(np.log(plan.class_probs)),
    }
    self._plan = plan
    self._aug_cfg = aug_cfg
    self._global = global_batch
    self._key = jax.random.fold_in(jax.random.key(seed), _DATA_STREAM)
    self._make = jax.jit(self._batch, out_shardings=batch_sharding)

  def _indices(self, t, step, key):
    g = self._global
    if self._plan.mode == 'natural':
      n = self._plan.num_examples
      pos = step * g + jnp.arange(g, dtype=jnp.int32)  # < 2^31 for any run
      epoch, i = pos // n, pos % n
      perm = lambda e: jax.random.permutation(jax.random.fold_in(key, e), n)
      first = epoch[0]
      return jnp.where(epoch == first, perm(first)[i], perm(first + 1)[i])
    k_cls, k_idx = jax.random.split(jax.random.fold_in(key, step))
    cls = jax.random.categorical(k_cls, t['log_probs'], shape=(g,))
    count = t['counts'][cls]
    u = jax.random.uniform(k_idx, (g,))
    within = jnp.minimum((u * count).astype(jnp.int32), count - 1)
    return t['by_class'][t['starts'][cls] + within]

  def _batch(self, tables, step):
    k_sample, k_aug = jax.random.split(self._key)
    idx = self._indices(tables, step, k_sample)
    k_aug = jax.random.fold_in(k_aug, step)
    draws = {}
    for k, (name, (shape, bound)) in enumerate(
        augment.draw_shapes(self._aug_cfg, self._global).items()
    ):
      draws[name] = jax.random.randint(
          jax.random.fold_in(k_aug, k), shape, 0, bound, dtype=jnp.int32
      )
    images = augment.augment(tables['images'][idx], draws, self._aug_cfg, jnp)
    return {'image': images, 'label': tables['labels'][idx]}

  def batches(
      self, start_step: int, end_step: int
  ) -> Iterator[dict[str, jax.Array]]:
    for step in range(start_step, end_step):
      yield self._make(self._tables, jnp.int32(step))

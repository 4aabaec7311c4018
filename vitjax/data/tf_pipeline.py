"""The tf.data input pipeline: draws, gathers and augments each batch on
the host.

`tf.data.Dataset.range(start, end)` yields step numbers; a parallel map turns
step s into its batch with stateless TF random ops seeded by (seed, s). The
batch is therefore a pure function of the step, so a resumed run repeats an
uninterrupted one exactly. Random draws cover the whole global batch and each
host keeps its own slice, so the data do not depend on the number of hosts.
"""

from __future__ import annotations

import os
from typing import Iterator

import jax
import numpy as np

from vitjax import errors, parallel
from vitjax.data import augment, sampling
from vitjax.data.sources import Split

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow.experimental.numpy as tnp  # pylint: disable=g-import-not-at-top,wrong-import-position

# Sub-streams of a step's seed.
_SAMPLE_CLASS, _SAMPLE_INDEX, _AUGMENT = 0, 1, 2


class TfPipeline:
  """Training batches {'image': uint8, 'label': int32}: global jax Arrays
  on `batch_sharding`, or without one this host's slice as NumPy arrays."""

  def __init__(
      self,
      split: Split,
      plan: sampling.Plan,
      aug_cfg,
      *,
      seed: int,
      global_batch: int,
      rows: tuple[int, int] | None = None,
      batch_sharding: jax.sharding.Sharding | None = None,
  ):
    """rows: [start, stop) of each global batch that this host feeds (its
    devices' rows, parallel.process_rows); by default all."""
    if global_batch > plan.num_examples:
      raise errors.ConfigError(
          f'train.batch_size={global_batch} exceeds the '
          f'{plan.num_examples} training images.'
      )
    self._offset, stop = rows or (0, global_batch)
    self._local = stop - self._offset
    self._global = global_batch
    self._seed = seed
    self._plan = plan
    self._aug_cfg = aug_cfg
    # Arrays live as constants of the map function (CIFAR is ~100 MB).
    self._images = tf.constant(split.images)
    self._labels = tf.constant(split.labels)
    self._by_class = tf.constant(plan.by_class)
    self._starts = tf.constant(plan.class_starts)
    self._counts = tf.constant(plan.class_counts)
    self._log_probs = tf.math.log(tf.constant(plan.class_probs)[None])
    self._sharding = batch_sharding
    # Traced once for every dataset `batches` makes (the budget's timing,
    # the log of sampled classes, the loop), and without autograph: the
    # batch's Python control flow is all static, and converting it cost
    # 1.7 s per trace.
    self._make = tf.function(
        self._batch,
        input_signature=[tf.TensorSpec([], tf.int64)],
        autograph=False,
    )

  def _indices(self, step, seed):
    g = self._global
    if self._plan.mode == 'natural':
      n = self._plan.num_examples
      pos = tf.cast(step, tf.int64) * g + tf.range(g, dtype=tf.int64)
      epoch, i = pos // n, pos % n
      # A batch spans at most two epochs (batch <= n); one scalar-seeded
      # shuffle each (batched seeds trip a padding bug in TF 2.21).
      shuffle = lambda e: tf.random.experimental.index_shuffle(
          i, tf.stack([tf.cast(self._seed, tf.int64), e]), n - 1
      )
      first = epoch[0]
      return tf.cast(
          tf.where(epoch == first, shuffle(first), shuffle(first + 1)), tf.int32
      )
    fold = tf.random.experimental.stateless_fold_in
    cls = tf.random.stateless_categorical(
        self._log_probs, g, fold(seed, _SAMPLE_CLASS), dtype=tf.int32
    )[0]
    u = tf.random.stateless_uniform([g], fold(seed, _SAMPLE_INDEX))
    count = tf.gather(self._counts, cls)
    within = tf.minimum(
        tf.cast(u * tf.cast(count, tf.float32), tf.int32), count - 1
    )
    return tf.gather(self._by_class, tf.gather(self._starts, cls) + within)

  def _batch(self, step):
    seed = tf.stack([tf.cast(self._seed, tf.int64), step])
    local = slice(self._offset, self._offset + self._local)
    idx = self._indices(step, seed)[local]
    images = tf.gather(self._images, idx)
    aug_seed = tf.random.experimental.stateless_fold_in(seed, _AUGMENT)
    draws = {}
    for k, (name, (shape, bound)) in enumerate(
        augment.draw_shapes(self._aug_cfg, self._global).items()
    ):
      full = tf.random.stateless_uniform(
          shape,
          tf.random.experimental.stateless_fold_in(aug_seed, k),
          maxval=bound,
          dtype=tf.int32,
      )
      draws[name] = full[..., local]
    images = augment.augment(images, draws, self._aug_cfg, tnp)
    return {'image': images, 'label': tf.gather(self._labels, idx)}

  def batches(
      self, start_step: int, end_step: int
  ) -> Iterator[dict[str, np.ndarray | jax.Array]]:
    ds = tf.data.Dataset.range(start_step, end_step)
    ds = ds.map(
        self._make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    # Without tf.data's autotuning (map calls one per core): with it,
    # dropping an iterator before its range ends, as a time-budgeted run
    # does, took from seconds to minutes.
    options = tf.data.Options()
    options.autotune.enabled = False
    for batch in ds.with_options(options).prefetch(2).as_numpy_iterator():
      yield batch if self._sharding is None else (
          parallel.host_batch_to_global(batch, self._sharding)
      )


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off the GPUs so that JAX owns their memory."""
  tf.config.set_visible_devices([], 'GPU')

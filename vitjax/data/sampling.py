"""What each sampling mode draws, shared by both input pipelines.

Every batch is a pure function of (seed, step): the pipelines compute the
indices of step s from scratch, so a resumed run sees exactly the batches an
uninterrupted one would, and no iterator state needs checkpointing.

- natural: shuffled epochs without replacement (a fresh permutation of the
  training split per epoch; position p of the run is example perm_e(p % n)
  with e = p // n).
- balanced: with replacement, every class equally likely; inside a class,
  every image equally likely (the course's WeightedRandomSampler, 1/n_c).
- sqrt: with replacement, class c drawn with probability ~ sqrt(n_c).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vitjax import errors

MODES = ('natural', 'balanced', 'sqrt')


@dataclasses.dataclass(frozen=True)
class Plan:
  """Index tables a pipeline needs to draw batches in one sampling mode."""

  mode: str
  num_examples: int
  class_probs: np.ndarray  # float32 [C]: chance a draw is of class c
  class_counts: np.ndarray  # int32 [C]
  class_starts: np.ndarray  # int32 [C]: where class c begins in by_class
  by_class: np.ndarray  # int32 [n]: example indices grouped by class


def class_probabilities(counts: np.ndarray, mode: str) -> np.ndarray:
  """The chance that a draw of `mode` sampling is of class c (float32)."""
  return _class_shares(counts, mode).astype(np.float32)


def drawn_class_counts(counts: np.ndarray, mode: str) -> np.ndarray:
  """Images of each class that an epoch of `mode` sampling draws, on
  average (float64; the counts themselves for 'natural'): the class
  distribution that the loss sees."""
  counts = np.asarray(counts, np.float64)
  if mode == 'natural':
    return counts
  return _class_shares(counts, mode) * counts.sum()


def _class_shares(counts: np.ndarray, mode: str) -> np.ndarray:
  counts = np.asarray(counts, np.float64)
  if mode == 'natural':
    p = counts
  elif mode == 'balanced':
    p = (counts > 0).astype(np.float64)
  elif mode == 'sqrt':
    p = np.sqrt(counts)
  else:
    raise errors.ConfigError(
        f'data.sampling={mode!r}: expected one of {MODES}.'
    )
  return p / p.sum()


def make_plan(labels: np.ndarray, num_classes: int, mode: str) -> Plan:
  counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
  by_class = np.argsort(labels, kind='stable').astype(np.int32)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  return Plan(
      mode,
      len(labels),
      class_probabilities(counts, mode),
      counts,
      starts,
      by_class,
  )

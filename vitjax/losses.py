"""Classification losses for imbalanced data, built on optax.

Every loss takes soft targets (label smoothing, mixup and cutmix make them
soft) and a per-class weight vector, so each base loss combines with each
weighting scheme and each sampling mode:

- 'ce':   cross-entropy, sum_c w_c y_c (-log p_c).
- 'focal': multi-class focal loss (Lin et al. 2017),
          sum_c w_c y_c (1 - p_c)^gamma (-log p_c); w plays the role of alpha.
- 'logit_adjusted': cross-entropy on logits + tau * log(prior) (Menon et al.
          2021); predictions use the raw logits, which is what makes it work.

Weighted losses are normalised by the total target weight, as PyTorch's
CrossEntropyLoss(weight=...) does, so their scale matches the unweighted
loss. Deferred re-weighting (Cao et al. 2019) keeps w = 1 until a step.

With soft targets a weight applies to each class's share of the target: a
mixup of 0.7 cat and 0.3 truck counts its cat term w_cat * 0.7 and its
truck term w_truck * 0.3 (and label smoothing's spread gets each class's
own weight); the batch's total target weight normalises the sum.

Class weights and the logit-adjustment prior are computed from the class
distribution the sampler draws (`sampling.drawn_class_counts`), not from
the training split's counts: under balanced sampling every class is drawn
equally, so 'inverse' weights are all 1 and logit adjustment is plain
cross-entropy, rather than correcting the imbalance a second time.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import errors
from vitjax.data import sampling

BASE_LOSSES = ('ce', 'focal', 'logit_adjusted')
WEIGHT_SCHEMES = ('none', 'inverse', 'effective')


def class_weights(
    counts: np.ndarray, scheme: str, beta: float = 0.9999
) -> np.ndarray:
  """Per-class weights from training counts.

  'inverse' is the course's total / (C * n_c) (mean weight per image is 1);
  'effective' is Cui et al. 2019, (1 - beta) / (1 - beta^n_c), normalised to
  sum to C.
  """
  counts = np.asarray(counts, np.float64)
  c = len(counts)
  if scheme == 'none':
    w = np.ones(c)
  elif scheme == 'inverse':
    w = counts.sum() / (c * counts)
  elif scheme == 'effective':
    w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    w = w * c / w.sum()
  else:
    raise errors.ConfigError(
        f'loss.class_weights={scheme!r}: expected one of {WEIGHT_SCHEMES}.'
    )
  return w.astype(np.float32)


def weighted_loss(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    name: str,
    focal_gamma: float = 2.0,
    log_prior: jax.Array | None = None,
    logit_adjust_tau: float = 1.0,
) -> jax.Array:
  """Mean loss over the batch (see the module docstring for each `name`)."""
  logits = logits.astype(jnp.float32)
  scaled = targets * weights
  if name == 'ce':
    per_example = optax.softmax_cross_entropy(logits, scaled)
  elif name == 'focal':
    # The modulating factor stays inside the gradient, as in the paper.
    p = jax.nn.softmax(logits)
    per_example = optax.softmax_cross_entropy(
        logits, scaled * (1.0 - p) ** focal_gamma
    )
  elif name == 'logit_adjusted':
    per_example = optax.softmax_cross_entropy(
        logits + logit_adjust_tau * log_prior, scaled
    )
  else:
    raise errors.ConfigError(
        f'loss.name={name!r}: expected one of {BASE_LOSSES}.'
    )
  return per_example.sum() / jnp.maximum(scaled.sum(), 1e-12)


def make_classification_loss(
    loss_cfg,
    train_counts: np.ndarray,
    steps_per_epoch: int,
    sampling_mode: str = 'natural',
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """Returns loss(logits, targets, step) for config.loss, its corrections
  fitted to what `sampling_mode` draws from `train_counts`."""
  if loss_cfg.name not in BASE_LOSSES:
    raise errors.ConfigError(
        f'loss.name={loss_cfg.name!r}: expected one of {BASE_LOSSES}.'
    )
  drawn = sampling.drawn_class_counts(train_counts, sampling_mode)
  weights = jnp.asarray(
      class_weights(drawn, loss_cfg.class_weights, loss_cfg.effective_beta)
  )
  prior = drawn / drawn.sum()
  log_prior = jnp.asarray(np.log(prior), jnp.float32)
  reweight_step = int(round(loss_cfg.reweight_from_epoch * steps_per_epoch))

  def loss_fn(logits, targets, step):
    w = jnp.where(step >= reweight_step, weights, jnp.ones_like(weights))
    return weighted_loss(
        logits,
        targets,
        w,
        name=loss_cfg.name,
        focal_gamma=loss_cfg.focal_gamma,
        log_prior=log_prior,
        logit_adjust_tau=loss_cfg.logit_adjust_tau,
    )

  return loss_fn

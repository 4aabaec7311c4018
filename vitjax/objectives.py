"""What a train step minimises: classification losses for imbalanced data,
built on optax, and each model family's objective.

Every classification loss takes soft targets (label smoothing, mixup and
cutmix make them soft) and a per-class weight vector, so each base loss
combines with each weighting scheme and each sampling mode:

- 'ce':   cross-entropy, sum_c w_c y_c (-log p_c).
- 'focal': multi-class focal loss (Lin et al. 2017),
          sum_c w_c y_c (1 - p_c)^gamma (-log p_c); w plays the role of alpha.
- 'logit_adjusted': cross-entropy on logits + tau * log(prior) (Menon et al.
          2021); predictions use the raw logits, which is what makes it work.

Weighted losses are normalised by the total target weight, as PyTorch's
CrossEntropyLoss(weight=...) does, so their scale matches the unweighted
loss. Deferred re-weighting (Cao et al. 2019) keeps w = 1 until a position
along the schedules (`loss.reweight_from_epoch` of them): in a run of fixed
length the step, under a time budget where the learning rate is then.

With soft targets a weight applies to each class's share of the target: a
mixup of 0.7 cat and 0.3 truck counts its cat term w_cat * 0.7 and its
truck term w_truck * 0.3 (and label smoothing's spread gets each class's
own weight); the batch's total target weight normalises the sum.

Class weights and the logit-adjustment prior are computed from the class
distribution the sampler draws (`sampling.drawn_class_counts`), not from
the training split's counts: under balanced sampling every class is drawn
equally, so 'inverse' weights are all 1 and logit adjustment is plain
cross-entropy, rather than correcting the imbalance a second time.

An objective maps (params, images, soft targets, schedule position, rngs)
to the total loss and (logits, named extra scalars). The train step
averages the extras into the logged metrics, so a model's own loss terms
(DynamicViT's ratio loss, A-ViT's ponder loss) show up in the logs without
touching the loop.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
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
  """Returns loss(logits, targets, position) for config.loss, its corrections
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
  # A position along the schedules, as warmup's length is.
  reweight_at = int(round(loss_cfg.reweight_from_epoch * steps_per_epoch))

  def loss_fn(logits, targets, position):
    w = jnp.where(position >= reweight_at, weights, jnp.ones_like(weights))
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


def _kl_from_teacher(teacher_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Mean KL(p_teacher || p) over the batch; the teacher is a constant."""
  return optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(logits),
      jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits)),
  ).mean()


class Classification:
  """The classification loss alone: the dense ViT's objective."""

  extra_metrics: tuple[str, ...] = ()

  def __init__(
      self,
      model: nn.Module,
      loss_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
  ):
    self.model = model
    self.loss_fn = loss_fn

  def __call__(
      self,
      params: Any,
      images: jax.Array,
      targets: jax.Array,
      position: jax.Array,
      rngs: dict[str, jax.Array],
  ) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    logits, _ = self.model.apply(
        {'params': params}, images, train=True, rngs=rngs
    )
    return self.loss_fn(logits, targets, position), (logits, {})


def token_distillation(
    tokens: jax.Array, teacher_tokens: jax.Array, keep: jax.Array
) -> jax.Array:
  """MSE of the student's final-norm patch tokens [b, n, c] against the
  teacher's, over the tokens whose keep decision [b, n] is 1. The decisions
  only select, as the official boolean mask does: no gradient reaches them
  through this term."""
  keep = jax.lax.stop_gradient(keep)[..., None]
  err = (
      tokens.astype(jnp.float32)
      - jax.lax.stop_gradient(teacher_tokens).astype(jnp.float32)
  ) ** 2
  return jnp.sum(keep * err) / jnp.maximum(jnp.sum(keep) * err.shape[-1], 1.0)


class DynamicViTObjective:
  """Classification + ratio loss + distillation from the frozen dense ViT.

  L = CE + ratio_weight * L_ratio / S + kl_weight * KL(p_teacher || p) +
  token_weight * L_token, as the official DistillDiffPruningLoss_dynamic:
  L_ratio = sum_s mean_b (mean_i keep_s - rho^s)^2 over the S stages;
  L_token = MSE of the final-norm patch tokens against the teacher's, over
  the tokens kept at the last stage. teacher=None turns distillation off.
  A dense ViT student (no stages, every token kept) makes it the control:
  the same training without token dropping.
  """

  def __init__(
      self,
      model: nn.Module,
      loss_fn: Callable,
      teacher,
      *,
      ratio_weight: float,
      kl_weight: float,
      token_weight: float,
  ):
    self.model, self.loss_fn, self.teacher = model, loss_fn, teacher
    self.ratio_weight = ratio_weight
    self.kl_weight, self.token_weight = kl_weight, token_weight
    stages = len(model.stages()) if hasattr(model, 'stages') else 0
    self.targets = jnp.array(
        [model.keep_ratio ** (s + 1) for s in range(stages)]
    )
    self.extra_metrics = (
        ('cls_loss',)
        + (('ratio_loss',) if stages else ())
        + (('kl_loss', 'token_loss') if teacher else ())
        + tuple(f'keep_{s}' for s in range(stages))
    )

  def __call__(self, params, images, targets, position, rngs):
    logits, aux = self.model.apply(
        {'params': params}, images, train=True, rngs=rngs
    )
    cls_loss = self.loss_fn(logits, targets, position)
    loss, extras = cls_loss, {'cls_loss': cls_loss}
    keep = jnp.ones(aux['tokens'].shape[:2], jnp.float32)  # dense: all
    if len(self.targets):
      policies = aux['policies']  # [stages, b, n]
      kept = policies.mean(-1)  # [stages, b]
      ratio = ((kept - self.targets[:, None]) ** 2).mean(-1).sum()
      loss = loss + self.ratio_weight * ratio / len(self.targets)
      extras['ratio_loss'] = ratio
      extras.update({f'keep_{s}': kept[s].mean() for s in range(len(kept))})
      keep = policies[-1]
    if self.teacher is not None:
      t_logits, t_aux = self.teacher.model.apply(
          {'params': self.teacher.params}, images, train=False
      )
      kl = _kl_from_teacher(t_logits, logits)
      token = token_distillation(aux['tokens'], t_aux['tokens'], keep)
      loss = loss + self.kl_weight * kl + self.token_weight * token
      extras.update(kl_loss=kl, token_loss=token)
    return loss, (logits, extras)


def halting_prior(
    depth: int, mean: float, std: float, faithful: bool
) -> jax.Array:
  """A-ViT's target distribution of halting over the blocks l = 0 ..
  depth-1 (the share of tokens that halt at block l): the Gaussian density
  of N(mean, std^2) taken at each block index. Corrected: normalised to sum
  1 over the blocks, a distribution. faithful=True, the official code's:
  rescaled so that the blocks before `mean` hold 0.98, so it sums to more
  than 1 (3.26 over 12 blocks at mean 8, std 1)."""
  blocks = jnp.arange(depth, dtype=jnp.float32)
  pdf = jnp.exp(-0.5 * ((blocks - mean) / std) ** 2) / (
      std * jnp.sqrt(2 * jnp.pi)
  )
  if faithful:
    return pdf * 0.98 / jnp.sum(jnp.where(blocks < mean, pdf, 0.0))
  return pdf / pdf.sum()


class AViTObjective:
  """Classification + ponder loss + halting-distribution prior (+ optional
  distillation from the dense teacher), as A-ViT's official code.

  ponder: mean over images and tokens of N + r. distribution: KL(T || H),
  H_l = the share of halting mass at block l. `faithful=True` (with the
  model's faithful forward) reproduces the official formulation: H_l is the
  mean raw score of every token, halted or not, of batch elements 1..B-1
  (the official `h[1:]`), the last block's taken before it is set to 1; T
  is unnormalised; the KL is divided by the depth and only added when
  positive. `False` is the corrected one (H from the tokens that ran each
  block, per-image mean then batch mean, a normalised T, a plain KL).
  """

  def __init__(
      self,
      model: nn.Module,
      loss_fn: Callable,
      teacher,
      *,
      ponder_weight: float,
      distr_weight: float,
      prior_mean: float,
      prior_std: float,
      faithful: bool,
      kl_weight: float,
  ):
    self.model, self.loss_fn, self.teacher = model, loss_fn, teacher
    self.ponder_weight, self.distr_weight = ponder_weight, distr_weight
    self.kl_weight, self.faithful = kl_weight, faithful
    self.prior = halting_prior(model.depth, prior_mean, prior_std, faithful)
    self.extra_metrics = (
        'cls_loss',
        'ponder_loss',
        'distr_loss',
        'mean_depth',
        'cls_depth',
    ) + (('kl_loss',) if teacher else ())

  def halting_distribution(self, aux) -> jax.Array:
    if self.faithful:
      h = aux['raw_halting'][:, 1:].mean(axis=(1, 2))  # the h[1:] slice
    else:
      h = aux['halting'].mean(axis=2).mean(axis=1)
    return jnp.clip(h / jnp.sum(h), 0.01, 0.99)

  def __call__(self, params, images, targets, position, rngs):
    logits, aux = self.model.apply(
        {'params': params}, images, train=True, rngs=rngs
    )
    cls_loss = self.loss_fn(logits, targets, position)
    ponder = aux['ponder'].mean()
    h = self.halting_distribution(aux)
    t = self.prior
    distr = jnp.sum(t * (jnp.log(t) - jnp.log(h)))
    distr_term = distr
    if self.faithful:  # KLDivLoss('batchmean') of a [depth] vector, if > 0
      distr = distr / self.model.depth
      distr_term = jnp.where(distr > 0, distr, 0.0)
    loss = (
        cls_loss + self.ponder_weight * ponder + self.distr_weight * distr_term
    )
    extras = {
        'cls_loss': cls_loss,
        'ponder_loss': ponder,
        'distr_loss': distr,
        'mean_depth': aux['depth'].mean(),
        'cls_depth': aux['depth'][:, 0].mean(),
    }
    if self.teacher is not None:
      t_logits, _ = self.teacher.model.apply(
          {'params': self.teacher.params}, images, train=False
      )
      kl = _kl_from_teacher(t_logits, logits)
      loss = loss + self.kl_weight * kl
      extras['kl_loss'] = kl
    return loss, (logits, extras)

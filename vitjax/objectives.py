"""What a train step minimises, per model family.

An objective maps (params, images, soft targets, step, rngs) to the total
loss and (logits, named extra scalars). The train step averages the extras
into the logged metrics, so a model's own loss terms (DynamicViT's ratio
loss, A-ViT's ponder loss) show up in the logs without touching the loop.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


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
      step: jax.Array,
      rngs: dict[str, jax.Array],
  ) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    logits, _ = self.model.apply(
        {'params': params}, images, train=True, rngs=rngs
    )
    return self.loss_fn(logits, targets, step), (logits, {})


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

  def __call__(self, params, images, targets, step, rngs):
    logits, aux = self.model.apply(
        {'params': params}, images, train=True, rngs=rngs
    )
    cls_loss = self.loss_fn(logits, targets, step)
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
  """A-ViT's target distribution of halting over blocks: a Gaussian at
  `mean`. The official code rescales it so its mass before `mean` is 0.98
  (so it does not sum to 1); the corrected one is normalised."""
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

  def __call__(self, params, images, targets, step, rngs):
    logits, aux = self.model.apply(
        {'params': params}, images, train=True, rngs=rngs
    )
    cls_loss = self.loss_fn(logits, targets, step)
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

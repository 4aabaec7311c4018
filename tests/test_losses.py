"""Imbalance-aware losses and batch mixing."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from vitjax import objectives
from vitjax.data import mixing

COUNTS = np.array([400, 200, 100, 50])


def test_class_weight_schemes():
  inv = objectives.class_weights(COUNTS, 'inverse')
  np.testing.assert_allclose(inv, COUNTS.sum() / (4 * COUNTS), rtol=1e-6)
  # The course's weights keep the mean weight per training image at 1.
  assert np.isclose((inv * COUNTS).sum() / COUNTS.sum(), 1.0)
  eff = objectives.class_weights(COUNTS, 'effective', beta=0.99)
  raw = (1 - 0.99) / (1 - 0.99**COUNTS)
  np.testing.assert_allclose(eff, raw * 4 / raw.sum(), rtol=1e-5)
  assert eff[3] > eff[0]
  np.testing.assert_array_equal(objectives.class_weights(COUNTS, 'none'), 1.0)
  with pytest.raises(ValueError, match='loss.class_weights'):
    objectives.class_weights(COUNTS, 'inverted')


def _batch(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  logits = jax.random.normal(k1, (8, 4)) * 2
  labels = jax.random.randint(k2, (8,), 0, 4)
  return logits, jax.nn.one_hot(labels, 4), labels


def test_weighted_ce_matches_the_pytorch_definition():
  logits, targets, labels = _batch()
  w = jnp.array([0.5, 1.0, 2.0, 4.0])
  got = objectives.weighted_loss(logits, targets, w, name='ce')
  nll = -jax.nn.log_softmax(logits)[jnp.arange(8), labels]
  want = (w[labels] * nll).sum() / w[labels].sum()
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_focal_with_gamma_zero_is_ce_and_down_weights_easy_examples():
  logits, targets, _ = _batch()
  ones = jnp.ones(4)
  ce = objectives.weighted_loss(logits, targets, ones, name='ce')
  f0 = objectives.weighted_loss(
      logits, targets, ones, name='focal', focal_gamma=0.0
  )
  np.testing.assert_allclose(f0, ce, rtol=1e-6)
  f2 = objectives.weighted_loss(
      logits, targets, ones, name='focal', focal_gamma=2.0
  )
  assert f2 < ce

  # Reference: -(1 - p_t)^2 log p_t, with its gradient through (1 - p_t).
  def ref(lg):
    logp = jax.nn.log_softmax(lg)
    pt = jnp.exp((logp * targets).sum(-1))
    return jnp.mean(-((1 - pt) ** 2) * (logp * targets).sum(-1))

  np.testing.assert_allclose(f2, ref(logits), rtol=1e-5)
  g = jax.grad(
      lambda lg: objectives.weighted_loss(
          lg, targets, ones, name='focal', focal_gamma=2.0
      )
  )(logits)
  np.testing.assert_allclose(g, jax.grad(ref)(logits), rtol=1e-4, atol=1e-7)


def test_logit_adjusted_loss_shifts_logits_by_the_log_prior():
  logits, targets, _ = _batch()
  log_prior = jnp.log(jnp.asarray(COUNTS / COUNTS.sum(), jnp.float32))
  got = objectives.weighted_loss(
      logits,
      targets,
      jnp.ones(4),
      name='logit_adjusted',
      log_prior=log_prior,
      logit_adjust_tau=1.5,
  )
  want = objectives.weighted_loss(
      logits + 1.5 * log_prior, targets, jnp.ones(4), name='ce'
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_deferred_reweighting_switches_on_at_its_epoch():
  cfg = common.base().loss
  cfg.class_weights, cfg.reweight_from_epoch = 'inverse', 2.0
  fn = objectives.make_classification_loss(cfg, COUNTS, steps_per_epoch=10)
  logits, targets, _ = _batch()
  plain = objectives.weighted_loss(logits, targets, jnp.ones(4), name='ce')
  weighted = objectives.weighted_loss(
      logits,
      targets,
      jnp.asarray(objectives.class_weights(COUNTS, 'inverse')),
      name='ce',
  )
  np.testing.assert_allclose(fn(logits, targets, jnp.int32(19)), plain)
  np.testing.assert_allclose(fn(logits, targets, jnp.int32(20)), weighted)


@pytest.mark.parametrize('sampling', ['balanced', 'sqrt'])
def test_corrections_fit_what_the_sampler_draws(sampling):
  cfg = common.base().loss
  logits, targets, _ = _batch()
  step = jnp.int32(0)
  drawn = {
      'balanced': np.full(4, COUNTS.sum() / 4),
      'sqrt': np.sqrt(COUNTS) / np.sqrt(COUNTS).sum() * COUNTS.sum(),
  }[sampling]
  # Logit adjustment: the prior of the drawn classes (uniform when
  # balanced, which leaves plain cross-entropy).
  cfg.name = 'logit_adjusted'
  fn = objectives.make_classification_loss(cfg, COUNTS, 10, sampling)
  log_prior = jnp.log(jnp.asarray(drawn / drawn.sum(), jnp.float32))
  want = objectives.weighted_loss(
      logits + log_prior, targets, jnp.ones(4), name='ce'
  )
  np.testing.assert_allclose(fn(logits, targets, step), want, rtol=1e-6)
  if sampling == 'balanced':
    plain = objectives.weighted_loss(logits, targets, jnp.ones(4), name='ce')
    np.testing.assert_allclose(fn(logits, targets, step), plain, rtol=1e-6)
  # Inverse weights: of the drawn counts (all 1 when balanced).
  cfg.name, cfg.class_weights = 'ce', 'inverse'
  fn = objectives.make_classification_loss(cfg, COUNTS, 10, sampling)
  w = jnp.asarray(objectives.class_weights(drawn, 'inverse'))
  want = objectives.weighted_loss(logits, targets, w, name='ce')
  np.testing.assert_allclose(fn(logits, targets, step), want, rtol=1e-6)


def test_class_weights_apply_to_each_share_of_a_soft_target():
  logits, _, _ = _batch()
  w = jnp.array([0.5, 1.0, 2.0, 4.0])
  # A 0.7 / 0.3 mixup of classes 0 and 3 in every row, then smoothing 0.1.
  targets = jnp.zeros((8, 4)).at[:, 0].set(0.7).at[:, 3].set(0.3)
  targets = targets * 0.9 + 0.1 / 4
  got = objectives.weighted_loss(logits, targets, w, name='ce')
  logp = jax.nn.log_softmax(logits)
  want = -(w * targets * logp).sum() / (w * targets).sum()
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_unknown_loss_is_named():
  cfg = common.base().loss
  cfg.name = 'hinge'
  with pytest.raises(ValueError, match="loss.name='hinge'"):
    objectives.make_classification_loss(cfg, COUNTS, 10)


@pytest.mark.parametrize('mixup, cutmix', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixing_keeps_targets_normalised_and_consistent(mixup, cutmix):
  aug = common.base().aug
  aug.mixup_alpha, aug.cutmix_alpha = mixup, cutmix
  images = jnp.stack([jnp.full((32, 32, 3), 10.0 * i) for i in range(6)])
  targets = jax.nn.one_hot(jnp.arange(6) % 4, 4)
  for seed in range(5):
    x, t = mixing.mix(jax.random.key(seed), images, targets, aug)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    # Image 0 is mixed with image 5: its mean pixel reveals lambda, and the
    # target weight of its own class must equal that lambda.
    lam = 1.0 - x[0].mean() / 50.0
    np.testing.assert_allclose(t[0, 0], lam, atol=1e-4)


def test_mixing_off_is_identity():
  aug = common.base().aug
  aug.mixup_alpha = aug.cutmix_alpha = 0.0
  images = jnp.ones((4, 32, 32, 3))
  targets = jnp.eye(4)
  x, t = mixing.mix(jax.random.key(0), images, targets, aug)
  assert x is images and t is targets


class _Fixed:
  """A stand-in model whose forward returns fixed outputs."""

  def __init__(self, logits, aux, stages=(), keep_ratio=1.0):
    self.outputs, self._stages, self.keep_ratio = (
        (logits, aux),
        stages,
        keep_ratio,
    )

  def stages(self):
    return self._stages

  def apply(self, *args, **kwargs):
    del args, kwargs
    return self.outputs


def test_dynamic_vit_loss_is_the_official_distill_diff_pruning_loss():
  rng = np.random.default_rng(0)
  b, n, c, classes, rho = 4, 6, 5, 3, 0.7
  logits, t_logits = rng.normal(size=(2, b, classes)).astype(np.float32)
  tokens, t_tokens = rng.normal(size=(2, b, n, c)).astype(np.float32)
  # Cumulative hard keep decisions of 3 stages, per image.
  policies = np.cumprod(rng.random((3, b, n)) < 0.8, axis=0).astype(np.float32)
  labels = np.array([0, 2, 1, 1])
  student = _Fixed(
      logits, {'policies': policies, 'tokens': tokens}, (1, 2, 3), rho
  )
  teacher = _Fixed(t_logits, {'tokens': t_tokens})
  ce = lambda logits, targets, step: _cross_entropy(logits, targets)
  objective = objectives.DynamicViTObjective(
      student,
      ce,
      types.SimpleNamespace(model=teacher, params={}),
      ratio_weight=2.0,
      kl_weight=0.5,
      token_weight=0.5,
  )
  loss, (_, extras) = objective({}, None, labels, 0, {})
  # DistillDiffPruningLoss (raoyongming/DynamicViT losses.py, mse_token
  # on, the keep share per image: score.mean(1)), in NumPy: the ratio loss
  # per stage is the batch mean of the squared gap between each image's
  # kept share and rho^s; KL(teacher || student) with 'batchmean'; the
  # token MSE over the tokens the last stage kept.
  pred_loss = sum(
      ((policies[s].mean(1) - rho ** (s + 1)) ** 2).mean() for s in range(3)
  )
  log_p, log_t = _log_softmax(logits), _log_softmax(t_logits)
  cls_kl = (np.exp(log_t) * (log_t - log_p)).sum() / b
  kept = policies[-1].reshape(b * n) > 0.5
  token_mse = (
      (tokens.reshape(b * n, c)[kept] - t_tokens.reshape(b * n, c)[kept]) ** 2
  ).mean()
  cls_loss = -log_p[np.arange(b), labels].mean()
  want = cls_loss + 2.0 * pred_loss / 3 + 0.5 * cls_kl + 0.5 * token_mse
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(extras['ratio_loss']), pred_loss, rtol=1e-5)
  np.testing.assert_allclose(float(extras['kl_loss']), cls_kl, rtol=1e-5)
  np.testing.assert_allclose(float(extras['token_loss']), token_mse, rtol=1e-5)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

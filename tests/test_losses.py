"""Imbalance-aware losses and batch mixing."""

import jax
import jax.numpy as jnp
import numpy as np
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

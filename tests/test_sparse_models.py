"""DynamicViT and A-ViT against the dense ViT they extend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vitjax import models, objectives
from vitjax.data.sources import Split
from vitjax.evaluators import cost, sparsity
from vitjax.evaluators.classification import Predictor
from vitjax.models import avit, dynamic_vit, token_removal
from vitjax.models.vit import EncoderBlock, ViT

from tests.conftest import jit_apply, jit_init

SIZES = dict(
    num_classes=10,
    patch_size=4,
    hidden_dim=32,
    depth=6,
    num_heads=2,
    mlp_ratio=2.0,
    stem='patch',
)


def _images(n=6, seed=0):
  return jax.random.randint(
      jax.random.key(seed), (n, 32, 32, 3), 0, 256
  ).astype(jnp.uint8)


# Cached: the tests only read them, and building them compiles.
@functools.cache
def _dense_params(seed=0, sizes=tuple(SIZES.items())):
  vit = ViT(**dict(sizes))
  params = jit_init(vit, jax.random.key(seed), _images(1), train=False)[
      'params'
  ]
  # A non-zero head, so that logits depend on the features.
  params['head']['kernel'] = jax.random.normal(
      jax.random.key(seed + 1), params['head']['kernel'].shape
  )
  return vit, params


def _with_dense(model, dense_params, seed=0):
  keys = {'params': jax.random.key(seed), 'gumbel': jax.random.key(seed)}
  return {
      **jit_init(model, keys, _images(1), train=False)['params'],
      **dense_params,
  }


# --- DynamicViT -------------------------------------------------------------


@pytest.mark.slow
def test_keep_ratio_one_gives_the_dense_logits():
  vit, dense = _dense_params()
  model = dynamic_vit.DynamicViT(**SIZES, keep_ratio=1.0)
  params = _with_dense(model, dense)
  x = _images()
  np.testing.assert_allclose(
      jit_apply(model, {'params': params}, x, train=False)[0],
      jit_apply(vit, {'params': dense}, x, train=False)[0],
      atol=1e-5,
  )


def test_policy_attention_gives_kept_tokens_the_subset_output():
  block = EncoderBlock(num_heads=2, mlp_dim=32)
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  params = jit_init(block, jax.random.key(1), x, deterministic=True)
  kept = jnp.array([0, 1, 4, 6, 8])
  policy = jnp.zeros((2, 9)).at[:, kept].set(1.0)
  full = jit_apply(block, params, x, policy=policy, deterministic=True)
  subset = jit_apply(block, params, x[:, kept], deterministic=True)
  # Dropped keys keep only the official eps/N weight.
  np.testing.assert_allclose(full[:, kept], subset, atol=1e-4)


def test_the_eval_path_runs_the_configured_token_counts():
  model = dynamic_vit.DynamicViT(**SIZES, keep_ratio=0.7)
  assert model.stages() == (2, 3, 5)  # ceil(6/4), ceil(6/2), ceil(18/4)
  assert model.keep_counts(64) == (44, 31, 21)
  assert model.tokens_per_block(64) == (65, 65, 45, 32, 32, 22)
  params = _with_dense(model, _dense_params()[1])
  _, aux = jit_apply(model, {'params': params}, _images(), train=False)
  assert aux['tokens'].shape == (6, 21, 32)


@pytest.mark.slow
def test_straight_through_gradients_reach_the_predictors():
  model = dynamic_vit.DynamicViT(**SIZES, keep_ratio=0.7)
  params = _with_dense(model, _dense_params()[1])
  x = _images()
  labels = jnp.arange(6) % 10

  def loss(p):
    logits, aux = jit_apply(
        model, {'params': p}, x, train=True, rngs={'gumbel': jax.random.key(3)}
    )
    # The classification loss alone: only attention carries the policy.
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), labels])

  grads = jax.jit(jax.grad(loss))(params)
  for s in range(3):
    norm = float(
        jnp.sqrt(
            sum(
                jnp.sum(g**2) for g in jax.tree.leaves(grads[f'predictors_{s}'])
            )
        )
    )
    assert norm > 0, s


def test_train_policies_are_cumulative_and_hard():
  model = dynamic_vit.DynamicViT(**SIZES)
  params = _with_dense(model, _dense_params()[1])
  _, aux = jit_apply(
      model,
      {'params': params},
      _images(),
      train=True,
      rngs={'gumbel': jax.random.key(0)},
  )
  p = np.asarray(aux['policies'])
  assert set(np.unique(p)) <= {0.0, 1.0}
  assert (p[1] <= p[0]).all() and (p[2] <= p[1]).all()


def test_inference_keeps_the_top_k_tokens_by_keep_score():
  model = dynamic_vit.DynamicViT(**SIZES, keep_ratio=0.7)
  params = _with_dense(model, _dense_params()[1])
  x = _images()
  _, aux = jit_apply(model, {'params': params}, x, train=False)
  stages, counts = model.stages(), model.keep_counts(64)

  def scores_before_each_stage(m, images):
    # The predictors' keep scores, recomputed stage by stage, each stage
    # keeping its k best-scored tokens by a full sort rather than top-k,
    # in grid order.
    t = m.tokens(images, train=False)
    positions = jnp.tile(jnp.arange(64), (len(images), 1))
    kept = []
    for i, block in enumerate(m.blocks):
      if i in stages:
        s = stages.index(i)
        score = m.predictors[s](t[:, 1:], jnp.ones(t[:, 1:].shape[:2]))[..., 0]
        # Stable: of equal scores the lower position first, as lax.top_k.
        order = jnp.argsort(-score, axis=1, stable=True)
        top = jnp.sort(order[:, : counts[s]], axis=1)
        t = jnp.concatenate(
            [t[:, :1], jnp.take_along_axis(t[:, 1:], top[..., None], 1)], 1
        )
        positions = jnp.take_along_axis(positions, top, 1)
        kept.append(positions)
      t = block(t, deterministic=True)
    return kept

  want = jit_apply(
      model, {'params': params}, x, method=scores_before_each_stage
  )
  for got, expected in zip(aux['kept_patches'], want):
    np.testing.assert_array_equal(got, expected)


def test_the_training_mask_and_the_gather_agree_on_the_same_kept_tokens(
    monkeypatch,
):
  model = dynamic_vit.DynamicViT(**SIZES, keep_ratio=0.7)
  params = _with_dense(model, _dense_params()[1])
  x = _images()
  logits, aux = jit_apply(model, {'params': params}, x, train=False)
  # Make the training path's decisions the ones inference made.
  masks = [
      jnp.zeros((6, 64)).at[jnp.arange(6)[:, None], kept].set(1.0)
      for kept in aux['kept_patches']
  ]
  decisions = iter(masks)
  monkeypatch.setattr(dynamic_vit, 'gumbel_keep', lambda *args: next(decisions))
  train_logits, train_aux = jit_apply(
      model,
      {'params': params},
      x,
      train=True,
      rngs={'gumbel': jax.random.key(0)},
  )
  np.testing.assert_array_equal(train_aux['policies'][-1], masks[-1])
  # Dropped keys keep only the official eps/N weight in training.
  np.testing.assert_allclose(train_logits, logits, atol=1e-4)


def test_token_distillation_passes_no_gradient_to_the_keep_decisions():
  k1, k2 = jax.random.split(jax.random.key(0))
  tokens = jax.random.normal(k1, (2, 5, 4))
  teacher = jax.random.normal(k2, (2, 5, 4))
  keep = jnp.array([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], jnp.float32)
  value, grad = jax.value_and_grad(
      lambda k: objectives.token_distillation(tokens, teacher, k)
  )(keep)
  np.testing.assert_array_equal(grad, 0.0)  # the official mask selects
  want = ((tokens - teacher) ** 2)[np.asarray(keep, bool)].mean()
  np.testing.assert_allclose(value, want, rtol=1e-6)


def _xla_flops(model, x):
  """XLA's count of the inference forward's FLOPs."""
  keys = {'params': jax.random.key(0), 'gumbel': jax.random.key(1)}
  params = jax.eval_shape(lambda: model.init(keys, x, train=False))['params']
  forward = lambda p, x: model.apply({'params': p}, x, train=False)[0]
  return cost.xla_flops(forward, params, x)


def test_macs_at_rho_07_with_predictors_exactly_and_as_xla_counts():
  c = common.base()  # the GPU recipe's backbone: dim 256, 8 blocks, 64 patches
  c.model.dtype = 'float32'
  dense = models.create(c.model, 10)
  c.model.name = 'dynamic_vit'
  with c.unlocked():
    c.model.keep_ratio, c.model.stage_blocks, c.model.gumbel_tau = 0.7, (), 1.0
  sparse = models.create(c.model, 10)
  ratio = (
      cost.model_macs(sparse)['macs_per_image']
      / cost.model_macs(dense)['macs_per_image']
  )
  # By hand: stages before blocks 2, 4, 6 keep int(64 * 0.7^s) = 44, 31,
  # 21 patch tokens; a block on n tokens of width C costs 12 n C^2 (qkv,
  # out, a 4C MLP) + 2 n^2 C (attention); each predictor scores the tokens
  # it sees at C^2 + C^2/2 + C^2/8 + C/2 each (official counting).
  dim, dense_tokens = 256, [65] * 8
  sparse_tokens = [65, 65, 45, 45, 32, 32, 22, 22]
  assert sparse.tokens_per_block(64) == tuple(sparse_tokens)
  blocks = lambda ns: sum(12 * n * dim**2 + 2 * n**2 * dim for n in ns)
  predictors = (64 + 44 + 31) * (dim**2 * (1 + 1 / 2 + 1 / 8) + dim / 2)
  dense_macs = cost.model_macs(dense)['macs_per_image']
  stem_and_head = dense_macs - blocks(dense_tokens)
  want = (stem_and_head + blocks(sparse_tokens) + predictors) / dense_macs
  assert ratio == pytest.approx(want, rel=1e-12)
  assert ratio == pytest.approx(0.66630, abs=1e-5)
  # XLA, which also counts norms, softmax and GELU, agrees within 0.1%.
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  xla_ratio = _xla_flops(sparse, x) / _xla_flops(dense, x)
  assert xla_ratio == pytest.approx(ratio, rel=1e-3)


# --- A-ViT ------------------------------------------------------------------


def test_no_halting_gives_the_dense_logits():
  vit, dense = _dense_params()
  model = avit.AViT(**SIZES, gate_center=1e9, compact_max_batch=0)
  x = _images()
  logits, aux = jit_apply(model, {'params': dense}, x, train=False)
  np.testing.assert_allclose(
      logits, jit_apply(vit, {'params': dense}, x, train=False)[0], atol=1e-5
  )
  np.testing.assert_array_equal(aux['depth'], 6.0)


@functools.cache
def _calibrated(target=2.0, sizes=tuple(SIZES.items())):
  _, dense = _dense_params(sizes=sizes)
  sizes = dict(sizes)
  probe = avit.AViT(**sizes, gate_center=1e9, compact_max_batch=0)
  inputs = jit_apply(
      probe, {'params': dense}, _images(16, seed=5), train=False
  )[1]['gate_inputs']
  beta = avit.calibrate_gate_center(np.asarray(inputs), 10.0, target)
  # The masked path at every batch size (the compact one is tested
  # against it).
  model = avit.AViT(**sizes, gate_center=beta, compact_max_batch=0)
  return model, dense, inputs, beta


def test_calibration_hits_the_target_halting_sum():
  _, _, inputs, beta = _calibrated(0.2)
  h = jax.nn.sigmoid(10.0 * np.asarray(inputs)[:-1] - beta)
  np.testing.assert_allclose(float(h.sum(0).mean()), 0.2, rtol=1e-3)


def test_halting_bookkeeping():
  model, params, _, _ = _calibrated(2.0)  # strong halting
  _, aux = jit_apply(model, {'params': params}, _images(), train=False)
  depth, ponder = np.asarray(aux['depth']), np.asarray(aux['ponder'])
  assert depth.min() >= 1 and depth.max() <= 6
  assert depth.mean() < 6  # some tokens halted early
  # ponder = blocks run + remainder, the remainder in (0, 1].
  assert ((ponder - depth) > 0).all() and ((ponder - depth) <= 1 + 1e-6).all()
  # Nobody runs a block after halting.
  active = np.asarray(aux['active'])
  np.testing.assert_array_equal(active.sum(0), depth)


def test_masked_and_token_removal_paths_agree():
  model, params, _, _ = _calibrated(2.0)
  x = _images(16, seed=7)
  l1, a1 = jit_apply(model, {'params': params}, x, train=False)
  l2, a2 = token_removal.token_removal_apply(model, {'params': params}, x)
  np.testing.assert_array_equal(np.argmax(l1, -1), np.argmax(l2, -1))
  np.testing.assert_allclose(l1, l2, atol=1e-4)
  np.testing.assert_array_equal(a1['depth'], a2['depth'])


@pytest.mark.slow  # compiles token removal's blocks
def test_avit_macs_are_the_mean_of_each_images_cost():
  model, params, _, _ = _calibrated(2.0)
  images = np.asarray(_images(16, seed=7))
  labels = np.arange(16) % 10
  report = sparsity.sparsity_report(
      Predictor(model, {'params': params}), Split(images, labels), 16, 10
  )
  active = np.asarray(
      jit_apply(model, {'params': params}, images, train=False)[1]['active']
  ).sum(
      -1
  )  # [blocks, images]: the tokens each block ran on each image
  assert len(set(map(tuple, active.T))) > 1  # images differ in cost
  per_image = [cost.vit_macs(model, 32, counts) for counts in active.T]
  measured = cost.model_macs(
      model, 32, report['tokens_per_block'], report['token_squares_per_block']
  )['macs_per_image']
  assert measured == pytest.approx(np.mean(per_image), rel=1e-12)
  # The square of the mean count under-counts attention.
  assert measured > cost.vit_macs(model, 32, report['tokens_per_block'])


@pytest.mark.slow
def test_the_compact_path_computes_what_the_masked_path_does():
  widths_run = set()
  # 17 tokens, so few widths to compile: 0, 8, 16, 17.
  sizes = dict(SIZES, patch_size=8, depth=3)
  # Little halting, strong halting, and every token halting at block 0.
  for target in (0.2, 1.0, 3.0):
    masked, params, _, _ = _calibrated(target, tuple(sizes.items()))
    compact = masked.clone(compact_max_batch=16)
    for x in (_images(1, seed=7), _images(5, seed=8)):
      l1, a1 = jit_apply(masked, {'params': params}, x, train=False)
      # One program, no host round trip: nothing leaves the device.
      run = jax.jit(lambda p, x: compact.apply({'params': p}, x, train=False))
      args = jax.device_put((params, x))
      # The compact path ran: a branch per block on the active count, which
      # the masked path has none of.
      assert 'cond[' in str(jax.make_jaxpr(run)(*args))
      assert 'cond[' not in str(
          jax.make_jaxpr(
              lambda p, x: masked.apply({'params': p}, x, train=False)
          )(*args)
      )
      with jax.transfer_guard('disallow'):
        l2, a2 = run(*args)
      np.testing.assert_allclose(l1, l2, atol=1e-5)
      for key in a1:
        np.testing.assert_allclose(a1[key], a2[key], atol=1e-5, err_msg=key)
      counts = np.asarray(a1['active'])[1:].sum(-1).max(-1)
      widths = avit.compact_widths((x.shape[1] // 8) ** 2 + 1)
      widths_run |= {widths[np.searchsorted(widths, c)] for c in counts}
  # Blocks ran at no width (all halted), at partial widths, and at full.
  assert 0 in widths_run and 17 in widths_run and len(widths_run) > 2
  # A pass that writes variables runs masked: lax.switch's branches would
  # write different ones.
  _, written = jit_apply(
      compact,
      {'params': params},
      _images(1),
      train=False,
      mutable=['intermediates'],
  )
  assert 'intermediates' in written


def test_token_removal_in_pieces_of_different_widths():
  model, params, _, _ = _calibrated(2.0)
  x = _images(16, seed=7)
  l1, a1 = jit_apply(model, {'params': params}, x, train=False)
  # Pieces of 3 images: the last one is short, and widths differ by piece.
  l2, a2 = token_removal.token_removal_apply(
      model, {'params': params}, x, images_per_piece=3
  )
  np.testing.assert_allclose(l1, l2, atol=1e-4)
  np.testing.assert_array_equal(a1['depth'], a2['depth'])
  widths = set()
  for active in np.asarray(a1['active'])[1:]:
    pieces, where = token_removal.removal_plan(active, 3)
    widths |= {p.rows.shape[1] for p in pieces}
    assert all(
        p.rows.shape[1] % 8 == 0 or p.rows.shape[1] == active.shape[1]
        for p in pieces
    )
    # Every active token has exactly one output row; the others read zeros.
    b, n = active.shape
    rows = np.concatenate([p.rows[p.valid] for p in pieces])
    np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(active))
    assert (where[~active] == b * n).all()
    assert len(np.unique(where[active])) == active.sum()
  assert len(widths) > 1


def test_ponder_loss_has_gradient_at_the_calibrated_gate():
  model, params, _, _ = _calibrated(0.2)
  x = _images()
  grads = jax.jit(
      jax.grad(
          lambda p: model.apply({'params': p}, x, train=False)[1][
              'ponder'
          ].mean()
      )
  )(params)
  norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
  assert norm > 1e-6


def _official_token_act(model, variables, images):
  """NumPy transcription of the official A-ViT token ACT (NVlabs/A-ViT,
  act_vision_transformer.py, forward_features_act_token), run with this
  model's blocks. Returns the ACT output, rho (ponder), the counter (depth)
  and the per-block mean raw halting score of batch elements 1.. (the
  official halting_score_layer)."""
  x = np.asarray(
      jit_apply(model, variables, images, method=avit.AViT.embed_only),
      np.float64,
  )
  bs, n, _ = x.shape
  eps, gamma, beta = model.halting_eps, model.gate_scale, model.gate_center
  c, r, mask = np.zeros((bs, n)), np.ones((bs, n)), np.ones((bs, n))
  rho, counter, output = np.zeros((bs, n)), np.ones((bs, n)), np.zeros_like(x)
  layer_means = []
  out = x
  for i in range(model.depth):
    out = out * mask[..., None]  # out.data = out.data * mask
    running = mask.astype(bool)
    block_output = np.asarray(
        jit_apply(
            model,
            variables,
            jnp.asarray(out, jnp.float32),
            running[:, None, None, :],
            running,
            method=lambda m, x, keys, mask, i=i: m.block_only(x, keys, i, mask),
        ),
        np.float64,
    )
    h = 1.0 / (1.0 + np.exp(-(gamma * block_output[..., 0] - beta)))
    layer_means.append(h[1:].mean())  # recorded before the last h = 1
    out = block_output.copy()
    block_output = block_output * mask[..., None]
    if i == model.depth - 1:
      h = np.ones((bs, n))
    c = c + h
    rho = rho + mask
    reached = (c > 1 - eps) * mask
    delta1 = block_output * (r * reached)[..., None]
    rho = rho + r * reached
    not_reached = (c < 1 - eps).astype(np.float64)
    r = r - not_reached * h
    delta2 = block_output * (h * not_reached)[..., None]
    counter = counter + not_reached
    mask = (c < 1 - eps).astype(np.float64)
    output = output + delta1 + delta2
  return output, rho, counter, np.array(layer_means)


@pytest.mark.slow
def test_the_faithful_mode_is_the_official_computation():
  model, params, _, beta = _calibrated(2.0)  # tokens halt at every block
  model = avit.AViT(**SIZES, gate_center=beta, faithful=True)
  x = _images(8, seed=11)
  variables = {'params': params}
  output, rho, counter, layer_means = _official_token_act(model, variables, x)
  logits, aux = jit_apply(model, variables, x, train=False)
  assert 1 < counter.mean() < model.depth  # halting happened, not all at once
  np.testing.assert_array_equal(aux['depth'], counter)
  np.testing.assert_allclose(aux['ponder'], rho, rtol=1e-5)
  np.testing.assert_allclose(
      aux['raw_halting'][:, 1:].mean(axis=(1, 2)), layer_means, rtol=1e-5
  )
  np.testing.assert_allclose(
      logits,
      jit_apply(
          model,
          variables,
          jnp.asarray(output, jnp.float32),
          method=lambda m, o: m.classify(o)[0],
      ),
      atol=1e-5,
  )
  # The official losses (engine_act.py): ponder = mean rho; the prior's
  # KLDivLoss('batchmean') over the 6 blocks, added only when positive.
  prior = objectives.halting_prior(6, 4.0, 1.0, faithful=True)
  objective = objectives.AViTObjective(
      model,
      lambda *args: 0.0,
      None,
      ponder_weight=1.0,
      distr_weight=1.0,
      prior_mean=4.0,
      prior_std=1.0,
      faithful=True,
      kl_weight=0.0,
  )
  loss, (_, extras) = objective(params, x, None, 0, {})
  h = np.clip(layer_means / layer_means.sum(), 0.01, 0.99)
  t = np.asarray(prior, np.float64)
  kl = np.sum(t * (np.log(t) - np.log(h))) / 6
  np.testing.assert_allclose(extras['ponder_loss'], rho.mean(), rtol=1e-5)
  np.testing.assert_allclose(extras['distr_loss'], kl, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      loss, rho.mean() + max(kl, 0.0), rtol=1e-4, atol=1e-6
  )


def _official_block(p, x, running, num_heads):
  """Block_ACT.forward_act of the official A-ViT, written from this block's
  parameters: LayerNorm inputs and outputs times the running mask, and a
  -1000 logit bias on halted keys (with the blocks' own tanh GELU)."""
  m = running[..., None].astype(x.dtype)

  def norm(q, v):
    mean = v.mean(-1, keepdims=True)
    var = ((v - mean) ** 2).mean(-1, keepdims=True)
    return (v - mean) / jnp.sqrt(var + 1e-6) * q['scale'] + q['bias']

  def dense(q, v, spec):
    return jnp.einsum(spec, v, q['kernel']) + q['bias']

  a = p['attn']
  y = norm(p['norm1'], x * m) * m
  q, k, v = (dense(a[n], y, 'bnd,dhe->bnhe') for n in ('query', 'key', 'value'))
  logits = jnp.einsum('bqhe,bkhe->bhqk', q, k) / jnp.sqrt(q.shape[-1])
  logits = logits - 1000.0 * (1.0 - running)[:, None, None, :]
  o = jnp.einsum('bhqk,bkhe->bqhe', jax.nn.softmax(logits), v)
  x = x + dense(a['out'], o, 'bqhe,hed->bqd')
  y = norm(p['norm2'], x * m) * m
  y = dense(p['mlp']['fc1'], y, 'bnd,df->bnf')
  y = dense(p['mlp']['fc2'], jax.nn.gelu(y, approximate=True), 'bnf,fd->bnd')
  return x + y


def test_the_faithful_block_masks_as_the_official_block():
  block = EncoderBlock(num_heads=2, mlp_dim=32)
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  params = jit_init(block, jax.random.key(1), x, deterministic=True)['params']
  running = jnp.array(
      [[1, 1, 0, 1, 0, 0, 1, 1, 1], [1, 0, 0, 0, 1, 1, 1, 0, 1]]
  )
  weights = jax.random.normal(jax.random.key(2), x.shape)

  def ours(x):
    y = jit_apply(
        block,
        {'params': params},
        x,
        running.astype(bool)[:, None, None, :],
        token_mask=running.astype(bool),
        deterministic=True,
    )
    return jnp.sum(y * weights), y

  def official(x):
    y = _official_block(params, x, running.astype(jnp.float32), 2)
    return jnp.sum(y * weights), y

  (_, y1), g1 = jax.jit(jax.value_and_grad(ours, has_aux=True))(x)
  (_, y2), g2 = jax.jit(jax.value_and_grad(official, has_aux=True))(x)
  np.testing.assert_allclose(y1, y2, atol=1e-5)  # halted rows too
  np.testing.assert_allclose(g1, g2, atol=1e-5)


@pytest.mark.slow
def test_faithful_halted_tokens_keep_their_gradient_path():
  _, params, _, beta = _calibrated(2.0)
  x = _images(8, seed=11)
  grads = {}
  for faithful in (False, True):
    model = avit.AViT(
        **SIZES, gate_center=beta, faithful=faithful, compact_max_batch=0
    )
    halted_early = (
        jit_apply(model, {'params': params}, x, train=False)[1]['depth'] == 1
    )
    assert halted_early.any()

    def later_scores(p):
      # The scores of tokens that halted at block 0, one block later: from
      # zeroed inputs, but in the official code their values still carry
      # gradient (the zeroing is a `.data` assignment).
      raw = jit_apply(model, {'params': p}, x, train=False)[1]['raw_halting']
      return jnp.sum(jnp.where(halted_early, raw[1], 0.0))

    g = jax.jit(jax.grad(later_scores))(params)
    grads[faithful] = np.sqrt(
        sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g))
    )
  assert grads[False] == 0.0 and grads[True] > 0.0


def test_faithful_and_corrected_forwards_predict_the_same():
  model, params, _, beta = _calibrated(2.0)
  faithful = avit.AViT(**SIZES, gate_center=beta, faithful=True)
  x = _images(8, seed=11)
  l1, a1 = jit_apply(model, {'params': params}, x, train=False)
  l2, a2 = jit_apply(faithful, {'params': params}, x, train=False)
  np.testing.assert_allclose(l1, l2, atol=1e-5)
  np.testing.assert_array_equal(a1['depth'], a2['depth'])


@pytest.mark.parametrize('faithful', [False, True])
def test_halting_prior(faithful):
  t = objectives.halting_prior(12, 8.0, 1.0, faithful)
  if faithful:  # the official target: 0.98 of it before block 8
    np.testing.assert_allclose(float(t[:8].sum()), 0.98, rtol=1e-5)
    np.testing.assert_allclose(float(t[8]), 1.30, atol=0.01)
  else:  # a Gaussian over the block indices 0..11, normalised to sum 1
    gauss = np.exp(-0.5 * (np.arange(12) - 8.0) ** 2)
    np.testing.assert_allclose(t, gauss / gauss.sum(), rtol=1e-6)
  assert int(jnp.argmax(t)) == 8

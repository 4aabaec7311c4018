"""The ViT model, its attention and Dense layers, the bf16 dot, its cost."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from configs import avit as avit_config, common
from configs import dynamic_vit as dvit_config, vit as vit_config
from vitjax import errors, models
from vitjax.evaluators import cost
from vitjax.models import attention, bf16_dot, dense, inference_weights
from vitjax.quant import norm_folding
from vitjax.models import vit
from vitjax.models.vit import EncoderBlock, ViT

from tests.conftest import FAMILIES, jit_apply, jit_init


def _model(variant, **kw):
  c = common.base()
  common.apply_variant(c, variant)
  c.model.stem = 'patch'
  c.model.update(kw)
  return models.create(c.model, num_classes=10)


def _params(model, seed=0):
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  # Jitted: op by op, a conv-stem DynamicViT's init takes seconds.
  init = jax.jit(lambda key: model.init({'params': key}, x, train=False))
  return init(jax.random.key(seed))['params']


def _perturbed(params, seed, scale):
  """Every leaf plus Gaussian noise of `scale`: no zero bias, no LayerNorm
  at scale 1 and bias 0."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      tree,
      [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)],
  )


@pytest.mark.parametrize(
    'variant, count',
    [
        ('seed', 10_732_426),  # the course's model: "about 10.7M"
        ('micro/4', 546_186),
        ('nano/4', 21_162),
    ],
)
def test_parameter_counts_are_pinned(variant, count):
  model = _model(variant)
  shapes = jax.eval_shape(lambda: _params(model))
  assert cost.param_count(shapes) == count


def test_forward_shapes_and_aux():
  model = _model('nano/4')
  params = _params(model)
  images = jax.random.randint(jax.random.key(1), (3, 32, 32, 3), 0, 256)
  logits, aux = jit_apply(
      model, {'params': params}, images.astype(jnp.uint8), train=False
  )
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert aux['tokens'].shape == (3, 64, 32)
  assert aux['pre_logits'].shape == (3, 32)


def test_train_mode_uses_dropout_keys_and_eval_is_deterministic():
  model = _model('nano/4', dropout=0.5, drop_path=0.5)
  params = _params(model)
  x = jnp.full((2, 32, 32, 3), 100, jnp.uint8)
  ev = lambda: jit_apply(model, {'params': params}, x, train=False)[0]
  np.testing.assert_array_equal(ev(), ev())
  tr = lambda k: jit_apply(
      model,
      {'params': params},
      x,
      train=True,
      rngs={'dropout': jax.random.key(k)},
  )[1]['tokens']
  assert not np.allclose(tr(0), tr(1))


def test_patch_dropout_trains_on_a_random_subset_and_evaluates_on_all():
  model = _model('nano/4', patch_dropout=0.5)
  params = _params(model)
  images = jax.random.randint(jax.random.key(1), (3, 32, 32, 3), 0, 256)
  images = images.astype(jnp.uint8)

  def final_patch_tokens(key, train):
    return jit_apply(
        model, {'params': params}, images, train=train, rngs={'dropout': key}
    )[1]['tokens']

  key = jax.random.key(0)
  assert final_patch_tokens(key, False).shape == (3, 64, 32)
  # Evaluation is the model without patch dropout.
  full = _model('nano/4')
  np.testing.assert_array_equal(
      jit_apply(model, {'params': params}, images, train=False)[0],
      jit_apply(full, {'params': params}, images, train=False)[0],
  )
  kept = final_patch_tokens(key, True)
  assert kept.shape == (3, 32, 32)  # half of the 64 patches
  np.testing.assert_array_equal(kept, final_patch_tokens(key, True))
  assert not np.allclose(kept, final_patch_tokens(jax.random.key(1), True))
  # The class token stays first; each image keeps its own distinct patches.
  tokens = jit_apply(
      model, {'params': params}, images, train=False, method=ViT.tokens
  )
  dropped = jit_apply(
      model,
      {'params': params},
      tokens,
      rngs={'dropout': key},
      method=ViT._drop_patches,
  )
  np.testing.assert_array_equal(dropped[:, 0], tokens[:, 0])
  picked = []
  for image_tokens, image_kept in zip(
      np.asarray(tokens[:, 1:]), np.asarray(dropped[:, 1:])
  ):
    same = np.all(image_kept[:, None] == image_tokens[None], axis=-1)
    assert np.all(same.sum(1) == 1)  # every kept token is one patch
    picked.append(frozenset(np.argmax(same, 1)))
  assert all(len(p) == 32 for p in picked) and len(set(picked)) == 3


@pytest.mark.parametrize('name', ['dynamic_vit', 'avit'])
def test_the_sparse_models_refuse_patch_dropout(name):
  c = (dvit_config if name == 'dynamic_vit' else avit_config).get_config(
      'smoke'
  )
  c.model.patch_dropout = 0.5
  with pytest.raises(errors.ConfigError, match='choose their own tokens'):
    _params(models.create(c.model, num_classes=10))


def test_gelu_is_flax_gelu_and_memory_bound_for_xla():
  x = jnp.linspace(-12.0, 12.0, 4001)
  np.testing.assert_allclose(vit.gelu(x), nn.gelu(x), atol=2e-6)
  np.testing.assert_allclose(
      jax.vmap(jax.grad(vit.gelu))(x),
      jax.vmap(jax.grad(nn.gelu))(x),
      atol=1e-5,
  )
  # What keeps XLA:CPU from splitting it across threads: its fused form
  # (with a Dense bias) does fewer flops than it moves bytes.
  y, b = jnp.ones((65, 256)), jnp.ones((256,))
  costs = jax.jit(lambda y, b: vit.gelu(y + b)).lower(y, b).compile()
  costs = costs.cost_analysis()
  assert costs['flops'] < costs['bytes accessed']


@pytest.mark.parametrize('name', FAMILIES)
def test_weights_cast_once_for_inference_give_the_same_logits(name):
  model = _model('nano/4', name=name, stem='conv', dtype='bfloat16')
  # Every weight non-zero (biases and the class token start at zero), so
  # that one read in float32 would change the logits.
  params = _perturbed(_params(model), seed=2, scale=0.1)
  cast = inference_weights.cast_for_inference(model, params, (32, 32, 3))
  float32 = {
      '/'.join(k.key for k in path)
      for path, leaf in jax.tree_util.tree_leaves_with_path(cast)
      if leaf.dtype == jnp.float32
  }
  # flax applies LayerNorm's scale and bias in float32; all else is cast.
  assert float32 == {
      '/'.join(k.key for k in path)
      for path, _ in jax.tree_util.tree_leaves_with_path(params)
      if 'norm' in path[-2].key
  }
  assert any(p.startswith('blocks_1/') for p in float32)
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
  # A-ViT takes its compact path (blocks under nn.switch) at batch 1, its
  # masked one at 20; the others run any batch the same way.
  for batch in (1, 20) if name == 'avit' else (2,):
    x = jax.random.randint(jax.random.key(batch), (batch, 32, 32, 3), 0, 256)
    np.testing.assert_array_equal(logits(cast, x), logits(params, x))
  f32 = model.clone(dtype='float32')
  assert inference_weights.cast_for_inference(f32, params, (32, 32, 3)) is (
      params
  )


@pytest.mark.parametrize('name', FAMILIES)
def test_folded_block_norms_compute_the_same_function(name):
  model = _model('nano/4', name=name)
  params = _perturbed(_params(model), seed=3, scale=0.3)
  folded = norm_folding.fold_block_norms(params)
  assert set(folded['blocks_0']['norm1']) == {'gain'}
  assert 'scale' in folded['encoder_norm']  # only the blocks' two norms
  logits = lambda m, p, x: jit_apply(m, {'params': p}, x, train=False)[0]
  x = jax.random.randint(jax.random.key(4), (2, 32, 32, 3), 0, 256)
  np.testing.assert_allclose(
      logits(model.clone(block_norm_affine=False), folded, x),
      logits(model, params, x),
      rtol=1e-4,
      atol=1e-4,
  )


def test_a_bare_norm_fused_with_a_quantization_stays_on_one_thread():
  # Why int8 serving folds the norms (vitjax/quant/norm_folding.py): XLA:CPU
  # splits a fused LayerNorm and quantization across threads (the
  # hand-off costs more than the op at batch 1), a bare one it does not.
  x = jnp.ones((65, 128))
  quantize = lambda y: jnp.round(jnp.clip(y, -127, 127)).astype(jnp.int8)
  split = {}
  for norm in (vit.Normalize(), nn.LayerNorm(epsilon=1e-6)):
    params = norm.init(jax.random.key(0), x)
    program = jax.jit(lambda p, x, norm=norm: quantize(norm.apply(p, x)))
    hlo = program.lower(params, x).compile().as_text()
    split[type(norm).__name__] = 'outer_dimension_partitions":["' in hlo
  assert not split['Normalize']
  if jax.default_backend() == 'cpu' and len(os.sched_getaffinity(0)) > 1:
    assert split['LayerNorm']  # what the test would miss otherwise


def test_masked_attention_equals_attention_over_the_kept_tokens():
  block = EncoderBlock(num_heads=2, mlp_dim=32)
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  params = jit_init(block, jax.random.key(1), x, deterministic=True)
  kept = jnp.array([0, 2, 3, 7])
  keep = jnp.zeros(9, bool).at[kept].set(True)
  # Each query sees the kept keys and itself (DynamicViT's policy).
  mask = (keep[None, :] | jnp.eye(9, dtype=bool))[None, None]
  full = jit_apply(block, params, x, mask, deterministic=True)
  subset = jit_apply(block, params, x[:, kept], deterministic=True)
  np.testing.assert_allclose(full[:, kept], subset, atol=1e-5)


def test_bfloat16_model_tracks_float32():
  f32 = _model('nano/4')
  bf16 = _model('nano/4', dtype='bfloat16')
  params = _params(f32)
  # Non-zero head so that logits carry the features.
  params['head']['kernel'] = jax.random.normal(
      jax.random.key(2), params['head']['kernel'].shape
  )
  x = jax.random.randint(jax.random.key(3), (8, 32, 32, 3), 0, 256)
  a = jit_apply(f32, {'params': params}, x, train=False)[0]
  b = jit_apply(bf16, {'params': params}, x, train=False)[0]
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(a, b, atol=0.1 * float(jnp.abs(a).max()))


@pytest.mark.parametrize('name', ['vit', 'dynamic_vit'])
def test_the_library_kernels_compute_what_the_cpu_kernels_do(name):
  # model.kernels='xla' (flax's attention, autodiff's bias gradients, no
  # Bf16Dot) and 'cpu': the same parameters, values and gradients.
  cpu = _model('nano/4', name=name, kernels='cpu')
  xla = _model('nano/4', name=name, kernels='xla')
  assert (cpu.kernels, xla.kernels) == ('cpu', 'xla')
  params = _params(cpu)
  assert jax.tree.structure(params) == jax.tree.structure(_params(xla))
  params['head']['kernel'] = jax.random.normal(
      jax.random.key(2), params['head']['kernel'].shape
  )
  x = jax.random.randint(jax.random.key(3), (4, 32, 32, 3), 0, 256)

  def loss(model, p):
    return jnp.sum(model.apply({'params': p}, x, train=False)[0] ** 2)

  value_and_grad = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(m, p)))
  for a, b in zip(
      jax.tree.leaves(value_and_grad(cpu)(params)),
      jax.tree.leaves(value_and_grad(xla)(params)),
  ):
    # Compiled, the two programs fuse and round differently in float32.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_auto_kernels_are_the_cpu_ones_on_a_cpu_and_a_bad_name_is_refused():
  expected = 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  assert _model('nano/4').kernels == expected  # config default 'auto'
  with pytest.raises(Exception, match="model.kernels='gpu'"):
    _model('nano/4', kernels='gpu')


@pytest.mark.parametrize(
    'dtype, tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 0.03)]
)
@pytest.mark.parametrize('with_mask', [False, True])
def test_attention_matches_flax_values_and_gradients(dtype, tol, with_mask):
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (
      jax.random.normal(key, (3, 7, 2, 8)).astype(dtype) for key in ks[:3]
  )
  # Image 1 hides two keys; image 2 hides all (rows come out uniform).
  mask = np.ones((3, 1, 1, 7), bool)
  mask[1, ..., [2, 5]] = False
  mask[2] = False
  mask = jnp.asarray(mask) if with_mask else None
  g = jax.random.normal(ks[3], q.shape)

  def loss(fn):
    return lambda *qkv: (fn(*qkv, mask=mask).astype(jnp.float32) * g).sum()

  ref = lambda *a, mask: nn.dot_product_attention(
      *(t.astype(jnp.float32) for t in a), mask=mask
  )
  np.testing.assert_allclose(
      attention.dot_product_attention(q, k, v, mask=mask).astype(jnp.float32),
      ref(q, k, v, mask=mask),
      atol=tol,
  )
  got = jax.grad(loss(attention.dot_product_attention), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    assert a.dtype == dtype
    np.testing.assert_allclose(a.astype(jnp.float32), b, atol=tol * 3)


@pytest.mark.parametrize(
    'features, axis, in_shape',
    [
        (7, -1, (3, 5, 8)),  # MLP, head
        ((2, 4), -1, (3, 5, 8)),  # query, key, value
        (7, (-2, -1), (3, 5, 2, 4)),  # attention output
    ],
)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_matches_flax_dense_general(features, axis, in_shape, dtype):
  x = jax.random.normal(jax.random.key(1), in_shape)
  init = nn.initializers.truncated_normal(0.02)
  ours = dense.Dense(
      features,
      axis,
      dtype=dtype,
      kernel_init=init,
      dot_general_cls=bf16_dot.Bf16Dot,
  )
  flax = nn.DenseGeneral(
      features,
      axis,
      dtype=dtype,
      kernel_init=init,
      dot_general_cls=bf16_dot.Bf16Dot,
  )
  params = jit_init(ours, jax.random.key(0), x)
  # Same names, shapes and initial values, so checkpoints carry over.
  reference = jit_init(flax, jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  params = jax.tree.map(  # a nonzero bias
      lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params
  )
  g = jax.random.normal(jax.random.key(3), jit_apply(ours, params, x).shape)
  loss = lambda m: lambda p: (m.apply(p, x).astype(jnp.float32) * g).sum()
  tol = 1e-5 if dtype == jnp.float32 else 0.02
  value_and_grad = lambda m: jax.jit(jax.value_and_grad(loss(m)))(params)
  (got_value, got), (want_value, want) = value_and_grad(ours), value_and_grad(
      flax
  )
  np.testing.assert_allclose(got_value, want_value, rtol=tol)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_self_attention_matches_flax_multi_head_attention():
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  mask = jnp.asarray(np.arange(9) < 6)[None, None, None, :]
  ours = attention.SelfAttention(num_heads=4)
  flax = nn.MultiHeadDotProductAttention(num_heads=4)
  params = ours.init(jax.random.key(1), x, deterministic=True)
  ref = flax.init(jax.random.key(1), x, x, deterministic=True)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref)
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params
  )
  np.testing.assert_allclose(
      ours.apply(params, x, mask, deterministic=True),
      flax.apply(params, x, x, mask=mask, deterministic=True),
      atol=1e-5,
  )


@pytest.mark.parametrize(
    'lhs_shape, rhs_shape, dims',
    [
        ((3, 5, 8), (8, 7), (((2,), (0,)), ((), ()))),  # Dense
        ((3, 5, 8), (8, 2, 4), (((2,), (0,)), ((), ()))),  # qkv DenseGeneral
        ((3, 5, 4, 6), (4, 6, 7), (((2, 3), (0, 1)), ((), ()))),  # attn out
        ((3, 8, 5), (7, 8), (((1,), (1,)), ((), ()))),  # transposed operands
    ],
)
def test_bf16_dot_gradients_match_a_float32_reference(
    lhs_shape, rhs_shape, dims
):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(k1, lhs_shape).astype(jnp.bfloat16)
  rhs = jax.random.normal(k2, rhs_shape).astype(jnp.bfloat16)
  dot = bf16_dot.Bf16Dot()
  out = dot(lhs, rhs, dims)
  assert out.dtype == jnp.bfloat16
  g = jax.random.normal(k3, out.shape)
  f = lambda a, b: (dot(a, b, dims).astype(jnp.float32) * g).sum()
  ref = lambda a, b: (
      lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims) * g
  ).sum()
  got = jax.grad(f, argnums=(0, 1))(lhs, rhs)
  want = jax.grad(ref, argnums=(0, 1))(lhs, rhs)
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16 and a.shape == b.shape
    np.testing.assert_allclose(a.astype(np.float32), b, rtol=0.02, atol=0.05)


def test_analytic_macs_match_the_paper_convention_and_xla():
  model = _model('seed')
  # Course model: 17 tokens, dim 384, 6 blocks -> about 0.18 GMACs.
  assert abs(cost.vit_macs(model) / 1e9 - 0.18) < 0.01
  params = jax.eval_shape(lambda: _params(model))
  fn = lambda p, x: model.apply({'params': p}, x, train=False)[0]
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  flops = cost.xla_flops(fn, params, x)
  # XLA also counts softmax, norms and GELU; MACs * 2 must be most of it.
  assert 0.8 < 2 * cost.vit_macs(model) / flops < 1.05


def test_unknown_model_fields_are_named():
  c = vit_config.get_config('smoke')
  with c.unlocked():
    c.model.keep_rate = 0.7
  with pytest.raises(ValueError, match="fields \\['keep_rate'\\]"):
    models.create(c.model, 10)

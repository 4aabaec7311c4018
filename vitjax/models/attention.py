"""Softmax attention with a hand-written backward pass, fast under bfloat16.

`nn.dot_product_attention` is right but slow to differentiate on XLA:CPU in
bfloat16: its einsums are upcast to float32 dots, and autodiff produces
mixed float32 x bfloat16 products and bfloat16 elementwise passes, which
this CPU runs far below its bfloat16 matmul speed. Here the four backward
products are written out (dq = ds k, dk = ds^T q, dv = p^T do, dp = do v^T),
each a bfloat16 x bfloat16 -> float32 batched matmul in the [batch, heads,
tokens, dim] layout, with the softmax and its backward in float32.

On the 2-core CPU, `scripts/benchmark.py --config=configs/vit.py:cpu`
trained at 251 images/s with flax's attention and a bfloat16 GELU, and at
331 with this attention and the GELU in float32 (models/vit.py). Values
and gradients match flax's to bfloat16 rounding (tests/test_vit.py); with
float32 inputs every product is float32.

`SelfAttention` is the blocks' attention layer; `policy_attention` is
DynamicViT's soft-masked attention for training.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import errors
from vitjax.models.dense import Dense

Array = jax.Array


def _matmul(subscripts: str, a: Array, b: Array) -> Array:
  return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def _masked_softmax(logits: Array, mask: Array) -> Array:
  # As flax: a hidden key gets the most negative logit, so a row whose keys
  # are all hidden comes out uniform, never NaN.
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """q, k, v: [b, h, n, d] (q already scaled); mask: bool, broadcastable to
  [b, h, n, n]. Returns [b, h, n, d] in q's dtype."""
  return _forward(q, k, v, mask)[0]


def _forward(q, k, v, mask):
  p = _masked_softmax(_matmul('bhqd,bhkd->bhqk', q, k), mask).astype(q.dtype)
  return _matmul('bhqk,bhkd->bhqd', p, v).astype(q.dtype), (q, k, v, p, mask)


def _backward(residuals, d_out):
  q, k, v, p, mask = residuals
  d_out = d_out.astype(q.dtype)
  d_v = _matmul('bhqk,bhqd->bhkd', p, d_out).astype(v.dtype)
  d_p = _matmul('bhqd,bhkd->bhqk', d_out, v)
  p32 = p.astype(jnp.float32)
  d_s = p32 * (d_p - jnp.sum(d_p * p32, -1, keepdims=True))
  # Hidden keys pass no gradient, even in a row whose keys are all hidden
  # (where p is uniform, not 0).
  d_s = jnp.where(mask, d_s, 0.0).astype(q.dtype)
  d_q = _matmul('bhqk,bhkd->bhqd', d_s, k).astype(q.dtype)
  d_k = _matmul('bhqk,bhqd->bhkd', d_s, q).astype(k.dtype)
  return d_q, d_k, d_v, None


_attention.defvjp(_forward, _backward)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    broadcast_dropout: bool = True,
    deterministic: bool = True,
    dtype: Any = None,
) -> Array:
  """`nn.dot_product_attention` with the fast backward pass above.

  query, key, value: [batch, tokens, heads, dim]; mask: bool, broadcastable
  to [batch, heads, queries, keys], False hides a key. With attention
  dropout active it hands over to flax's implementation, which draws the
  dropout mask.
  """
  if not deterministic and dropout_rate > 0.0:
    return nn.dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        dropout_rng=dropout_rng,
        dropout_rate=dropout_rate,
        broadcast_dropout=broadcast_dropout,
        deterministic=False,
        dtype=dtype,
        force_fp32_for_softmax=True,
    )
  dtype = dtype or query.dtype
  q, k, v, mask = _heads_first(query, key, value, mask)
  return _attention(q, k, v, mask).swapaxes(1, 2).astype(dtype)


def _heads_first(query, key, value, mask):
  """[b, n, h, d] inputs as the kernel takes them: [b, h, n, d], the query
  scaled, and a mask even when there is none."""
  scale = np.sqrt(query.shape[-1]).astype(query.dtype)
  q, k, v = (t.swapaxes(1, 2) for t in (query / scale, key, value))
  if mask is None:
    mask = jnp.ones((1, 1, 1, 1), bool)
  return q, k, v, mask


def attention_weights(
    query: Array, key: Array, mask: Array | None = None
) -> Array:
  """The softmax weights [batch, heads, queries, keys] that
  `dot_product_attention` applies (for figures; it never materialises
  them itself outside its kernel)."""
  q, k, _, mask = _heads_first(query, key, key, mask)
  return _masked_softmax(_matmul('bhqd,bhkd->bhqk', q, k), mask)


def policy_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    policy: Array,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    broadcast_dropout: bool = True,
    dtype: Any = None,
) -> Array:
  """Attention under a soft keep policy (DynamicViT's masked softmax).

  policy: [batch, keys], 1 = kept, 0 = dropped (straight-through hard
  values in the forward pass). Query i weighs key j by exp(s_ij) G_ij with
  G_ij = p_j + (1 - p_j) [i == j]: each token sees the kept tokens and
  itself. Unlike a boolean mask this passes gradients to the policy, which
  is how the classification loss trains DynamicViT's predictors. In float32;
  the eps terms are the official code's guard against empty rows.
  """
  dtype = dtype or query.dtype
  q, k, v = (t.astype(jnp.float32) for t in (query, key, value))
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(q.shape[-1])
  n = k.shape[1]
  p = policy.astype(jnp.float32)[:, None, None, :]
  gate = p + (1.0 - p) * jnp.eye(n, dtype=jnp.float32)
  weights = (
      jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
      * gate
  )
  eps = 1e-6
  weights = (weights + eps / n) / (weights.sum(-1, keepdims=True) + eps)
  if not deterministic and dropout_rate > 0.0:
    shape = (
        ((1, 1) + weights.shape[2:]) if broadcast_dropout else (weights.shape)
    )
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v).astype(dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with nn.MultiHeadDotProductAttention's
  parameters (query, key, value, out), built from `dense.Dense` so that the
  projections' bias gradients are fast on XLA:CPU.

  Three attention kernels, chosen per call: DynamicViT's soft keep `policy`
  (`policy_attention`); flax's `dot_product_attention` with kernels='xla',
  or with aqtp's int8 einsums when `einsum_cls` is injected (it accepts
  them); otherwise `dot_product_attention` above, with `mask` (A-ViT hides
  halted tokens). Applied with `mutable=['intermediates']`, a call sows its
  attention weights [batch, heads, queries, keys] as 'attention_weights'.
  """

  num_heads: int
  dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  dropout_rate: float = 0.0
  dot_general_cls: Callable[[], Any] | None = None
  einsum_cls: Callable[[], Any] | None = None
  kernels: str = 'cpu'  # 'xla': flax's attention and autodiff's bias grads

  @nn.compact
  def __call__(
      self,
      x: Array,
      mask: Array | None = None,
      *,
      policy: Array | None = None,
      deterministic: bool,
  ) -> Array:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise errors.ConfigError(
          f'hidden_dim {dim} is not a multiple of num_heads '
          f'{self.num_heads}.'
      )
    project = functools.partial(
        Dense,
        (self.num_heads, dim // self.num_heads),
        dtype=self.dtype,
        kernel_init=self.kernel_init,
        dot_general_cls=self.dot_general_cls,
        bias_grad_matmul=self.kernels == 'cpu',
    )
    q, k, v = (project(name=n)(x) for n in ('query', 'key', 'value'))
    dropout = {
        'dropout_rate': self.dropout_rate,
        'deterministic': deterministic or self.dropout_rate == 0.0,
    }
    if not dropout['deterministic']:
      dropout['dropout_rng'] = self.make_rng('dropout')
    if policy is not None:
      y = policy_attention(q, k, v, policy=policy, **dropout)
    elif self.einsum_cls is not None or self.kernels == 'xla':
      einsums = {}
      if self.einsum_cls is not None:
        einsums = {
            'qk_attn_weights_einsum': self.einsum_cls(),
            'attn_weights_value_einsum': self.einsum_cls(),
        }
      y = nn.dot_product_attention(
          q,
          k,
          v,
          mask=mask,
          dtype=self.dtype,
          force_fp32_for_softmax=True,
          module=self,  # sows the weights when 'intermediates' is mutable
          **einsums,
          **dropout,
      )
    else:
      y = dot_product_attention(q, k, v, mask, dtype=self.dtype, **dropout)
      if self.is_mutable_collection('intermediates'):
        # What flax sows, from this kernel's own softmax (the figure's
        # prediction is then the inference pass's, bit for bit).
        self.sow(
            'intermediates', 'attention_weights', attention_weights(q, k, mask)
        )
    return Dense(
        dim,
        axis=(-2, -1),
        dtype=self.dtype,
        kernel_init=self.kernel_init,
        dot_general_cls=self.dot_general_cls,
        bias_grad_matmul=self.kernels == 'cpu',
        name='out',
    )(y)

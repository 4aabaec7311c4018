"""Vision Transformer (pre-LayerNorm) in pure Flax linen.

The building blocks here (`PatchEmbed`, `EncoderBlock`, `ViT`) are shared by
DynamicViT and A-ViT, which run the same blocks with their own token logic.
Parameter names are kept stable (`embed`, `blocks_<i>`, `encoder_norm`, `head`)
so that a ViT checkpoint initialises the sparse models directly.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import errors
from vitjax.models import attention
from vitjax.models.dense import Dense

Array = jax.Array
# `partial(SomeDotGeneral, ...)`, instantiated once per Dense layer. None means
# the plain float `lax.dot_general`; int8 evaluation injects aqtp's here.
DotGeneralCls = Callable[[], Any] | None

_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
# Per-channel pixel statistics of CIFAR-10's training set, on the 0..255 scale.
PIXEL_MEAN = (125.3, 123.0, 113.9)
PIXEL_STD = (63.0, 62.1, 66.7)


def compute_dtype(name: str) -> jnp.dtype:
  """Maps the config's dtype name to a jnp dtype, with a clear error."""
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if name not in dtypes:
    raise errors.ConfigError(
        f"model.dtype={name!r}: expected 'float32' or 'bfloat16' ('auto' is "
        'made one of them by models.create).'
    )
  return dtypes[name]


def gelu(x: Array) -> Array:
  """flax's (tanh-approximate) GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
  x^3))), written as x (0.5 + 0.5 tanh(x (sqrt(2/pi) + 0.044715 sqrt(2/pi)
  x^2))): seven elementwise operations instead of eight. In float32 a fused
  GELU then does fewer flops than it moves bytes, so XLA:CPU's cost model
  takes it for memory-bound and runs it on one thread; as compute-bound it
  was split across the threads, whose hand-off cost more than it saved for
  one image (docs/performance.md#batch-1)."""
  c = 0.7978845608028654  # sqrt(2 / pi)
  u = x * (c + (0.044715 * c) * x * x)
  return x * (0.5 + 0.5 * jnp.tanh(u))


def gelu_f32(x: Array) -> Array:
  """GELU computed in float32, returned in x's dtype: XLA:CPU
  differentiates a bfloat16 GELU several times slower than a float32 one."""
  return gelu(x.astype(jnp.float32)).astype(x.dtype)


class Normalize(nn.Module):
  """LayerNorm without its per-feature scale and bias: (x - mean) times
  gain / sqrt(var + epsilon), in float32, with one scalar gain applied to
  the per-token reciprocal (so not once per element). Mean and variance
  as flax's LayerNorm computes them (E[x^2] - E[x]^2). The blocks' norms
  when int8 folds their scale and bias into the layers they feed
  (vitjax/quant/norm_folding.py)."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gain = self.param('gain', nn.initializers.ones, (), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(x32 * x32, -1, keepdims=True) - mean**2, 0.0)
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * gain)
    return y.astype(self.dtype)


class DropPath(nn.Module):
  """Stochastic depth: drops a residual branch per example."""

  rate: float

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class PatchEmbed(nn.Module):
  """Image -> [cls, patch tokens] + learned position embedding.

  `stem='patch'`: the classic p x p convolution with stride p.
  `stem='conv'`: log2(p) 3x3 convolutions of stride 2 instead (widths
  ramping up to hidden_dim), the early-convolution stem of Xiao et al. 2021,
  which trains markedly better on small datasets. It keeps the token grid
  and costs a few percent of the blocks' MACs.
  """

  patch_size: int
  hidden_dim: int
  stem: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    # Raw pixels in [0, 255] (uint8 or float) in, so every caller feeds the
    # model the same way; normalising here costs nothing next to the blocks.
    x = (images.astype(jnp.float32) - jnp.array(PIXEL_MEAN)) / jnp.array(
        PIXEL_STD
    )
    x = x.astype(self.dtype)
    p = self.patch_size
    if self.stem == 'conv':
      steps = p.bit_length() - 1
      if p < 2 or 2**steps != p:
        raise errors.ConfigError(
            f"model.stem='conv' needs a power-of-two patch_size, not {p}."
        )
      for i in range(steps):
        width = self.hidden_dim // 2 ** (2 * (steps - 1 - i))
        x = nn.Conv(
            max(width, 8),
            (3, 3),
            strides=(2, 2),
            dtype=self.dtype,
            name=f'stem_conv_{i}',
        )(x)
        if i < steps - 1:
          x = gelu(nn.LayerNorm(dtype=self.dtype, name=f'stem_norm_{i}')(x))
    elif self.stem == 'patch':
      x = nn.Conv(
          self.hidden_dim,
          (p, p),
          strides=(p, p),
          padding='VALID',
          dtype=self.dtype,
          name='patch',
      )(x)
    else:
      raise errors.ConfigError(
          f"model.stem={self.stem!r}: expected 'patch' or 'conv'."
      )
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype), x], axis=1
    )
    pos = self.param('pos_embedding', _trunc_normal, (1, h * w + 1, c))
    return x + pos.astype(x.dtype)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  dot_general_cls: DotGeneralCls = None
  kernels: str = 'cpu'

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    dense = lambda n, name: Dense(
        n,
        dtype=self.dtype,
        kernel_init=_trunc_normal,
        name=name,
        dot_general_cls=self.dot_general_cls,
        bias_grad_matmul=self.kernels == 'cpu',
    )
    y = dense(self.mlp_dim, 'fc1')(x)
    y = gelu_f32(y)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = dense(x.shape[-1], 'fc2')(y)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block whose attention accepts a token mask.

  `mask` is boolean, broadcastable to [batch, heads, queries, keys]; False
  hides a key from a query (A-ViT hides halted tokens this way). `policy`
  ([batch, tokens] floats) instead applies DynamicViT's differentiable keep
  policy (see `attention.policy_attention`). The softmax is computed in
  float32 either way, so masked logits stay exact under bfloat16.
  `token_mask` ([batch, tokens], 1 = running) masks both LayerNorms' inputs
  and outputs, as the official A-ViT block does: a halted token then feeds
  only biases to the attention and the MLP, and no gradient through them.
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  dot_general_cls: DotGeneralCls = None
  einsum_cls: DotGeneralCls = None  # int8 for the two attention einsums
  kernels: str = 'cpu'  # see ViT.kernels
  norm_affine: bool = True  # see ViT.block_norm_affine

  @nn.compact
  def __call__(
      self,
      x: Array,
      mask: Array | None = None,
      *,
      policy: Array | None = None,
      token_mask: Array | None = None,
      deterministic: bool,
  ) -> Array:
    def norm(name: str, x: Array) -> Array:
      if self.norm_affine:
        layer = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
      else:
        layer = Normalize(1e-6, self.dtype, name=name)
      if token_mask is None:
        return layer(x)
      m = token_mask[..., None].astype(x.dtype)
      return layer(x * m) * m

    y = norm('norm1', x)
    y = attention.SelfAttention(
        self.num_heads,
        self.dtype,
        _trunc_normal,
        self.attention_dropout,
        self.dot_general_cls,
        self.einsum_cls,
        self.kernels,
        name='attn',
    )(y, mask, policy=policy, deterministic=deterministic)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = x + DropPath(self.drop_path)(y, deterministic=deterministic)
    y = norm('norm2', x)
    y = MlpBlock(
        self.mlp_dim,
        self.dropout,
        self.dtype,
        self.dot_general_cls,
        self.kernels,
        name='mlp',
    )(y, deterministic=deterministic)
    return x + DropPath(self.drop_path)(y, deterministic=deterministic)


class ViT(nn.Module):
  """Classic ViT classifier on raw [0, 255] pixels; returns `(logits, aux)`.

  aux['tokens'] holds the final-LayerNorm patch tokens (what DynamicViT's
  token distillation compares) and aux['pre_logits'] the class-token feature.
  Submodules are built in `setup` so that the sparse subclasses can also run
  them one at a time (A-ViT's token-removal path). The sizes have no
  defaults: configs/common.py names them (VARIANTS).
  """

  num_classes: int
  patch_size: int
  hidden_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float
  stem: str  # 'patch' | 'conv' (see PatchEmbed)
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0  # rate of the last block; rises linearly from 0
  # PatchDropout (Liu et al. 2022): in training, each image keeps a random
  # (1 - patch_dropout) of its patch tokens (rounded, at least one) and its
  # class token from the first block on; evaluation sees them all. Fewer
  # tokens make a cheaper step. The ViT's alone: the sparse models choose
  # their own tokens. With the conv stem the kept tokens have seen their
  # neighbours' pixels, a milder regulariser than with patches.
  patch_dropout: float = 0.0
  dtype: str = 'float32'  # compute dtype: 'float32' | 'bfloat16'
  # 'cpu': the hand-written kernels for XLA:CPU (attention's backward pass,
  # Dense bias gradients as matmuls; with bfloat16, Bf16Dot); 'xla': the
  # libraries' own (flax's attention, autodiff). models.create resolves
  # config's 'auto'.
  kernels: str = 'cpu'
  # Injected, not configured: the blocks' Dense layers (bf16 or int8), the
  # head's (int8 only when asked) and the attention einsums' (int8).
  dot_general_cls: DotGeneralCls = None
  head_dot_general_cls: DotGeneralCls = None
  attention_einsum_cls: DotGeneralCls = None
  # False: the blocks' two LayerNorms only normalise (with a scalar gain);
  # their scale and bias live in the layers that read them
  # (vitjax/quant/norm_folding.py, for int8).
  block_norm_affine: bool = True

  def setup(self):
    dtype = compute_dtype(self.dtype)
    if not 0.0 <= self.patch_dropout < 1.0:
      raise errors.ConfigError(
          f'model.patch_dropout={self.patch_dropout:g}: the share of patch '
          'tokens dropped in training must be in [0, 1).'
      )
    if self.patch_dropout and type(self) is not ViT:
      raise errors.ConfigError(
          f'model.patch_dropout={self.patch_dropout:g}: the sparse models '
          'choose their own tokens; set it to 0.'
      )
    if self.kernels not in ('cpu', 'xla'):
      raise errors.ConfigError(
          f"ViT.kernels={self.kernels!r}: expected 'cpu' or 'xla' ('auto' "
          'is made one of them by models.create).'
      )
    self.embed = PatchEmbed(self.patch_size, self.hidden_dim, self.stem, dtype)
    self.embed_dropout = nn.Dropout(self.dropout)
    self.blocks = [
        EncoderBlock(
            num_heads=self.num_heads,
            mlp_dim=int(self.hidden_dim * self.mlp_ratio),
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            drop_path=self.drop_path * i / max(self.depth - 1, 1),
            dtype=dtype,
            dot_general_cls=self.dot_general_cls,
            einsum_cls=self.attention_einsum_cls,
            kernels=self.kernels,
            norm_affine=self.block_norm_affine,
        )
        for i in range(self.depth)
    ]
    self.encoder_norm = nn.LayerNorm(epsilon=1e-6, dtype=dtype)
    self.head = Dense(
        self.num_classes,
        kernel_init=nn.initializers.zeros,
        dtype=dtype,
        dot_general_cls=self.head_dot_general_cls,
        bias_grad_matmul=self.kernels == 'cpu',
    )

  def tokens_per_block(self, num_patches: int) -> tuple[int, ...]:
    """Tokens (class token included) each block processes at inference."""
    return (num_patches + 1,) * self.depth

  def tokens(self, images: Array, *, train: bool) -> Array:
    """[batch, 1 + patches, dim]: class token first."""
    return self.embed_dropout(self.embed(images), deterministic=not train)

  def _drop_patches(self, x: Array) -> Array:
    """The class token and a random subset of each image's patch tokens,
    drawn from the 'dropout' stream (a step's key)."""
    b, n = x.shape[0], x.shape[1] - 1
    keep = max(1, round((1.0 - self.patch_dropout) * n))
    scores = jax.random.uniform(self.make_rng('dropout'), (b, n))
    _, kept = jax.lax.top_k(scores, keep)
    patches = jnp.take_along_axis(x[:, 1:], kept[..., None], axis=1)
    return jnp.concatenate([x[:, :1], patches], axis=1)

  def classify(self, x: Array) -> tuple[Array, dict[str, Array]]:
    """Final norm and head on a [batch, tokens, dim] sequence (cls first)."""
    x = self.encoder_norm(x)
    logits = self.head(x[:, 0])
    # Losses and metrics read float32 logits whatever the compute dtype.
    return logits.astype(jnp.float32), {
        'pre_logits': x[:, 0],
        'tokens': x[:, 1:],
    }

  def __call__(
      self, images: Array, *, train: bool
  ) -> tuple[Array, dict[str, Array]]:
    x = self.tokens(images, train=train)
    if train and self.patch_dropout:
      x = self._drop_patches(x)
    for block in self.blocks:
      x = block(x, deterministic=not train)
    return self.classify(x)

"""DynamicViT (Rao et al. 2021): learned token dropping, as the official code.

Prediction modules sit before the stage blocks (default near D/4, D/2, 3D/4)
and score the patch tokens (the class token is always kept) as keep/drop.

- Training: a straight-through hard Gumbel-softmax sample (the `gumbel` rng
  stream) per token; decisions multiply across stages (once dropped, always
  dropped); nothing is removed, every block attends under the soft policy
  (`policy_attention`), so shapes are static and gradients reach the
  predictors through attention as well as the ratio loss.
- Inference: at stage s the top-k patch tokens by keep score are gathered,
  k = int(N0 * rho^s) (the same k for every image: static shapes at any
  batch size), and later blocks really run on fewer tokens.

Parameter names extend the ViT's, so a ViT checkpoint initialises it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import errors
from vitjax.models.bf16_dot import Bf16Dot
from vitjax.models.dense import Dense
from vitjax.models.vit import ViT, compute_dtype, gelu_f32

Array = jax.Array
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class PredictorLG(nn.Module):
  """Scores tokens from local features and the mean of the kept ones."""

  hidden_dim: int
  dtype: Any = jnp.float32
  kernels: str = 'cpu'  # as the ViT's (ViT.kernels)

  @nn.compact
  def __call__(self, x: Array, policy: Array) -> Array:
    """x [b, n, c] patch tokens, policy [b, n] -> log p(keep, drop) [b, n, 2].

    Channel 0 is "keep", as in the official code.
    """
    c = self.hidden_dim
    # As the blocks' layers: Bf16Dot's bfloat16 matmuls with float32
    # accumulation (XLA:CPU runs bfloat16-result dots at half speed; other
    # dtypes pass through) and Dense's fast bias gradient.
    dense = lambda n, name: Dense(
        n,
        dtype=self.dtype,
        kernel_init=_trunc_normal,
        name=name,
        dot_general_cls=Bf16Dot if self.kernels == 'cpu' else None,
        bias_grad_matmul=self.kernels == 'cpu',
    )
    z = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm')(x)
    z = gelu_f32(dense(c, 'in')(z))
    local, glob = z[..., : c // 2], z[..., c // 2 :]
    p = policy[..., None].astype(z.dtype)
    glob = (glob * p).sum(1, keepdims=True) / jnp.maximum(
        p.sum(1, keepdims=True), 1e-6
    )
    z = jnp.concatenate([local, jnp.broadcast_to(glob, local.shape)], -1)
    z = gelu_f32(dense(c // 2, 'out_1')(z))
    z = gelu_f32(dense(c // 4, 'out_2')(z))
    z = dense(2, 'out_3')(z)
    return jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)


def gumbel_keep(log_probs: Array, key: Array, tau: float) -> Array:
  """Straight-through hard Gumbel-softmax: forward one-hot, soft gradient.

  Returns the keep decision (channel 0) as 0./1. floats.
  """
  u = jax.random.uniform(key, log_probs.shape, minval=1e-10, maxval=1.0)
  soft = jax.nn.softmax((log_probs - jnp.log(-jnp.log(u))) / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
  return (hard - jax.lax.stop_gradient(soft) + soft)[..., 0]


def default_stage_blocks(depth: int) -> tuple[int, ...]:
  """Blocks preceded by a predictor: ceil(D/4), ceil(D/2), ceil(3D/4)."""
  blocks = sorted(
      {min(max(-(-depth * q // 4), 1), depth - 1) for q in (1, 2, 3)}
  )
  return tuple(blocks)


class DynamicViT(ViT):
  """ViT with DynamicViT token dropping; returns `(logits, aux)`.

  aux (training): 'policies' [stages, b, n] cumulative keep decisions,
  'tokens' final-norm patch tokens (for token distillation).
  aux (inference): 'tokens' of the kept tokens only; 'kept_patches', per
  stage, the patch-grid positions [b, k_s] of the tokens it kept.
  """

  keep_ratio: float = 0.7  # rho: stage s keeps rho^s of the patch tokens
  stage_blocks: tuple[int, ...] = ()  # empty: default_stage_blocks(depth)
  gumbel_tau: float = 1.0

  def stages(self) -> tuple[int, ...]:
    stages = tuple(self.stage_blocks) or default_stage_blocks(self.depth)
    if any(not 0 < b < self.depth for b in stages) or sorted(
        set(stages)
    ) != list(stages):
      raise errors.ConfigError(
          f'model.stage_blocks={stages}: expected increasing '
          f'block indices in 1..{self.depth - 1}.'
      )
    return stages

  def keep_counts(self, num_patches: int) -> tuple[int, ...]:
    """Patch tokens kept after each stage at inference (cumulative rho^s)."""
    return tuple(
        max(int(num_patches * self.keep_ratio ** (s + 1)), 1)
        for s in range(len(self.stages()))
    )

  def tokens_per_block(self, num_patches: int) -> tuple[int, ...]:
    stages, keep = self.stages(), self.keep_counts(num_patches)
    counts, n = [], num_patches
    for i in range(self.depth):
      if i in stages:
        n = keep[stages.index(i)]
      counts.append(n + 1)
    return tuple(counts)

  def predictor_macs(self, num_patches: int) -> float:
    """The predictors' MACs per image at inference (each scores the tokens
    still kept when it runs): n (C^2 + C^2/2 + C^2/8 + C/2) per stage."""
    c = self.hidden_dim
    per_token = c * c + c * c / 2 + c * c / 8 + c / 2
    scored = [num_patches] + list(self.keep_counts(num_patches))[:-1]
    return float(sum(scored) * per_token)

  def setup(self):
    super().setup()
    self.predictors = [
        PredictorLG(self.hidden_dim, compute_dtype(self.dtype), self.kernels)
        for _ in self.stages()
    ]

  def __call__(
      self, images: Array, *, train: bool
  ) -> tuple[Array, dict[str, Array]]:
    x = self.tokens(images, train=train)
    n1 = x.shape[1]
    stages = self.stages()
    if train:
      return self._train_path(x, stages)
    keep = self.keep_counts(n1 - 1)
    # Where each remaining patch token sits in the image's patch grid.
    positions = jnp.broadcast_to(jnp.arange(n1 - 1), (x.shape[0], n1 - 1))
    kept = []
    for i, block in enumerate(self.blocks):
      if i in stages:
        s = stages.index(i)
        patches = x[:, 1:]
        log_probs = self.predictors[s](patches, jnp.ones(patches.shape[:2]))
        _, idx = jax.lax.top_k(log_probs[..., 0], keep[s])
        idx = jnp.sort(idx, axis=-1)  # keep the tokens' spatial order
        x = jnp.concatenate(
            [x[:, :1], jnp.take_along_axis(patches, idx[..., None], axis=1)],
            axis=1,
        )
        positions = jnp.take_along_axis(positions, idx, axis=1)
        kept.append(positions)
      x = block(x, deterministic=True)
    logits, aux = self.classify(x)
    aux['kept_patches'] = tuple(kept)
    return logits, aux

  def _train_path(self, x, stages):
    b, n1, _ = x.shape
    policy = jnp.ones((b, n1 - 1), jnp.float32)
    policies = []
    for i, block in enumerate(self.blocks):
      if i in stages:
        s = stages.index(i)
        log_probs = self.predictors[s](x[:, 1:], policy)
        policy = (
            gumbel_keep(log_probs, self.make_rng('gumbel'), self.gumbel_tau)
            * policy
        )
        policies.append(policy)
      full = (
          jnp.concatenate([jnp.ones((b, 1), policy.dtype), policy], 1)
          if policies
          else None
      )
      x = block(x, policy=full, deterministic=False)
    logits, aux = self.classify(x)
    aux['policies'] = jnp.stack(policies)
    return logits, aux

"""Mixup and cutmix inside the jitted train step, shared by both input pipelines.

A mixed batch pairs each image with the batch reversed (as timm does), so
no second batch is drawn. Per batch: with probability `mix_prob` it is
mixed, by mixup or cutmix with equal odds when both are on; lambda ~
Beta(alpha, alpha). Cutmix's lambda is corrected to the pasted box's actual
area. Targets are mixed with the same lambda.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mix(
    key: jax.Array, images: jax.Array, targets: jax.Array, aug_cfg
) -> tuple[jax.Array, jax.Array]:
  """images [b, h, w, c] (any dtype, 0..255), targets [b, classes] soft."""
  use_mixup = aug_cfg.mixup_alpha > 0
  use_cutmix = aug_cfg.cutmix_alpha > 0
  if not (use_mixup or use_cutmix) or aug_cfg.mix_prob <= 0:
    return images, targets
  k_apply, k_pick, k_mix, k_cut = jax.random.split(key, 4)
  x = images.astype(jnp.float32)
  x_pair, t_pair = x[::-1], targets[::-1]
  b, h, w, _ = x.shape

  outputs = []  # (mixed images, lambda), one per enabled method
  if use_mixup:
    lam = jax.random.beta(k_mix, aug_cfg.mixup_alpha, aug_cfg.mixup_alpha)
    outputs.append((lam * x + (1.0 - lam) * x_pair, lam))
  if use_cutmix:
    lam = jax.random.beta(k_cut, aug_cfg.cutmix_alpha, aug_cfg.cutmix_alpha)
    k_y, k_x = jax.random.split(k_cut)
    cut_h = jnp.floor(h * jnp.sqrt(1.0 - lam)).astype(jnp.int32)
    cut_w = jnp.floor(w * jnp.sqrt(1.0 - lam)).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam = 1.0 - box.sum() / (h * w)
    outputs.append((jnp.where(box[None, :, :, None], x_pair, x), lam))

  if len(outputs) == 2:
    pick = jax.random.bernoulli(k_pick)
    mixed = jnp.where(pick, outputs[1][0], outputs[0][0])
    lam = jnp.where(pick, outputs[1][1], outputs[0][1])
  else:
    mixed, lam = outputs[0]
  apply = jax.random.bernoulli(k_apply, aug_cfg.mix_prob)
  lam = jnp.where(apply, lam, 1.0)
  mixed = jnp.where(apply, mixed, x)
  return mixed, lam * targets + (1.0 - lam) * t_pair

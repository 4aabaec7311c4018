"""A-ViT's token-removal inference path, for large batches.

Before each block the host reads which tokens are still active, sorts the
batch's images by their active count and cuts it into pieces; each piece
runs the block on its images' active tokens only, gathered into a buffer
padded to a multiple of 8 (`removal_plan`). One buffer for the whole batch
would be as wide as its busiest image: at batch 256, nearly every token.
It gives the masked path's predictions (tests/test_sparse_models.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models.avit import AViT, HaltState, zero_halted

Array = jax.Array


# Images per piece in the token-removal path. The batch is sorted by active
# count and cut into pieces that each run a block at their own width, so a few
# busy images do not set everyone's width (at batch 256 the busiest image
# usually still has all 65 tokens active). 32 images keep each matmul large.
IMAGES_PER_PIECE = 32


@dataclasses.dataclass(frozen=True)
class RemovalPiece:
  """One piece of a block's token-removal plan."""

  rows: np.ndarray  # int32 [images, width]: flat indices b * n + token
  valid: np.ndarray  # bool [images, width]: False for padding
  offset: int  # where its outputs start in the block's output rows


def removal_plan(
    active: np.ndarray, images_per_piece: int = IMAGES_PER_PIECE
) -> tuple[list[RemovalPiece], np.ndarray]:
  """Host-side layout of one block's token-removal pass.

  active: bool [b, n]. Images are sorted by active count and cut into pieces;
  each piece gathers its images' active tokens (in token order) into a
  buffer whose width is the piece's largest count rounded up to a multiple of
  8. Returns the pieces and `where` [b, n]: each token's row in the block's
  output buffer, or b * n (the buffer's trailing zero row) for tokens that
  skip the block. The pieces' rows never exceed b * n in total.
  """
  b, n = active.shape
  counts = active.sum(1)
  by_count = np.argsort(-counts, kind='stable')
  active_first = np.argsort(~active, axis=1, kind='stable')
  zero_row = b * n
  where = np.full((b, n), zero_row, np.int32)
  pieces, offset = [], 0
  for start in range(0, b, images_per_piece):
    imgs = by_count[start : start + images_per_piece]
    width = min(-(-int(counts[imgs].max()) // 8) * 8, n)
    if width == 0:  # every token of these images has halted
      continue
    tokens = active_first[imgs, :width]
    valid = np.take_along_axis(active[imgs], tokens, 1)
    slots = offset + np.arange(imgs.size * width).reshape(imgs.size, width)
    where[imgs[:, None], tokens] = np.where(valid, slots, zero_row)
    pieces.append(
        RemovalPiece(
            (imgs[:, None] * n + tokens).astype(np.int32), valid, offset
        )
    )
    offset += imgs.size * width
  return pieces, where


@functools.partial(jax.jit, static_argnums=(0, 4))
def _dense_block(
    model: AViT, variables: Any, x: Array, state: HaltState, i: int
) -> tuple[Array, HaltState]:
  """Block i on every token, while none has halted (always block 0)."""
  x = model.apply(variables, x, None, i, method=AViT.block_only)
  return x, state.update(x, model.halting_score(x, i), model.halting_eps)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _removal_piece(
    model: AViT,
    variables: Any,
    out: Array,
    x: Array,
    rows: Array,
    valid: Array,
    i: int,
    offset: Array,
) -> Array:
  """Block i on one piece's gathered tokens, written into out [b*n+1, c]."""
  images, width = rows.shape
  xg = x.reshape(-1, x.shape[-1])[rows]
  y = model.apply(
      variables, xg, valid[:, None, None, :], i, method=AViT.block_only
  )
  y = zero_halted(y, valid).reshape(images * width, -1)
  return jax.lax.dynamic_update_slice(out, y.astype(out.dtype), (offset, 0))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _back_in_token_order(
    model: AViT, out: Array, where: Array, i: int, state: HaltState
) -> tuple[Array, HaltState]:
  """[b, n, c] from the pieces' output rows (zeros for skipped tokens)."""
  x = out[where]
  return x, state.update(x, model.halting_score(x, i), model.halting_eps)


def token_removal_apply(
    model: AViT,
    variables: Any,
    images: Array,
    *,
    images_per_piece: int = IMAGES_PER_PIECE,
) -> tuple[Array, dict[str, Array]]:
  """Inference that skips halted tokens (see the module docstring).

  variables: {'params': ...} (plus 'aqt' for int8 serving). Runs block by
  block from the host, which reads the active mask and plans each block
  (`removal_plan`): every piece compiles once per (block, images, width),
  at most n / 8 + 1 widths, and later blocks process fewer tokens.
  """
  x = _embed(model, variables, images)
  state = HaltState.start(x)
  b, n, c = x.shape
  for i in range(model.depth):
    active = np.asarray(state.active)
    if active.all():
      x, state = _dense_block(model, variables, x, state, i)
      continue
    pieces, where = removal_plan(active, images_per_piece)
    out = jnp.zeros((b * n + 1, c), x.dtype)
    for piece in pieces:
      out = _removal_piece(
          model,
          variables,
          out,
          x,
          piece.rows,
          piece.valid,
          i,
          np.int32(piece.offset),
      )
    x, state = _back_in_token_order(model, out, where, i, state)
  return _finish(model, variables, state)


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, variables, images):
  return model.apply(variables, images, method=AViT.embed_only)


@functools.partial(jax.jit, static_argnums=0)
def _finish(model, variables, state):
  return model.apply(variables, state, method=AViT.finish)

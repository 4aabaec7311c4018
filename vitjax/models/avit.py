"""A-ViT (Yin et al. 2022): adaptive token halting, as the official code.

After every block l each token k gets a halting score from embedding
dimension 0 of its residual stream, h = sigmoid(gate_scale * x[k, 0] -
gate_center) (no parameters), and h = 1 at the last block. A token halts at
the first block where its cumulative score reaches 1 - eps (that block still
runs). Its output is the ACT mean field sum_{l<N} h_l e_l + r e_N with the
remainder r = 1 - sum_{l<N} h_l; the class token's output feeds the head
(the class token may halt too, as in the official code). Halted tokens are
zeroed and hidden as attention keys. ponder = N + r per token.

`faithful=True` runs the official code's forward for the official prior
loss (objectives.AViTObjective): halted tokens are zeroed for the forward
pass only (the official `.data` assignment), so gradients pass as if they
were not; the blocks mask their LayerNorms' inputs and outputs; every
token, halted or not, gets a halting score from its raw block output, and
the last block's score is recorded before it is set to 1. The running
tokens' values, and so the predictions, are the same in both modes. What
still differs from the official training: it ran under fp16 autocast, and
each GPU took its own batch's `h[1:]` and its own KL, where here one
process's global batch does (the same on one device); halted keys are
hidden exactly rather than by a -1000 logit bias, which agrees unless the
attention logits spread by about 900.

Three inference paths give the same predictions:
- `__call__` on a batch (what the official code does): every block runs on
  every token, halted ones masked, so it is no faster than the dense model;
- `__call__` on a few images (up to `compact_max_batch`): before each block
  the active tokens are gathered into a buffer of the next multiple of 8,
  and lax.switch runs the block compiled for that width, all in one jitted
  program: what serves one image at a time;
- `token_removal.token_removal_apply` for large batches: the host reads
  the active mask before each block and gathers the active tokens into
  buffers padded to a multiple of 8, one per piece of the batch sorted by
  active count, so later blocks really run on fewer tokens.

The gate's beta must fit the dense model it starts from: the paper's
constants saturate the sigmoid on a fresh CIFAR model (h ~ 1e-13, no ponder
gradient), so `calibrate_gate` chooses it on that model's own gate inputs.
"""

from __future__ import annotations

from typing import Any


import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models.vit import ViT

Array = jax.Array


@flax.struct.dataclass
class HaltState:
  """Per-token ACT bookkeeping carried through the blocks."""

  cumulative: Array  # [b, n] sum of h so far
  remainder: Array  # [b, n] 1 - sum of h before the current block
  active: Array  # bool [b, n]: still running
  output: Array  # [b, n, c] float32 ACT-weighted sum of block outputs
  ponder: Array  # [b, n] blocks run + remainder at halting
  depth: Array  # [b, n] blocks run
  scores: tuple[Array, ...] = ()  # per block: h of the tokens that ran it
  raw_scores: tuple[Array, ...] = ()  # per block: h of every token
  ran: tuple[Array, ...] = ()  # per block: who ran it

  @classmethod
  def start(cls, x: Array) -> 'HaltState':
    b, n, _ = x.shape
    zeros = jnp.zeros((b, n), jnp.float32)
    return cls(
        zeros,
        jnp.ones((b, n), jnp.float32),
        jnp.ones((b, n), bool),
        jnp.zeros(x.shape, jnp.float32),
        zeros,
        zeros,
    )

  def update(
      self, x: Array, h: Array, eps: float, raw_h: Array | None = None
  ) -> 'HaltState':
    """Accounts block output x and halting scores h (raw_h, the scores
    before the last block's are set to 1, default h). Halted tokens' rows of
    x get no weight."""
    active = self.active
    h_run = jnp.where(active, h, 0.0)
    cumulative = self.cumulative + h_run
    # As the official code: past 1 - eps a token halts (with its remainder),
    # below it runs on; one exactly at it stops with no weight.
    halting = active & (cumulative > 1.0 - eps)
    still = active & (cumulative < 1.0 - eps)
    weight = jnp.where(still, h_run, jnp.where(halting, self.remainder, 0.0))
    return self.replace(
        cumulative=cumulative,
        remainder=jnp.where(still, self.remainder - h_run, self.remainder),
        active=still,
        output=self.output + weight[..., None] * x.astype(jnp.float32),
        ponder=self.ponder + active + jnp.where(halting, self.remainder, 0.0),
        depth=self.depth + active,
        scores=self.scores + (h_run,),
        raw_scores=self.raw_scores + (h if raw_h is None else raw_h,),
        ran=self.ran + (active,),
    )


def zero_halted(x: Array, active: Array) -> Array:
  return jnp.where(active[..., None], x, jnp.zeros((), x.dtype))


class AViT(ViT):
  """ViT with ACT halting; returns `(logits, aux)`.

  aux: 'ponder' and 'depth' [b, n]; 'halting' and 'raw_halting' [depth, b,
  n] (h of the tokens that ran each block / of all tokens); 'active'
  [depth, b, n]; 'gate_inputs' [depth, b, n] (x[:, :, 0] after each block,
  for calibrating gate_center).
  """

  gate_scale: float = 10.0  # gamma
  gate_center: float = 10.0  # beta: calibrate it on the dense model
  halting_eps: float = 0.01
  faithful: bool = False  # the official forward (see the module docstring)
  # At inference, batches of at most this many images run on their active
  # tokens alone, in one jitted program (`_compact_block`); larger ones, in
  # which some image usually still has every token active, run masked, and
  # so do the faithful mode and passes that write variables. 0: always
  # masked.
  compact_max_batch: int = 16

  def gate(self, x: Array) -> Array:
    """sigmoid(gamma * x[..., 0] - beta) for every token."""
    return jax.nn.sigmoid(
        self.gate_scale * x[..., 0].astype(jnp.float32) - self.gate_center
    )

  def halting_score(self, x: Array, i: int) -> Array:
    if i == self.depth - 1:
      return jnp.ones(x.shape[:2], jnp.float32)
    return self.gate(x)

  def __call__(
      self, images: Array, *, train: bool
  ) -> tuple[Array, dict[str, Array]]:
    x = self.tokens(images, train=train)
    state = HaltState.start(x)
    gate_inputs = []
    compact = (
        not train
        # Its raw halting scores are every token's, running or not.
        and not self.faithful
        # A pass that writes variables (init, int8 conversion, sown
        # intermediates) would write them in some branches only.
        and not self.scope.mutable
        and isinstance(x.shape[0], int)  # not a symbolic (exported) batch
        and x.shape[0] <= self.compact_max_batch
    )
    for i, block in enumerate(self.blocks):
      if compact:
        # Block 0 runs every token: none has halted before it.
        x = (
            self._compact_block(x, state.active, i)
            if i
            else block(x, deterministic=True)
        )
        state = state.update(x, self.halting_score(x, i), self.halting_eps)
      else:
        keys = state.active[:, None, None, :]  # halted tokens hide as keys
        if self.faithful:
          # Zeros forward, identity backward: the official `out.data *=
          # mask`.
          x = x + jax.lax.stop_gradient(zero_halted(x, state.active) - x)
          x = block(x, keys, token_mask=state.active, deterministic=not train)
          raw_h = self.gate(x)
          h = self.halting_score(x, i) if i == self.depth - 1 else raw_h
          state = state.update(x, h, self.halting_eps, raw_h)
        else:
          x = zero_halted(
              block(
                  zero_halted(x, state.active), keys, deterministic=not train
              ),
              state.active,
          )
          state = state.update(x, self.halting_score(x, i), self.halting_eps)
      gate_inputs.append(x[..., 0].astype(jnp.float32))
    logits, aux = self.finish(state)
    aux['gate_inputs'] = jnp.stack(gate_inputs)
    return logits, aux

  def _compact_block(self, x: Array, active: Array, i: int) -> Array:
    """Block i on the active tokens alone: the same outputs as the masked
    path, zeros for halted tokens.

    Each image's active tokens are gathered first (in token order) into a
    buffer whose width is the batch's largest active count rounded up to
    a multiple of 8 (`compact_widths`); jax.lax.switch (flax's nn.switch)
    runs the block compiled for that width, so one jitted program serves
    every count without a host round trip. Padding slots are hidden as
    keys and their outputs dropped.
    """
    b, n, _ = x.shape
    widths = compact_widths(n)
    counts = active.sum(-1, dtype=jnp.int32)
    branch = jnp.searchsorted(jnp.asarray(widths), counts.max())
    order = jnp.argsort(~active, axis=-1, stable=True)
    # Each token's slot in that order: its rank among the active tokens,
    # or after them among the halted ones.
    slot = jnp.where(
        active,
        jnp.cumsum(active, -1) - 1,
        counts[:, None] + jnp.cumsum(~active, -1) - 1,
    )

    def at_width(width: int):
      def run(mdl: AViT, x: Array) -> Array:
        if width == 0:  # every token has halted
          return jnp.zeros_like(x)
        rows = order[:, :width]
        valid = jnp.take_along_axis(active, rows, 1)
        y = mdl.blocks[i](
            jnp.take_along_axis(x, rows[..., None], 1),
            valid[:, None, None, :],
            deterministic=True,
        )
        # Back in token order; halted tokens read the appended zero row.
        y = jnp.concatenate(
            [zero_halted(y, valid), jnp.zeros((b, 1) + y.shape[2:], y.dtype)],
            1,
        )
        where = jnp.where(active, slot, width)
        return jnp.take_along_axis(y, where[..., None], 1)

      return run

    return nn.switch(branch, [at_width(w) for w in widths], self, x)

  def finish(self, state: HaltState) -> tuple[Array, dict[str, Array]]:
    logits, aux = self.classify(state.output)
    aux.update(
        ponder=state.ponder,
        depth=state.depth,
        halting=jnp.stack(state.scores),
        raw_halting=jnp.stack(state.raw_scores),
        active=jnp.stack(state.ran),
    )
    return logits, aux

  # Pieces for the token-removal path, which runs the same parameters.

  def embed_only(self, images: Array) -> Array:
    return self.tokens(images, train=False)

  def block_only(
      self, x: Array, keys: Array, i: int, token_mask: Array | None = None
  ) -> Array:
    return self.blocks[i](x, keys, token_mask=token_mask, deterministic=True)


def compact_widths(tokens: int) -> tuple[int, ...]:
  """The token buffer widths the compact path compiles a block for: 0,
  then multiples of 8, then `tokens`."""
  return (0,) + tuple(range(8, tokens, 8)) + (tokens,)


def halting_sums(
    gate_inputs: np.ndarray, gate_scale: float, gate_center: float
) -> np.ndarray:
  """Per image, the mean over its tokens of sum_{l<D-1} sigmoid(gamma x0_l -
  beta), from gate inputs [depth, images, tokens]."""
  x0 = np.asarray(gate_inputs, np.float64)[:-1]
  z = np.clip(gate_scale * x0 - gate_center, -60, 60)
  return np.sum(1.0 / (1.0 + np.exp(-z)), axis=0).mean(axis=-1)


def calibrate_gate_center(
    gate_inputs: np.ndarray, gate_scale: float, target_sum: float
) -> float:
  """beta such that the mean over tokens of sum_{l<D-1} sigmoid(gamma x0_l -
  beta) equals target_sum, on gate inputs [depth, ...] of the dense model.

  A small target (0.1-0.3) means no early halting yet, with the sigmoid far
  from saturation, so the ponder loss has gradient from the first step.
  """
  lo, hi = -1e3, 1e3  # the halting sum falls as beta grows
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if halting_sums(gate_inputs, gate_scale, mid).mean() > target_sum:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def calibrate_gate(
    model: AViT,
    params: Any,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    target_sum: float,
) -> dict[str, Any]:
  """The gate_center (beta) at which the dense ViT's weights `params` give
  a mean per-token halting sum over the first D-1 blocks of `target_sum`
  on `images`, with what the calibration saw: the sum per class of
  `labels`, and the gate inputs' spread."""
  probe = model.clone(gate_center=1e9)  # no token halts: the dense model
  gate_inputs = np.asarray(
      jax.jit(
          lambda p, x: probe.apply({'params': p}, x, train=False)[1][
              'gate_inputs'
          ]
      )(params, images)
  )
  beta = calibrate_gate_center(gate_inputs, model.gate_scale, target_sum)
  sums = halting_sums(gate_inputs, model.gate_scale, beta)
  return {
      'gate_center': beta,
      'gate_scale': model.gate_scale,
      'initial_halting_sum': target_sum,
      'images': int(len(images)),
      'halting_sum_per_class': {
          name: float(sums[labels == c].mean())
          for c, name in enumerate(class_names)
          if np.any(labels == c)
      },
      'gate_input_mean': float(np.mean(gate_inputs)),
      'gate_input_std': float(np.std(gate_inputs)),
  }

"""The blocks' LayerNorm scale and bias folded into the layers that read them.

A pre-LN block feeds `LN(x) = n(x) * g + b` (n: the normalisation alone) to
the query, key and value projections (norm1) and to the MLP's first layer
(norm2). For any such Dense layer, `LN(x) @ W + c = n(x) @ (g[:, None] * W)
+ (b @ W + c)`: the same function, with the LayerNorm reduced to n (A-ViT's
faithful forward, which zeroes halted tokens' norm outputs, then feeds
their rows b @ W + c instead of c; it only calibrates int8). The
model that reads folded weights is the same one with
`block_norm_affine=False`, whose block norms are `models.vit.Normalize`:
n(x) times one scalar gain, 1 after folding.

Why int8 serving folds them: its activation quantization is fused into the
op that produces the layer's input, here the LayerNorm. With the scale and
bias applied there, XLA:CPU's cost model takes that fused op for
compute-bound (about 8 operations per element against 5 bytes moved) and
splits it across the threads; at batch 1 the hand-off costs several times
the op (docs/int8.md). With static activation scales the quantization's
own multiply then moves into the gain too (server.py,
`_absorb_input_scales`), which leaves n(x) * gain, a clip, a rounding and
a conversion: about as many operations as bytes moved, and XLA keeps the
op on one thread. The quantized layers see n(x), and calibrate and
quantize on it, with g folded into their weights before those are
quantized per output channel: a different int8 model of the same float
function, whose accuracy the int8 evaluation reports
(`eval.quant_fold_norms`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The layers each block LayerNorm feeds, by their path under the block.
READERS = {
    'norm1': (('attn', 'query'), ('attn', 'key'), ('attn', 'value')),
    'norm2': (('mlp', 'fc1'),),
}


def block_names(params: Any) -> list[str]:
  return [k for k in params if k.startswith('blocks_') and k[7:].isdigit()]


def fold_block_norms(params: Any) -> Any:
  """Float32 weights with every block's norm1 and norm2 scale and bias
  folded into the Dense layers they feed (see top); the norms keep a gain
  of 1. Traceable: jax.eval_shape gives the folded tree's shapes."""
  params = dict(params)  # a copy we may change
  for name in block_names(params):
    block = dict(params[name])
    for norm, readers in READERS.items():
      g, b = block[norm]['scale'], block[norm]['bias']
      block[norm] = {'gain': jnp.ones((), jnp.float32)}
      for parent, layer in readers:
        dense = block[parent][layer]
        kernel = dense['kernel']  # [dim, *features], contracts its first axis
        folded = {
            'kernel': g.reshape((-1,) + (1,) * (kernel.ndim - 1)) * kernel,
            # HIGHEST: a GPU would otherwise multiply float32 in TF32.
            'bias': (
                dense['bias']
                + jnp.tensordot(
                    b, kernel, axes=(0, 0), precision=jax.lax.Precision.HIGHEST
                )
            ),
        }
        block[parent] = dict(block[parent]) | {layer: folded}
    params[name] = block
  return params


def float_model_to_quantize(
    model: nn.Module, params: Any, quant_cfg
) -> tuple[nn.Module, Any]:
  """The float model and weights that int8 quantizes: with
  eval.quant_fold_norms, the blocks' LayerNorm affines folded into the
  layers they feed (the same function; see top). params may
  be jax.ShapeDtypeStructs (the folded ones' shapes come back)."""
  if not quant_cfg.quant_fold_norms:
    return model, params
  fold = fold_block_norms
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    folded = jax.eval_shape(fold, params)
  else:
    # Jitted, the folded leaves keep the params' placement on the mesh.
    folded = jax.jit(fold)(params)
  return model.clone(block_norm_affine=False), folded

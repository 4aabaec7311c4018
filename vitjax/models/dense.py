"""Dense layers whose bias gradient is a matmul, not a reduction.

`Dense` has the parameters, initialisation and call of `nn.DenseGeneral`
(with `batch_dims=()`), so checkpoints and the injected dot_general (bf16 or
aqtp's int8) are the same. What differs is the backward pass of the bias:
autodiff turns `y + bias` into a sum of the output gradient over every
token of the batch, and XLA:CPU compiles that sum, fused with its producer,
into a reduce-window loop that runs at about 0.5 G elements/s: 2 ms per
layer, a quarter of the CPU sprint's training step. Here the same sum is a
matrix-vector product (ones x gradient, float32 accumulation), which XLA
hands to its matmul library. `scripts/benchmark.py --config=configs/vit.py:cpu`
measures the step (docs/performance.md#kernels).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@jax.custom_vjp
def add_bias(y: Array, bias: Array) -> Array:
  """y [..., *features] + bias [*features], in y's dtype."""
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias  # backward needs only its shape and dtype


def _add_bias_bwd(bias, g):
  lead = g.ndim - bias.ndim
  ones = jnp.ones(g.shape[:lead], g.dtype)
  axes = tuple(range(lead))
  d_bias = lax.dot_general(
      ones, g, ((axes, axes), ((), ())), preferred_element_type=jnp.float32
  )
  return g, d_bias.astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _flat_init(
    init: Callable[..., Array], n_in: int | None
) -> Callable[..., Array]:
  """Draws a [*in, *out] kernel as the [prod(in), prod(out)] matrix (a bias,
  n_in=None, as a vector), as nn.DenseGeneral does: same values from the
  same key."""

  def wrapped(key, shape, dtype=jnp.float32):
    if n_in is None:
      flat = (int(np.prod(shape)),)
    else:
      flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
    return jnp.reshape(init(key, flat, dtype), shape)

  return wrapped


class Dense(nn.Module):
  """nn.DenseGeneral (no batch_dims) with a matmul bias gradient (see top).

  features: an int or a tuple (e.g. (heads, head_dim)); axis: the input
  axes contracted, -1 or e.g. (-2, -1) for attention's output projection.
  """

  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Array] = nn.initializers.zeros
  dot_general_cls: Callable[[], Any] | None = None
  # False: autodiff's bias gradient, the library path (model.kernels='xla').
  bias_grad_matmul: bool = True

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    features = (
        (self.features,)
        if isinstance(self.features, int)
        else tuple(self.features)
    )
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % inputs.ndim for a in axis)
    kernel_shape = tuple(inputs.shape[a] for a in axis) + features
    kernel = self.param(
        'kernel',
        _flat_init(self.kernel_init, len(axis)),
        kernel_shape,
        jnp.float32,
    )
    bias = self.param(
        'bias', _flat_init(self.bias_init, None), features, jnp.float32
    )
    dot_general = (
        self.dot_general_cls() if self.dot_general_cls else lax.dot_general
    )
    y = dot_general(
        inputs.astype(self.dtype),
        kernel.astype(self.dtype),
        ((axis, tuple(range(len(axis)))), ((), ())),
        precision=None,
    )
    if not self.bias_grad_matmul:
      return y + bias.astype(y.dtype)
    return add_bias(y, bias)

"""bfloat16 matmuls that accumulate in float32, forward and backward.

XLA:CPU only reaches the AVX512-BF16 / AMX kernels when a bfloat16 dot asks
for a float32 result; a dot that returns bfloat16 runs at float32 speed or
below (measured here: 404 vs 189 GFLOP/s on the 2-core EPYC). Flax's Dense
layers ask for bfloat16 results, and JAX's transpose rule turns the backward
dots into mixed float32 x bfloat16 products, which are slow too. This dot
keeps all three products (forward, d_lhs, d_rhs) as bfloat16 x bfloat16 ->
float32, then rounds to bfloat16. On GPUs the same form is what cuBLAS does
anyway, so it is used there unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np


def _free_axes(ndim: int, contracting: tuple[int, ...]) -> list[int]:
  return [a for a in range(ndim) if a not in contracting]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot(lhs, rhs, contracting):
  out = lax.dot_general(
      lhs, rhs, (contracting, ((), ())), preferred_element_type=jnp.float32
  )
  return out.astype(lhs.dtype)


def _dot_fwd(lhs, rhs, contracting):
  return _dot(lhs, rhs, contracting), (lhs, rhs)


def _dot_bwd(contracting, residuals, g):
  lhs, rhs = residuals
  lc, rc = contracting
  l_free, r_free = _free_axes(lhs.ndim, lc), _free_axes(rhs.ndim, rc)
  # g's axes are [l_free..., r_free...] in order.
  g_l = tuple(range(len(l_free)))
  g_r = tuple(range(len(l_free), g.ndim))
  g = g.astype(lhs.dtype)

  # d_lhs: contract g's rhs-free axes with rhs's free axes. The result's
  # axes are lhs's free axes, then rhs's contracting axes in rhs order, each
  # standing for the lhs axis it was contracted with.
  d_lhs = lax.dot_general(
      g,
      rhs,
      ((g_r, tuple(r_free)), ((), ())),
      preferred_element_type=jnp.float32,
  )
  labels = l_free + [lc[rc.index(a)] for a in sorted(rc)]
  d_lhs = jnp.transpose(d_lhs, np.argsort(labels))
  # d_rhs: contract lhs's free axes with g's lhs-free axes, likewise.
  d_rhs = lax.dot_general(
      lhs,
      g,
      ((tuple(l_free), g_l), ((), ())),
      preferred_element_type=jnp.float32,
  )
  labels = [rc[lc.index(a)] for a in sorted(lc)] + r_free
  d_rhs = jnp.transpose(d_rhs, np.argsort(labels))
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)


class Bf16Dot:
  """A `lax.dot_general` stand-in: `dense.Dense(dot_general_cls=Bf16Dot)`.

  Only bfloat16 x bfloat16 products without batch axes (every Dense layer
  in the models) take the float32-accumulating path; anything
  else is passed to `lax.dot_general` unchanged.
  """

  def __call__(
      self,
      lhs,
      rhs,
      dimension_numbers,
      precision=None,
      preferred_element_type=None,
      **kwargs,
  ):
    contracting, batch = dimension_numbers
    if (
        lhs.dtype == rhs.dtype == jnp.bfloat16
        and batch == ((), ())
        and preferred_element_type in (None, jnp.bfloat16)
    ):
      lc, rc = contracting
      return _dot(lhs, rhs, (tuple(lc), tuple(rc)))
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )

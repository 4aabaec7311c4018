"""Where compiled time goes: the HLO's thunks sorted into kinds of work."""

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip('aqt')

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax import models, quant  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax.measure import profiling  # pylint: disable=g-import-not-at-top,wrong-import-position

from tests.conftest import jit_init  # pylint: disable=g-import-not-at-top,wrong-import-position


def _nano_model(batch: int):
  """(config, model, its first weights, zero images of `batch`)."""
  c = common.base()
  common.apply_variant(c, 'nano/4')
  c.model.stem = 'patch'
  model = models.create(c.model, 10)
  x = jnp.zeros((batch, 32, 32, 3), jnp.uint8)
  params = jit_init(model, jax.random.key(0), x, train=False)['params']
  return c, model, params, x


def _int8_server():
  c, model, params, x = _nano_model(8)
  c.eval.quant, c.eval.quant_path = 'int8', 'serve'
  # Per-token scales: each quantization is its own ops (a static scale's
  # may fuse into the op before it).
  c.eval.quant_activations = 'per_token'
  server = quant.Int8Server.convert(model, c.eval, params)
  variables = {'params': server.params, 'aqt': server.frozen}
  serve = jax.jit(
      lambda v, x: server.model.apply(server.prepare(v), x, train=False)[0]
  )
  return serve, variables, x


@pytest.mark.skipif(
    jax.default_backend() != 'cpu', reason='thunk names are XLA:CPU ones'
)
def test_the_int8_serving_step_is_sorted_into_its_kinds_of_work():
  serve, variables, x = _int8_server()
  hlo = serve.lower(variables, x).compile().as_text()
  ops = profiling.classify(hlo)
  kinds = [op.kind for op in ops.values()]
  assert set(kinds) <= set(profiling.KINDS)
  # 2 blocks x (q, k, v, out, fc1, fc2): each int8 dot is its own thunk.
  assert profiling.s8_dots(hlo) == 12
  assert kinds.count('int8 matmul') == 12
  for kind in (
      'quantize activations',
      'dequantize (fused into the next op)',
      'attention (scores, softmax, weighted sum)',
      'layer norm',
  ):
    assert kind in kinds, kind
  # The quantized layers' thunks carry their module's name.
  assert all(
      'AqtDotGeneral' in op.op_name
      for op in ops.values()
      if op.kind == 'int8 matmul'
  )

  traced = profiling.op_seconds(
      lambda: serve(variables, x), profiling.module_name(hlo), calls=3
  )
  # Every thunk ran, each once per call (on each of the test's 2 devices).
  assert set(traced.seconds) == set(ops)
  assert traced.wall_seconds > 0
  rows = profiling.shares(ops, traced.seconds)
  assert {r.kind for r in rows} <= set(kinds)
  assert sum(r.fraction for r in rows) == pytest.approx(1.0)
  assert all(r.seconds > 0 and r.thunks > 0 for r in rows)
  assert [r.seconds for r in rows] == sorted(
      (r.seconds for r in rows), reverse=True
  )
  assert 'int8 matmul' in profiling.format_shares(rows)
  # A trace with none of these thunks (another program, renamed events)
  # is no table of zero rows.
  renamed = {f'other.{name}': t for name, t in traced.seconds.items()}
  with pytest.raises(ValueError, match='is one of the compiled'):
    profiling.shares(ops, renamed)


def test_a_float_model_has_no_int8_work():
  _, model, params, x = _nano_model(2)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
  hlo = forward.lower(params, x).compile().as_text()
  kinds = {op.kind for op in profiling.classify(hlo).values()}
  assert profiling.s8_dots(hlo) == 0
  assert 'float matmul' in kinds
  assert not kinds & {
      'int8 matmul',
      'quantize activations',
      'dequantize (fused into the next op)',
  }


def test_a_loop_counts_the_thunks_it_runs_not_itself():
  def f(x):
    return jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y @ y), x)

  x = jnp.ones((64, 64)) / 64
  jitted = jax.jit(f)
  hlo = jitted.lower(x).compile().as_text()
  ops = profiling.classify(hlo)
  assert 'float matmul' in {op.kind for op in ops.values()}
  assert not any(name.startswith('while') for name in ops)
  traced = profiling.op_seconds(
      lambda: jitted(x), profiling.module_name(hlo), calls=2
  )
  # What the trace holds beyond the thunks is the loop's own span.
  assert all(n.startswith('while') for n in set(traced.seconds) - set(ops))
  assert {n for n in ops if 'dot' in n or 'fusion' in n} <= set(traced.seconds)

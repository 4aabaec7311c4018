"""int8 evaluation with aqtp: fake-quant, frozen serving, the fallback."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('aqt')

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax import evaluate, models, parallel, quant  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax.measure import profiling  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax.quant import server as quant_server  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.conftest import FAMILIES, jit_apply, jit_init  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax.models import token_removal  # pylint: disable=g-import-not-at-top,wrong-import-position


def _quant_cfg(**kw):
  """int8 settings; per-token fake quantization unless `kw` says."""
  q = common.base().eval
  q.quant, q.quant_path, q.quant_activations = 'int8', 'fake', 'per_token'
  q.update(kw)
  return q


def _random_model(seed=0, **kw):
  c = common.base()
  common.apply_variant(c, 'nano/4')
  c.model.stem = 'patch'
  c.model.update(kw)
  model = models.create(c.model, 10)
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  params = jit_init(model, jax.random.key(seed), x, train=False)['params']
  params['head']['kernel'] = jax.random.normal(
      jax.random.key(seed + 1), params['head']['kernel'].shape
  )
  return model, params


def _images(n=32, seed=0):
  return jax.random.randint(
      jax.random.key(seed), (n, 32, 32, 3), 0, 256
  ).astype(jnp.uint8)


def test_fake_quant_and_serving_give_the_same_predictions():
  model, params = _random_model()
  x = _images()
  fake = quant.quantized_model(model, _quant_cfg(), 'fake')
  fake_logits = jit_apply(fake, {'params': params}, x, train=False)[0]
  server = quant.Int8Server.convert(
      model, _quant_cfg(quant_path='serve'), params, (32, 32, 3)
  )
  serve_logits = server.predict(x)
  np.testing.assert_array_equal(
      np.argmax(fake_logits, -1), np.argmax(serve_logits, -1)
  )
  np.testing.assert_allclose(fake_logits, serve_logits, atol=0.02)
  float_logits = jit_apply(model, {'params': params}, x, train=False)[0]
  assert not np.allclose(float_logits, fake_logits)  # int8 really ran


@pytest.mark.parametrize('name', FAMILIES)
def test_bfloat16_models_serve_int8_dots_in_float32_and_agree_with_fake_quant(
    name,
):
  model, params = _random_model(name=name, dtype='bfloat16')
  x = _images()
  fake = quant.quantized_model(model, _quant_cfg(), 'fake')
  fake_logits = jit_apply(fake, {'params': params}, x, train=False)[0]
  server = quant.Int8Server.convert(
      model, _quant_cfg(quant_path='serve'), params, (32, 32, 3)
  )
  # The float parts of an int8 model compute in float32 (see
  # quantized_model), whatever the model trained in.
  assert fake.dtype == server.model.dtype == 'float32'
  variables = {'params': server.params, 'aqt': server.frozen}
  apply = lambda v, x: server.model.apply(server.prepare(v), x, train=False)
  compiled = jax.jit(apply).lower(variables, x).compile()
  hlo = compiled.as_text()
  if jax.default_backend() == 'cpu':  # a GPU may call its int8 gemm
    # Every quantized layer runs an int8 x int8 dot: 2 blocks x (q, k, v,
    # out, fc1, fc2). A change that fell back to float would fail here.
    assert profiling.s8_dots(hlo) == 12
    assert 'bf16[' not in hlo
  serve_logits, aux = compiled(variables, x)
  np.testing.assert_array_equal(
      np.argmax(fake_logits, -1), np.argmax(serve_logits, -1)
  )
  scale = np.abs(fake_logits).max()
  assert np.abs(fake_logits - serve_logits).max() <= 0.01 * scale
  if name == 'avit':  # its batch path: token removal, also in int8
    removal_logits, _ = token_removal.token_removal_apply(
        server.model, server.prepare(variables), x
    )
    assert np.abs(removal_logits - serve_logits).max() <= 0.03 * scale
  if name == 'dynamic_vit':
    assert [k.shape[1] for k in aux['kept_patches']] == [44]


def test_the_fallback_reproduces_aqt_fake_quant():
  model, params = _random_model()
  x = _images()
  aqt = quant.quantized_model(model, _quant_cfg(), 'fake')
  fallback = quant.quantized_model(
      model, _quant_cfg(quant_backend='fallback'), 'fake'
  )
  np.testing.assert_allclose(
      jit_apply(aqt, {'params': params}, x, train=False)[0],
      jit_apply(fallback, {'params': params}, x, train=False)[0],
      atol=1e-5,
  )


def test_saved_int8_restores_without_float_kernels(tmp_path):
  # Width 128: a per-channel scale costs 4 bytes per K int8 weights, so the
  # ratio is 1/4 + 1/K; the tiny test width would make it 0.28.
  model, params = _random_model(hidden_dim=128, num_heads=4)
  cfg = _quant_cfg(quant_path='serve')
  server = quant.Int8Server.convert(model, cfg, params, (32, 32, 3))
  disk = server.save(tmp_path / 'int8', {'step': 1})
  assert json.loads((tmp_path / 'int8.json').read_text()) == {'step': 1}
  restored = quant.Int8Server.load(
      tmp_path / 'int8', model, cfg, params, (32, 32, 3)
  )
  x = _images()
  np.testing.assert_array_equal(server.predict(x), restored.predict(x))
  # No float copy of a quantized kernel is stored or loaded ...
  flat = jax.tree_util.tree_flatten_with_path(restored.params)[0]
  names = ['/'.join(str(getattr(k, 'key', k)) for k in p) for p, _ in flat]
  assert not [n for n in names if n.endswith(('fc1/kernel', 'query/kernel'))]
  assert any(v.dtype == jnp.int8 for v in jax.tree.leaves(restored.frozen))
  # ... so the int8 kernels and their scales are about a quarter of float32.
  sizes = quant.weight_bytes(params, server)
  assert sizes['int8_kernel_bytes'] <= 0.27 * sizes['float32_kernel_bytes']
  assert disk < sizes['float32_model_bytes']


def test_each_layer_gets_its_own_frozen_weights():
  model, params = _random_model()
  server = quant.Int8Server.convert(
      model, _quant_cfg(quant_path='serve'), params, (32, 32, 3)
  )
  frozen = [
      np.asarray(v)
      for v in jax.tree.leaves(server.frozen)
      if v.dtype == jnp.int8
  ]
  assert len(frozen) == 2 * 6  # 2 blocks x (q, k, v, out, fc1, fc2)
  assert not np.array_equal(frozen[0], frozen[-1])


@pytest.mark.slow
def test_a_trained_model_keeps_its_predictions_in_int8(
    smoke_config, trained_vit_workdir
):
  smoke_config.eval.quant = 'int8'
  data = sources.load(smoke_config.data, smoke_config.seed)
  mesh = parallel.make_mesh()
  # The float32 model, and the same weights computing in bfloat16.
  for dtype, path, scales in (
      ('float32', 'fake', 'per_token'),
      ('float32', 'serve', 'per_token'),
      ('bfloat16', 'serve', 'per_token'),
  ):
    smoke_config.model.dtype = dtype
    smoke_config.eval.quant_path = path
    smoke_config.eval.quant_activations = scales
    restored = evaluate.restore_predictors(
        smoke_config, trained_vit_workdir, 'best', data=data, mesh=mesh
    )
    q = restored.header['quantization']
    assert q['activations'] == scales and restored.header['precision'] == 'int8'
    assert q['test_agreement_with_float'] >= 0.98, (dtype, path, scales)
  # The default, static scales, evaluated and reported in full.
  smoke_config.model.dtype = 'float32'
  smoke_config.eval.quant_path = 'serve'
  smoke_config.eval.quant_activations = 'static'
  report = evaluate.evaluate_checkpoint(
      smoke_config, trained_vit_workdir, 'best'
  )
  q = report['quantization']
  assert q['activations'] == 'static' and report['precision'] == 'int8'
  assert q['test_agreement_with_float'] >= 0.98
  # The same model: the serving tree's missing float kernels still count.
  assert report['cost']['parameters'] == 21_162
  # What it holds: int8 kernels, the rest float32.
  assert report['cost']['weight_bytes'] == q['int8_model_bytes']
  assert q['checkpoint_bytes_on_disk'] > 0
  assert (trained_vit_workdir / 'eval' / 'report_best_int8.json').exists()
  assert (trained_vit_workdir / 'eval' / 'attention_int8.png').exists()


def test_bad_quant_settings_are_named():
  model, _ = _random_model()
  with pytest.raises(ValueError, match="eval.quant_path='serve' needs"):
    quant.quantized_model(
        model, _quant_cfg(quant_path='serve', quant_backend='fallback'), 'serve'
    )


def test_calibration_batches_mix_the_classes_of_a_class_sorted_split():
  # A split sorted by class, as the training arrays are; each image's
  # pixels hold its class.
  classes = np.repeat(np.arange(10), 300)
  images = np.broadcast_to(
      classes[:, None, None, None].astype(np.uint8), (3000, 2, 2, 3)
  )
  sample = quant.calibration_sample(
      images, _quant_cfg(quant_calibration_images=512), seed=0
  )
  batches = sample[:, 0, 0, 0].reshape(4, 128)  # 4 calibration batches
  for batch in batches:
    assert len(np.unique(batch)) == 10


@pytest.mark.slow
def test_static_scales_are_calibrated_frozen_per_layer_and_saved(
    tmp_path, monkeypatch
):
  model, params = _random_model()
  # Block norms far from scale 1 and bias 0, as trained ones are, so that
  # folding them (the default) changes what the layers they feed see.
  for block in ('blocks_0', 'blocks_1'):
    for i, norm in enumerate(('norm1', 'norm2')):
      key = jax.random.key(10 + i)
      params[block][norm] = {
          'scale': 1 + 0.5 * jax.random.normal(key, (32,)),
          'bias': 0.3 * jax.random.normal(jax.random.split(key)[0], (32,)),
      }
  cfg = _quant_cfg(quant_path='serve', quant_activations='static')
  calibration = np.asarray(_images(n=256, seed=1))  # 2 batches of 128
  folded_model, folded = quant.float_model_to_quantize(model, params, cfg)
  stats = quant.calibrate(folded_model, cfg, folded, calibration)
  counts = [
      int(v)
      for p, v in jax.tree_util.tree_leaves_with_path(stats)
      if jax.tree_util.keystr(p).endswith("['count']")
  ]
  # One calibrator per quantized layer, for its input; each saw both
  # batches (creating the statistics counts none).
  assert len(counts) == 2 * 6 and set(counts) == {2}
  server = quant.Int8Server.convert(
      model, cfg, params, (32, 32, 3), calibration_images=calibration
  )
  # The scale of each layer's input is its calibrated bound / 127.5: frozen
  # in the layer, or, for the layers a block norm feeds (folded norms, the
  # default), moved into that norm's gain as its reciprocal, the layer's
  # frozen input scale then 1 and its weight scales multiplied by it.
  bounds = {
      jax.tree_util.keystr(p[:-2]): v
      for p, v in jax.tree_util.tree_leaves_with_path(*stats.values())
      if jax.tree_util.keystr(p).endswith("['sum_of_max']")
  }
  readers = {'query': 'norm1', 'key': 'norm1', 'value': 'norm1', 'fc1': 'norm2'}
  absorbed = 0
  for path, v in jax.tree_util.tree_leaves_with_path(server.frozen):
    if jax.tree_util.keystr(path).endswith("['qlhs']['scale']"):
      bound = bounds[jax.tree_util.keystr(path[:-2])] / 2
      layer = path[-4].key
      if layer in readers:
        absorbed += 1
        assert float(v.reshape(())) == 1.0
        gain = server.params[path[0].key][readers[layer]]['gain']
        v = 1 / gain
      np.testing.assert_allclose(v.reshape(()), bound.reshape(()) / 127.5, 1e-6)
  assert absorbed == 2 * 4
  # One frozen scale per layer for its input (per tensor), beside the
  # int8 kernels and their per-channel scales.
  lhs_scales = [
      v
      for p, v in jax.tree_util.tree_leaves_with_path(server.frozen)
      if "['qlhs']['scale']" in jax.tree_util.keystr(p)
  ]
  assert len(lhs_scales) == 2 * 6
  assert all(v.size == 1 and float(v.reshape(())) > 0 for v in lhs_scales)
  x = _images()
  apply = lambda v, x: server.model.apply(server.prepare(v), x, train=False)
  variables = {'params': server.params, 'aqt': server.frozen}
  compiled = jax.jit(apply).lower(variables, x).compile()
  logits = compiled(variables, x)[0]
  if jax.default_backend() == 'cpu':
    hlo = compiled.as_text()
    assert profiling.s8_dots(hlo) == 12
    # The scales are constants of the program, so the query, key and value
    # layers' common input is quantized once: four quantizations a block
    # (norm1, attention output, norm2, GELU), not six.
    quantizations = re.findall(
        r'^\s*(?:ROOT )?%\S+ = s8\[[^=]*\bfusion\(', hlo.split('ENTRY')[1], re.M
    )
    assert len(quantizations) == 2 * 4
  float_logits = jit_apply(model, {'params': params}, x, train=False)[0]
  agree = np.mean(np.argmax(logits, -1) == np.argmax(float_logits, -1))
  assert agree >= 0.9
  # Serving uses the frozen scales: no scale is taken from the batch, so an
  # extreme image beside another leaves its logits as they were ...
  extreme = x.at[1:].set(255)
  np.testing.assert_array_equal(compiled(variables, extreme)[0][0], logits[0])
  # ... and a server of different frozen scales serves other logits.
  doubled = jax.tree_util.tree_map_with_path(
      lambda p, v: 2 * v if "['qlhs']" in jax.tree_util.keystr(p) else v,
      server.frozen,
  )
  other = quant.Int8Server(
      server.model, cfg, server.params, doubled, server.removed
  )
  assert not np.allclose(other.predict(x), logits)
  # Moving the input scales into the norms' gains serves the same values.
  monkeypatch.setattr(
      quant_server,
      '_absorb_input_scales',
      lambda params, frozen: (params, frozen),
  )
  unabsorbed = quant.Int8Server.convert(
      model, cfg, params, (32, 32, 3), calibration_images=calibration
  )
  np.testing.assert_allclose(unabsorbed.predict(x), logits, atol=1e-5)
  monkeypatch.undo()
  # Not folded: the input scales stay in the layers, and the predictions
  # are nearly the same (another int8 model of the same float function).
  unfolded_cfg = _quant_cfg(
      quant_path='serve', quant_activations='static', quant_fold_norms=False
  )
  unfolded = quant.Int8Server.convert(
      model, unfolded_cfg, params, (32, 32, 3), calibration_images=calibration
  )
  assert 'scale' in unfolded.params['blocks_0']['norm1']
  for path, v in jax.tree_util.tree_leaves_with_path(unfolded.frozen):
    if jax.tree_util.keystr(path).endswith("['qlhs']['scale']"):
      assert float(v.reshape(())) != 1.0  # nothing moved
  unfolded_logits = unfolded.predict(x)
  assert np.mean(np.argmax(unfolded_logits, -1) == np.argmax(logits, -1)) >= 0.9
  # Saved and loaded without calibrating again (its tree from eval_shape).
  server.save(tmp_path / 'int8', {'step': 1})
  restored = quant.Int8Server.load(
      tmp_path / 'int8', model, cfg, params, (32, 32, 3)
  )
  np.testing.assert_array_equal(restored.predict(x), server.predict(x))
  # A-ViT's token removal serves fewer tokens per block through the same
  # per-tensor scales.
  avit_model, avit_params = _random_model(name='avit')
  _, aux = jit_apply(avit_model, {'params': avit_params}, x, train=False)
  assert np.min(aux['depth']) < avit_model.depth  # some tokens halt
  avit_server = quant.Int8Server.convert(
      avit_model, cfg, avit_params, (32, 32, 3), calibration_images=calibration
  )
  masked = avit_server.predict(x)
  removed, _ = token_removal.token_removal_apply(
      avit_server.model,
      avit_server.prepare(
          {'params': avit_server.params, 'aqt': avit_server.frozen}
      ),
      x,
  )
  assert np.abs(masked - removed).max() <= 0.03 * np.abs(masked).max()


def test_static_scales_need_the_serving_path_and_calibration_images():
  model, params = _random_model()
  with pytest.raises(ValueError, match="use it with eval.quant_path='serve'"):
    quant.quantized_model(model, _quant_cfg(quant_activations='static'), 'fake')
  with pytest.raises(ValueError, match='calibrates on training images'):
    quant.Int8Server.convert(
        model,
        _quant_cfg(quant_path='serve', quant_activations='static'),
        params,
        (32, 32, 3),
    )
  with pytest.raises(ValueError, match='quant_activations=.hourly'):
    quant.quantized_model(model, _quant_cfg(quant_activations='hourly'), 'fake')

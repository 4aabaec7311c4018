"""The per-patch decision figures read the models' own inference pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.evaluators import plots
from vitjax.data.sources import Split
from vitjax.evaluators import decisions
from vitjax.evaluators.classification import Predictor
from vitjax.models import avit, dynamic_vit
from vitjax.models.vit import ViT

from tests.conftest import jit_apply, jit_init

SIZES = dict(
    num_classes=10,
    patch_size=8,
    hidden_dim=32,
    depth=4,
    num_heads=2,
    mlp_ratio=2.0,
    stem='patch',
)
GRID = 32 // SIZES['patch_size']
NAMES = [f'class {i}' for i in range(10)]


def _split(per_class=3, seed=0) -> Split:
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(10), per_class).astype(np.int32)
  images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
  return Split(images, labels)


def _predictor(model, seed=0) -> Predictor:
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  keys = {'params': jax.random.key(seed), 'gumbel': jax.random.key(seed)}
  params = jit_init(model, keys, x, train=False)['params']
  # A non-zero head and spread keep scores, so that decisions vary.
  params = jax.tree.map(
      lambda p: p + 0.5 * jax.random.normal(jax.random.key(seed + 1), p.shape),
      params,
  )
  return Predictor(model, {'params': params})


def test_pick_images_takes_the_same_images_of_every_class():
  labels = _split(per_class=5).labels
  idx = decisions.pick_images(labels, 2, seed=0)
  assert np.bincount(labels[idx]).tolist() == [2] * 10
  assert list(labels[idx]) == sorted(labels[idx])  # class by class
  np.testing.assert_array_equal(idx, decisions.pick_images(labels, 2, seed=0))


@pytest.mark.slow
def test_the_token_picture_greys_out_exactly_what_the_model_dropped():
  model = dynamic_vit.DynamicViT(**SIZES, keep_ratio=0.5)
  predictor = _predictor(model)
  d = decisions.on_test_images(predictor, _split())
  # The model's own inference pass on the same images.
  logits, aux = jit_apply(model, predictor.variables, d['images'], train=False)
  np.testing.assert_array_equal(d['predicted'], np.argmax(logits, -1))
  n, size = len(d['images']), SIZES['patch_size']
  assert d['kept'].shape == (len(model.stages()), n, GRID, GRID)
  for s, positions in enumerate(aux['kept_patches']):
    panels = plots.grey_out(d['images'], d['kept'][s])
    # Per patch of the picture: left as it was, or greyed out.
    shown = np.all(
        (panels == d['images']).reshape(n, GRID, size, GRID, size, 3),
        axis=(2, 4, 5),
    )
    # Per patch of the model: among the positions its stage kept.
    kept = np.zeros((n, GRID * GRID), bool)
    for i, row in enumerate(np.asarray(positions)):
      kept[i, row] = True
    np.testing.assert_array_equal(shown, kept.reshape(n, GRID, GRID))
  # Later stages keep a subset of what earlier ones kept, k_s patches each.
  assert np.all(d['kept'][1:] <= d['kept'][:-1])
  counts = d['kept'].sum((2, 3))
  assert (counts == np.array(model.keep_counts(GRID * GRID))[:, None]).all()


def test_the_depth_picture_is_the_models_halting_depth(tmp_path):
  model = avit.AViT(**SIZES, gate_scale=10.0, gate_center=0.0)
  predictor = _predictor(model)
  d = decisions.on_test_images(predictor, _split())
  _, aux = jit_apply(model, predictor.variables, d['images'], train=False)
  np.testing.assert_array_equal(
      d['depth'], np.asarray(aux['depth'])[:, 1:].reshape(-1, GRID, GRID)
  )
  assert 1 <= d['depth'].min() and d['depth'].max() <= SIZES['depth']
  path = decisions.write_figure(d, NAMES, tmp_path, '', [2.0] * 10)
  assert path == tmp_path / 'depth.png' and path.stat().st_size > 1000


@pytest.mark.parametrize('kernels', ['cpu', 'xla'])
def test_attention_weights_are_sown_without_changing_the_prediction(kernels):
  model = ViT(**SIZES, kernels=kernels)
  predictor = _predictor(model)
  images = _split().images[:4]
  plain = jit_apply(model, predictor.variables, images, train=False)[0]
  (sown, _), inter = jit_apply(
      model, predictor.variables, images, train=False, mutable=['intermediates']
  )
  np.testing.assert_array_equal(sown, plain)
  weights = decisions._attention_weights(inter)  # pylint: disable=protected-access
  tokens = GRID * GRID + 1
  assert len(weights) == SIZES['depth']
  assert weights[0].shape == (4, SIZES['num_heads'], tokens, tokens)
  np.testing.assert_allclose(weights[0].sum(-1), 1.0, rtol=1e-5)


def test_patch_tokens_follow_the_row_major_grid_the_figures_assume():
  model = ViT(**SIZES)
  predictor = _predictor(model)
  images = _split().images[:1]
  r, c, size = 1, 3, SIZES['patch_size']
  changed = images.copy()
  changed[0, r * size : (r + 1) * size, c * size : (c + 1) * size] = 0
  tokens = lambda x: jit_apply(
      model, predictor.variables, x, train=False, method=ViT.tokens
  )
  moved = np.abs(tokens(changed) - tokens(images)).sum(-1)[0]
  assert np.flatnonzero(moved).tolist() == [1 + r * GRID + c]


def test_attention_rollout_mixes_in_the_residual_and_multiplies_blocks():
  rng = np.random.default_rng(0)
  w = [rng.dirichlet(np.ones(5), size=(2, 3, 5)) for _ in range(3)]
  rollout = decisions.attention_rollout(w)
  expected = np.eye(5)
  for block in w:
    a = 0.5 * block.mean(1) + 0.5 * np.eye(5)
    expected = a / a.sum(-1, keepdims=True) @ expected
  np.testing.assert_allclose(rollout, expected[:, 0, 1:])
  # A block whose tokens attend only to themselves changes nothing.
  identity = np.broadcast_to(np.eye(5), (2, 3, 5, 5))
  np.testing.assert_allclose(
      decisions.attention_rollout(w + [identity]), rollout
  )


@pytest.mark.parametrize(
    'model, name',
    [
        (ViT(**SIZES), 'attention.png'),
        (dynamic_vit.DynamicViT(**SIZES, keep_ratio=0.5), 'tokens.png'),
    ],
)
def test_every_family_writes_its_figure(tmp_path, model, name):
  d = decisions.on_test_images(_predictor(model), _split())
  path = decisions.write_figure(d, NAMES, tmp_path, '_int8')
  assert path == tmp_path / name.replace('.png', '_int8.png')
  assert path.stat().st_size > 1000

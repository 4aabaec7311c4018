"""Sampling and augmentation, in the tf.data pipeline and the device pipeline."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

tf = pytest.importorskip('tensorflow')  # absent on the GPU image
import tensorflow.experimental.numpy as tnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax.data import augment, device_pipeline, sampling, tf_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitjax.data.sources import Split

COUNTS = (400, 200, 100, 50)  # 8:1 imbalance makes the modes easy to tell


@pytest.fixture(scope='module')
def split():
  labels = np.repeat(np.arange(4), COUNTS).astype(np.int32)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
  # Tag each image with its index in pixel (0, 0) so batches can be traced.
  images[:, 0, 0, 0] = np.arange(len(labels)) % 256
  images[:, 0, 0, 1] = np.arange(len(labels)) // 256
  return Split(images, labels)


def _no_aug():
  a = common.base().aug
  a.crop_padding, a.flip, a.randaugment_layers = 0, False, 0
  return a


def _pipelines(split, mode, aug, batch=50, seed=0):
  plan = sampling.make_plan(split.labels, 4, mode)
  return (
      tf_pipeline.TfPipeline(split, plan, aug, seed=seed, global_batch=batch),
      device_pipeline.DevicePipeline(
          split, plan, aug, seed=seed, global_batch=batch
      ),
  )


def _labels(pipeline, steps):
  return np.concatenate(
      [np.asarray(b['label']) for b in pipeline.batches(0, steps)]
  )


def test_class_probabilities():
  counts = np.array(COUNTS)
  np.testing.assert_allclose(
      sampling.class_probabilities(counts, 'natural'), counts / counts.sum()
  )
  np.testing.assert_allclose(
      sampling.class_probabilities(counts, 'balanced'), [0.25] * 4
  )
  sq = np.sqrt(counts)
  np.testing.assert_allclose(
      sampling.class_probabilities(counts, 'sqrt'), sq / sq.sum(), rtol=1e-6
  )
  with pytest.raises(ValueError, match='data.sampling'):
    sampling.class_probabilities(counts, 'uniform')


@pytest.mark.parametrize('pipeline_index', [0, 1])
def test_natural_sampling_is_epochs_without_replacement(split, pipeline_index):
  pipeline = _pipelines(split, 'natural', _no_aug())[pipeline_index]
  batches = list(pipeline.batches(0, 30))  # 1500 draws = 2 epochs of 750
  pixels = [np.asarray(b['image'])[:, 0, 0].astype(int) for b in batches]
  ids = np.concatenate([p[:, 0] + 256 * p[:, 1] for p in pixels])
  for epoch in range(2):
    assert sorted(ids[epoch * 750 : (epoch + 1) * 750]) == list(range(750))
  assert list(ids[:750]) != list(ids[750:])  # a new order each epoch


@pytest.mark.parametrize('mode', ['balanced', 'sqrt'])
def test_pipelines_draw_the_same_class_distribution(split, mode):
  tf_pipe, dev_pipe = _pipelines(split, mode, _no_aug())
  expected = sampling.class_probabilities(np.array(COUNTS), mode)
  n = 60 * 50
  for pipeline in (tf_pipe, dev_pipe):
    freq = np.bincount(_labels(pipeline, 60), minlength=4) / n
    # 3000 draws: a standard error of at most 0.009 per class.
    np.testing.assert_allclose(freq, expected, atol=0.035)


def test_batches_are_a_function_of_the_step(split):
  for pipeline in _pipelines(split, 'balanced', common.base().aug):
    a = list(pipeline.batches(0, 6))[5]
    b = next(pipeline.batches(5, 6))
    np.testing.assert_array_equal(
        np.asarray(a['image']), np.asarray(b['image'])
    )
    np.testing.assert_array_equal(
        np.asarray(a['label']), np.asarray(b['label'])
    )


def test_each_host_gets_its_slice_of_the_global_batch(split):
  plan = sampling.make_plan(split.labels, 4, 'natural')
  aug = common.base().aug
  whole = next(
      tf_pipeline.TfPipeline(split, plan, aug, seed=3, global_batch=40).batches(
          7, 8
      )
  )
  for rows in ((0, 20), (20, 40), (10, 30)):
    part = next(
        tf_pipeline.TfPipeline(
            split, plan, aug, seed=3, global_batch=40, rows=rows
        ).batches(7, 8)
    )
    np.testing.assert_array_equal(
        part['image'], whole['image'][rows[0] : rows[1]]
    )


def test_a_process_feeds_the_rows_its_devices_hold_in_the_mesh():
  devices = jax.devices()
  mesh = parallel.make_mesh(devices)
  assert parallel.process_rows(mesh, 8 * len(devices)) == (
      0,
      8 * len(devices),
  )


def test_the_same_augmentation_code_gives_the_same_images_in_tf_and_jax(split):
  aug = common.base().aug
  aug.randaugment_layers, aug.randaugment_magnitude = 3, 10.0
  rng = np.random.default_rng(0)
  draws = {
      k: rng.integers(0, hi, size=s).astype(np.int32)
      for k, (s, hi) in augment.draw_shapes(aug, 64).items()
  }
  x = split.images[:64]
  out_tf = augment.augment(
      tf.constant(x), {k: tf.constant(v) for k, v in draws.items()}, aug, tnp
  ).numpy()
  out_jax = np.asarray(
      jax.jit(lambda x, d: augment.augment(x, d, aug, jnp))(x, draws)
  )
  # Float rounding may move a posterize/solarize threshold for a pixel.
  assert np.mean(out_tf != out_jax) < 1e-4
  assert not np.array_equal(out_tf, x)


def test_pipelines_have_the_same_augmentation_statistics(split):
  aug = common.base().aug
  stats = []
  for pipeline in _pipelines(split, 'natural', aug, batch=100):
    imgs = np.concatenate(
        [np.asarray(b['image']) for b in pipeline.batches(0, 6)]
    ).astype(np.float32)
    stats.append(
        (imgs.mean(), imgs.std(), (imgs == 128).mean(), (imgs == 0).mean())
    )
  np.testing.assert_allclose(stats[0], stats[1], rtol=0.05, atol=0.005)


def test_crop_and_flip_only_move_pixels():
  aug = _no_aug()
  aug.crop_padding, aug.flip = 4, True
  x = np.arange(2 * 32 * 32 * 3).reshape(2, 32, 32, 3) % 251
  x = (x + 1).astype(np.uint8)  # no zeros, so padding is visible
  draws = {
      'crop': np.array([[4, 4], [4, 8]], np.int32),  # [rows, cols]
      'flip': np.array([1, 0], np.int32),
  }
  out = np.asarray(augment.augment(x, draws, aug, jnp))
  np.testing.assert_array_equal(out[0], x[0][:, ::-1])  # centred, flipped
  # Offset 8 of the padded image = 4 pixels right of centre: shifted left.
  np.testing.assert_array_equal(out[1, :, :28], x[1, :, 4:])
  assert (out[1, :, 28:] == 0).all()  # zero padding came in

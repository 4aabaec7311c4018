"""Serving a trained run: without its data, in int8, exported, and from the
command line."""

import json
from pathlib import Path
import subprocess
import sys

import jax
from ml_collections import ConfigDict
import numpy as np
from PIL import Image
import pytest

from vitjax import checkpoint, evaluate, quantization, serving, sharding
from vitjax.data import sources


def _run_config(workdir: Path) -> ConfigDict:
  return ConfigDict(json.loads((workdir / 'config.json').read_text()))


@pytest.fixture(scope='module')
def test_images(trained_vit_workdir):
  config = _run_config(trained_vit_workdir)
  return sources.load(config.data, config.seed).test.images[::9]


def test_a_run_serves_the_weights_evaluation_restores(
    trained_vit_workdir, test_images
):
  served = serving.load(trained_vit_workdir)
  config = _run_config(trained_vit_workdir)
  data = sources.load(config.data, config.seed)
  assert served.class_names == list(data.class_names)
  assert served.description['checkpoint'].startswith('best (step ')
  # What evaluation restores, with the data, the optimizer and the state.
  restored = evaluate.restore_predictors(
      config, trained_vit_workdir, 'best', data=data, mesh=sharding.make_mesh()
  )
  for a, b in zip(
      jax.tree.leaves(served.predictor.params),
      jax.tree.leaves(restored.float_predictor.params),
  ):
    np.testing.assert_array_equal(a, b)
  probs = served.probabilities(test_images)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_int8_serves_the_saved_int8_model_without_the_float_weights(
    trained_vit_workdir, test_images, monkeypatch
):
  config = _run_config(trained_vit_workdir)
  float_served = serving.load(trained_vit_workdir)
  quant = serving._int8_config(config)  # pylint: disable=protected-access
  server = quantization.Int8Server.convert(
      float_served.predictor.model, quant, float_served.predictor.params
  )
  server.save(trained_vit_workdir / 'int8' / 'best')

  def no_float(*args, **kwargs):
    raise AssertionError('read the float weights')

  monkeypatch.setattr(checkpoint.Checkpoints, 'restore_weights', no_float)
  monkeypatch.setattr(checkpoint.Checkpoints, 'restore', no_float)
  served = serving.load(trained_vit_workdir, int8=True)
  assert served.description['precision'] == 'int8'
  np.testing.assert_allclose(
      served.probabilities(test_images),
      jax.nn.softmax(server.predict(test_images), -1),
      rtol=1e-5,
      atol=1e-6,
  )


def test_predict_classifies_files_skips_non_images_and_exports(
    trained_vit_workdir, test_images, tmp_path
):
  folder = tmp_path / 'photos'
  (folder / 'more').mkdir(parents=True)
  for i, image in enumerate(test_images[:3]):
    Image.fromarray(image).save(folder / f'{i}.png')
  big = np.kron(test_images[3], np.ones((5, 3, 1), np.uint8))  # 160x96
  Image.fromarray(big).save(folder / 'more' / 'big.jpg')
  (folder / 'notes.txt').write_text('not an image')
  artifact = tmp_path / 'vit.jax'
  run = subprocess.run(
      [
          sys.executable,
          '-m',
          'vitjax.predict',
          f'--workdir={trained_vit_workdir}',
          '--json',
          f'--export={artifact}',
          str(folder),
      ],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'skipped' in run.stderr and 'notes.txt' in run.stderr
  out = json.loads(run.stdout)
  assert [Path(s['file']).name for s in out['skipped']] == ['notes.txt']
  files = [Path(p['file']).name for p in out['predictions']]
  assert files == ['0.png', '1.png', '2.png', 'big.jpg']
  served = serving.load(trained_vit_workdir)
  expected = served.probabilities(test_images[:3])
  for pred, probs in zip(out['predictions'], expected):
    top = pred['top']
    assert len(top) == 3
    assert [t['class'] for t in top] == [
        served.class_names[c] for c in np.argsort(-probs, kind='stable')[:3]
    ]
    np.testing.assert_allclose(top[0]['probability'], probs.max(), rtol=1e-5)
  # The artifact runs in a fresh process with jax alone.
  np.save(tmp_path / 'images.npy', test_images)
  script = (
      'import sys, jax, numpy as np\n'
      f'f = jax.export.deserialize(bytearray(open({str(artifact)!r}, "rb")'
      '.read()))\n'
      f'np.save({str(tmp_path / "probs.npy")!r}, '
      f'np.asarray(f.call(np.load({str(tmp_path / "images.npy")!r}))))\n'
      'assert not [m for m in sys.modules if m.split(".")[0] in '
      '("vitjax", "flax", "aqt")], "imported the model code"\n'
  )
  fresh = subprocess.run(
      [sys.executable, '-c', script],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=tmp_path,
      check=False,
  )
  assert fresh.returncode == 0, fresh.stderr[-2000:]
  np.testing.assert_allclose(
      np.load(tmp_path / 'probs.npy'),
      served.probabilities(test_images),
      rtol=1e-5,
      atol=1e-6,
  )
  meta = json.loads(Path(f'{artifact}.json').read_text())
  assert meta['class_names'] == served.class_names


def test_a_folder_without_a_run_is_named(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='holds no run'):
    serving.load(tmp_path)

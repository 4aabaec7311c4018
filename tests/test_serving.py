"""Serving a trained run: without its data, in int8, exported, and from the
command line."""

import json
from pathlib import Path
import subprocess
import sys

from absl import flags
import jax
from ml_collections import ConfigDict
import numpy as np
from PIL import Image
import pytest

from vitjax import checkpoint, errors, evaluate, predict, quant
from vitjax import serving, parallel
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
      config, trained_vit_workdir, 'best', data=data, mesh=parallel.make_mesh()
  )
  assert jax.tree.structure(served.predictor.params) == jax.tree.structure(
      restored.float_predictor.params
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
  quant_cfg = serving._int8_config(config)  # pylint: disable=protected-access
  assert quant_cfg.quant_activations == 'static'  # the default
  train_images = sources.load(config.data, config.seed).train.images
  server = quant.Int8Server.convert(
      float_served.predictor.model,
      quant_cfg,
      float_served.predictor.params,
      calibration_images=quant.calibration_sample(
          train_images, quant_cfg, config.seed
      ),
  )
  with checkpoint.Checkpoints(trained_vit_workdir) as ckpts:
    step = ckpts.step_of('best')
  saved = trained_vit_workdir / 'int8' / 'best'
  server.save(saved, quant.conversion_source(step + 1, quant_cfg, False))
  # Converted from another step: not served; the float weights are.
  other = serving.load(trained_vit_workdir, int8=True)
  assert other.description['int8_from'] == 'converted from the float weights'
  server.save(saved, quant.conversion_source(step, quant_cfg, False))

  def no_float(*args, **kwargs):
    raise AssertionError('read the float weights')

  monkeypatch.setattr(checkpoint.Checkpoints, 'restore_weights', no_float)
  monkeypatch.setattr(checkpoint.Checkpoints, 'restore', no_float)
  served = serving.load(trained_vit_workdir, int8=True)
  assert served.description['precision'] == 'int8'
  assert served.description['int8_from'] == str(saved)
  np.testing.assert_allclose(
      served.probabilities(test_images),
      jax.nn.softmax(server.predict(test_images), -1),
      rtol=1e-5,
      atol=1e-6,
  )


@pytest.mark.slow
def test_predict_classifies_files_skips_non_images_and_exports(
    trained_vit_workdir, test_images, tmp_path, capsys
):
  folder = tmp_path / 'photos'
  (folder / 'more').mkdir(parents=True)
  for i, image in enumerate(test_images[:3]):
    Image.fromarray(image).save(folder / f'{i}.png')
  big = np.kron(test_images[3], np.ones((5, 3, 1), np.uint8))  # 160x96
  Image.fromarray(big).save(folder / 'more' / 'big.jpg')
  (folder / 'notes.txt').write_text('not an image')
  artifact = tmp_path / 'vit.jax'
  argv = ['predict', f'--workdir={trained_vit_workdir}', '--int8', '--json']
  argv += [f'--export={artifact}', str(folder)]
  try:  # the command line, in this process
    predict.main(flags.FLAGS(argv))
  finally:
    flags.FLAGS.unparse_flags()
  run = capsys.readouterr()
  assert 'skipped' in run.err and 'notes.txt' in run.err
  out = json.loads(run.out)
  assert [Path(s['file']).name for s in out['skipped']] == ['notes.txt']
  files = [Path(p['file']).name for p in out['predictions']]
  assert files == ['0.png', '1.png', '2.png', 'big.jpg']
  served = serving.load(trained_vit_workdir, int8=True)
  assert out['served']['precision'] == 'int8'
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


def test_images_are_read_upright_in_8_bits_and_folders_searched(tmp_path):
  (tmp_path / 'a' / '.hidden').mkdir(parents=True)
  (tmp_path / 'a' / '.hidden' / 'x.png').write_bytes(b'')
  (tmp_path / 'a' / '.y.png').write_bytes(b'')
  # 16-bit greyscale at half range reads as mid grey, not white.
  grey16 = Image.fromarray(np.full((64, 48), 32768, np.uint16))
  grey16.save(tmp_path / 'a' / 'grey16.png')
  # Stored 1 wide and 2 tall, black over white, with EXIF orientation 6
  # (shown turned 90 degrees clockwise): upright, black is on the right.
  stored = Image.fromarray(
      np.array([[0], [255]], np.uint8).repeat(3, -1).reshape(2, 1, 3)
  )
  exif = Image.Exif()
  exif[0x0112] = 6
  stored.save(tmp_path / 'a' / 'turned.jpg', exif=exif, quality=100)
  (tmp_path / 'notes.txt').write_text('text')
  files = serving.image_files(
      [str(tmp_path / 'a'), str(tmp_path / 'notes.txt')]
  )
  assert [f.name for f in files] == ['grey16.png', 'turned.jpg', 'notes.txt']
  grey = serving.read_image(files[0])
  assert grey.shape == (32, 32, 3) and abs(int(grey.mean()) - 127) <= 1
  upright = serving.read_image(files[1]).astype(int)
  assert upright[:, -8:].mean() < 60 and upright[:, :8].mean() > 195
  assert serving.read_image(files[2]).startswith('not an image')
  with pytest.raises(errors.UserError, match='no such file'):
    serving.image_files([str(tmp_path / 'missing.jpg')])


def test_int8_without_a_saved_model_or_the_data_says_how_to_serve(
    trained_vit_workdir, tmp_path
):
  # A copy of the run whose data has moved away and whose int8 model was
  # never saved: static scales cannot be calibrated.
  import shutil  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / 'run'
  shutil.copytree(
      trained_vit_workdir, workdir, ignore=shutil.ignore_patterns('int8')
  )
  config = json.loads((workdir / 'config.json').read_text())
  config['data']['root'] = str(tmp_path / 'moved')
  (workdir / 'config.json').write_text(json.dumps(config))
  assert serving.load(workdir).description['precision'] != 'int8'  # float
  with pytest.raises(sources.DataError, match='static activation scales'):
    serving.load(workdir, int8=True)

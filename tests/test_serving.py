"""Serving a trained run: without its data, in int8, exported, and from the
command line."""

import importlib
import json
from pathlib import Path
import subprocess
import sys

import jax
from ml_collections import ConfigDict
import numpy as np
from PIL import Image
import pytest

from vitjax import checkpoint, errors, evaluate, models, predict, quant
from vitjax import serving, parallel
from vitjax.data import sources
from vitjax.evaluators.classification import Predictor

from tests.conftest import FAMILIES, global_flags, jit_init, make_image_tree


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
  with global_flags(argv) as args:  # the command line, in this process
    predict.main(args)
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
  # Data there, but not the run's: its images could be the run's
  # validation images, as evaluation checks too.
  make_image_tree(tmp_path / 'moved', [30] * 10, [8] * 10)
  with pytest.raises(sources.DataError, match='data split differs'):
    serving.load(workdir, int8=True)


@pytest.mark.parametrize('family', FAMILIES)
def test_every_family_exports_the_function_it_serves(family, tmp_path):
  config = importlib.import_module(f'configs.{family}').get_config('smoke')
  config.model.dtype = 'float32'
  model = models.create(config.model, 10)
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
  variables = jit_init(
      model, jax.random.key(0), images[:1].astype(np.float32), train=False
  )
  served = serving.Served(
      Predictor(model, {'params': variables['params']}), list('abcdefghij'), {}
  )
  path = serving.export(served, tmp_path / 'model.jax')
  exported = jax.export.deserialize(bytearray(path.read_bytes()))
  np.testing.assert_allclose(
      exported.call(images), served.probabilities(images), rtol=1e-5, atol=1e-6
  )
  # A-ViT's artifact runs the masked path, for any batch size: no branch on
  # the tokens still active, as its compact path at batch 1 has.
  assert 'case' not in exported.mlir_module()
  if family == 'avit':
    compact = jax.jit(served.predictor.logits).lower(
        served.predictor.variables, images[:1]
    )
    assert 'case' in compact.as_text()


def test_a_file_that_does_not_decode_is_a_reason_whatever_pillow_raises(
    tmp_path, monkeypatch
):
  good = tmp_path / 'good.png'
  noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)
  Image.fromarray(noise).save(good)  # its data in 4 IDAT chunks
  data = good.read_bytes()
  second = data.index(b'IDAT', data.index(b'IDAT') + 1)
  broken = {
      # The second data chunk misnamed: load() raises SyntaxError('broken
      # PNG file'), which is no OSError.
      'chunk.png': data[:second] + b'\0\1\2\3' + data[second + 4 :],
      'cut.png': data[: len(data) // 2],
      'header.png': data[:20],
  }
  for name, content in broken.items():
    (tmp_path / name).write_bytes(content)
    reason = serving.read_image(tmp_path / name)
    assert isinstance(reason, str) and reason.startswith('not an image'), name
  # Over Pillow's warning limit (under its error limit): refused, not
  # decoded.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 40_000)  # 256 x 256
  assert 'DecompressionBombWarning' in serving.read_image(good)


def test_a_photo_decodes_reduced_before_it_is_resized(tmp_path, monkeypatch):
  photo = tmp_path / 'photo.jpg'
  Image.fromarray(np.full((512, 384, 3), 200, np.uint8)).save(photo)
  sizes = []
  transpose = serving.ImageOps.exif_transpose
  monkeypatch.setattr(
      serving.ImageOps,
      'exif_transpose',
      lambda im: sizes.append(im.size) or transpose(im),
  )
  image = serving.read_image(photo)
  assert image.shape == (32, 32, 3) and abs(int(image.mean()) - 200) <= 2
  assert sizes == [(48, 64)]  # 1/8 of 384 x 512, at least 32 x 32


@pytest.mark.parametrize(
    'flag, message',
    [
        ('--checkpoint=bset', "--checkpoint='bset': expected 'best'"),
        ('--export={tmp}', '--export={tmp}: is a folder'),
    ],
)
def test_predict_names_a_bad_flag_in_one_line(
    flag, message, trained_vit_workdir, tmp_path, capsys
):
  Image.new('RGB', (32, 32)).save(tmp_path / 'a.png')
  argv = ['predict', f'--workdir={trained_vit_workdir}']
  argv += [flag.format(tmp=tmp_path), str(tmp_path / 'a.png')]
  with global_flags(argv) as args, pytest.raises(SystemExit) as stopped:
    predict.main(args)
  assert stopped.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'vitjax: {message.format(tmp=tmp_path)}')

"""A trained run, ready to classify images, without its training data.

`load` rebuilds the model from the run's config.json (A-ViT's calibrated
gate from calibration.json), restores only its inference weights (an orbax
partial restore of the train state: the EMA's when the run kept one and
eval.use_ema), and with `int8` the frozen int8 model that an int8
evaluation saved under <workdir>/int8/<checkpoint>, whose tree is traced
from the model with jax.eval_shape: no float kernel is read for it. With
no saved int8 model that fits, the float weights are converted, and static
activation scales are then calibrated on the run's training images, the
one case that reads the data.

`image_files` and `read_image` read your own images as the model takes
them (vitjax/predict.py is the command line).

`export` writes the serving function, with its weights, as a jax.export
artifact (StableHLO with a symbolic batch size, for the platform it was
exported on), which jax alone runs, without this package:
jax.export.deserialize(bytes).call(images). Input: uint8 images [batch, 32, 32, 3]
in [0, 255]; output: float32 class probabilities [batch, classes]. A-ViT
exports its masked path (the compact one needs a batch size it can count).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any
import warnings

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
import numpy as np
from PIL import Image, ImageOps

from vitjax import checkpoint, errors, families, quant, trainer
from vitjax import workdir as workdir_lib
from vitjax.data import sources
from vitjax.data.sources import IMAGE_SHAPE
from vitjax.evaluators.classification import Predictor


@dataclasses.dataclass
class Served:
  predictor: Predictor
  class_names: list[str]
  # What is served: workdir, checkpoint and step, model, precision.
  description: dict[str, Any]

  def __post_init__(self):
    # Compiled once per batch shape; the weights are arguments, not
    # constants folded into every compile.
    self._probabilities = jax.jit(
        lambda v, x: jax.nn.softmax(self.predictor.logits(v, x), -1)
    )

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(self._probabilities(self.predictor.variables, images))


def load(
    workdir: str | Path, which: str = 'best', int8: bool = False
) -> Served:
  """The run in `workdir` at checkpoint `which` ('best', 'latest', a step)."""
  workdir = Path(workdir).expanduser()
  config = workdir_lib.saved_config(workdir)
  names = workdir_lib.class_names(workdir)
  model = families.inference_model(config, len(names), workdir)
  abstract = trainer.abstract_params(model)
  ema = families.uses_ema(config)
  description = {
      'workdir': str(workdir),
      'model': config.model.name,
      'precision': 'int8' if int8 else model.dtype,
  }
  quant_cfg = _int8_config(config)
  with checkpoint.Checkpoints(workdir) as ckpts:
    step = ckpts.step_of(which)
    description['checkpoint'] = f'{which} (step {step})'
    saved = workdir / 'int8' / str(which)
    if int8 and quant.saved_fits(
        saved, quant.conversion_source(step, quant_cfg, ema)
    ):
      try:
        server = quant.Int8Server.load(saved, model, quant_cfg, abstract)
      except ValueError as e:  # orbax: the saved tree is not the model's
        raise checkpoint.CheckpointError(
            f'the int8 model in {str(saved)!r} does not fit the model of '
            f'{str(workdir)!r} ({e}); delete it to convert the float weights '
            'again.'
        ) from None
      description['int8_from'] = str(saved)
      return Served(server.predictor(), names, description)
    params, _ = ckpts.restore_weights(abstract, step, ema=ema)
  if not int8:
    return Served(Predictor.of_float_weights(model, params), names, description)
  images = None
  if quant_cfg.quant_activations == 'static':
    # Static scales are calibrated on the run's training images.
    try:
      data = sources.load(config.data, config.seed)
    except sources.DataError as e:
      raise sources.DataError(
          f'{e}\nint8 with static activation scales is calibrated on the '
          "run's training images, and no calibrated int8 model of this "
          f'checkpoint is saved in {str(saved)!r}: evaluate it in int8 where '
          'the data is (python -m vitjax.main --mode=eval '
          '--config.eval.quant=int8 ...), which saves one.'
      ) from None
    # As evaluation does: images of another split could be validation
    # images of this run.
    workdir_lib.check_split(workdir, data.split_id)
    images = quant.calibration_sample(data.train.images, quant_cfg, config.seed)
  server = quant.Int8Server.convert(
      model, quant_cfg, params, calibration_images=images
  )
  description['int8_from'] = 'converted from the float weights'
  return Served(server.predictor(), names, description)


def _int8_config(config: ConfigDict) -> ConfigDict:
  """eval's int8 settings, frozen serving (the path that stores int8)."""
  ev = config.eval.copy_and_resolve_references()
  with ev.unlocked():
    ev.quant, ev.quant_path, ev.quant_backend = 'int8', 'serve', 'aqt'
  return ev


def export(served: Served, path: str | Path) -> Path:
  """Writes the serving function with its weights (jax.export, any batch
  size) to `path`, and what it serves beside it (`path`.json)."""
  path = Path(path)
  predictor = served.predictor
  (batch,) = jax.export.symbolic_shape('batch')
  # The weights are closed over: they travel in the artifact as constants.
  exported = jax.export.export(
      jax.jit(
          lambda x: jax.nn.softmax(predictor.logits(predictor.variables, x), -1)
      )
  )(jax.ShapeDtypeStruct((batch,) + IMAGE_SHAPE, jnp.uint8))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(exported.serialize())
  meta = dict(served.description, class_names=served.class_names)
  meta['input'] = f'uint8 [batch, {", ".join(map(str, IMAGE_SHAPE))}], 0..255'
  meta['output'] = 'float32 class probabilities [batch, classes]'
  meta['platforms'] = list(exported.platforms)
  Path(f'{path}.json').write_text(json.dumps(meta, indent=1))
  return path


def image_files(paths: list[str]) -> list[Path]:
  """The files named, and every file under the folders named (hidden
  files and folders left out), in order. A missing path is a UserError."""
  files = []
  for arg in paths:
    path = Path(arg).expanduser()
    if path.is_dir():
      files += sorted(
          p
          for p in path.rglob('*')
          if p.is_file()
          and not any(
              part.startswith('.') for part in p.relative_to(path).parts
          )
      )
    elif path.exists():
      files.append(path)
    else:
      raise errors.UserError(f'{arg!r}: no such file or folder.')
  return files


def read_image(path: Path):
  """uint8 [32, 32, 3], or why the file is not an image (a str).

  Turned upright by its EXIF orientation; 16-bit greyscale scaled to 8
  bits; transparent pixels over white. A file that does not decode, whatever
  Pillow raises for it (a broken PNG raises SyntaxError, a cut one EOFError
  or OSError, ...), and an image over Pillow's decompression-bomb warning
  limit are reasons, not exceptions: one bad file among many is skipped.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      return _read_image(path)
  except Exception as e:  # pylint: disable=broad-exception-caught
    return f'not an image ({e.__class__.__name__}: {e})'


def _read_image(path: Path) -> np.ndarray:
  with Image.open(path) as im:
    # A JPEG decodes at the smallest power-of-two reduction that keeps at
    # least 32x32 pixels: a photo is never decoded at full size to be
    # shrunk to 32x32.
    im.draft(None, IMAGE_SHAPE[1::-1])
    im = ImageOps.exif_transpose(im)
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
      im = Image.fromarray(
          (np.asarray(im, np.float64) / 257.0).clip(0, 255).astype(np.uint8)
      )
    if im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info:
      rgba = im.convert('RGBA')
      im = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
      im.alpha_composite(rgba)
    im = im.convert('RGB').resize(IMAGE_SHAPE[1::-1], Image.Resampling.BICUBIC)
    return np.asarray(im, np.uint8)

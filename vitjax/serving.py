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

`export` writes the serving function, with its weights, as a jax.export
artifact (StableHLO with a symbolic batch size, for the platform it was
exported on), which jax alone runs, without this package:
jax.export.deserialize(bytes).call(images). Input: uint8 images [batch, 32, 32, 3]
in [0, 255]; output: float32 class probabilities [batch, classes].
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
import numpy as np

from vitjax import checkpoint, families, models, quantization
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
  if not (workdir / 'config.json').exists():
    raise checkpoint.CheckpointError(
        f'{str(workdir)!r} holds no run (no config.json): pass the --workdir '
        'of a trained model (python -m vitjax.main ... --workdir=DIR).'
    )
  if not checkpoint.has_steps(workdir):
    raise checkpoint.CheckpointError(
        f'{str(workdir)!r} has no checkpoint yet: train it first.'
    )
  config = workdir_lib.saved_config(workdir)
  names = workdir_lib.class_names(workdir)
  model = models.create(
      config.model, len(names), **families.model_overrides(config, workdir)
  )
  abstract = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0),
          jnp.zeros((1,) + IMAGE_SHAPE, jnp.uint8),
          train=False,
      )['params']
  )
  ema = config.optim.ema_decay > 0 and config.eval.use_ema
  description = {
      'workdir': str(workdir),
      'model': config.model.name,
      'precision': 'int8' if int8 else model.dtype,
  }
  quant = _int8_config(config)
  with checkpoint.Checkpoints(workdir) as ckpts:
    step = ckpts.step_of(which)
    description['checkpoint'] = f'{which} (step {step})'
    saved = workdir / 'int8' / str(which)
    if int8 and _saved_int8_fits(saved, step, quant, ema):
      try:
        server = quantization.Int8Server.load(saved, model, quant, abstract)
      except ValueError as e:  # orbax: the saved tree is not the model's
        raise checkpoint.CheckpointError(
            f'the int8 model in {str(saved)!r} does not fit the model of '
            f'{str(workdir)!r} ({e}); delete it to convert the float weights '
            'again.'
        ) from None
      description['int8_from'] = str(saved)
      return Served(_server_predictor(server), names, description)
    params, _ = ckpts.restore_weights(abstract, step, ema=ema)
  if not int8:
    return Served(Predictor.of_float_weights(model, params), names, description)
  images = None
  if quant.quant_activations == 'static':
    # Static scales are calibrated on the run's training images.
    try:
      train_images = sources.load(config.data, config.seed).train.images
    except sources.DataError as e:
      raise sources.DataError(
          f'{e}\nint8 with static activation scales is calibrated on the '
          f"run's training images, and no calibrated int8 model of this "
          f'checkpoint is saved in {str(saved)!r}: evaluate it in int8 where '
          'the data is (python -m vitjax.main --mode=eval '
          '--config.eval.quant=int8 ...), which saves one.'
      ) from None
    images = quantization.calibration_sample(train_images, quant, config.seed)
  server = quantization.Int8Server.convert(
      model, quant, params, calibration_images=images
  )
  description['int8_from'] = 'converted from the float weights'
  return Served(_server_predictor(server), names, description)


def _saved_int8_fits(saved: Path, step: int, quant, ema: bool) -> bool:
  """Whether the int8 model saved at `saved` was converted from this step
  with these settings (an evaluation of another step, or with other
  eval.quant_* settings, may have written it); if not, the float weights
  are converted instead."""
  source = quantization.source_file(saved)
  if not saved.is_dir() or not source.exists():
    return False
  wanted = quantization.conversion_source(step, quant, ema)
  saved_source = json.loads(source.read_text())
  # Conversions saved before the norms could be folded did not fold them.
  saved_source.setdefault('fold_block_norms', False)
  if saved_source == wanted:
    return True
  logging.info(
      'The int8 model in %s was converted from %s, not %s: converting the '
      'float weights.',
      saved,
      source.read_text(),
      wanted,
  )
  return False


def _int8_config(config: ConfigDict) -> ConfigDict:
  """eval's int8 settings, frozen serving (the path that stores int8)."""
  ev = config.eval.copy_and_resolve_references()
  with ev.unlocked():
    ev.quant, ev.quant_path, ev.quant_backend = 'int8', 'serve', 'aqt'
  return ev


def _server_predictor(server: quantization.Int8Server) -> Predictor:
  return Predictor(
      server.model,
      {'params': server.params, 'aqt': server.frozen},
      prepare=server.prepare,
  )


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

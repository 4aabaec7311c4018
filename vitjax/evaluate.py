"""Evaluating a checkpoint: accuracy on val and test, cost, sparsity, int8.

`--mode=eval` and the end of training both call `evaluate_checkpoint`, which
writes <workdir>/eval/report_<checkpoint>.json plus PNG figures (among them
the model's per-patch decisions: evaluators/decisions.py) and prints a
table. The measurements themselves live in vitjax/evaluators/.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from absl import logging
import jax
from ml_collections import ConfigDict
import numpy as np

from vitjax import checkpoint, errors, families, parallel, quant, trainer
from vitjax import workdir as workdir_lib
from vitjax.data import sources
from vitjax.evaluators import classification, cost, decisions
from vitjax.evaluators import report as report_lib, sparsity, speed
from vitjax.evaluators.classification import Predictor
from vitjax.measure import machine
from vitjax.models import avit


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint's predictors, ready to evaluate or time."""

  predictor: Predictor  # what is evaluated: float, or int8 with eval.quant
  float_predictor: Predictor
  teacher: Predictor | None  # a sparse model's dense teacher
  header: dict[str, Any]  # what the report says of the checkpoint


def restore_predictors(
    config: ConfigDict,
    workdir: str | Path,
    which: str | int,
    *,
    data: sources.Dataset,
    mesh,
    family: families.ModelFamily | None = None,
) -> Restored:
  """Restores a checkpoint; with eval.quant='int8' converts it to int8
  (see vitjax/quant)."""
  workdir = Path(workdir).expanduser()
  workdir_lib.check_split(workdir, data.split_id)
  family = family or families.build(config, data, 1, mesh, workdir)
  abstract = parallel.with_sharding(
      trainer.abstract_params(family.model),
      parallel.replicated(mesh),
  )
  ema = families.uses_ema(config)
  with checkpoint.Checkpoints(workdir) as ckpts:
    params, step = ckpts.restore_weights(abstract, which, ema=ema)
    # The run's whole training time is in its latest checkpoint.
    train_seconds = ckpts.read_meta('latest')['train_seconds']
  float_predictor = Predictor.of_float_weights(family.model, params)
  header = {
      'checkpoint': f'{which} (step {step})',
      'workdir': str(workdir),
      'step': step,
      'model': config.model.name,
      'class_names': list(data.class_names),
      'train_seconds': float(train_seconds),
      'machine': machine.describe(),
  }
  ev = config.eval
  if ev.quant == 'int8':
    calibration = None
    if ev.quant_activations == 'static':
      calibration = quant.calibration_sample(data.train.images, ev, config.seed)
    predictor, header['quantization'] = quant.int8_predictor(
        family.model,
        params,
        ev,
        calibration,
        workdir / 'int8' / str(which),
        quant.conversion_source(step, ev, ema),
    )
    header['quantization']['test_agreement_with_float'] = _agreement(
        float_predictor, predictor, data.test.images, ev.batch_size, mesh
    )
  elif ev.quant == 'none':
    predictor = float_predictor
  else:
    raise errors.ConfigError(
        f"eval.quant={ev.quant!r}: expected 'none' or 'int8'."
    )
  # What the predictor computes in: 'int8' (the quantized layers, the rest
  # in float32, header['quantization']) or the model's dtype.
  header['precision'] = 'int8' if ev.quant == 'int8' else family.model.dtype
  header['compute_dtype'] = predictor.model.dtype
  teacher = None
  if family.teacher is not None:
    teacher = Predictor.of_float_weights(
        family.teacher.model, family.teacher.params
    )
    header['teacher'] = {
        'workdir': config.sparse.init_from,
        'step': family.teacher.step,
        # Served in its own float dtype: with eval.quant=int8 the speed-up
        # over it mixes int8's gain with the sparsity's.
        'precision': teacher.model.dtype,
    }
  return Restored(predictor, float_predictor, teacher, header)


def evaluate_checkpoint(
    config: ConfigDict,
    workdir: str | Path,
    which: str | int,
    *,
    data=None,
    mesh=None,
    family: families.ModelFamily | None = None,
    restored: Restored | None = None,
    timed: bool = True,
) -> dict[str, Any]:
  """Restores a checkpoint, evaluates it on val and test, writes the report.

  With eval.quant='int8' the checkpoint is evaluated in int8, with its
  float predictions for comparison. Sparse models also report their dense
  teacher's accuracy, and (`timed`) its speed timed interleaved with theirs.
  `data`, `mesh`, `family` and `restored` spare a caller that has them their
  rebuilding. `timed=False` is for a caller that times several checkpoints
  together and writes its own report (scripts/compare.py): the returned
  report has no speed, and is neither written nor printed here.
  """
  workdir = Path(workdir).expanduser()
  data = data or sources.load(config.data, config.seed)
  mesh = mesh or parallel.make_mesh()
  restored = restored or restore_predictors(
      config, workdir, which, data=data, mesh=mesh, family=family
  )
  predictor, ev = restored.predictor, config.eval
  report = copy.deepcopy(restored.header)
  report['sparsity'] = sparsity.sparsity_report(
      predictor, data.test, ev.batch_size, data.num_classes
  )
  report.update(_accuracy(predictor, data, ev.batch_size, mesh))
  report['cost'] = cost.cost_report(
      predictor,
      # A-ViT's cost depends on the images: count what the test set ran.
      report['sparsity'],
      float_params=restored.float_predictor.params,
  )
  timed_predictors = {'model': predictor}
  if restored.teacher is not None:
    report['teacher'].update(
        _accuracy(restored.teacher, data, ev.batch_size, mesh),
        cost=cost.cost_report(restored.teacher),
    )
    timed_predictors['teacher'] = restored.teacher
  if timed and jax.process_count() > 1:
    logging.info(
        'Speed is not timed with several processes (each would time its own'
        ' devices); evaluate the checkpoint with --mode=eval on one.'
    )
  elif timed:
    report['speed'] = speed.speed_report(
        timed_predictors,
        mesh,
        data.test.images,
        ev.speed_batch,
        rounds=ev.speed_rounds,
        seconds=ev.speed_seconds,
        baseline='teacher' if restored.teacher is not None else None,
    )
  if not timed:
    return report
  suffix = '_int8' if report['precision'] == 'int8' else ''
  if jax.process_index() == 0:
    path = report_lib.write_report(
        report,
        workdir / 'eval',
        f'{which}{suffix}',
        data.class_names,
        workdir / 'metrics.jsonl',
    )
    logging.info('Wrote %s', path)
  # Every process runs the figure's forward pass; process 0 draws it.
  figure_data = decisions.on_test_images(predictor, data.test)
  if jax.process_index() == 0:
    figure = decisions.write_figure(
        figure_data,
        data.class_names,
        workdir / 'eval',
        suffix,
        mean_depth_per_class=report['sparsity'].get('mean_depth_per_class'),
    )
    logging.info('Wrote %s', figure)
    report_lib.print_report(report, data.class_names)
  return report


# Restoring the checkpoint, writing the report and drawing its figures:
# 2.1 s on the 2-core AMD EPYC Zen 4 for the CPU preset; kept with room.
_OTHER_SECONDS = 3.0


def expected_seconds(
    config: ConfigDict,
    data: sources.Dataset,
    has_teacher: bool,
    timings,
) -> float:
  """What evaluate_checkpoint at the end of training should take (0 for a
  run without one), from the timing of one validation pass and of its
  compilation (a time budget reserves it: vitjax/time_budget.py). Counted
  from what it runs: its forward passes in images, a compilation per
  function it jits, the speed timing as configured, and the rest."""
  if not config.train.final_evaluation:
    return 0.0
  ev = config.eval
  n_val, n_test = len(data.val), len(data.test)
  per_image = timings.validation_seconds / n_val
  predictors = 2 if has_teacher else 1
  # Each predictor: val and test, and two warm-up calls at the timed batch.
  images = predictors * (n_val + n_test + 2 * ev.speed_batch)
  # Each: its accuracy, cost analysis, and two timed batch sizes; the
  # model's decisions figure.
  compiles = 4 * predictors + 1
  # A timing round runs each candidate for speed_seconds, or one call.
  batch_call = max(ev.speed_seconds, ev.speed_batch * per_image)
  round_seconds = predictors * (batch_call + ev.speed_seconds)
  if config.model.name == 'avit':
    images += 2 * n_test  # its sparsity report runs both paths
    compiles += 3
    # Its batch-1 program holds every block after the first once per
    # compact width (AViT._compact_block): about that many forwards more.
    depth = config.model.depth
    tokens = (sources.IMAGE_SHAPE[0] // config.model.patch_size) ** 2 + 1
    compiles += (depth - 1) * (len(avit.compact_widths(tokens)) - 2) / depth
    round_seconds += batch_call  # its masked path, beside token removal
  if ev.quant == 'int8':
    # Calibration, conversion and the agreement with float on test.
    images += ev.quant_calibration_images + 2 * n_test
    compiles += 3
  return (
      images * per_image
      + compiles * timings.compile_seconds
      + ev.speed_rounds * round_seconds
      + _OTHER_SECONDS
  )


def _accuracy(
    predictor: Predictor, data: sources.Dataset, batch_size: int, mesh
) -> dict[str, Any]:
  """{'val': metrics, 'test': metrics} of the predictor."""
  predict_fn = classification.make_predict_fn(predictor.logits, mesh)
  return {
      name: classification.evaluate_split(
          predict_fn,
          predictor.variables,
          split,
          batch_size,
          mesh,
          data.num_classes,
      )
      for name, split in (('val', data.val), ('test', data.test))
  }


def _agreement(
    a: Predictor, b: Predictor, images: np.ndarray, batch_size: int, mesh
) -> float:
  """How often two predictors predict the same class, image by image."""
  preds = [
      np.argmax(
          classification.predict(
              classification.make_predict_fn(p.logits, mesh),
              p.variables,
              images,
              batch_size,
              mesh,
          ),
          -1,
      )
      for p in (a, b)
  ]
  return float(np.mean(preds[0] == preds[1]))

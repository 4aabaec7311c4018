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

from vitjax import checkpoint, distributed, errors, families, machine
from vitjax import quantization
from vitjax import sharding, train_state, workdir as workdir_lib
from vitjax.data import sources
from vitjax.evaluators import classification, cost, decisions
from vitjax.evaluators import report as report_lib, sparsity, speed
from vitjax.evaluators.classification import Predictor
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
  (see vitjax/quantization.py)."""
  workdir = Path(workdir).expanduser()
  workdir_lib.check_split(workdir, data.split_id, record=False)
  family = family or families.build(config, data, 1, mesh, workdir)
  # The optimizer's structure, not its schedule, shapes the saved state.
  tx = family.optimizer.structure()
  abstract = train_state.abstract(
      family.model, tx, config.optim.ema_decay > 0, sharding.replicated(mesh)
  )
  with checkpoint.Checkpoints(workdir) as ckpts:
    state, meta = ckpts.restore(abstract, which)
    # The run's whole training time is in its latest checkpoint.
    train_seconds = ckpts.read_meta('latest')['train_seconds']
  params = state.eval_params(config.eval.use_ema)
  float_predictor = Predictor.of_float_weights(family.model, params)
  header = {
      'checkpoint': f'{which} (step {meta["step"]})',
      'workdir': str(workdir),
      'step': int(meta['step']),
      'model': config.model.name,
      'class_names': list(data.class_names),
      'train_seconds': float(train_seconds),
      'machine': machine.describe(),
  }
  quant = config.eval.quant
  if quant == 'int8':
    source = quantization.conversion_source(
        meta['step'],
        config.eval,
        config.optim.ema_decay > 0 and config.eval.use_ema,
    )
    predictor, header['quantization'] = _int8_predictor(
        config,
        float_predictor,
        params,
        data,
        mesh,
        workdir / 'int8' / str(which),
        source,
    )
  elif quant == 'none':
    predictor = float_predictor
  else:
    raise errors.ConfigError(
        f"eval.quant={quant!r}: expected 'none' or 'int8'."
    )
  # What the predictor computes in: 'int8' (the quantized layers, the rest
  # in float32, header['quantization']) or the model's dtype.
  header['precision'] = 'int8' if quant == 'int8' else family.model.dtype
  header['compute_dtype'] = predictor.model.dtype
  teacher = None
  if family.teacher is not None:
    teacher = Predictor.of_float_weights(
        family.teacher.model, family.teacher.params
    )
    header['teacher'] = {
        'workdir': config.sparse.init_from,
        'step': family.teacher.step,
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
  mesh = mesh or sharding.make_mesh()
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
      report['sparsity'].get('tokens_per_block')
      if config.model.name == 'avit'
      else None,
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
    *,
    has_teacher: bool,
    validation_seconds: float,
    compile_seconds: float,
) -> float:
  """What evaluate_checkpoint at the end of training should take, from the
  timing of one validation pass and of its compilation: a time-budgeted run
  keeps this much for it (vitjax/time_budget.py). Counted from what it
  runs: its forward passes in images, a compilation per function it jits,
  the speed timing as configured, and the rest."""
  ev = config.eval
  n_val, n_test = len(data.val), len(data.test)
  per_image = validation_seconds / n_val
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
      + compiles * compile_seconds
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


def _int8_predictor(
    config: ConfigDict,
    float_predictor: Predictor,
    params: Any,
    data: sources.Dataset,
    mesh,
    save_dir: Path,
    source: dict[str, Any],
) -> tuple[Predictor, dict[str, Any]]:
  """The int8 predictor of eval.quant_path, converted from the float32
  `params` (float_predictor's may be cast to bfloat16), and what to report
  about it."""
  ev = config.eval
  model = float_predictor.model
  calibration = None
  if ev.quant_activations == 'static':
    calibration = quantization.calibration_sample(
        data.train.images, ev, config.seed
    )
  info = {
      'path': ev.quant_path,
      'backend': ev.quant_backend,
      'head': ev.quant_head,
      'attention_einsums': ev.quant_attention,
      'activations': ev.quant_activations,
      'calibration_images': 0 if calibration is None else len(calibration),
      'fold_block_norms': ev.quant_fold_norms,
  }
  if ev.quant_path == 'fake':
    folded_model, folded = quantization.float_model_to_quantize(
        model, params, ev
    )
    predictor = Predictor(
        quantization.quantized_model(folded_model, ev, 'fake'),
        {'params': folded},
    )
  else:
    server = quantization.Int8Server.convert(
        model,
        ev,
        params,
        calibration_images=calibration,
    )
    info.update(quantization.weight_bytes(params, server))
    # Every process takes part in orbax's save, and reads it back only once
    # it is complete.
    info['checkpoint_bytes_on_disk'] = server.save(save_dir, source)
    info['checkpoint'] = str(save_dir)
    distributed.barrier('int8 server saved')
    # Serve what was saved: the round trip is part of the check.
    server = quantization.Int8Server.load(save_dir, model, ev, params)
    predictor = Predictor(
        server.model,
        {'params': server.params, 'aqt': server.frozen},
        prepare=server.prepare,
    )
  # How often int8 and float agree, image by image, on the test set.
  preds = []
  for p in (float_predictor, predictor):
    logits = classification.predict(
        classification.make_predict_fn(p.logits, mesh),
        p.variables,
        data.test.images,
        ev.batch_size,
        mesh,
    )
    preds.append(np.argmax(logits, -1))
  info['test_agreement_with_float'] = float(np.mean(preds[0] == preds[1]))
  return predictor, info

"""Evaluation: accuracy metrics, cost, and the written report of a checkpoint.

`--mode=eval` and the end of training both call `evaluate_checkpoint`, which
writes <workdir>/eval/report_<checkpoint>.json plus PNG figures and prints a
table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import complexity, parallel, plots
from vitjax.data.sources import Split


def classification_metrics(labels: np.ndarray, logits: np.ndarray,
                           num_classes: int) -> dict[str, Any]:
  """Top-1, balanced accuracy, per-class recall/precision, confusion."""
  labels = np.asarray(labels)
  preds = np.argmax(logits, axis=-1)
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, preds), 1)
  support = cm.sum(1)
  predicted = cm.sum(0)
  recall = np.divide(np.diag(cm), support, out=np.zeros(num_classes),
                     where=support > 0)
  precision = np.divide(np.diag(cm), predicted, out=np.zeros(num_classes),
                        where=predicted > 0)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels)).mean()
  return {
      'num_images': int(len(labels)),
      'loss': float(loss),
      'accuracy': float(np.mean(preds == labels)),
      'balanced_accuracy': float(np.mean(recall[support > 0])),
      'worst_class_recall': float(np.min(recall[support > 0])),
      'per_class_recall': recall.tolist(),
      'per_class_precision': precision.tolist(),
      'confusion_matrix': cm.tolist(),
  }


def make_predict_fn(model: nn.Module, mesh) -> Callable:
  """Jitted (params, images) -> float32 logits, batch sharded on the mesh."""
  def predict(params, images):
    return model.apply({'params': params}, images, train=False)[0]
  return jax.jit(predict, in_shardings=(parallel.replicated(mesh),
                                        parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


def predict(predict_fn: Callable, params: Any, images: np.ndarray,
            batch_size: int, mesh) -> np.ndarray:
  """Logits for every image; the last batch is padded, then trimmed."""
  parallel.check_batch(batch_size, mesh, 'eval.batch_size')
  sharding = parallel.batch_sharding(mesh)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) +
                                              chunk.shape[1:], chunk.dtype)])
    logits = predict_fn(params, jax.device_put(chunk, sharding))
    out.append(parallel.to_host(logits)[:n])
  return np.concatenate(out)


def evaluate_split(predict_fn: Callable, params: Any, split: Split,
                   batch_size: int, mesh, num_classes: int) -> dict[str, Any]:
  logits = predict(predict_fn, params, split.images, batch_size, mesh)
  return classification_metrics(split.labels, logits, num_classes)


def cost_report(model: nn.Module, params: Any, mesh, speed_batch: int,
                image_shape: tuple[int, ...]) -> dict[str, Any]:
  """Parameters, MACs per image (analytic and XLA's count), speed."""
  predict_fn = make_predict_fn(model, mesh)
  batch = max(speed_batch // mesh.size, 1) * mesh.size
  images = jax.device_put(np.zeros((batch,) + image_shape, np.uint8),
                          parallel.batch_sharding(mesh))
  single = np.zeros((1,) + image_shape, np.uint8)
  one = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
  flops = complexity.xla_flops(one, params, single)
  return {
      'parameters': complexity.param_count(params),
      'macs_per_image': complexity.vit_macs(model, image_shape[0]),
      'xla_flops_per_image': flops,
      'inference_images_per_second': complexity.images_per_second(
          predict_fn, params, images, batch=batch),
      'inference_batch': batch,
      'latency_ms_batch1': 1000.0 / complexity.images_per_second(
          one, params, single, batch=1),
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
  }


def write_report(report: dict[str, Any], out_dir: Path, name: str,
                 class_names: tuple[str, ...], metrics_jsonl: Path) -> Path:
  """Writes the JSON report and its figures; returns the JSON's path."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f'report_{name}.json'
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(report, indent=1))
  tmp.replace(path)
  for split in ('test', 'val'):
    m = report[split]
    title = f'{split}, {name}: balanced accuracy {m["balanced_accuracy"]:.4f}'
    plots.confusion_matrix(np.array(m['confusion_matrix']), class_names,
                           out_dir / f'confusion_{split}.png', title)
    plots.per_class_recall(m['per_class_recall'], class_names,
                           out_dir / f'recall_{split}.png', title)
  records = plots.read_metrics(metrics_jsonl)
  if records:
    plots.training_curves(records, out_dir / 'curves.png',
                          title=f'{report.get("model", "")} {name}')
  return path


def format_table(report: dict[str, Any], class_names: tuple[str, ...]) -> str:
  rows = [f'{"":>14} {"val":>8} {"test":>8}']
  for key in ('accuracy', 'balanced_accuracy', 'worst_class_recall', 'loss'):
    rows.append(f'{key:>20} {report["val"][key]:8.4f} '
                f'{report["test"][key]:8.4f}')
  rows.append('per-class recall / precision (test):')
  t = report['test']
  for i, name in enumerate(class_names):
    rows.append(f'{name:>20} {t["per_class_recall"][i]:8.4f} '
                f'{t["per_class_precision"][i]:8.4f}')
  c = report['cost']
  rows.append(
      f'parameters {c["parameters"]:,}; {c["macs_per_image"] / 1e6:.1f} M '
      f'MACs/image; {c["inference_images_per_second"]:.0f} images/s at batch '
      f'{c["inference_batch"]}; {c["latency_ms_batch1"]:.2f} ms at batch 1 '
      f'({c["device"]})')
  rows[0] = f'{"":>20} {"val":>8} {"test":>8}'
  return '\n'.join(rows)


def log_report(report: dict[str, Any], class_names: tuple[str, ...]) -> None:
  logging.info('Evaluation of %s:\n%s', report['checkpoint'],
               format_table(report, class_names))
  print(format_table(report, class_names), flush=True)


def _finite(x: float) -> float:
  return x if math.isfinite(x) else float('nan')

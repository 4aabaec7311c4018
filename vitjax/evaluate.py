"""Evaluation: accuracy metrics, cost, and the written report of a checkpoint.

`--mode=eval` and the end of training both call `evaluate_checkpoint`, which
writes <workdir>/eval/report_<checkpoint>.json plus PNG figures and prints a
table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

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


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A model ready for inference on given variables.

  `prepare` runs inside the jitted call: the int8 server uses it to rebuild
  the zero float kernels that aqtp declares but never reads.
  """
  model: nn.Module
  variables: Any  # {'params': ...} plus, for int8 serving, {'aqt': ...}
  prepare: Callable[[Any], Any] = lambda v: v

  def apply(self, variables: Any, images: jax.Array) -> tuple[jax.Array, Any]:
    return self.model.apply(self.prepare(variables), images, train=False)

  @property
  def params(self) -> Any:
    return self.variables['params']


def make_predict_fn(predictor: Predictor, mesh) -> Callable:
  """Jitted (variables, images) -> float32 logits, batch sharded."""
  return jax.jit(lambda v, x: predictor.apply(v, x)[0],
                 in_shardings=(parallel.replicated(mesh),
                               parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


def predict(predict_fn: Callable, variables: Any, images: np.ndarray,
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
    logits = predict_fn(variables, jax.device_put(chunk, sharding))
    out.append(parallel.to_host(logits)[:n])
  return np.concatenate(out)


def evaluate_split(predict_fn: Callable, variables: Any, split: Split,
                   batch_size: int, mesh, num_classes: int,
                   return_logits: bool = False):
  logits = predict(predict_fn, variables, split.images, batch_size, mesh)
  metrics = classification_metrics(split.labels, logits, num_classes)
  return (metrics, logits) if return_logits else metrics


def cost_report(predictor: Predictor, mesh, speed_batch: int,
                image_shape: tuple[int, ...], speed_seconds: float = 0.5,
                tokens_per_block=None, float_params: Any = None
                ) -> dict[str, Any]:
  """Parameters, MACs per image (analytic and XLA's count), speed.

  tokens_per_block: measured per-block token counts (A-ViT); by default the
  model's static ones. float_params: what to count as the parameters when
  the predictor's own tree lacks some (an int8 server keeps its quantized
  kernels outside 'params').
  """
  model, variables = predictor.model, predictor.variables
  predict_fn = make_predict_fn(predictor, mesh)
  batch = max(speed_batch // mesh.size, 1) * mesh.size
  images = jax.device_put(np.zeros((batch,) + image_shape, np.uint8),
                          parallel.batch_sharding(mesh))
  single = np.zeros((1,) + image_shape, np.uint8)
  one = jax.jit(lambda v, x: predictor.apply(v, x)[0])
  return {
      'parameters': complexity.param_count(
          variables['params'] if float_params is None else float_params),
      **complexity.model_macs(model, image_shape[0], tokens_per_block),
      'xla_flops_per_image': complexity.xla_flops(one, variables, single),
      'inference_images_per_second': complexity.images_per_second(
          predict_fn, variables, images, batch=batch,
          min_seconds=speed_seconds),
      'inference_batch': batch,
      'latency_ms_batch1': 1000.0 / complexity.images_per_second(
          one, variables, single, batch=1, min_seconds=speed_seconds),
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
  }


def sparsity_report(predictor: Predictor, images: np.ndarray,
                    batch_size: int, speed_batch: int,
                    speed_seconds: float) -> dict[str, Any]:
  """What a sparse model actually computes on `images` (the test set).

  DynamicViT: its static stage layout. A-ViT: mean depth per token (and of
  the class token), tokens per block, where tokens halt, and both inference
  paths: their agreement and their speed.
  """
  from vitjax.models import avit, dynamic_vit  # pylint: disable=g-import-not-at-top
  model = predictor.model
  patches = (images.shape[1] // model.patch_size) ** 2
  if isinstance(model, dynamic_vit.DynamicViT):
    keep = model.keep_counts(patches)
    return {'stage_blocks': list(model.stages()), 'keep_counts': list(keep),
            'keep_ratio_per_stage': [k / patches for k in keep],
            'tokens_per_block': list(model.tokens_per_block(patches))}
  if not isinstance(model, avit.AViT):
    return {}
  masked = jax.jit(predictor.apply)
  ready = jax.jit(predictor.prepare)(predictor.variables)  # for removal
  removal = lambda v, x: avit.token_removal_apply(model, v, x)
  preds, removal_preds, depth, active = [], [], [], []
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    logits, aux = masked(predictor.variables, x)
    preds.append(np.argmax(logits, -1))
    depth.append(np.asarray(aux['depth']))
    active.append(np.asarray(aux['active']).sum(-1))  # [depth, b]
    removal_preds.append(np.argmax(removal(ready, x)[0], -1))
  depth = np.concatenate(depth)  # [n, tokens]
  tokens_per_block = np.concatenate(active, axis=1).mean(1)
  halts_at = np.bincount(depth.astype(int).ravel() - 1,
                         minlength=model.depth) / depth.size
  # What A-ViT computes depends on the images, and the test set is sorted
  # by class: time a seeded sample of all classes, not the first class.
  sample = np.random.default_rng(0).permutation(len(images))[:speed_batch]
  speed_x = images[np.sort(sample)]
  rate = lambda fn, v: complexity.images_per_second(
      fn, v, speed_x, batch=len(speed_x), min_seconds=speed_seconds)
  return {
      'gate_center': model.gate_center,
      'mean_depth_per_token': float(depth.mean()),
      'mean_depth_cls_token': float(depth[:, 0].mean()),
      'tokens_per_block': tokens_per_block.tolist(),
      'halting_distribution': halts_at.tolist(),
      'token_removal_agreement': float(np.mean(
          np.concatenate(preds) == np.concatenate(removal_preds))),
      'masked_images_per_second': rate(lambda v, x: masked(v, x)[0],
                                       predictor.variables),
      'token_removal_images_per_second': rate(
          lambda v, x: removal(v, x)[0], ready),
      'speed_batch': int(len(speed_x)),
  }


def serving_images_per_second(report: dict[str, Any]) -> tuple[float, str]:
  """The batch images/s a model serves at, and the path when it is not the
  plain forward: A-ViT serves through token removal (its masked path is no
  faster than dense)."""
  sp = report.get('sparsity', {})
  if 'token_removal_images_per_second' in sp:
    return sp['token_removal_images_per_second'], 'token removal'
  return report['cost']['inference_images_per_second'], ''


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
  if 'halting_distribution' in report.get('sparsity', {}):
    sp = report['sparsity']
    plots.halting_distribution(
        sp['halting_distribution'], out_dir / 'halting.png',
        f'{name}: mean depth {sp["mean_depth_per_token"]:.2f} blocks/token')
  records = plots.read_metrics(metrics_jsonl)
  if records:
    plots.training_curves(records, out_dir / 'curves.png',
                          title=f'{report.get("model", "")} {name}')
  return path


def format_table(report: dict[str, Any], class_names: tuple[str, ...]) -> str:
  rows = [f'{"":>20} {"val":>8} {"test":>8}']
  for key in ('accuracy', 'balanced_accuracy', 'worst_class_recall', 'loss'):
    rows.append(f'{key:>20} {report["val"][key]:8.4f} '
                f'{report["test"][key]:8.4f}')
  rows.append('per-class recall / precision (test):')
  t = report['test']
  for i, name in enumerate(class_names):
    rows.append(f'{name:>20} {t["per_class_recall"][i]:8.4f} '
                f'{t["per_class_precision"][i]:8.4f}')
  c = report['cost']
  sp = report.get('sparsity', {})
  if 'teacher' in report:
    t = report['teacher']
    rate, path = serving_images_per_second(report)
    rows.append(f'teacher (dense ViT) test balanced accuracy '
                f'{t["test"]["balanced_accuracy"]:.4f}; drop '
                f'{t["test"]["balanced_accuracy"] - report["test"]["balanced_accuracy"]:+.4f}; '
                f'MACs ratio {c["macs_per_image"] / t["cost"]["macs_per_image"]:.3f}; '
                f'speed-up at batch {c["inference_batch"]} '
                f'{rate / t["cost"]["inference_images_per_second"]:.2f}x'
                f'{f" ({path})" if path else ""}, '
                f'at batch 1 {t["cost"]["latency_ms_batch1"] / c["latency_ms_batch1"]:.2f}x'
                + (' (masked)' if path else ''))
  q = report.get('quantization')
  if q:
    line = (f'int8 ({q["path"]}, {q["backend"]}): agrees with float on '
            f'{q["test_agreement_with_float"]:.4f} of test images')
    if 'int8_kernel_bytes' in q:
      line += (f'; quantized kernels {q["int8_kernel_bytes"]:,} B vs '
               f'{q["float32_kernel_bytes"]:,} B float32 '
               f'({q["int8_kernel_bytes"] / q["float32_kernel_bytes"]:.3f}x)'
               f'; int8 checkpoint {q.get("checkpoint_bytes_on_disk", 0):,} B '
               'on disk')
    rows.append(line)
  if 'mean_depth_per_token' in sp:
    rows.append(f'A-ViT: mean depth {sp["mean_depth_per_token"]:.2f} blocks '
                f'per token (class token {sp["mean_depth_cls_token"]:.2f}); '
                f'token removal agrees on {sp["token_removal_agreement"]:.4f} '
                f'of images; {sp["masked_images_per_second"]:.0f} images/s '
                f'masked vs {sp["token_removal_images_per_second"]:.0f} with '
                'token removal')
  rows.append(
      f'parameters {c["parameters"]:,}; {c["macs_per_image"] / 1e6:.1f} M '
      f'MACs/image; {c["inference_images_per_second"]:.0f} images/s at batch '
      f'{c["inference_batch"]}; {c["latency_ms_batch1"]:.2f} ms at batch 1 '
      f'({c["device"]})')
  return '\n'.join(rows)


def print_report(report: dict[str, Any], class_names: tuple[str, ...]
                 ) -> None:
  print(f'Evaluation of {report["checkpoint"]}:', flush=True)
  print(format_table(report, class_names), flush=True)

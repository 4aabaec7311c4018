"""Accuracy of a model on a split: logits in batches, then the metrics."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import parallel
from vitjax.data.sources import IMAGE_SHAPE, Split
from vitjax.models import inference_weights

# (variables, images) -> float32 logits.
LogitsFn = Callable[[Any, jax.Array], jax.Array]


def _unchanged(variables: Any) -> Any:
  return variables


def model_logits(model: nn.Module) -> LogitsFn:
  """The inference logits of `model`, for variables given per call."""
  return lambda variables, images: model.apply(variables, images, train=False)[
      0
  ]


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A model with the variables it infers with.

  `prepare` runs inside the jitted call: the int8 server uses it to rebuild
  the zero float kernels that aqtp declares but never reads.
  """

  model: nn.Module
  variables: Any  # {'params': ...} plus, for int8 serving, {'aqt': ...}
  prepare: Callable[[Any], Any] = _unchanged

  def apply(self, variables: Any, images: jax.Array) -> tuple[jax.Array, Any]:
    return self.model.apply(self.prepare(variables), images, train=False)

  def logits(self, variables: Any, images: jax.Array) -> jax.Array:
    return self.apply(variables, images)[0]

  @property
  def params(self) -> Any:
    return self.variables['params']

  @classmethod
  def of_float_weights(cls, model: nn.Module, params: Any) -> 'Predictor':
    """The predictor of a float model's trained (float32) weights, those
    that the model only ever reads in its compute dtype cast to it once
    (models/inference_weights.py): the same logits, bit for bit on
    XLA:CPU."""
    return cls(
        model,
        {
            'params': inference_weights.cast_for_inference(
                model, params, IMAGE_SHAPE
            )
        },
    )


def make_predict_fn(logits: LogitsFn, mesh) -> LogitsFn:
  """`logits` jitted with the batch sharded over the mesh."""
  return jax.jit(
      logits,
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
      out_shardings=parallel.batch_sharding(mesh),
  )


def predict(
    predict_fn: LogitsFn,
    variables: Any,
    images: np.ndarray,
    batch_size: int,
    mesh,
) -> np.ndarray:
  """Logits for every image; the last batch is padded, then trimmed."""
  parallel.check_batch(batch_size, mesh, 'eval.batch_size')
  placement = parallel.batch_sharding(mesh)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate(
          [chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)]
      )
    logits = predict_fn(variables, jax.device_put(chunk, placement))
    out.append(parallel.to_host(logits)[:n])
  return np.concatenate(out)


def classification_metrics(
    labels: np.ndarray, logits: np.ndarray, num_classes: int
) -> dict[str, Any]:
  """Top-1, balanced accuracy, per-class recall/precision, confusion."""
  labels = np.asarray(labels)
  preds = np.argmax(logits, axis=-1)
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, preds), 1)
  support = cm.sum(1)
  predicted = cm.sum(0)
  recall = np.divide(
      np.diag(cm), support, out=np.zeros(num_classes), where=support > 0
  )
  precision = np.divide(
      np.diag(cm), predicted, out=np.zeros(num_classes), where=predicted > 0
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels)
  ).mean()
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


def evaluate_split(
    predict_fn: LogitsFn,
    variables: Any,
    split: Split,
    batch_size: int,
    mesh,
    num_classes: int,
) -> dict[str, Any]:
  logits = predict(predict_fn, variables, split.images, batch_size, mesh)
  return classification_metrics(split.labels, logits, num_classes)


def split_evaluator(
    model: nn.Module, split: Split, batch_size: int, mesh, num_classes: int
) -> Callable[[Any], dict[str, Any]]:
  """params -> the split's metrics, for the model's float weights as
  training holds them (validation)."""
  predict_fn = make_predict_fn(model_logits(model), mesh)
  return lambda params: evaluate_split(
      predict_fn, {'params': params}, split, batch_size, mesh, num_classes
  )

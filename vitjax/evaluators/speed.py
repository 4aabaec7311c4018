"""How fast predictors serve, timed together so their ratios hold.

Each predictor is timed at a batch (images/s) and at batch 1 (the latency
of one image, waited for), all of them interleaved by vitjax/measure/timing.py, on
the same seeded test images: a batch of them, and at batch 1
SINGLE_IMAGES of them served one after another (A-ViT's cost depends on
the image). A model is timed on the path it serves with: A-ViT at a batch on
token removal (its masked path, which runs every block on every token, is
timed beside it for comparison), and at batch 1 on its compact path (the
active tokens alone, in one jitted program: AViT.compact_max_batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from vitjax import errors, parallel
from vitjax.measure import timing
from vitjax.evaluators.classification import Predictor, make_predict_fn
from vitjax.models import avit, token_removal


def _with_model(predictor: Predictor, model) -> Predictor:
  return dataclasses.replace(predictor, model=model)


def _serving_fn(
    predictor: Predictor, mesh, batch: int
) -> Callable[[Any, Any], Any]:
  """(variables, images) -> logits, as the model serves at this batch."""
  if isinstance(predictor.model, avit.AViT) and batch > 1:
    model = predictor.model
    # Its variables come prepared (see _candidates): it runs from the host.
    return lambda v, x: token_removal.token_removal_apply(model, v, x)[0]
  if isinstance(predictor.model, avit.AViT):
    # The faithful mode predicts the same; it only records more, masked.
    predictor = _with_model(predictor, predictor.model.clone(faithful=False))
  if batch == 1:
    return jax.jit(predictor.logits)
  return make_predict_fn(predictor.logits, mesh)


# Batch 1 is timed on this many images, one at a time.
SINGLE_IMAGES = 16


def _candidates(
    name: str,
    predictor: Predictor,
    mesh,
    images: np.ndarray,
    singles: np.ndarray,
) -> dict[str, timing.Candidate]:
  """images: the batch timed; singles: the images timed at batch 1, one
  call serving them one after another, each waited for."""
  batch = len(images)
  serve = _serving_fn(predictor, mesh, batch)
  batched = jax.device_put(images, parallel.batch_sharding(mesh))
  singles = [jax.device_put(x[None]) for x in singles]
  serve_one = _serving_fn(predictor, mesh, 1)
  v = predictor.variables
  if isinstance(predictor.model, avit.AViT):
    # Token removal plans on the host: prepared once, not in every call.
    ready = jax.jit(predictor.prepare)(v)
    batch_call = lambda: serve(ready, batched)
  else:
    batch_call = lambda: serve(v, batched)
  out = {
      f'{name}@{batch}': timing.Candidate(batch_call, batch),
      f'{name}@1': timing.Candidate(
          lambda: [jax.block_until_ready(serve_one(v, x)) for x in singles],
          len(singles),
      ),
  }
  if isinstance(predictor.model, avit.AViT):
    masked = make_predict_fn(
        _with_model(
            predictor, predictor.model.clone(compact_max_batch=0)
        ).logits,
        mesh,
    )
    out[f'{name} masked@{batch}'] = timing.Candidate(
        lambda: masked(v, batched), batch
    )
  return out


def speed_report(
    predictors: Mapping[str, Predictor],
    mesh,
    images: np.ndarray,
    batch: int,
    *,
    rounds: int,
    seconds: float,
    baseline: str | None = None,
    more_baselines: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
  """Images/s at `batch` and batch-1 latency of every predictor.

  images: test images; a seeded sample of `batch` of them (repeated if
  there are fewer) is timed, since the test set is sorted by class and
  A-ViT's cost depends on the images. With `baseline`, every other
  predictor's speed-up over it at both batches, as the median and
  interquartile range of per-round ratios; with `more_baselines` ({key:
  {name: its baseline}}), those speed-ups too, under 'speedup_over_<key>'
  (scripts/compare.py: 'own', a model's int8 predictor over the same model
  in float32; 'first', a lighter model over the dense one in the same
  precision).
  A-ViT's token removal is also given over its masked path, the same way.
  Returns {name: {...}} as plain JSON-able numbers.
  """
  batch = max(batch // mesh.size, 1) * mesh.size
  if batch < 2:
    raise errors.ConfigError(
        f'eval.speed_batch={batch}: time a batch of at least 2 images (batch'
        ' 1 is timed beside it anyway).'
    )
  for key, over in (more_baselines or {}).items():
    unknown = sorted((set(over) | set(over.values())) - set(predictors))
    if unknown:
      raise ValueError(
          f'more_baselines[{key!r}] names {unknown}, which are not among '
          f'the predictors timed ({sorted(predictors)}).'
      )
  pick = np.random.default_rng(0).permutation(len(images))
  sample = images[np.sort(pick[:batch])]
  sample = np.take(sample, np.arange(batch) % len(sample), 0)
  # In the seeded order: the test set is sorted by class.
  singles = images[np.take(pick, np.arange(SINGLE_IMAGES) % len(pick))]
  candidates = {}
  for name, predictor in predictors.items():
    candidates.update(_candidates(name, predictor, mesh, sample, singles))
  t = timing.interleaved(candidates, rounds=rounds, seconds=seconds)
  report = {}
  for name, predictor in predictors.items():
    r = {
        'batch': batch,
        'images_per_second': t.rate(f'{name}@{batch}').as_dict(),
        'latency_ms_batch1': t.ms_per_item(f'{name}@1').as_dict(),
        'path': (
            'token removal (batch), compact (batch 1)'
            if isinstance(predictor.model, avit.AViT)
            else 'forward'
        ),
        'rounds': rounds,
    }
    if f'{name} masked@{batch}' in candidates:
      r['masked_images_per_second'] = t.rate(f'{name} masked@{batch}').as_dict()
      r['token_removal_over_masked'] = t.ratio(
          f'{name}@{batch}', f'{name} masked@{batch}'
      ).as_dict()
    speedup = lambda base: {
        f'batch {batch}': (
            t.ratio(f'{name}@{batch}', f'{base}@{batch}').as_dict()
        ),
        'batch 1': t.ratio(f'{name}@1', f'{base}@1').as_dict(),
    }
    if baseline is not None and name != baseline:
      r['speedup_over'] = baseline
      r['speedup'] = speedup(baseline)
    for key, over in (more_baselines or {}).items():
      if name in over:
        r[f'speedup_over_{key}'] = {'over': over[name]} | speedup(over[name])
    report[name] = r
  return report

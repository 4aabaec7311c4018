"""Training and inference speed of any config, as the train loop runs it.

  python scripts/benchmark.py --config=configs/vit.py:seed
  python scripts/benchmark.py --config=configs/vit.py:cpu --input=tf
  python scripts/benchmark.py --config=configs/vit.py:cpu --input=device

Training images/s is the real jitted train step (augmentation mixing, loss,
AdamW update, EMA) at config.train.batch_size; `--input` chooses what feeds
it: fixed synthetic batches ('none': the model step alone), the tf.data
pipeline or the device pipeline on the configured data. Inference images/s is
the jitted forward at config.eval.speed_batch. Each figure is the median of
--repeats timings of --seconds each; the spread is printed beside it.
"""

import os
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file.', lock_config=True
)
_INPUT = flags.DEFINE_enum(
    'input', 'none', ['none', 'tf', 'device'], 'What feeds the train step.'
)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats per figure.')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Length of one repeat.')
flags.mark_flags_as_required(['config'])


def _timed(run_steps, batch: int) -> tuple[float, list[float]]:
  """Median images/s of run_steps(n) -> seconds, over the repeats."""
  run_steps(3)  # compile, warm caches and let tf.data autotune settle
  per_step = run_steps(3) / 3
  n = max(2, int(_SECONDS.value / max(per_step, 1e-4)))
  rates = [n * batch / run_steps(n) for _ in range(_REPEATS.value)]
  return statistics.median(rates), rates


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import optax
  from vitjax import losses, models, objectives, optimizers, sharding, train
  from vitjax import train_state
  from vitjax.data import pipelines, sources
  from vitjax.evaluators import classification, cost

  config = _CONFIG.value
  mesh = sharding.make_mesh()
  batch = config.train.batch_size
  num_classes = 10
  if _INPUT.value == 'none':
    rng = np.random.default_rng(0)
    counts = np.full(num_classes, 100)
    host = {
        'image': rng.integers(0, 256, (batch, 32, 32, 3), np.uint8),
        'label': rng.integers(0, num_classes, batch).astype(np.int32),
    }
    fixed = sharding.host_batch_to_global(host, sharding.batch_sharding(mesh))
    batches = lambda start, end: (fixed for _ in range(start, end))
  else:
    with config.unlocked():
      config.data.pipeline = _INPUT.value
    data = sources.load(config.data, config.seed)
    counts = data.train.counts(num_classes)
    batches = pipelines.make(config, data, mesh).batches

  model = models.create(config.model, num_classes)
  schedule = optax.constant_schedule(1e-4)
  tx = optimizers.make_optimizer(config.optim, schedule)
  objective = objectives.Classification(
      model,
      losses.make_classification_loss(
          config.loss, counts, 100, config.data.sampling
      ),
  )
  step = train.make_train_step(
      objective, schedule, config, num_classes, jax.random.key(1), mesh
  )
  state = jax.jit(
      lambda key: train_state.create(
          model,
          train_state.init_params(model, key),
          tx,
          config.optim.ema_decay > 0,
      ),
      out_shardings=sharding.replicated(mesh),
  )(jax.random.key(0))
  metrics = train.make_metrics_cls(()).empty()
  position = [0]

  def run_train(n):
    nonlocal state, metrics
    start = time.perf_counter()
    for b in batches(position[0], position[0] + n):
      state, metrics = step(state, b, metrics)
    jax.block_until_ready(state.params)
    position[0] += n
    return time.perf_counter() - start

  train_rate, train_rates = _timed(run_train, batch)

  predict = classification.make_predict_fn(
      classification.model_logits(model), mesh
  )
  eval_batch = config.eval.speed_batch
  images = jax.device_put(
      np.zeros((eval_batch,) + sources.IMAGE_SHAPE, np.uint8),
      sharding.batch_sharding(mesh),
  )

  def run_infer(n):
    start = time.perf_counter()
    for _ in range(n):
      out = predict({'params': state.params}, images)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  infer_rate, infer_rates = _timed(run_infer, eval_batch)
  spread = lambda r: f'(min {min(r):.0f}, max {max(r):.0f})'
  print(
      f'device: {jax.device_count()} x {jax.devices()[0].device_kind}; '
      f'jax {jax.__version__}; model {config.model.name} '
      f'dim {config.model.hidden_dim} depth {config.model.depth} patch '
      f'{config.model.patch_size} dtype {config.model.dtype}; '
      f'{cost.param_count(state.params):,} parameters, '
      f'{cost.vit_macs(model) / 1e6:.1f} M MACs/image'
  )
  print(
      f'train  (batch {batch}, input {_INPUT.value}): {train_rate:.0f} '
      f'images/s {spread(train_rates)}, median of {_REPEATS.value}'
  )
  print(
      f'infer  (batch {eval_batch}): {infer_rate:.0f} images/s '
      f'{spread(infer_rates)}, median of {_REPEATS.value}'
  )


if __name__ == '__main__':
  app.run(main)

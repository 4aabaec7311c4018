"""Training and inference speed of any config, as the train loop runs it.

  python scripts/benchmark.py --config=configs/vit.py:seed
  python scripts/benchmark.py --config=configs/vit.py:cpu --input=tf
  python scripts/benchmark.py --config=configs/vit.py:cpu --input=device

Training images/s is the real jitted train step (augmentation mixing, loss,
AdamW update, EMA) at config.train.batch_size, 5 steps per timed call as the
training loop dispatches them; `--input` chooses what feeds
it: fixed synthetic batches ('none': the model step alone), the tf.data
pipeline or the device pipeline on the configured data. Inference images/s is
the jitted forward at config.eval.speed_batch and at batch 1. Each figure is the median of
--repeats rounds of about --seconds each, with its interquartile range.
With --baseline=<another config> both are timed in one sitting, interleaved
(vitjax/timing.py), and the ratios are printed:

  python scripts/benchmark.py --config=configs/vit.py:cpu \
      --baseline=configs/vit.py:cpu --baseline.model.dtype=float32

--int8 also times the int8 serving model of the same (random) weights at
both batches, and --profile then traces every candidate with jax.profiler
and prints the share of its time in each kind of work: int8 dots, the
quantization of their inputs, float matmuls, attention, LayerNorm...

  python scripts/benchmark.py --config=configs/vit.py:seed \
      --config.model.dtype=float32 --int8 --profile
"""

import os

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file.', lock_config=True
)
_BASELINE = config_flags.DEFINE_config_file(
    'baseline', None, 'A second config, timed with --config, interleaved.'
)
_INPUT = flags.DEFINE_enum(
    'input', 'none', ['none', 'tf', 'device'], 'What feeds the train step.'
)
_INT8 = flags.DEFINE_bool(
    'int8',
    False,
    'Also time the int8 serving model (aqtp) of the same weights.',
)
_PROFILE = flags.DEFINE_bool(
    'profile',
    False,
    'Then profile each candidate (jax.profiler) and print where its time '
    'goes, by kind of work (vitjax/profiling.py).',
)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved timing rounds.')
_SECONDS = flags.DEFINE_float(
    'seconds', 10.0, 'Length of one timing of one candidate.'
)
flags.mark_flags_as_required(['config'])
_STEPS_PER_CALL = 5
_PROFILE_CALLS = 10


def _candidates(config, label: str) -> tuple[dict, dict, str]:
  """Timing candidates for a config's train step and inference, the
  programs they run (for --profile), and a line describing the model."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vitjax import losses, models, objectives, optimizers, sharding, train
  from vitjax import quantization, timing, train_state
  from vitjax.data import pipelines, sources
  from vitjax.evaluators import classification, cost

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
  optimizer = optimizers.make_optimizer(config.optim, 100, batch)
  # The step's learning rates are an input: a warmup's, which costs the
  # same as any other.
  rates = jax.device_put(
      optimizer.schedules(10_000)(50.0), sharding.replicated(mesh)
  )
  objective = objectives.Classification(
      model,
      losses.make_classification_loss(
          config.loss, counts, 100, config.data.sampling
      ),
  )
  step = train.make_train_step(
      objective, optimizer, config, num_classes, jax.random.key(1), mesh
  )
  state = jax.jit(
      lambda key: train_state.create(
          model,
          train_state.init_params(model, key),
          optimizer.structure(),
          config.optim.ema_decay > 0,
      ),
      out_shardings=sharding.replicated(mesh),
  )(jax.random.key(0))
  metrics = train.make_metrics_cls(()).empty()
  # The batch iterator runs across calls, so that tf.data keeps streaming.
  stream = batches(0, 10**9)

  def train_steps():
    # Several steps per timed call, waited for at the end only, as the
    # training loop runs them (it waits at its log steps).
    nonlocal state, metrics
    for _ in range(_STEPS_PER_CALL):
      state, metrics = step(state, next(stream), metrics, rates)
    return state.params

  eval_batch = config.eval.speed_batch
  rng = np.random.default_rng(1)
  batched = jax.device_put(
      rng.integers(0, 256, (eval_batch,) + sources.IMAGE_SHAPE, np.uint8),
      sharding.batch_sharding(mesh),
  )
  single = jax.device_put(np.asarray(batched)[:1])
  # Inference runs on a copy of the first weights: the train step donates
  # (deletes) the state's as it updates them.
  weights = jax.tree.map(lambda x: x.copy(), state.params)
  served = classification.Predictor.of_float_weights(model, weights)
  inference = {'infer': (served.logits, served.variables)}
  if _INT8.value:
    # The frozen int8 server of these weights, as `--mode=eval
    # --config.eval.quant=int8` serves a checkpoint.
    with config.unlocked():
      config.eval.quant, config.eval.quant_path = 'int8', 'serve'
    calibration = None
    if config.eval.quant_activations == 'static':
      # Static scales calibrated on random images: this times, it does not
      # judge accuracy.
      calibration = rng.integers(
          0,
          256,
          (config.eval.quant_calibration_images,) + sources.IMAGE_SHAPE,
          np.uint8,
      )
    server = quantization.Int8Server.convert(
        model, config.eval, weights, calibration_images=calibration
    )
    inference['int8'] = (
        classification.Predictor(server.model, None, server.prepare).logits,
        {'params': server.params, 'aqt': server.frozen},
    )
  candidates = {
      f'{label} train': timing.Candidate(train_steps, _STEPS_PER_CALL * batch)
  }
  # The optimised HLO of what each candidate runs, for --profile.
  programs = {
      f'{label} train': lambda: step.lower(state, next(stream), metrics, rates)
  }
  for what, (logits, variables) in inference.items():
    for name, f, x in (
        # A batch sharded over the devices, as evaluation runs it; batch 1
        # on one device, as a server of one image runs it.
        (
            f'{label} {what}',
            classification.make_predict_fn(logits, mesh),
            batched,
        ),
        (f'{label} {what}@1', jax.jit(logits), single),
    ):
      candidates[name] = timing.Candidate(
          lambda f=f, x=x, v=variables: f(v, x), x.shape[0]
      )
      programs[name] = lambda f=f, x=x, v=variables: f.lower(v, x)
  about = (
      f'{label}: model {config.model.name} dim {model.hidden_dim} depth '
      f'{model.depth} patch {model.patch_size} dtype {model.dtype} kernels '
      f'{model.kernels}; {cost.param_count(state.params):,} parameters, '
      f'{cost.vit_macs(model) / 1e6:.1f} M MACs/image; inference at batch '
      f'{eval_batch} and 1'
      + (
          ' (int8: aqtp serving, float parts in float32, activation scales '
          f'{config.eval.quant_activations}, block norms '
          f'{"folded" if config.eval.quant_fold_norms else "not folded"})'
          if _INT8.value
          else ''
      )
  )
  return candidates, programs, about


def _profile(name: str, candidate, program) -> str:
  """The time shares of one candidate's compiled program, by kind of work."""
  from vitjax import profiling  # pylint: disable=g-import-not-at-top

  hlo = program().compile().as_text()
  traced = profiling.op_seconds(
      candidate.call, profiling.module_name(hlo), calls=_PROFILE_CALLS
  )
  rows = profiling.shares(profiling.classify(hlo), traced.seconds)
  total = sum(r.seconds for r in rows)
  return (
      f'{name}: {1e3 * traced.wall_seconds:.2f} ms per call, '
      f'{1e3 * total:.2f} ms of thunks (summed over threads), '
      f'{profiling.s8_dots(hlo)} int8 dots in its HLO\n'
      + profiling.format_shares(rows)
  )


def main(argv):
  del argv
  from vitjax import machine, timing  # pylint: disable=g-import-not-at-top

  candidates, programs, about = _candidates(_CONFIG.value, 'config')
  lines = [about]
  if _BASELINE.value is not None:
    more, more_programs, about = _candidates(_BASELINE.value, 'baseline')
    lines.append(about)
    programs |= more_programs
    # What is compared runs side by side: config train, baseline train, ...
    kinds = [n.removeprefix('config ') for n in candidates]
    candidates = {
        f'{label} {what}': (candidates | more)[f'{label} {what}']
        for what in kinds
        for label in ('config', 'baseline')
    }
  t = timing.interleaved(
      candidates, rounds=_REPEATS.value, seconds=_SECONDS.value
  )
  print(
      f'{machine.summary(machine.describe())}; '
      f'input {_INPUT.value}; each figure the median '
      f'of {_REPEATS.value} interleaved rounds of about {_SECONDS.value} s, '
      'with its interquartile range'
  )
  print('\n'.join(lines))
  for name in candidates:
    print(f'{name:20}: {t.rate(name).format(" images/s", 0)}')
  for label in ('config', 'baseline'):
    for batch in ('', '@1'):
      if f'{label} int8{batch}' in candidates:
        ratio = t.ratio(f'{label} int8{batch}', f'{label} infer{batch}')
        print(
            f'{label} int8 over float, batch '
            f'{"1" if batch else "as configured"}: {ratio.format("x")}'
        )
  if _BASELINE.value is not None:
    for what in kinds:
      print(
          f'config over baseline, {what}: '
          f'{t.ratio(f"config {what}", f"baseline {what}").format("x")}'
      )
  if _PROFILE.value:
    print(
        f'\nWhere the time goes ({_PROFILE_CALLS} calls profiled; a train '
        f'call is {_STEPS_PER_CALL} steps):'
    )
    for name, candidate in candidates.items():
      print(_profile(name, candidate, programs[name]))


if __name__ == '__main__':
  app.run(main)

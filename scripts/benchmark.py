"""Training and inference speed of any config, as the train loop runs it,
and two measurements that explain it.

  python scripts/benchmark.py --config=configs/vit.py:seed
  python scripts/benchmark.py --config=configs/dynamic_vit.py:cpu
  python scripts/benchmark.py --config=configs/vit.py:cpu --input=tf
  python scripts/benchmark.py --config=configs/vit.py:cpu \
      --baseline=configs/vit.py:cpu --baseline.model.dtype=float32
  python scripts/benchmark.py --config=configs/vit.py:seed \
      --config.model.dtype=float32 --int8 --profile
  python scripts/benchmark.py --config=configs/vit.py:cpu --measure=blocks
  python scripts/benchmark.py --measure=matmuls

--measure=steps (the default): training images/s is the model family's real
jitted train step (trainer.build: augmentation mixing, loss, optimizer,
EMA; a fine-tune's objective against a teacher of random weights) at
config.train.batch_size, 5 steps per timed call as the training loop
dispatches them; `--input` chooses what feeds it: fixed synthetic batches
('none': the step alone), the tf.data pipeline or the device pipeline on
the configured data. Inference images/s is the jitted forward at
config.eval.speed_batch and at batch 1. With --baseline=<another config>
both are timed in one sitting, interleaved (vitjax/measure/timing.py), and
the ratios printed. --int8 also times the int8 serving model of the same
(random) weights, and --profile then traces every candidate with
jax.profiler and prints the share of its time in each kind of work.

--measure=blocks: what the config's encoder blocks cost at batch 1 against
their token count (--tokens), in float32 and bfloat16, as served: what
token sparsity can save. --measure=matmuls: one matmul per shape
(--shapes, MxKxN) in int8, bfloat16 and float32, in G multiply-adds/s:
what a quantized layer can gain over float on this CPU.

Every figure is the median of --repeats interleaved rounds of about
--seconds each, with its interquartile range; every ratio the median of
per-round ratios.
"""

import os

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file.', lock_config=False
)
_BASELINE = config_flags.DEFINE_config_file(
    'baseline', None, 'A second config, timed with --config, interleaved.'
)
_MEASURE = flags.DEFINE_enum(
    'measure',
    'steps',
    ['steps', 'blocks', 'matmuls'],
    'What to time (see the top of the script).',
)
_INPUT = flags.DEFINE_enum(
    'input', 'none', ['none', 'tf', 'device'], 'What feeds the train step.'
)
_INT8 = flags.DEFINE_bool(
    'int8', False, 'Also time the int8 serving model of the same weights.'
)
_PROFILE = flags.DEFINE_bool(
    'profile',
    False,
    'Then profile each candidate (jax.profiler) and print where its time '
    'goes, by kind of work (vitjax/measure/profiling.py).',
)
_TOKENS = flags.DEFINE_list(
    'tokens',
    ['65', '45', '33', '22', '9'],
    '--measure=blocks: token counts (the class token included); the first '
    'is the full one.',
)
# The layers of the CPU preset (dim 128, 65 tokens) and of the course's
# model (dim 384, 17 tokens) at batch 256 (q/k/v, fc1, fc2), and at batch 1.
_SHAPES = flags.DEFINE_list(
    'shapes',
    '16640x128x128,16640x128x256,16640x256x128,4352x384x384,4352x384x1536,'
    '4352x1536x384,65x128x128,17x384x1536'.split(','),
    '--measure=matmuls: [M, K] x [K, N] shapes, MxKxN.',
)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved timing rounds.')
_SECONDS = flags.DEFINE_float(
    'seconds', 10.0, 'Length of one timing of one candidate.'
)
_STEPS_PER_CALL = 5
_PROFILE_CALLS = 10


def _data(config):
  """The data the train step and the model family are built on: the
  configured source, or random images of the course's 10 classes."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from vitjax.data import sources

  if _INPUT.value != 'none':
    with config.unlocked():
      config.data.pipeline = _INPUT.value
    return sources.load(config.data, config.seed)
  rng = np.random.default_rng(0)

  def split(n):
    images = rng.integers(0, 256, (n,) + sources.IMAGE_SHAPE, np.uint8)
    return sources.Split(images, np.arange(n, dtype=np.int32) % 10)

  return sources.Dataset(
      split(1024), split(256), split(256), sources.CIFAR10_NAMES
  )


def _candidates(config, label: str) -> tuple[dict, dict, str]:
  """Timing candidates for a config's train step and inference, the
  programs they run (for --profile), and a line describing the model."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vitjax import families, parallel, quant, trainer
  from vitjax.data import pipelines, sources
  from vitjax.evaluators import classification, cost
  from vitjax.measure import timing

  mesh = parallel.make_mesh()
  batch = config.train.batch_size
  data = _data(config)
  teacher = None
  if 'sparse' in config:
    teacher = families.untrained_teacher(config, data.num_classes)
  family = families.build(config, data, 100, mesh, None, teacher)
  model = family.model
  train = trainer.build(
      config, family, data.num_classes, mesh, jax.random.key(1)
  )
  # The step's learning rates are an input: a warmup's, which costs the
  # same as any other.
  position = 50.0
  rates = train.rates_along(10_000)(position)
  state, metrics = train.init(jax.random.key(0)), train.metrics.empty()
  if _INPUT.value == 'none':
    fixed = parallel.host_batch_to_global(
        {
            'image': data.train.images[:batch],
            'label': data.train.labels[:batch],
        },
        parallel.batch_sharding(mesh),
    )
    stream = iter(lambda: fixed, None)
  else:
    # The iterator runs across calls, so that tf.data keeps streaming.
    stream = pipelines.make(config, data, mesh).batches(0, 10**9)

  def train_steps():
    # Several steps per timed call, waited for at the end only, as the
    # training loop runs them (it waits at its log steps).
    nonlocal state, metrics
    for _ in range(_STEPS_PER_CALL):
      state, metrics = train.step(state, next(stream), metrics, rates, position)
    return state.params

  eval_batch = config.eval.speed_batch
  rng = np.random.default_rng(1)
  batched = jax.device_put(
      rng.integers(0, 256, (eval_batch,) + sources.IMAGE_SHAPE, np.uint8),
      parallel.batch_sharding(mesh),
  )
  single = jax.device_put(np.asarray(batched)[:1])
  # Inference runs on a copy of the first weights: the train step donates
  # (deletes) the state's as it updates them.
  weights = jax.tree.map(lambda x: x.copy(), state.params)
  served = classification.Predictor.of_float_weights(model, weights)
  inference = {'infer': served}
  if _INT8.value:
    # The frozen int8 server of these weights, as `--mode=eval
    # --config.eval.quant=int8` serves a checkpoint (with --input=none its
    # static scales are calibrated on random images: this times, it does
    # not judge accuracy).
    with config.unlocked():
      config.eval.quant, config.eval.quant_path = 'int8', 'serve'
    calibration = quant.calibration_sample(
        data.train.images, config.eval, config.seed
    )
    inference['int8'] = quant.Int8Server.convert(
        model, config.eval, weights, calibration_images=calibration
    ).predictor()
  candidates = {
      f'{label} train': timing.Candidate(train_steps, _STEPS_PER_CALL * batch)
  }
  # The optimised HLO of what each candidate runs, for --profile.
  programs = {
      f'{label} train': lambda: train.step.lower(
          state, next(stream), metrics, rates, position
      )
  }
  for what, predictor in inference.items():
    for name, f, x in (
        # A batch sharded over the devices, as evaluation runs it; batch 1
        # on one device, as a server of one image runs it.
        (
            f'{label} {what}',
            classification.make_predict_fn(predictor.logits, mesh),
            batched,
        ),
        (f'{label} {what}@1', jax.jit(predictor.logits), single),
    ):
      v = predictor.variables
      candidates[name] = timing.Candidate(
          lambda f=f, x=x, v=v: f(v, x), x.shape[0]
      )
      programs[name] = lambda f=f, x=x, v=v: f.lower(v, x)
  about = (
      f'{label}: model {config.model.name} dim {model.hidden_dim} depth '
      f'{model.depth} patch {model.patch_size} dtype {model.dtype} kernels '
      f'{model.kernels}; {cost.param_count(weights):,} parameters, '
      f'{cost.model_macs(model)["macs_per_image"] / 1e6:.1f} M MACs/image; '
      f'inference at batch {eval_batch} and 1'
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
  from vitjax.measure import profiling  # pylint: disable=g-import-not-at-top

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


def _steps() -> None:
  from vitjax.measure import timing  # pylint: disable=g-import-not-at-top

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
  print(f'input {_INPUT.value}')
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


def _blocks() -> None:
  """The config's encoder blocks (its ViT's, all in a row, weights cast as
  served) on one image of each token count, in float32 and bfloat16."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vitjax import models
  from vitjax.evaluators.classification import Predictor
  from vitjax.measure import timing

  config = _CONFIG.value
  tokens = [int(n) for n in _TOKENS.value]
  candidates = {}
  for dtype in ('float32', 'bfloat16'):
    # The ViT of the config's backbone.
    vit_fields = models.fields('vit')
    model_cfg = {k: v for k, v in config.model.items() if k in vit_fields}
    model = models.create(model_cfg | {'name': 'vit', 'dtype': dtype}, 10)
    image = np.zeros((1, 32, 32, 3), np.uint8)
    params = model.init(jax.random.key(0), image, train=False)['params']
    served = Predictor.of_float_weights(model, params)

    def blocks(mdl, x):
      for block in mdl.blocks:
        x = block(x, deterministic=True)
      return x

    run = jax.jit(lambda v, x, model=model: model.apply(v, x, method=blocks))
    for n in tokens:
      # The blocks' input, in the dtype the patch embedding hands them.
      x = np.random.default_rng(n).normal(size=(1, n, model.hidden_dim))
      x = jax.device_put(x.astype(jax.numpy.dtype(dtype)))
      candidates[f'{dtype} {n}'] = timing.Candidate(
          lambda v=served.variables, x=x, f=run: f(v, x), model.depth
      )
  t = timing.interleaved(
      candidates, rounds=_REPEATS.value, seconds=_SECONDS.value
  )
  print(
      f'{config.model.depth} blocks of width {config.model.hidden_dim} in a '
      'row, batch 1; microseconds per block (interquartile range), and the '
      f'share of the {tokens[0]}-token cost (per-round ratios)'
  )
  for dtype in ('float32', 'bfloat16'):
    for n in tokens:
      spread = t.ms_per_item(f'{dtype} {n}')
      # Its share of the full cost, round by round: full's speed over its.
      share = t.ratio(f'{dtype} {tokens[0]}', f'{dtype} {n}')
      print(
          f'  {dtype:9} {n:3d} tokens: {1e3 * spread.median:6.1f} us'
          f' ({1e3 * spread.q25:.1f}-{1e3 * spread.q75:.1f}),'
          f' share {share.format()}'
      )


def _matmuls() -> None:
  """int8 x int8 -> int32 (what int8 serving runs), bfloat16 x bfloat16 ->
  float32 (model.dtype=bfloat16) and float32, per shape."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jax import lax
  import jax.numpy as jnp
  import numpy as np
  from vitjax.measure import timing

  kinds = {
      'int8': (jnp.int8, jnp.int32),
      'bfloat16': (jnp.bfloat16, jnp.float32),
      'float32': (jnp.float32, jnp.float32),
  }
  print('G multiply-adds/s (interquartile range)')
  rng = np.random.default_rng(0)
  for shape in _SHAPES.value:
    m, k, n = (int(d) for d in shape.split('x'))
    candidates = {}
    for name, (dtype, result) in kinds.items():
      lhs = jnp.asarray(rng.integers(-127, 128, (m, k)), dtype)
      rhs = jnp.asarray(rng.integers(-127, 128, (k, n)), dtype)
      dot = jax.jit(
          lambda a, b, r=result: lax.dot_general(
              a, b, (((1,), (0,)), ((), ())), preferred_element_type=r
          )
      )
      # items = multiply-adds, so that rate() reads in multiply-adds/s.
      candidates[name] = timing.Candidate(
          lambda d=dot, a=lhs, b=rhs: d(a, b), m * k * n
      )
    t = timing.interleaved(
        candidates, rounds=_REPEATS.value, seconds=_SECONDS.value
    )
    print(
        f'{shape:>14}: '
        + '  '.join(
            f'{name} {r.median / 1e9:6.1f} ({r.q25 / 1e9:.0f}-{r.q75 / 1e9:.0f})'
            for name, r in ((name, t.rate(name)) for name in kinds)
        )
    )
    for name, over in (
        ('int8', 'float32'),
        ('bfloat16', 'float32'),
        ('int8', 'bfloat16'),
    ):
      print(f'{"":>16}{name} over {over}: {t.ratio(name, over).format("x")}')


def main(argv):
  del argv
  from vitjax.measure import machine  # pylint: disable=g-import-not-at-top

  if _MEASURE.value != 'matmuls' and _CONFIG.value is None:
    raise app.UsageError(f'--measure={_MEASURE.value} needs --config.')
  print(
      f'{machine.summary(machine.describe())}; each figure the median of '
      f'{_REPEATS.value} interleaved rounds of about {_SECONDS.value} s'
  )
  {'steps': _steps, 'blocks': _blocks, 'matmuls': _matmuls}[_MEASURE.value]()


if __name__ == '__main__':
  app.run(main)

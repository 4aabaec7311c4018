"""What one encoder block costs at batch 1 against its token count.

  python scripts/block_cost.py --config=configs/vit.py:cpu
  python scripts/block_cost.py --config=configs/vit.py:cpu --tokens=65,33,9

Token sparsity (DynamicViT, A-ViT) saves what a block costs per token; what
a block costs whatever its tokens, it cannot save. This times the config's
own encoder blocks (its ViT, all of them in a row, inference weights as
served: models/inference_weights.py) on one image of each --tokens count,
in float32 and bfloat16, all interleaved (vitjax/timing.py), and prints
the time per block with its interquartile range and its share of the
full-token block's.
"""

import os

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file.', lock_config=False
)
_TOKENS = flags.DEFINE_list(
    'tokens',
    ['65', '45', '33', '22', '9'],
    'Token counts (the class token included); the first is the full one.',
)
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Interleaved timing rounds.')
_SECONDS = flags.DEFINE_float('seconds', 0.4, 'Length of one timing.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vitjax import machine, models, timing
  from vitjax.evaluators.classification import Predictor
  from vitjax.models.vit import compute_dtype

  config = _CONFIG.value
  tokens = [int(n) for n in _TOKENS.value]
  candidates = {}
  for dtype in ('float32', 'bfloat16'):
    with config.unlocked():
      config.model.name, config.model.dtype = 'vit', dtype
    model = models.create(config.model, 10)
    image = np.zeros((1, 32, 32, 3), np.uint8)
    params = model.init(jax.random.key(0), image, train=False)['params']
    served = Predictor.of_float_weights(model, params)

    def blocks(mdl, x):
      for block in mdl.blocks:
        x = block(x, deterministic=True)
      return x

    run = jax.jit(
        lambda variables, x, model=model: model.apply(
            variables, x, method=blocks
        )
    )
    for n in tokens:
      # The blocks' input, in the dtype the patch embedding hands them.
      x = np.random.default_rng(n).normal(size=(1, n, model.hidden_dim))
      x = jax.device_put(x.astype(compute_dtype(dtype)))
      candidates[(dtype, n)] = timing.Candidate(
          lambda v=served.variables, x=x, f=run: f(v, x), model.depth
      )
  timings = timing.interleaved(
      {f'{d} {n}': c for (d, n), c in candidates.items()},
      rounds=_REPEATS.value,
      seconds=_SECONDS.value,
  )
  print(machine.summary(machine.describe()))
  print(
      f'{config.model.depth} blocks of width {config.model.hidden_dim} in a'
      ' row, batch 1; microseconds per block, median of'
      f' {_REPEATS.value} interleaved rounds (interquartile range), and'
      f' the share of the {tokens[0]}-token cost (per-round ratios)'
  )
  for dtype in ('float32', 'bfloat16'):
    full = f'{dtype} {tokens[0]}'
    for n in tokens:
      spread = timings.ms_per_item(f'{dtype} {n}')
      # Its share of the full cost, round by round: full's speed over its.
      share = timings.ratio(full, f'{dtype} {n}')
      print(
          f'  {dtype:9} {n:3d} tokens: {1e3 * spread.median:6.1f} us'
          f' ({1e3 * spread.q25:.1f}-{1e3 * spread.q75:.1f}),'
          f' share {share.format()}'
      )


if __name__ == '__main__':
  app.run(main)

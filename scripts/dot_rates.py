"""How fast this machine's XLA runs one matmul in int8, bfloat16 and float32.

  python scripts/dot_rates.py
  python scripts/dot_rates.py --shapes=16640x128x384,4352x384x1536

Each shape MxKxN is [M, K] x [K, N], the sizes of the models' layers at
batch 256 by default (tokens x width x output width): int8 x int8 -> int32
(what the int8 serving path runs), bfloat16 x bfloat16 -> float32 (what
`model.dtype=bfloat16` runs) and float32. The three are timed interleaved
(vitjax/timing.py) and printed in G multiply-adds per second, with
their ratios (medians of per-round ratios): what a quantized layer can gain
over float on this CPU before any quantization cost.
"""

import os

from absl import app, flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_SHAPES = flags.DEFINE_list(
    'shapes',
    [
        # the CPU preset (dim 128, 65 tokens): q/k/v, fc1 (x2 width), fc2
        '16640x128x128',
        '16640x128x256',
        '16640x256x128',
        # the course's model (dim 384, 17 tokens): q/k/v, fc1 (x4), fc2
        '4352x384x384',
        '4352x384x1536',
        '4352x1536x384',
        # batch 1 of each
        '65x128x128',
        '17x384x1536',
    ],
    'MxKxN matmul shapes.',
)
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Interleaved timing rounds.')
_SECONDS = flags.DEFINE_float('seconds', 0.5, 'Length of one timing.')


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  from jax import lax
  import jax.numpy as jnp
  import numpy as np

  from vitjax import machine, timing

  dims = (((1,), (0,)), ((), ()))
  kinds = {
      'int8': (jnp.int8, jnp.int32),
      'bfloat16': (jnp.bfloat16, jnp.float32),
      'float32': (jnp.float32, jnp.float32),
  }
  print(
      f'{machine.summary(machine.describe())}; G multiply-adds/s, the median '
      f'of {_REPEATS.value} interleaved rounds (interquartile range)'
  )
  rng = np.random.default_rng(0)
  for shape in _SHAPES.value:
    m, k, n = (int(d) for d in shape.split('x'))
    candidates = {}
    for name, (dtype, result) in kinds.items():
      lhs = jnp.asarray(rng.integers(-127, 128, (m, k)), dtype)
      rhs = jnp.asarray(rng.integers(-127, 128, (k, n)), dtype)
      dot = jax.jit(
          lambda a, b, r=result: lax.dot_general(
              a, b, dims, preferred_element_type=r
          )
      )
      # items = multiply-adds, so that rate() reads in multiply-adds/s.
      candidates[name] = timing.Candidate(
          lambda d=dot, a=lhs, b=rhs: d(a, b), m * k * n
      )
    t = timing.interleaved(
        candidates, rounds=_REPEATS.value, seconds=_SECONDS.value
    )
    rates = {name: t.rate(name) for name in kinds}
    print(
        f'{shape:>14}: '
        + '  '.join(
            f'{name} {r.median / 1e9:6.1f} ({r.q25 / 1e9:.0f}-{r.q75 / 1e9:.0f})'
            for name, r in rates.items()
        )
    )
    # Per-round ratios, as every speed-up the project prints.
    for name, over in (
        ('int8', 'float32'),
        ('bfloat16', 'float32'),
        ('int8', 'bfloat16'),
    ):
      print(f'{"":>16}{name} over {over}: {t.ratio(name, over).format("x")}')


if __name__ == '__main__':
  app.run(main)

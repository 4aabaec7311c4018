"""Writes tfds `cifar10`, drawn to the course's class profile, as folders.

  python scripts/prepare_data.py --out=./data

For users with internet but without the course's files: the result has the
course's layout (<out>/CIFAR10_imbalanced/CIFAR10_unbalance/<class>/ and
<out>/CIFAR10_balanced/CIFAR10_balance/<class>/, classes named 0..9), with
the course's counts (training 4435 ... 2023, test 487 per class), drawn per
class with a fixed seed. Images are written as PNG, so pixels are exactly
CIFAR-10's (the course's own copy is JPEG). `--config.data.source=tfds`
draws the same images without writing anything.
"""

import os
from pathlib import Path

from absl import app, flags
import numpy as np
from PIL import Image

from configs import common
from vitjax.data import sources

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_OUT = flags.DEFINE_string('out', './data', 'Folder to write the layout to.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the per-class draw.')


def main(argv):
  del argv
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  base = common.base().data
  out = Path(_OUT.value).expanduser()
  plan = (
      (base.train_dir, 'train', base.train_profile),
      (base.test_dir, 'test', (base.test_per_class,) * 10),
  )
  for rel, _, _ in plan:
    if (out / rel).exists() and any((out / rel).iterdir()):
      raise SystemExit(
          f'{out / rel} already holds data; choose an empty '
          '--out or remove it first.'
      )
  for rel, split, counts in plan:
    ds = tfds.load('cifar10', split=split, as_supervised=True)
    parts = list(tfds.as_numpy(ds.batch(10_000)))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    idx = sources.draw_profile(labels, counts, _SEED.value)
    for n, i in enumerate(idx):
      folder = out / rel / str(int(labels[i]))
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(images[i]).save(folder / f'{split}_{i:05d}.png')
    print(f'{split}: wrote {len(idx)} images under {out / rel}')


if __name__ == '__main__':
  app.run(main)

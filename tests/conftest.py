"""Shared test set-up: two fake CPU devices, tiny datasets, tiny configs."""

import os

# Before JAX starts: two CPU devices, so data parallelism is tested for real.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + ' --xla_force_host_platform_device_count=2'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from pathlib import Path  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position

from configs import vit as vit_config  # pylint: disable=wrong-import-position

# Tests run tiny models, so compile time dominates: compile with fewer
# optimisations, and reuse identical programs across tests.
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update(
    'jax_compilation_cache_dir',
    os.path.join(os.environ.get('TMPDIR', '/tmp'), 'vitjax-test-jax-cache'),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

TRAIN_DIR = 'CIFAR10_imbalanced/CIFAR10_unbalance'
TEST_DIR = 'CIFAR10_balanced/CIFAR10_balance'


def synthetic_image(label: int, rng: np.random.Generator) -> np.ndarray:
  """A 32x32 image whose colour and stripes depend on the class."""
  base = np.array(
      [(label * 37) % 256, (label * 91) % 256, (label * 151) % 256], np.float32
  )
  stripes = (np.arange(32)[:, None] + label * np.arange(32)[None, :]) % 8 < 4
  img = base + 60.0 * stripes[..., None] + rng.normal(0, 20, (32, 32, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def make_image_tree(
    root: Path, train_counts, test_counts, seed: int = 0, suffix: str = '.png'
) -> Path:
  """Writes the course's folder layout with synthetic images under root."""
  rng = np.random.default_rng(seed)
  for rel, counts in ((TRAIN_DIR, train_counts), (TEST_DIR, test_counts)):
    for label, n in enumerate(counts):
      d = root / rel / str(label)
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        Image.fromarray(synthetic_image(label, rng)).save(d / f'{i}{suffix}')
  return root


@pytest.fixture(scope='session')
def tiny_data_root(tmp_path_factory) -> Path:
  """10 classes, imbalanced 40..22 training images, 8 test images each."""
  root = tmp_path_factory.mktemp('data')
  return make_image_tree(root, [40 - 2 * c for c in range(10)], [8] * 10)


@pytest.fixture(scope='session')
def course_data_root() -> Path:
  """The course data: $VITJAX_DATA_ROOT (CI sets it), else ./data."""
  env = os.environ.get('VITJAX_DATA_ROOT')
  root = Path(env or 'data')
  if not root.is_dir():
    if env:
      pytest.fail(f'VITJAX_DATA_ROOT={env} is not a folder.')
    pytest.skip('no course data: set VITJAX_DATA_ROOT (see README)')
  return root


@pytest.fixture
def smoke_config(tiny_data_root, tmp_path):
  """configs/vit.py:smoke pointed at the tiny dataset."""
  c = vit_config.get_config('smoke')
  c.data.root = str(tiny_data_root)
  c.data.cache_dir = str(tmp_path / 'cache')
  c.train.batch_size = 16
  c.train.epochs = 2.0
  c.train.eval_every_epochs = 1.0
  c.train.log_every_steps = 5
  c.eval.batch_size = 32
  c.eval.speed_batch = 16
  c.eval.speed_seconds, c.eval.speed_rounds = 0.02, 2
  c.data.val_fraction = 0.2
  c.data.log_sampled_images = 32
  return c


@pytest.fixture(scope='session')
def trained_vit_workdir(tmp_path_factory, tiny_data_root) -> Path:
  """A tiny ViT trained for two epochs on the tiny dataset (shared)."""
  from vitjax import train  # pylint: disable=g-import-not-at-top

  c = vit_config.get_config('smoke')
  c.data.root = str(tiny_data_root)
  c.data.cache_dir = str(tmp_path_factory.mktemp('cache'))
  c.data.val_fraction = 0.2
  c.train.batch_size, c.train.epochs, c.train.eval_every_epochs = 16, 3.0, 1.0
  c.eval.batch_size, c.eval.speed_batch = 32, 16
  c.eval.speed_seconds, c.eval.speed_rounds = 0.02, 2
  workdir = tmp_path_factory.mktemp('vit')
  train.train_and_evaluate(c, str(workdir))
  return workdir

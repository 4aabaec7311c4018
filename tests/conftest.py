"""Shared test set-up: two fake CPU devices, tiny datasets, tiny configs."""

import contextlib
import dataclasses
import functools
import os

# Before JAX starts: two CPU devices, so data parallelism is tested for
# real; each program compiled in one piece, which costs the tests' tiny
# programs less CPU than XLA's parallel code generation does.
_XLA_FLAGS = '--xla_cpu_parallel_codegen_split_count=1'
os.environ['XLA_FLAGS'] = (
    f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAGS}"
    ' --xla_force_host_platform_device_count=2'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from pathlib import Path  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags  # pylint: disable=wrong-import-position
from absl import logging as absl_logging  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
from ml_collections import ConfigDict  # pylint: disable=wrong-import-position

from configs import vit as vit_config  # pylint: disable=wrong-import-position

# Tests run tiny models, so compile time dominates: compile with fewer
# optimisations, and reuse identical programs across tests.
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update(
    'jax_compilation_cache_dir',
    os.path.join(os.environ.get('TMPDIR', '/tmp'), 'vitjax-test-jax-cache'),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


# Every model family, for tests parametrized by it: the sparse ones compile
# for several seconds, so they run with the slow tests (the ViT stays in the
# edit-test loop).
FAMILIES = (
    'vit',
    pytest.param('dynamic_vit', marks=pytest.mark.slow),
    pytest.param('avit', marks=pytest.mark.slow),
)


def subprocess_env(devices: int = 2, **more: str) -> dict[str, str]:
  """The environment of a process a test starts: it compiles as the test
  session does, into its cache, so that each launch compiles little."""
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      JAX_DISABLE_MOST_OPTIMIZATIONS='1',
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      PYTHONPATH=str(Path(__file__).resolve().parent.parent),
      **more,
  )
  env['XLA_FLAGS'] = (
      f'{_XLA_FLAGS} --xla_force_host_platform_device_count={devices}'
  )
  return env


@contextlib.contextmanager
def global_flags(argv: list[str]):
  """absl's global flags parsed from argv, for a command run in this
  process; afterwards unparsed, and absl's logger at the level it had
  (setting the flags sets it from --verbosity, which would hide the INFO
  lines that later tests read)."""
  absl_logger = absl_logging.get_absl_logger()
  level = absl_logger.level
  try:
    yield flags.FLAGS(argv)
  finally:
    flags.FLAGS.unparse_flags()
    absl_logger.setLevel(level)


def jit_apply(module, variables, *args, **kwargs):
  """module.apply, jitted: compiling a tiny model once costs less than
  running its ops one by one (flax's eager init and apply of a 4-block
  DynamicViT took 11 and 8 s here). The same module and options reuse
  their compiled program."""
  try:
    apply = _jitted(module.apply, tuple(sorted(kwargs.items())))
  except TypeError:  # an option that is not hashable (rngs, mutable)
    apply = jax.jit(functools.partial(module.apply, **kwargs))
  return apply(variables, *args)


@functools.cache
def _jitted(apply, options):
  return jax.jit(functools.partial(apply, **dict(options)))


def jit_init(module, rngs, *args, **kwargs):
  """module.init, jitted (see jit_apply)."""
  return jax.jit(functools.partial(module.init, **kwargs))(rngs, *args)


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


def smoke(data_root: Path, cache_dir: Path) -> ConfigDict:
  """configs/vit.py:smoke on a tiny dataset: 248 training images, 16 steps
  an epoch at batch 16, 2 epochs (31 steps), validated every epoch."""
  c = vit_config.get_config('smoke')
  c.data.root = str(data_root)
  c.data.cache_dir = str(cache_dir)
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


def smoke_trainer(config: ConfigDict, devices=None):
  """The trainer of `config` (10 steps an epoch) on a mesh of `devices`
  (all by default), and its data's first 16 training images as a batch on
  that mesh."""
  # pylint: disable=g-import-not-at-top
  from vitjax import families, parallel, trainer
  from vitjax.data import sources

  data = sources.load(config.data, 0)
  mesh = parallel.make_mesh(devices)
  family = families.build(config, data, 10, mesh, None)
  train = trainer.build(config, family, 10, mesh, jax.random.key(1))
  batch = parallel.host_batch_to_global(
      {'image': data.train.images[:16], 'label': data.train.labels[:16]},
      parallel.batch_sharding(mesh),
  )
  return train, batch


@pytest.fixture
def smoke_config(tiny_data_root, tmp_path) -> ConfigDict:
  return smoke(tiny_data_root, tmp_path / 'cache')


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  config: ConfigDict  # what trained it: copy it before changing a field
  workdir: Path


@pytest.fixture(scope='session')
def trained_vit(tmp_path_factory, tiny_data_root) -> TrainedRun:
  """The smoke ViT trained once per test process (no final evaluation),
  for the tests that only read its workdir or are refused by it."""
  from vitjax import train  # pylint: disable=g-import-not-at-top

  c = smoke(tiny_data_root, tmp_path_factory.mktemp('cache'))
  workdir = tmp_path_factory.mktemp('vit')
  c.train.final_evaluation = False
  train.train_and_evaluate(c, str(workdir))
  return TrainedRun(c, workdir)


@pytest.fixture(scope='session')
def trained_vit_workdir(trained_vit) -> Path:
  return trained_vit.workdir

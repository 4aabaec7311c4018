"""Loading the course folders and tfds, the split, and bad-input errors."""

import os
import shutil

import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')  # absent on the GPU image

from configs import common
from tests.conftest import TEST_DIR, TRAIN_DIR, make_image_tree
from vitjax.data import sources


def _cfg(root, cache):
  c = common.base().data
  c.root, c.cache_dir = str(root), str(cache)
  return c


def test_folder_layout_loads_with_labels_and_split(tiny_data_root, tmp_path):
  d = sources.load(_cfg(tiny_data_root, tmp_path), seed=0)
  assert d.class_names == sources.CIFAR10_NAMES
  n_train = sum(40 - 2 * c for c in range(10))
  assert len(d.train) + len(d.val) == n_train
  assert len(d.val) == round(0.1 * n_train)
  assert list(d.test.counts(10)) == [8] * 10
  assert d.train.images.shape[1:] == (32, 32, 3)
  assert d.train.images.dtype == np.uint8
  # Labels follow the folders: a pixel statistic that depends on the class
  # (the synthetic base colour) is constant within a class.
  for c in range(10):
    red = d.test.images[d.test.labels == c][..., 0].astype(float).mean()
    assert abs(red - ((c * 37) % 256 + 30)) < 25


def test_cache_is_reused_and_keyed_by_files(
    tiny_data_root, tmp_path, monkeypatch
):
  tree = tmp_path / 'data'
  shutil.copytree(tiny_data_root, tree)
  cfg = _cfg(tree, tmp_path / 'cache')
  first = sources.load(cfg, seed=0)
  cached = list((tmp_path / 'cache').glob('images-*.npy'))
  assert len(cached) == 2  # train and test folders

  def no_decoding(path):
    raise AssertionError(f'{path} was decoded again')

  monkeypatch.setattr(sources, '_decode', no_decoding)
  again = sources.load(cfg, seed=0)  # from the cache alone
  np.testing.assert_array_equal(first.train.images, again.train.images)
  # A file that changes (its time here) changes the key: decoded anew.
  image = next((tree / TRAIN_DIR / '3').iterdir())
  os.utime(image, ns=(0, 0))
  with pytest.raises(AssertionError, match='decoded again'):
    sources.load(cfg, seed=0)


def test_course_split_sizes():
  labels = np.repeat(np.arange(10), common.COURSE_TRAIN_PROFILE)
  train, val = sources.stratified_split(labels, 0.1, seed=0)
  assert (len(train), len(val)) == (32022, 3558)
  assert not set(train) & set(val)
  per_class = np.bincount(labels[val], minlength=10)
  np.testing.assert_allclose(
      per_class, np.array(common.COURSE_TRAIN_PROFILE) * 0.1, atol=1
  )


@pytest.mark.slow  # decodes the 40,450 images once per cache
def test_real_course_data(course_data_root, tmp_path):
  d = sources.load(_cfg(course_data_root, tmp_path), seed=0)
  assert (len(d.train), len(d.val), len(d.test)) == (32022, 3558, 4870)
  counts = d.train.counts(10) + d.val.counts(10)
  assert tuple(counts) == common.COURSE_TRAIN_PROFILE


def test_numeric_class_folders_sort_numerically(tmp_path):
  root = make_image_tree(tmp_path / 'd', [2] * 12, [1] * 12)
  d = sources.load(_cfg(root, tmp_path / 'c'), seed=0)
  assert d.class_names == tuple(str(i) for i in range(12))


def test_tfds_source_draws_the_profile(tmp_path):
  cfg = _cfg(tmp_path, tmp_path)
  cfg.source = 'tfds'
  cfg.train_profile = (30, 25, 20, 15, 10, 10, 10, 10, 10, 5)
  cfg.test_per_class = 5
  with tfds.testing.mock_data(num_examples=600):
    d = sources.load(cfg, seed=0)
    other_seed = sources.load(cfg, seed=1)
  assert tuple(d.train.counts(10) + d.val.counts(10)) == cfg.train_profile
  assert list(d.test.counts(10)) == [5] * 10
  assert d.class_names[0] == 'airplane'
  # Every seed is scored on the same test images.
  np.testing.assert_array_equal(other_seed.test.images, d.test.images)
  np.testing.assert_array_equal(other_seed.test.labels, d.test.labels)


@pytest.mark.parametrize(
    'case, message',
    [
        ('missing_root', 'is not a folder'),
        (
            'misnamed_split',
            "has no folder 'CIFAR10_unbalance'.*Did you mean 'CIFAR10_unbalanced'",
        ),
        ('empty_class', 'has no images'),
        ('stray_file', 'holds files beside its class folders'),
        ('bad_image', 'does not decode'),
        ('wrong_size', 'must be 32x32'),
        ('class_mismatch', 'are not those of'),
        ('non_image', 'not images'),
    ],
)
def test_bad_input_gets_one_clear_error(tmp_path, case, message):
  root = make_image_tree(tmp_path / 'd', [3] * 3, [2] * 3)
  train = root / TRAIN_DIR
  if case == 'missing_root':
    shutil.rmtree(root)
  elif case == 'misnamed_split':
    train.rename(train.parent / 'CIFAR10_unbalanced')
  elif case == 'empty_class':
    for f in (train / '1').iterdir():
      f.unlink()
  elif case == 'stray_file':
    (train / 'notes.txt').write_text('x')
  elif case == 'bad_image':
    (train / '2' / 'broken.jpg').write_bytes(b'not a jpeg')
  elif case == 'wrong_size':
    from PIL import Image  # pylint: disable=g-import-not-at-top

    Image.new('RGB', (64, 48)).save(train / '0' / 'big.png')
  elif case == 'class_mismatch':
    (root / TEST_DIR / '2').rename(root / TEST_DIR / '7')
  elif case == 'non_image':
    (train / '0' / 'labels.csv').write_text('a,b')
  with pytest.raises(sources.DataError, match=message) as err:
    sources.load(_cfg(root, tmp_path / 'c'), seed=0)
  if case in ('bad_image', 'wrong_size', 'empty_class', 'non_image'):
    assert str(train) in str(err.value)  # the message names the path

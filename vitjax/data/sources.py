"""Where the images come from: the course's folders or tfds `cifar10`.

Both sources end as decoded uint8 arrays in memory (CIFAR is 110 MB), split
into train / validation (a stratified, seeded share of the training folders)
/ test. Folders are decoded once with Pillow, which needs no TensorFlow, and
cached as .npy files keyed by the folders' file list, sizes and times.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import hashlib
import os
from pathlib import Path
from typing import Any

from absl import logging
import numpy as np
from PIL import Image, UnidentifiedImageError

from vitjax import errors

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
IMAGE_SHAPE = (32, 32, 3)  # CIFAR: every image, every model input


class DataError(errors.UserError):
  """Bad or missing input data; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 [n, height, width, 3]
  labels: np.ndarray  # int32 [n]

  def __len__(self) -> int:
    return len(self.labels)

  def counts(self, num_classes: int) -> np.ndarray:
    return np.bincount(self.labels, minlength=num_classes)


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Split
  val: Split
  test: Split
  class_names: tuple[str, ...]
  # What makes the train / validation split: its settings and fingerprints
  # of each side's images (file names, or tfds indices).
  split_id: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def log_counts(self) -> None:
    for name in ('train', 'val', 'test'):
      split = getattr(self, name)
      counts = split.counts(self.num_classes).tolist()
      logging.info(
          '%s: %d images; per class %s',
          name,
          len(split),
          dict(zip(self.class_names, counts)),
      )


def load(data_config, seed: int) -> Dataset:
  """Loads the configured source and splits off validation."""
  if data_config.source == 'folder':
    train, train_ids, test, names = _load_folders(data_config)
  elif data_config.source == 'tfds':
    train, train_ids, test, names = _load_tfds(data_config, seed)
  else:
    raise DataError(
        f"data.source={data_config.source!r}: expected 'folder' or 'tfds'."
    )
  train_idx, val_idx = stratified_split(
      train.labels, data_config.val_fraction, seed
  )
  take = lambda s, i: Split(s.images[i], s.labels[i])
  fingerprint = lambda i: hashlib.sha1(
      '\n'.join(sorted(train_ids[j] for j in i)).encode()
  ).hexdigest()[:16]
  split_id = {
      'source': data_config.source,
      'seed': seed,
      'val_fraction': data_config.val_fraction,
      'train_images': fingerprint(train_idx),
      'val_images': fingerprint(val_idx),
  }
  return Dataset(
      take(train, train_idx), take(train, val_idx), test, names, split_id
  )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Seeded per-class split; the held-out total is round(fraction * n).

  Per-class shares are rounded by largest remainder, so the course's 35,580
  images give exactly 32,022 / 3,558.
  """
  if not 0.0 <= fraction < 1.0:
    raise DataError(f'data.val_fraction={fraction}: expected 0 <= f < 1.')
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * fraction
  take = np.floor(exact).astype(int)
  short = int(round(fraction * len(labels))) - take.sum()
  take[np.argsort(-(exact - take), kind='stable')[:short]] += 1
  rng = np.random.default_rng(seed)
  train, val = [], []
  for c, k in zip(classes, take):
    idx = rng.permutation(np.flatnonzero(labels == c))
    val.append(idx[:k])
    train.append(idx[k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def draw_profile(labels: np.ndarray, counts, seed: int) -> np.ndarray:
  """Indices drawing `counts[c]` examples of each class c, seeded."""
  rng = np.random.default_rng(seed)
  out = []
  for c, k in enumerate(counts):
    pool = np.flatnonzero(labels == c)
    if len(pool) < k:
      raise DataError(
          f'class {c} has {len(pool)} images in the source, fewer '
          f'than the {k} the profile asks for.'
      )
    out.append(np.sort(rng.choice(pool, size=k, replace=False)))
  return np.concatenate(out)


# --- tfds ----------------------------------------------------------------

CIFAR10_NAMES = (
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
)


def _load_tfds(
    cfg, seed: int
) -> tuple[Split, list[str], Split, tuple[str, ...]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  out = []
  for split, counts in (
      ('train', cfg.train_profile),
      ('test', (cfg.test_per_class,) * 10),
  ):
    # Batches of 10k and a concatenate: batch_size=-1 aborts under mocking.
    ds = tfds.load('cifar10', split=split, as_supervised=True)
    parts = list(tfds.as_numpy(ds.batch(10_000)))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # The test subset is one for every run (seed 0): seeds are compared on
    # the same test images. The imbalanced training draw follows the seed.
    idx = draw_profile(labels, counts, seed if split == 'train' else 0)
    out.append(
        Split(images[idx].astype(np.uint8), labels[idx].astype(np.int32))
    )
    if split == 'train':
      train_ids = [f'cifar10/train/{i}' for i in idx]
  return out[0], train_ids, out[1], CIFAR10_NAMES


# --- course folders ------------------------------------------------------


def _load_folders(cfg) -> tuple[Split, list[str], Split, tuple[str, ...]]:
  root = Path(cfg.root).expanduser()
  if not root.is_dir():
    raise DataError(
        f'data.root={str(root)!r} is not a folder. Put the course data there '
        f'({cfg.train_dir}/<class>/ and {cfg.test_dir}/<class>/), point '
        '--config.data.root at it, or build it from tfds with '
        '`python scripts/prepare_data.py --out=<root>` (or use '
        '--config.data.source=tfds).'
    )
  train_dir, test_dir = (
      _split_dir(root, d) for d in (cfg.train_dir, cfg.test_dir)
  )
  train_files = _class_files(train_dir)
  names = tuple(train_files)
  test_files = _class_files(test_dir)
  if set(test_files) != set(names):
    raise DataError(
        f'the class folders of {test_dir} ({sorted(test_files)}) are not '
        f'those of {train_dir} ({sorted(names)}). Both splits need the same '
        'class folders.'
    )
  cache = Path(cfg.cache_dir).expanduser()
  train = _decode_cached(train_files, names, cache)
  test = _decode_cached(test_files, names, cache)
  train_ids = [f'{n}/{p.name}' for n in names for p in train_files[n]]
  # The course names its folders by CIFAR-10 class index (data README).
  if names == tuple(str(i) for i in range(10)):
    names = CIFAR10_NAMES
  return train, train_ids, test, names


def _split_dir(root: Path, rel: str) -> Path:
  path = root / rel
  if path.is_dir():
    return path
  # Name the nearest folder that does exist, to catch a typo or a case slip.
  parent = root
  for part in Path(rel).parts:
    if not (parent / part).is_dir():
      siblings = sorted(p.name for p in parent.iterdir() if p.is_dir())
      close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.5)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise DataError(
          f'{str(path)!r} is missing: {str(parent)!r} has no folder {part!r} '
          f'(it has {siblings}).{hint} Fix the folder name or set '
          '--config.data.train_dir / --config.data.test_dir.'
      )
    parent = parent / part
  raise AssertionError('unreachable')


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
  """{class name: sorted image files}, classes in label order."""
  files, strays = {}, []
  for entry in sorted(split_dir.iterdir()):
    if entry.name.startswith('.'):
      continue
    if not entry.is_dir():
      strays.append(entry.name)
      continue
    images, others = [], []
    for f in sorted(entry.iterdir()):
      if f.name.startswith('.'):
        continue
      (
          images
          if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
          else others
      ).append(f)
    if others:
      raise DataError(
          f'{str(entry)!r} holds entries that are not images: '
          f'{[o.name for o in others[:5]]}. A class folder may hold only '
          f'image files ({", ".join(IMAGE_SUFFIXES)}); move the rest out.'
      )
    if not images:
      raise DataError(
          f'class folder {str(entry)!r} has no images. Remove it '
          'or fill it; every class needs examples.'
      )
    files[entry.name] = images
  if strays:
    raise DataError(
        f'{str(split_dir)!r} holds files beside its class folders: '
        f'{strays[:5]}. It must hold one folder per class; move them out.'
    )
  if len(files) < 2:
    raise DataError(
        f'{str(split_dir)!r} has {len(files)} class folder(s); a '
        'classifier needs one folder per class, at least two.'
    )
  # Folder names are labels: numeric names sort numerically (so '10' follows
  # '9'), any other names sort as text.
  names = list(files)
  if all(n.isdigit() for n in names):
    names.sort(key=int)
  return {n: files[n] for n in names}


def _decode_cached(
    files: dict[str, list[Path]], names: tuple[str, ...], cache_dir: Path
) -> Split:
  paths = [p for n in names for p in files[n]]
  labels = np.concatenate(
      [np.full(len(files[n]), i, np.int32) for i, n in enumerate(names)]
  )
  key = hashlib.sha1()
  for p in paths:
    st = p.stat()
    key.update(f'{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n'.encode())
  cached = cache_dir / f'images-{key.hexdigest()[:20]}.npy'
  if cached.exists():
    images = np.load(cached)
    if len(images) == len(paths):
      return Split(images, labels)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    images = np.stack(list(pool.map(_decode, paths, chunksize=256)))
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f'.tmp{os.getpid()}.npy')
    np.save(tmp, images)
    os.replace(tmp, cached)  # atomic: readers never see half a file
  except OSError:
    pass  # a read-only cache only costs the decode next time
  return Split(images, labels)


def _decode(path: Path) -> np.ndarray:
  try:
    with Image.open(path) as im:
      im.load()
      arr = np.asarray(im.convert('RGB'))
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(
        f'{str(path)!r} does not decode as an image ({e}). '
        'Replace or delete the file.'
    ) from None
  if arr.shape != IMAGE_SHAPE:
    raise DataError(
        f'{str(path)!r} is {arr.shape[1]}x{arr.shape[0]} pixels; '
        'every image must be 32x32 (CIFAR). Resize or remove it.'
    )
  return arr

"""Datasets: metadata in one place, and loaders returning uint8 NHWC numpy arrays.

Backends:
  * 'files': IDX .gz files (MNIST / Fashion-MNIST; found automatically where
    Debian's `dataset-fashion-mnist` puts them, and for Fashion-MNIST's test
    split in the copy shipped inside the package, cmi_jax/datasets/) and the
    CIFAR-10/100 python pickle batches from a folder;
  * 'tfds': tensorflow-datasets (optional `[tfds]` extra), never downloading:
    with download off it fails in well under a second when data are absent.

Missing data raise `DataNotFoundError` at once, naming the paths tried and the
command or config field that fixes it.
"""

import dataclasses
import gzip
import os
import pickle
import struct
import zlib
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from cmi_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Shape, classes, normalization and standard augmentation of a dataset."""
  name: str
  image_shape: Tuple[int, int, int]   # H, W, C
  num_classes: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  crop_padding: int                   # standard train augmentation: crop with padding
  flip: bool                          # ... and horizontal flip
  default_dirs: Tuple[str, ...] = ()
  install_hint: str = ''
  tfds_name: str = ''
  shipped_splits: Tuple[str, ...] = ()  # splits in SHIPPED_DIR/<name>, tried after default_dirs


# Data shipped inside the package (package_data), so a non-editable install has it too.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'datasets')


DATASETS: Dict[str, DatasetInfo] = {
    'fashion_mnist': DatasetInfo(
        'fashion_mnist', (28, 28, 1), 10, (0.2860,), (0.3530,), 2, True,
        default_dirs=('/usr/share/datasets/fashion-mnist',),
        install_hint='apt-get update && apt-get install -y dataset-fashion-mnist',
        tfds_name='fashion_mnist', shipped_splits=('test',)),
    'mnist': DatasetInfo(
        'mnist', (28, 28, 1), 10, (0.1307,), (0.3081,), 2, False,
        default_dirs=('/usr/share/datasets/mnist',), tfds_name='mnist'),
    'cifar10': DatasetInfo(
        'cifar10', (32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 4, True,
        install_hint='download the python version of CIFAR-10 and point data.dir at it',
        tfds_name='cifar10'),
    # CIFAR-100 statistics as the benchmark's registry has them (the teachers were trained with these).
    'cifar100': DatasetInfo(
        'cifar100', (32, 32, 3), 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 4, True,
        install_hint='download the python version of CIFAR-100 and point data.dir at it',
        tfds_name='cifar100'),
}

SPLITS = ('train', 'test')


class DataNotFoundError(UserError, FileNotFoundError):
  """Data files are absent or unreadable; the message says how to fix it."""


class DataCorruptError(DataNotFoundError):
  """A data file exists but is damaged (truncated, wrong size or format). `load`
  raises it at once rather than trying the next folder, and the runner stops on
  it rather than switching evaluation off: a damaged file must be replaced."""


_REPLACE = ('Replace the file with an intact copy (download it again or reinstall the '
            'package), or point data.dir at another folder.')


class Split(NamedTuple):
  images: np.ndarray  # [N, H, W, C] uint8
  labels: np.ndarray  # [N] int32


def get_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {sorted(DATASETS)} '
                     '(config field data.name).')
  return DATASETS[name]


# ---------------------------------------------------------------- IDX (MNIST-like)

_IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def read_idx(path: str) -> np.ndarray:
  """Decodes one IDX file (optionally gzipped): magic, dims, big-endian data."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataCorruptError(f'Cannot read IDX file {path} ({e}); it is truncated or damaged. '
                           f'{_REPLACE}') from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DataCorruptError(f'{path} is not an IDX file (bad magic {raw[:4]!r}). {_REPLACE}')
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  ndim = raw[3]
  body = len(raw) - 4 - 4 * ndim
  if body < 0 or body % dtype.itemsize:
    raise DataCorruptError(f'{path}: {len(raw)} bytes do not fit the IDX header ({ndim} dims of '
                           f'{dtype}); the file is truncated. {_REPLACE}')
  dims = struct.unpack('>' + 'I' * ndim, raw[4:4 + 4 * ndim])
  data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise DataCorruptError(f'{path}: header says {dims} ({int(np.prod(dims))} values) '
                           f'but holds {data.size}; the file is truncated. {_REPLACE}')
  return data.reshape(dims).astype(dtype.newbyteorder('='))


def _find(directory: str, stem: str) -> Optional[str]:
  for cand in (stem + '.gz', stem, stem.replace('-idx', '.idx') + '.gz'):
    p = os.path.join(directory, cand)
    if os.path.exists(p):
      return p
  return None


def load_idx(directory: str, split: str) -> Split:
  """Loads an MNIST-format split from `directory` (train-*/t10k-* IDX files)."""
  img_stem, lbl_stem = _IDX_FILES[split]
  img_path, lbl_path = _find(directory, img_stem), _find(directory, lbl_stem)
  if img_path is None or lbl_path is None:
    missing = img_stem if img_path is None else lbl_stem
    raise DataNotFoundError(f'No {missing}[.gz] in {directory}.')
  images = read_idx(img_path)
  labels = read_idx(lbl_path).astype(np.int32)
  if images.ndim != 3 or labels.shape != (images.shape[0],):
    raise DataCorruptError(f'{img_path} / {lbl_path}: images {images.shape} and labels '
                           f'{labels.shape} do not pair up. {_REPLACE}')
  return Split(images[..., None].astype(np.uint8), labels)


# ---------------------------------------------------------------- CIFAR pickles

def _unpickle(path: str) -> dict:
  try:
    with open(path, 'rb') as f:
      return pickle.load(f, encoding='latin1')
  except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError,
          AttributeError, ImportError, MemoryError) as e:  # a damaged pickle fails in many ways
    raise DataCorruptError(f'Cannot read CIFAR batch {path} ({type(e).__name__}: {e}); it is '
                           f'truncated or damaged. {_REPLACE}') from e


def _cifar_root(directory: str, num_classes: int) -> str:
  sub = 'cifar-10-batches-py' if num_classes == 10 else 'cifar-100-python'
  nested = os.path.join(directory, sub)
  return nested if os.path.isdir(nested) else directory


def load_cifar(directory: str, split: str, num_classes: int) -> Split:
  """CIFAR-10 (data_batch_1..5 / test_batch) or CIFAR-100 (train / test) pickles.

  `directory` may be the batches folder itself or its parent.
  """
  root = _cifar_root(directory, num_classes)
  if num_classes == 10:
    names = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
    key = 'labels'
  else:
    names, key = [split], 'fine_labels'
  paths = [os.path.join(root, n) for n in names]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise DataNotFoundError(f'Missing CIFAR-{num_classes} file(s): {", ".join(missing)}.')
  images, labels = [], []
  for p in paths:
    d = _unpickle(p)
    if not isinstance(d, dict) or 'data' not in d or key not in d:
      raise DataCorruptError(f'{p} lacks the "data"/"{key}" entries of a CIFAR-{num_classes} '
                             'batch (wrong dataset for this config? data.name selects it).')
    raw = np.asarray(d['data'], np.uint8)
    if raw.size % 3072:
      raise DataCorruptError(f'{p}: "data" holds {raw.size} bytes, not a whole number of '
                             f'32x32x3 images (3072 bytes each); the file is damaged or not '
                             f'CIFAR. {_REPLACE}')
    imgs = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    lbls = np.asarray(d[key], np.int32)
    if len(imgs) != len(lbls):
      raise DataCorruptError(f'{p} holds {len(imgs)} images but {len(lbls)} labels; the file '
                             f'is damaged. {_REPLACE}')
    if len(lbls) and (lbls.min() < 0 or lbls.max() >= num_classes):
      raise DataCorruptError(f'{p}: labels span {lbls.min()}..{lbls.max()}, outside the '
                             f'{num_classes} classes of CIFAR-{num_classes} (data.name).')
    images.append(imgs)
    labels.append(lbls)
  return Split(np.concatenate(images), np.concatenate(labels))


# ---------------------------------------------------------------- tfds

def load_tfds(info: DatasetInfo, split: str, data_dir: Optional[str]) -> Split:
  """tensorflow-datasets backend; never downloads (download=False)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataNotFoundError(
        'data.backend="tfds" needs tensorflow-datasets: pip install -e ".[tfds]" '
        '(or use data.backend="files").') from e
  try:
    # Batched iteration, not batch_size=-1: that asks tf.data for one batch of
    # the split's recorded size, which aborts the process when the size is
    # unknown (tfds.testing.mock_data without metadata).
    ds = tfds.load(info.tfds_name, split=split, data_dir=data_dir, download=False,
                   as_supervised=True)
    batches = list(tfds.as_numpy(ds.batch(10_000)))
  except Exception as e:  # tfds raises assorted errors when data are absent
    raise DataNotFoundError(
        f'tfds could not load {info.tfds_name!r} split {split!r} from data_dir={data_dir!r} '
        f'without downloading ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). '
        'Prepare it once where you have internet (tfds.builder(name).download_and_prepare()) '
        'and set data.dir to that folder, or use data.backend="files".') from e
  if not batches:
    raise DataNotFoundError(f'tfds split {split!r} of {info.tfds_name!r} in data_dir={data_dir!r} '
                            'is empty.')
  images = np.concatenate([np.asarray(b[0], np.uint8) for b in batches])
  labels = np.concatenate([np.asarray(b[1]) for b in batches])
  if images.ndim == 3:
    images = images[..., None]
  return Split(images, np.asarray(labels, np.int32))


# ---------------------------------------------------------------- entry point

def load(name: str, split: str, data_dir: Optional[str] = None,
         backend: str = 'files') -> Split:
  """Loads split 'train' or 'test' of dataset `name` as uint8 NHWC + int32 labels.

  Args:
    name: a key of DATASETS.
    split: 'train' or 'test'.
    data_dir: folder holding the files (config field data.dir); None tries the
      dataset's default folders (Debian's package location for Fashion-MNIST),
      then the copy shipped in the package (Fashion-MNIST's test split).
    backend: 'files' or 'tfds'.
  """
  info = get_info(name)
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
  if backend == 'tfds':
    out = load_tfds(info, split, data_dir)
  elif backend == 'files':
    dirs = (data_dir,) if data_dir else info.default_dirs + shipped_dirs(info, split)
    if not dirs:
      raise DataNotFoundError(
          f'No folder given for {name}: set data.dir (e.g. --config.data.dir=/path/to/{name}) '
          f'to the folder with its files; {info.install_hint}.')
    errors = []
    out = None
    for d in dirs:
      if not os.path.isdir(d):
        errors.append(f'{d} (no such folder)')
        continue
      try:
        out = (load_idx(d, split) if name in ('mnist', 'fashion_mnist')
               else load_cifar(d, split, info.num_classes))
        break
      except DataCorruptError:
        raise  # a damaged file is not "absent": say so instead of trying the next folder
      except DataNotFoundError as e:
        errors.append(str(e))
    if out is None:
      fix = 'Set --config.data.dir (data.dir) to the folder holding the files'
      if info.install_hint and not data_dir:
        fix = f'Install it ({info.install_hint}) or s{fix[1:]}'
      raise DataNotFoundError(f'{name} {split} split not found. Tried: {"; ".join(errors)}. '
                              f'{fix}.')
  else:
    raise ValueError(f'data.backend must be "files" or "tfds", got {backend!r}.')
  if out.images.shape[1:] != info.image_shape:
    raise DataCorruptError(f'{name} {split}: images have shape {out.images.shape[1:]}, '
                           f'expected {info.image_shape}: these files hold another dataset; '
                           f'point data.dir at {name} files or set data.name to their dataset.')
  if len(out.labels) and (out.labels.min() < 0 or out.labels.max() >= info.num_classes):
    raise DataCorruptError(f'{name} {split}: labels span {out.labels.min()}..{out.labels.max()}, '
                           f'outside its {info.num_classes} classes: these files hold another '
                           f'dataset or are damaged. {_REPLACE}')
  return out


def shipped_dirs(info: DatasetInfo, split: str) -> Tuple[str, ...]:
  """The package's own copy of `split` of dataset `info` (a 1-tuple), or ()."""
  return (os.path.join(SHIPPED_DIR, info.name),) if split in info.shipped_splits else ()


def batch_indices(rng: np.random.Generator, n: int, batch_size: int,
                  shuffle: bool = True, drop_last: bool = True) -> Iterator[np.ndarray]:
  """Index arrays for one pass over n examples."""
  order = rng.permutation(n) if shuffle else np.arange(n)
  stop = n - n % batch_size if drop_last else n
  for i in range(0, stop, batch_size):
    yield order[i:i + batch_size]

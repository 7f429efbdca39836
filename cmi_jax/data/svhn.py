"""SVHN cropped digits: train_32x32.mat / test_32x32.mat (MATLAB v5), as
torchvision's SVHN reads them (TV:datasets/svhn.py:36-49, scipy.io.loadmat)."""

import os

import numpy as np

from cmi_jax.data.base import REPLACE, DataCorruptError, DataNotFoundError, DatasetInfo, Split

FILES = {'train': 'train_32x32.mat', 'test': 'test_32x32.mat'}


def read_mat(path: str) -> dict:
  """The arrays X and y of a MATLAB v5 file (scipy.io.loadmat)."""
  import scipy.io  # pylint: disable=g-import-not-at-top  (jax itself requires scipy)
  try:
    return scipy.io.loadmat(path, variable_names=('X', 'y'))
  except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError, MemoryError,
          scipy.io.matlab.MatReadError) as e:  # a damaged .mat fails in many ways
    raise DataCorruptError(f'Cannot read SVHN file {path} ({type(e).__name__}: {e}); it is '
                           f'truncated or not a MATLAB v5 file. {REPLACE}') from e


def load_svhn(directory: str, split: str) -> Split:
  """X [32, 32, 3, N] uint8 -> [N, 32, 32, 3]; y [N, 1] with 10 meaning the digit 0."""
  path = os.path.join(directory, FILES[split])
  if not os.path.isfile(path):
    raise DataNotFoundError(f'No {FILES[split]} in {directory}.')
  d = read_mat(path)
  if 'X' not in d or 'y' not in d:
    raise DataCorruptError(f'{path} lacks the arrays X and y of an SVHN file (has '
                           f'{sorted(k for k in d if not k.startswith("__"))}). {REPLACE}')
  x, y = np.asarray(d['X']), np.asarray(d['y'])
  if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
    raise DataCorruptError(f'{path}: X is {x.shape} and y {y.shape}, expected [32, 32, 3, N] '
                           f'and [N, 1]. {REPLACE}')
  labels = y.reshape(-1).astype(np.int64)
  if len(labels) and (labels.min() < 1 or labels.max() > 10):
    raise DataCorruptError(f'{path}: labels span {labels.min()}..{labels.max()}, outside '
                           f'SVHN\'s 1..10. {REPLACE}')
  images = np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)), dtype=np.uint8)
  return Split(images, (labels % 10).astype(np.int32))


def load_split(directory: str, split: str, info: DatasetInfo, limit: int = 0) -> Split:
  """The 'svhn' layout: the two .mat files in data.dir."""
  del info, limit  # one layout, read whole
  return load_svhn(directory, split)

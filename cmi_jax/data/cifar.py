"""CIFAR-10/100 python pickle batches (the 'python version' archives)."""

import os
import pickle

import numpy as np

from cmi_jax.data.base import REPLACE, DataCorruptError, DataNotFoundError, DatasetInfo, Split


def _unpickle(path: str) -> dict:
  try:
    with open(path, 'rb') as f:
      return pickle.load(f, encoding='latin1')
  except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError,
          AttributeError, ImportError, MemoryError) as e:  # a damaged pickle fails in many ways
    raise DataCorruptError(f'Cannot read CIFAR batch {path} ({type(e).__name__}: {e}); it is '
                           f'truncated or damaged. {REPLACE}') from e


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
                             f'CIFAR. {REPLACE}')
    imgs = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    lbls = np.asarray(d[key], np.int32)
    if len(imgs) != len(lbls):
      raise DataCorruptError(f'{p} holds {len(imgs)} images but {len(lbls)} labels; the file '
                             f'is damaged. {REPLACE}')
    if len(lbls) and (lbls.min() < 0 or lbls.max() >= num_classes):
      raise DataCorruptError(f'{p}: labels span {lbls.min()}..{lbls.max()}, outside the '
                             f'{num_classes} classes of CIFAR-{num_classes} (data.name).')
    images.append(imgs)
    labels.append(lbls)
  return Split(np.concatenate(images), np.concatenate(labels))


def load_split(directory: str, split: str, info: DatasetInfo, limit: int = 0) -> Split:
  """The 'cifar' layout (CIFAR-10 or -100 by the dataset's class count)."""
  del limit  # the batches are read whole
  return load_cifar(directory, split, 100 if info.name == 'cifar100' else 10)

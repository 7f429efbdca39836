"""IDX files (MNIST, Fashion-MNIST): magic, dims, big-endian data, optionally gzipped."""

import gzip
import os
import struct
import zlib
from typing import Optional, Sequence

import numpy as np

from cmi_jax.data.base import REPLACE, DataCorruptError, DataNotFoundError, DatasetInfo, Split

FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
           0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}
# Where torchvision's MNIST / FashionMNIST keep the files under their root
# (TV:datasets/mnist.py raw_folder = <root>/<class name>/raw).
NESTED = {'mnist': os.path.join('MNIST', 'raw'), 'fashion_mnist': os.path.join('FashionMNIST', 'raw')}


def read_idx(path: str) -> np.ndarray:
  """Decodes one IDX file (optionally gzipped): magic, dims, big-endian data."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataCorruptError(f'Cannot read IDX file {path} ({e}); it is truncated or damaged. '
                           f'{REPLACE}') from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise DataCorruptError(f'{path} is not an IDX file (bad magic {raw[:4]!r}). {REPLACE}')
  dtype = np.dtype(_DTYPES[raw[2]])
  ndim = raw[3]
  body = len(raw) - 4 - 4 * ndim
  if body < 0 or body % dtype.itemsize:
    raise DataCorruptError(f'{path}: {len(raw)} bytes do not fit the IDX header ({ndim} dims of '
                           f'{dtype}); the file is truncated. {REPLACE}')
  dims = struct.unpack('>' + 'I' * ndim, raw[4:4 + 4 * ndim])
  data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise DataCorruptError(f'{path}: header says {dims} ({int(np.prod(dims))} values) '
                           f'but holds {data.size}; the file is truncated. {REPLACE}')
  return data.reshape(dims).astype(dtype.newbyteorder('='))


def _find(directory: str, stem: str) -> Optional[str]:
  for cand in (stem + '.gz', stem, stem.replace('-idx', '.idx') + '.gz'):
    p = os.path.join(directory, cand)
    if os.path.exists(p):
      return p
  return None


def load_idx(directory: str, split: str, nested: Sequence[str] = ()) -> Split:
  """Loads an MNIST-format split from `directory` (train-*/t10k-* IDX files),
  or from the first of `directory/<n>` for n in `nested` that holds them."""
  img_stem, lbl_stem = FILES[split]
  for d in (directory,) + tuple(os.path.join(directory, n) for n in nested):
    img_path, lbl_path = _find(d, img_stem), _find(d, lbl_stem)
    if img_path is not None and lbl_path is not None:
      break
  else:
    missing = img_stem if _find(directory, img_stem) is None else lbl_stem
    raise DataNotFoundError(f'No {missing}[.gz] in {directory}.')
  images = read_idx(img_path)
  labels = read_idx(lbl_path).astype(np.int32)
  if images.ndim != 3 or labels.shape != (images.shape[0],):
    raise DataCorruptError(f'{img_path} / {lbl_path}: images {images.shape} and labels '
                           f'{labels.shape} do not pair up. {REPLACE}')
  return Split(images[..., None].astype(np.uint8), labels)


def load_split(directory: str, split: str, info: DatasetInfo, limit: int = 0) -> Split:
  """The 'idx' layout: the IDX files in data.dir (or in torchvision's <Name>/raw below it)."""
  del limit  # the files are read whole
  nested = (NESTED[info.name],) if info.name in NESTED else ()
  return load_idx(directory, split, nested)

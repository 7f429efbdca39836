"""Data loaders on tiny files written here; clear, fast errors when data are missing."""

import dataclasses
import gzip
import os
import pickle
import struct
import sys
import time

import numpy as np
import pytest

from cmi_jax import data

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'


def _write_idx(path, array):
  """IDX file: 0x0000, type code, ndim, big-endian dims, then the data."""
  codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
  header = bytes([0, 0, codes[array.dtype], array.ndim])
  header += struct.pack('>' + 'I' * array.ndim, *array.shape)
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


def _write_fmnist(directory, n_train=5, n_test=3, seed=0, gz=True):
  rng = np.random.default_rng(seed)
  out = {}
  ext = '.gz' if gz else ''
  for split, prefix, n in (('train', 'train', n_train), ('test', 't10k', n_test)):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    _write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte{ext}'), images)
    _write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte{ext}'), labels)
    out[split] = (images, labels)
  return out


def _write_cifar(directory, num_classes, n=3, seed=0):
  """CIFAR python pickles: 'data' [n, 3072] uint8 (CHW rows), labels lists."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  if num_classes == 10:
    files = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}
  else:
    files = {'train': ['train'], 'test': ['test']}
  out = {}
  for split, names in files.items():
    datas, labels = [], []
    for name in names:
      d = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
      y = rng.integers(0, num_classes, size=n).tolist()
      entry = {'data': d, 'batch_label': name}
      if num_classes == 10:
        entry['labels'] = y
      else:
        entry['fine_labels'] = y
        entry['coarse_labels'] = [v // 5 for v in y]
      with open(os.path.join(directory, name), 'wb') as f:
        pickle.dump(entry, f)
      datas.append(d)
      labels.extend(y)
    out[split] = (np.concatenate(datas), np.array(labels))
  return out


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize('gz', [True, False])
def test_idx_decodes_exact_values(tmp_path, gz):
  written = _write_fmnist(tmp_path, gz=gz)
  for split in ('train', 'test'):
    images, labels = written[split]
    for got in (data.load_idx(str(tmp_path), split),
                data.load('fashion_mnist', split, str(tmp_path))):
      assert got.images.dtype == np.uint8 and got.labels.dtype == np.int32
      np.testing.assert_array_equal(got.images, images[..., None])
      np.testing.assert_array_equal(got.labels, labels)


def test_read_idx_other_dtypes(tmp_path):
  a = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
  _write_idx(tmp_path / 'a.idx', a)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / 'a.idx')), a)
  # Big-endian int32 payload.
  b = np.array([1, -2, 70000], np.int32)
  with open(tmp_path / 'b.idx', 'wb') as f:
    f.write(bytes([0, 0, 0x0C, 1]) + struct.pack('>I', 3) + b.astype('>i4').tobytes())
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / 'b.idx')), b)


def test_truncated_idx_names_the_file(tmp_path):
  _write_fmnist(tmp_path)
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  with gzip.open(path, 'wb') as f:
    f.write(raw[:-100])
  with pytest.raises(data.DataNotFoundError, match='truncated') as e:
    data.read_idx(str(path))
  assert str(path) in str(e.value)
  with pytest.raises(data.DataNotFoundError) as e:
    data.load('fashion_mnist', 'train', str(tmp_path))
  assert str(path) in str(e.value)
  # A file that is not IDX at all.
  bad = tmp_path / 'bad.idx'
  bad.write_bytes(b'\x50\x4b\x03\x04rest')
  with pytest.raises(data.DataNotFoundError, match='not an IDX file'):
    data.read_idx(str(bad))


# ---------------------------------------------------------------- CIFAR

@pytest.mark.parametrize('num_classes, name, sub', [
    (10, 'cifar10', ''), (10, 'cifar10', 'cifar-10-batches-py'),
    (100, 'cifar100', ''), (100, 'cifar100', 'cifar-100-python')])
def test_cifar_pickles_exact_nhwc(tmp_path, num_classes, name, sub):
  written = _write_cifar(os.path.join(tmp_path, sub), num_classes)
  for split in ('train', 'test'):
    raw, labels = written[split]
    got = data.load(name, split, str(tmp_path))
    n = len(labels)
    assert got.images.shape == (n, 32, 32, 3) and got.images.dtype == np.uint8
    assert got.labels.dtype == np.int32
    np.testing.assert_array_equal(got.labels, labels)
    nn_, h, w, c = np.meshgrid(np.arange(n), np.arange(32), np.arange(32), np.arange(3),
                               indexing='ij')
    np.testing.assert_array_equal(got.images, raw[nn_, c * 1024 + h * 32 + w])
    # Spot check one pixel by hand.
    assert got.images[1, 2, 3, 2] == raw[1, 2 * 1024 + 2 * 32 + 3]
  assert len(written['train'][1]) == (15 if num_classes == 10 else 3)


def test_cifar_wrong_kind_of_batch(tmp_path):
  _write_cifar(tmp_path, 100)  # a CIFAR-100 folder
  with open(tmp_path / 'test_batch', 'wb') as f:
    pickle.dump({'data': np.zeros((1, 3072), np.uint8), 'fine_labels': [0]}, f)
  with pytest.raises(data.DataNotFoundError, match='labels'):
    data.load_cifar(str(tmp_path), 'test', 10)


# ---------------------------------------------------------------- missing data

def _raises_fast(limit_s, *args, **kwargs):
  t = time.perf_counter()
  with pytest.raises(data.DataNotFoundError) as e:
    data.load(*args, **kwargs)
  assert time.perf_counter() - t < limit_s
  return str(e.value)


def test_missing_fmnist_default_dir_says_apt_get(tmp_path, monkeypatch):
  absent = str(tmp_path / 'no-fashion-mnist')
  info = dataclasses.replace(data.DATASETS['fashion_mnist'], default_dirs=(absent,))
  monkeypatch.setitem(data.DATASETS, 'fashion_mnist', info)
  msg = _raises_fast(1.0, 'fashion_mnist', 'train')
  assert absent in msg
  assert 'apt-get install -y dataset-fashion-mnist' in msg
  assert 'data.dir' in msg


def test_missing_given_dir_names_it(tmp_path):
  absent = str(tmp_path / 'elsewhere')
  msg = _raises_fast(1.0, 'fashion_mnist', 'test', absent)
  assert absent in msg and 'data.dir' in msg
  # An existing folder without the files names the file it looked for.
  msg = _raises_fast(1.0, 'fashion_mnist', 'test', str(tmp_path))
  assert str(tmp_path) in msg and 't10k-images-idx3-ubyte' in msg


def test_missing_cifar(tmp_path):
  msg = _raises_fast(1.0, 'cifar10', 'train')
  assert 'data.dir' in msg
  msg = _raises_fast(1.0, 'cifar100', 'test', str(tmp_path))
  assert os.path.join(str(tmp_path), 'test') in msg and 'data.dir' in msg


def test_unknown_dataset_and_split():
  with pytest.raises(ValueError) as e:
    data.load('imagenet21k', 'train')
  for choice in ('cifar10', 'cifar100', 'fashion_mnist', 'mnist', 'svhn', 'tiny_imagenet',
                 'imagenet', 'image_folder'):
    assert choice in str(e.value)
  with pytest.raises(ValueError, match='split'):
    data.load('cifar10', 'validation')
  with pytest.raises(ValueError, match='backend'):
    data.load('cifar10', 'train', backend='hdf5')


def test_tfds_backend_without_tfds(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # import fails
  msg = _raises_fast(1.0, 'fashion_mnist', 'train', backend='tfds')
  assert 'pip install -e ".[tfds]"' in msg


# ---------------------------------------------------------------- tfds

@pytest.mark.tfds
def test_tfds_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=5):
    for name, shape in (('fashion_mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))):
      split = data.load(name, 'train', backend='tfds')
      assert split.images.shape == (5,) + shape and split.images.dtype == np.uint8
      assert split.labels.shape == (5,) and split.labels.dtype == np.int32
      assert split.labels.min() >= 0 and split.labels.max() < 10


@pytest.mark.tfds
def test_tfds_absent_data_fails_fast_without_download(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')

  def no_download(*args, **kwargs):
    raise AssertionError('tfds tried to download')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_download)
  msg = _raises_fast(2.0, 'fashion_mnist', 'test', str(tmp_path / 'tfds'), backend='tfds')
  assert 'download' in msg and 'tfds could not load' in msg
  assert not os.path.exists(tmp_path / 'tfds' / 'downloads')


# ---------------------------------------------------------------- real data

@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason='dataset-fashion-mnist not installed')
def test_real_fashion_mnist():
  for split, n in (('train', 60000), ('test', 10000)):
    s = data.load('fashion_mnist', split)
    assert s.images.shape == (n, 28, 28, 1) and s.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(s.labels, minlength=10), [n // 10] * 10)
    assert s.labels.min() == 0 and s.labels.max() == 9
    assert 50 < s.images.mean() < 100  # Fashion-MNIST's mean pixel is ~73


# ---------------------------------------------------------------- batches

def test_batch_indices():
  n, bs = 10, 4
  batches = list(data.batch_indices(np.random.default_rng(0), n, bs, drop_last=False))
  assert [len(b) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))
  assert not np.array_equal(np.concatenate(batches), np.arange(n))  # shuffled
  batches = list(data.batch_indices(np.random.default_rng(0), n, bs))
  assert [len(b) for b in batches] == [4, 4]
  assert len(np.unique(np.concatenate(batches))) == 8
  batches = list(data.batch_indices(np.random.default_rng(0), n, bs, shuffle=False,
                                    drop_last=False))
  np.testing.assert_array_equal(np.concatenate(batches), np.arange(n))
  # Same generator state, same order; a fresh epoch draws a new one.
  rng = np.random.default_rng(3)
  e1 = np.concatenate(list(data.batch_indices(rng, n, 5)))
  e2 = np.concatenate(list(data.batch_indices(rng, n, 5)))
  np.testing.assert_array_equal(np.sort(e1), np.arange(n))
  np.testing.assert_array_equal(np.sort(e2), np.arange(n))
  assert not np.array_equal(e1, e2)
  np.testing.assert_array_equal(
      np.concatenate(list(data.batch_indices(np.random.default_rng(3), n, 5))), e1)
  assert list(data.batch_indices(np.random.default_rng(0), 3, 4)) == []

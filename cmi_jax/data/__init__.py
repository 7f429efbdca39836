"""Datasets: metadata in one table, one loader per on-disk layout behind `load`.

Layouts ('files' backend, found under data.dir):
  * 'idx': IDX .gz files (MNIST / Fashion-MNIST; found automatically where
    Debian's `dataset-fashion-mnist` puts them, and for Fashion-MNIST's test
    split in the copy shipped inside the package, cmi_jax/datasets/);
  * 'cifar': the CIFAR-10/100 python pickle batches;
  * 'svhn': train_32x32.mat / test_32x32.mat;
  * 'tiny_imagenet', 'imagenet', 'image_folder': folders of image files,
    decoded with PIL (cmi_jax/data/folders.py).
The 'tfds' backend reads tensorflow-datasets (optional `[tfds]` extra), never
downloading: with download off it fails in well under a second when data are absent.

Splits are uint8 NHWC + int32 labels, in memory, except ImageNet's, whose
images decode batch by batch on access (`FolderImages`). Missing data raise
`DataNotFoundError` at once, naming the paths tried and the command or config
field that fixes it; damaged data raise `DataCorruptError`.
"""

import dataclasses
import os
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from cmi_jax.data import cifar, folders, idx, svhn
from cmi_jax.data.base import (REPLACE, SPLITS, DataCorruptError, DataMismatchError,
                               DataNotFoundError, DatasetInfo, Split)
from cmi_jax.data.cifar import load_cifar
from cmi_jax.data.folders import (load_image_folder, load_imagenet, load_tiny_imagenet)
from cmi_jax.data.idx import load_idx, read_idx
from cmi_jax.data.images import FolderImages, resize_arrays
from cmi_jax.data.svhn import load_svhn
from cmi_jax.data.tfds import load_tfds
from cmi_jax.data.transfer import TransferSet, load_transfer_set

__all__ = [
    'DATASETS', 'LOADERS', 'OPTIONS', 'SPLITS', 'SHIPPED_DIR', 'DataCorruptError',
    'DataMismatchError', 'DataNotFoundError', 'DatasetInfo', 'FolderImages', 'Split',
    'TransferSet', 'batch_indices', 'load_transfer_set',
    'config_options', 'get_info', 'iter_batches', 'load', 'load_cifar', 'load_idx',
    'load_image_folder', 'load_imagenet', 'load_svhn', 'load_tfds', 'load_tiny_imagenet',
    'read_idx', 'shipped_dirs']

# Data shipped inside the package (package_data), so a non-editable install has it too.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'datasets')

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

# Normalisation as the benchmark's NORMALIZE_DICT has it (DF:registry.py:17-37).
DATASETS: Dict[str, DatasetInfo] = {
    'fashion_mnist': DatasetInfo(
        'fashion_mnist', (28, 28, 1), 10, (0.2860,), (0.3530,), 2, True,
        default_dirs=('/usr/share/datasets/fashion-mnist',),
        install_hint='apt-get update && apt-get install -y dataset-fashion-mnist',
        tfds_name='fashion_mnist', shipped_splits=('test',), layout='idx'),
    # The reference resizes MNIST to 32 (DF:registry.py:95-109): data.image_size=32; its
    # train transform is that resize alone (no crop, no flip).
    'mnist': DatasetInfo(
        'mnist', (28, 28, 1), 10, (0.1307,), (0.3081,), 0, False,
        default_dirs=('/usr/share/datasets/mnist',), tfds_name='mnist', layout='idx',
        install_hint='put the four MNIST *-idx?-ubyte[.gz] files in data.dir'),
    'cifar10': DatasetInfo(
        'cifar10', (32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 4, True,
        install_hint='download the python version of CIFAR-10 and point data.dir at it',
        tfds_name='cifar10', layout='cifar'),
    # CIFAR-100 statistics as the benchmark's registry has them (the teachers were trained with these).
    'cifar100': DatasetInfo(
        'cifar100', (32, 32, 3), 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 4, True,
        install_hint='download the python version of CIFAR-100 and point data.dir at it',
        tfds_name='cifar100', layout='cifar'),
    # No train augmentation in the reference (DF:registry.py:174-186).
    'svhn': DatasetInfo(
        'svhn', (32, 32, 3), 10, _HALF, _HALF, 0, False, tfds_name='svhn_cropped', layout='svhn',
        install_hint='download train_32x32.mat and test_32x32.mat (the cropped digits of '
                     'http://ufldl.stanford.edu/housenumbers/) into data.dir'),
    # The 0.5/0.5 entry the reference actually uses (zoo-and-datasets.md section 3).
    'tiny_imagenet': DatasetInfo(
        'tiny_imagenet', (64, 64, 3), 200, _HALF, _HALF, 4, True, layout='tiny_imagenet',
        install_hint='extract tiny-imagenet-200.zip (http://cs231n.stanford.edu/'
                     'tiny-imagenet-200.zip) and point data.dir at the folder holding it'),
    # Evaluated at Resize 256 + CenterCrop 224, trained (and distilled) on RandomResizedCrop
    # 224 (torchvision's scale (0.08, 1)) + flip (DF:registry.py:187-203).
    'imagenet': DatasetInfo(
        'imagenet', (224, 224, 3), 1000, _IMAGENET_MEAN, _IMAGENET_STD, 0, True,
        layout='imagenet', eval_resize=256, crop_scale=(0.08, 1.0),
        install_hint='put ILSVRC2012 train/ and val/ (one folder per wnid, as '
                     'torchvision.datasets.ImageNet leaves them) in data.dir'),
    # Size, classes, mean and std come from the config (data.image_size, data.mean,
    # data.std; data.num_classes or the number of class folders).
    'image_folder': DatasetInfo(
        'image_folder', (0, 0, 3), 0, (), (), 4, True, layout='image_folder',
        install_hint='point data.dir at a folder with train/ and test/ (or val/), each holding '
                     'one subfolder of images per class'),
}

# layout -> loader(directory, split, info, limit) -> Split.
LOADERS: Dict[str, Callable[[str, str, DatasetInfo, int], Split]] = {
    'idx': idx.load_split,
    'cifar': cifar.load_split,
    'svhn': svhn.load_split,
    'tiny_imagenet': folders.load_tiny_imagenet,
    'imagenet': folders.load_imagenet,
    'image_folder': folders.load_image_folder,
}

# Optional fields of the config's data section that refine a table entry (0 or
# empty: the entry's own value).
OPTIONS = ('image_size', 'mean', 'std', 'num_classes')


def config_options(section: Mapping) -> Dict:
  """The OPTIONS fields a config's data section sets (a mapping, e.g. cfg.data), as
  keyword arguments of `get_info` and `load`; fields it lacks are left out."""
  return {k: section[k] for k in OPTIONS if k in section}


def get_info(name: str, data_dir: Optional[str] = None, *, image_size: int = 0,
             mean: Sequence[float] = (), std: Sequence[float] = (),
             num_classes: int = 0) -> DatasetInfo:
  """The DATASETS entry `name`, refined by the config's data options.

  Args:
    name: a key of DATASETS (config field data.name).
    data_dir: data.dir; image_folder counts its class folders there when
      num_classes is 0.
    image_size: images resized (shorter side) and center-cropped to this
      (data.image_size; 0: the dataset's size). Required by image_folder.
    mean, std: per-channel normalisation (data.mean, data.std; empty: the
      dataset's). Required by image_folder.
    num_classes: data.num_classes (0: the dataset's).
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {sorted(DATASETS)} '
                     '(config field data.name).')
  info = DATASETS[name]
  if name == 'image_folder':
    missing = [f'data.{k}' for k, v in (('image_size', image_size), ('mean', mean), ('std', std))
               if not v]
    if missing:
      raise ValueError(f'data.name=image_folder needs {", ".join(missing)}: the size the '
                       'images are resized and center-cropped to, and the per-channel RGB '
                       'normalisation the teacher was trained with (e.g. '
                       '--config.data.image_size=64 --config.data.mean="(0.5,0.5,0.5)" '
                       '--config.data.std="(0.5,0.5,0.5)").')
    if not num_classes:
      if not data_dir:
        raise ValueError('data.name=image_folder needs data.num_classes, or data.dir to '
                         'count the class folders in.')
      num_classes = folders.count_classes(data_dir)
  c = info.image_shape[2]
  for field, v in (('mean', mean), ('std', std)):
    if v and (len(v) != c or (field == 'std' and min(v) <= 0)):
      raise ValueError(f'data.{field}={tuple(v)!r} is invalid: {name} images have {c} '
                       f'channel(s); give {c} value(s){" > 0" if field == "std" else ""}.')
  if image_size < 0 or num_classes < 0:
    raise ValueError(f'data.image_size={image_size} / data.num_classes={num_classes} must be '
                     '>= 0 (0: the dataset\'s own).')
  changes = {}
  if image_size:
    changes['image_shape'] = (image_size, image_size, c)
    if info.eval_resize:  # keep the resize : crop ratio (ImageNet's 256 : 224)
      changes['eval_resize'] = int(round(image_size * info.eval_resize / info.image_shape[0]))
  if mean:
    changes['mean'] = tuple(float(x) for x in mean)
  if std:
    changes['std'] = tuple(float(x) for x in std)
  if num_classes:
    changes['num_classes'] = int(num_classes)
  return dataclasses.replace(info, **changes) if changes else info


def _load_files(info: DatasetInfo, split: str, data_dir: Optional[str], limit: int) -> Split:
  """Tries data.dir, else the default folders then the shipped copy."""
  dirs = (data_dir,) if data_dir else info.default_dirs + shipped_dirs(info, split)
  if not dirs:
    raise DataNotFoundError(
        f'No folder given for {info.name}: set data.dir (e.g. --config.data.dir=/path/to/'
        f'{info.name}) to the folder with its files; {info.install_hint}.')
  errors = []
  for d in dirs:
    if not os.path.isdir(d):
      errors.append(f'{d} (no such folder)')
      continue
    try:
      return LOADERS[info.layout](d, split, info, limit)
    except DataCorruptError:
      raise  # a damaged file is not "absent": say so instead of trying the next folder
    except DataNotFoundError as e:
      errors.append(str(e))
  fix = 'Set --config.data.dir (data.dir) to the folder holding the files'
  if info.install_hint and not data_dir:
    fix = f'Install it ({info.install_hint}) or s{fix[1:]}'
  raise DataNotFoundError(f'{info.name} {split} split not found. Tried: {"; ".join(errors)}. '
                          f'{fix}.')


def load(name: str, split: str, data_dir: Optional[str] = None,
         backend: str = 'files', *, limit: int = 0, **options) -> Split:
  """Loads split 'train' or 'test' of dataset `name` as uint8 NHWC + int32 labels.

  Args:
    name: a key of DATASETS.
    split: 'train' or 'test' (for imagenet, tiny_imagenet: their val/ folder).
    data_dir: folder holding the files (config field data.dir); None tries the
      dataset's default folders (Debian's package location for Fashion-MNIST),
      then the copy shipped in the package (Fashion-MNIST's test split).
    backend: 'files' or 'tfds'.
    limit: keep this many examples (data.eval_limit; 0: all): the first ones of
      array files, ones spread evenly over a folder listing (which is sorted by
      class), listed but never decoded beyond them.
    **options: image_size, mean, std, num_classes, as for `get_info`.
  Returns:
    A Split; for imagenet its images are a FolderImages (decoded on access).
  """
  info = get_info(name, data_dir, **options)
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
  if backend == 'tfds':
    out = load_tfds(info, split, data_dir)
  elif backend == 'files':
    out = _load_files(info, split, data_dir, limit)
  else:
    raise ValueError(f'data.backend must be "files" or "tfds", got {backend!r}.')
  if limit and len(out.labels) > limit:
    out = Split(out.images[:limit], out.labels[:limit])
  if (isinstance(out.images, np.ndarray) and out.images.shape[1:] != info.image_shape
      and out.images.shape[3:] == info.image_shape[2:] and options.get('image_size')):
    out = Split(resize_arrays(out.images, info.image_shape[0]), out.labels)
  if out.images.shape[1:] != info.image_shape:
    raise DataCorruptError(f'{name} {split}: images have shape {out.images.shape[1:]}, '
                           f'expected {info.image_shape}: these files hold another dataset; '
                           f'point data.dir at {name} files or set data.name to their dataset.')
  if len(out.labels) and (out.labels.min() < 0 or out.labels.max() >= info.num_classes):
    raise DataCorruptError(f'{name} {split}: labels span {out.labels.min()}..{out.labels.max()}, '
                           f'outside its {info.num_classes} classes: these files hold another '
                           f'dataset or are damaged. {REPLACE}')
  return out


def shipped_dirs(info: DatasetInfo, split: str) -> Tuple[str, ...]:
  """The package's own copy of `split` of dataset `info` (a 1-tuple), or ()."""
  return (os.path.join(SHIPPED_DIR, info.name),) if split in info.shipped_splits else ()


def iter_batches(split: Split, batch_size: int) -> Iterator[Split]:
  """Consecutive batches of a split as in-memory Splits (the last may be short);
  a FolderImages split decodes one batch at a time."""
  for i in range(0, len(split.labels), batch_size):
    yield Split(np.asarray(split.images[i:i + batch_size]), split.labels[i:i + batch_size])


def batch_indices(rng: np.random.Generator, n: int, batch_size: int,
                  shuffle: bool = True, drop_last: bool = True) -> Iterator[np.ndarray]:
  """Index arrays for one pass over n examples."""
  order = rng.permutation(n) if shuffle else np.arange(n)
  stop = n - n % batch_size if drop_last else n
  for i in range(0, stop, batch_size):
    yield order[i:i + batch_size]

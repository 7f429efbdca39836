"""Folders of image files: a generic class-folder tree, ImageNet, Tiny-ImageNet.

Each loader lists the split (paths and labels) and checks it before anything
compiles: a missing split folder, a class folder without images, a label file
naming an unknown class, a class count that does not match the dataset each
raise one error naming the file or folder and the fix. The images are then
decoded with PIL (RGB) and resized + center-cropped as torchvision's eval
transforms do (cmi_jax.data.images).
"""

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from cmi_jax.data import images as image_files
from cmi_jax.data.base import DataCorruptError, DataNotFoundError, DatasetInfo, Split


def class_folders(directory: str) -> List[str]:
  """Sorted names of the subfolders of `directory`: class index = position
  (torchvision `find_classes`)."""
  return sorted(e.name for e in os.scandir(directory) if e.is_dir())


def class_images(directory: str) -> List[str]:
  """Image files below one class folder, recursively, in torchvision's order
  (`make_dataset`: sorted os.walk, then sorted file names)."""
  out = []
  for root, _, names in sorted(os.walk(directory, followlinks=True)):
    out.extend(os.path.join(root, n) for n in sorted(names) if image_files.is_image_file(n))
  return out


def spread(n: int, limit: int) -> np.ndarray:
  """`limit` indices spread evenly over range(n) (all of them when limit is 0 or >= n):
  a quick check on a class-sorted listing still sees every class."""
  if not limit or limit >= n:
    return np.arange(n)
  return (np.arange(limit) * n) // limit


def _check_classes(found: int, info: DatasetInfo, where: str) -> None:
  if found != info.num_classes:
    raise DataCorruptError(
        f'{where} defines {found} classes, but {info.name} has {info.num_classes}: the folder '
        'is incomplete or holds another dataset. Point data.dir at a complete copy, or set '
        f'data.num_classes={found} if the teacher was trained on these {found} classes.')


def _finish(paths: Sequence[str], labels: Sequence[int], info: DatasetInfo, limit: int,
            lazy: bool) -> Split:
  keep = spread(len(paths), limit)
  paths = [paths[i] for i in keep]
  labels = np.asarray(labels, np.int32)[keep]
  size, channels = info.image_shape[0], info.image_shape[2]
  resize = max(info.eval_resize, size)
  imgs = image_files.FolderImages(paths, resize, size, channels)
  return Split(imgs if lazy else np.asarray(imgs), labels)


def _split_dir(root: str, split: str, names: Sequence[str], what: str) -> str:
  for n in names:
    d = os.path.join(root, n)
    if os.path.isdir(d):
      return d
  raise DataNotFoundError(
      f'No {split} split in {root}: expected the folder {" or ".join(names)}/ there ({what}). '
      'Set data.dir to the folder that holds the splits.')


def list_class_tree(split_dir: str, classes: Optional[Sequence[str]] = None
                    ) -> Tuple[List[str], List[int], List[str]]:
  """(paths, labels, classes) of a folder of class subfolders.

  `classes` (e.g. the train split's) fixes the class order; a subfolder it
  does not name is an error, as is a class folder without image files.
  """
  found = class_folders(split_dir)
  if not found:
    n = sum(1 for e in os.scandir(split_dir) if e.is_file() and image_files.is_image_file(e.name))
    hint = (f' It holds {n} image files directly: sort them into one subfolder per class.'
            if n else '')
    raise DataNotFoundError(f'{split_dir} has no class subfolders (one folder of images per '
                            f'class is expected).{hint}')
  if classes is None:
    classes = found
  index = {c: i for i, c in enumerate(classes)}
  unknown = [c for c in found if c not in index]
  if unknown:
    raise DataCorruptError(
        f'{split_dir} has class folder(s) {unknown[:5]} that the train split does not have '
        f'({len(classes)} classes there): the splits come from different copies; point data.dir '
        'at one complete copy.')
  paths, labels, empty = [], [], []
  for c in found:
    files = class_images(os.path.join(split_dir, c))
    if not files:
      empty.append(os.path.join(split_dir, c))
    paths.extend(files)
    labels.extend([index[c]] * len(files))
  if empty:
    raise DataNotFoundError(
        f'Class folder(s) without image files ({", ".join(image_files.IMAGE_EXTENSIONS)}): '
        f'{", ".join(empty[:5])}{" ..." if len(empty) > 5 else ""}. Restore the images '
        'or remove the empty folders from every split.')
  return paths, labels, list(classes)


def _tree_split(root: str, split: str, names: Sequence[str], what: str,
                info: Optional[DatasetInfo]) -> Tuple[List[str], List[int], List[str]]:
  """A split of a train/ + val|test/ class-folder tree; classes from train/ when present,
  their count checked against the dataset before any image is listed."""
  split_dir = _split_dir(root, split, names, what)
  train_dir = os.path.join(root, 'train')
  class_dir = train_dir if os.path.isdir(train_dir) else split_dir
  classes = class_folders(class_dir) or None
  if classes and info is not None:
    _check_classes(len(classes), info, class_dir)
  return list_class_tree(split_dir, classes)


# ---------------------------------------------------------------- image_folder

FOLDER_SPLITS = {'train': ('train',), 'test': ('test', 'val')}


def count_classes(directory: str) -> int:
  """Class count of an image_folder tree (its train/ split, else test/ or val/)."""
  for n in ('train',) + FOLDER_SPLITS['test']:
    d = os.path.join(directory, n)
    if os.path.isdir(d):
      found = class_folders(d)
      if found:
        return len(found)
  raise DataNotFoundError(f'{directory} has no train/, test/ or val/ folder with class '
                          'subfolders, so the class count is unknown: fix data.dir or set '
                          'data.num_classes.')


def load_image_folder(directory: str, split: str, info: DatasetInfo, limit: int = 0) -> Split:
  """The 'image_folder' layout: data.dir/{train,test|val}/<class>/**/<image>; classes
  = sorted train/ subfolders (torchvision ImageFolder); Resize + CenterCrop to the
  configured size, held in memory."""
  paths, labels, _ = _tree_split(directory, split, FOLDER_SPLITS[split],
                                 'one subfolder of images per class', info)
  return _finish(paths, labels, info, limit, lazy=False)


# ---------------------------------------------------------------- imagenet

IMAGENET_SPLITS = {'train': ('train',), 'test': ('val',)}


def imagenet_root(directory: str) -> str:
  """data.dir itself, or its ILSVRC2012/ subfolder (the reference's data_root layout)."""
  nested = os.path.join(directory, 'ILSVRC2012')
  if not any(os.path.isdir(os.path.join(directory, n)) for n in ('train', 'val')) \
      and os.path.isdir(nested):
    return nested
  return directory


def load_imagenet(directory: str, split: str, info: DatasetInfo, limit: int = 0) -> Split:
  """The 'imagenet' layout: {train,val}/<wnid>/*.JPEG (torchvision ImageNet after its
  devkit step); 'test' reads val/. Images stay on disk and decode batch by batch
  at Resize 256 + CenterCrop 224 (a `FolderImages`)."""
  paths, labels, _ = _tree_split(imagenet_root(directory), split, IMAGENET_SPLITS[split],
                                 'one folder per wnid, as torchvision.datasets.ImageNet '
                                 'leaves them', info)
  return _finish(paths, labels, info, limit, lazy=True)


# ---------------------------------------------------------------- tiny_imagenet

TINY = 'tiny-imagenet-200'


def tiny_imagenet_root(directory: str) -> str:
  """The folder holding wnids.txt: data.dir, data.dir/tiny-imagenet-200, or
  data.dir/tiny-imagenet-200/tiny-imagenet-200 (where NAYER's registry looks,
  NY:registry.py:320-322)."""
  tried = [directory, os.path.join(directory, TINY), os.path.join(directory, TINY, TINY)]
  for d in tried:
    if os.path.isfile(os.path.join(d, 'wnids.txt')):
      return d
  raise DataNotFoundError(f'No wnids.txt in {", ".join(tried)}: extract tiny-imagenet-200.zip '
                          'and set data.dir to the folder that holds tiny-imagenet-200/.')


def _read_lines(path: str) -> List[str]:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read().splitlines()
  except UnicodeDecodeError as e:
    raise DataCorruptError(f'{path} is not a text file ({e}); re-extract tiny-imagenet-200.zip.'
                           ) from e


def read_wnids(root: str) -> List[str]:
  """wnids.txt, sorted: class index = position (NY:datafree/datasets/tiny_imagenet.py:77-84)."""
  path = os.path.join(root, 'wnids.txt')
  wnids = sorted({w.strip() for w in _read_lines(path) if w.strip()})
  if not wnids:
    raise DataCorruptError(f'{path} lists no class ids; re-extract tiny-imagenet-200.zip.')
  return wnids


def tiny_train(root: str, wnids: Sequence[str]) -> Tuple[List[str], List[int]]:
  """train/<wnid>/images/*.JPEG for every wnid, sorted (:91-99)."""
  train = os.path.join(root, 'train')
  if not os.path.isdir(train):
    raise DataNotFoundError(f'No train split in {root}: the folder train/ is missing; '
                            're-extract tiny-imagenet-200.zip.')
  extra = sorted(set(class_folders(train)) - set(wnids))
  if extra:
    raise DataCorruptError(f'{train} has class folder(s) {extra[:5]} that '
                           f'{os.path.join(root, "wnids.txt")} does not list; the two come '
                           'from different copies: re-extract tiny-imagenet-200.zip.')
  paths, labels, empty = [], [], []
  for i, w in enumerate(wnids):
    d = os.path.join(train, w, 'images')
    files = sorted(n for n in os.listdir(d) if image_files.is_image_file(n)) \
        if os.path.isdir(d) else []
    if not files:
      empty.append(d)
    paths.extend(os.path.join(d, n) for n in files)
    labels.extend([i] * len(files))
  if empty:
    raise DataNotFoundError(f'No images in {", ".join(empty[:5])}{" ..." if len(empty) > 5 else ""} '
                            f'({len(empty)} of the {len(wnids)} classes of wnids.txt): '
                            're-extract tiny-imagenet-200.zip.')
  return paths, labels


def tiny_val(root: str, wnids: Sequence[str]) -> Tuple[List[str], List[int]]:
  """val/images/* labelled by val/val_annotations.txt (tab-separated: file, wnid,
  box; the box is ignored), in the annotation file's order (:100-112)."""
  ann = os.path.join(root, 'val', 'val_annotations.txt')
  if not os.path.isfile(ann):
    raise DataNotFoundError(f'No test split in {root}: {ann} is missing (Tiny-ImageNet\'s '
                            'labelled val/ split is its test split); re-extract '
                            'tiny-imagenet-200.zip.')
  index = {w: i for i, w in enumerate(wnids)}
  images_dir = os.path.join(root, 'val', 'images')
  paths, labels = [], []
  for no, line in enumerate(_read_lines(ann), 1):
    if not line.strip():
      continue
    cols = line.split('\t')
    if len(cols) < 2:
      raise DataCorruptError(f'{ann} line {no}: {line!r} is not "<file>\\t<wnid>\\t...": the '
                             'file is damaged; re-extract tiny-imagenet-200.zip.')
    name, wnid = cols[0].strip(), cols[1].strip()
    if wnid not in index:
      raise DataCorruptError(
          f'{ann} line {no} labels {name} with class {wnid!r}, which '
          f'{os.path.join(root, "wnids.txt")} does not list: the two files come from '
          'different copies; re-extract tiny-imagenet-200.zip.')
    path = os.path.join(images_dir, name)
    if not os.path.isfile(path):
      raise DataNotFoundError(f'{ann} line {no} names {path}, which is missing; '
                              're-extract tiny-imagenet-200.zip.')
    paths.append(path)
    labels.append(index[wnid])
  if not paths:
    raise DataNotFoundError(f'{ann} labels no images; re-extract tiny-imagenet-200.zip.')
  return paths, labels


def load_tiny_imagenet(directory: str, split: str, info: DatasetInfo, limit: int = 0) -> Split:
  """The 'tiny_imagenet' layout (NY:datafree/datasets/tiny_imagenet.py), in memory
  (64x64: 1.2 GB for the train split); 'test' reads the labelled val/ split."""
  root = tiny_imagenet_root(directory)
  wnids = read_wnids(root)
  _check_classes(len(wnids), info, os.path.join(root, 'wnids.txt'))
  paths, labels = tiny_train(root, wnids) if split == 'train' else tiny_val(root, wnids)
  return _finish(paths, labels, info, limit, lazy=False)

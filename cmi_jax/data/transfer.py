"""Transfer sets for KD on given images (experiments/distill.py, the runner's
kd.init_pool): the synthesize CLI's `synthetic.npz` and folders of image files
such as the authors' pre-inverted set (zoo-and-datasets.md section 3.3).

A folder is read recursively (sorted walk, torchvision's image extensions) and
is unlabeled, as the reference's `UnlabeledImageDataset` (DF:_utils.py:179-206);
an .npz holds `images` [N, H, W, C] uint8 and optionally `labels` [N]. Every
image must have the teacher's size and channel count; with `resize` the images
are resized (shorter side) and center-cropped to it instead. Anything else is
one error naming the file and the fix, raised before anything compiles.
"""

import concurrent.futures
import os
import zipfile
from typing import NamedTuple, Optional, Sequence

import numpy as np

from cmi_jax.data import folders
from cmi_jax.data import images as image_files
from cmi_jax.data.base import REPLACE, DataCorruptError, DataMismatchError, DataNotFoundError

# PIL modes by the channels they decode to (alpha dropped; palette images are RGB).
_ONE_CHANNEL = ('1', 'L', 'LA', 'I', 'I;16', 'F')


class TransferSet(NamedTuple):
  images: np.ndarray             # [N, H, W, C] uint8
  labels: Optional[np.ndarray]   # [N] int32, or None (a folder: unlabeled)


def _resize_hint(flag: str, size: int) -> str:
  return (f'pass {flag} to resize (shorter side) and center-crop every image to {size}x{size}, '
          'or give images of that size')


def read_image(path: str, image_shape: Sequence[int], resize: bool = False,
               resize_flag: str = '--resize') -> np.ndarray:
  """One image file -> [H, W, C] uint8 of the teacher's `image_shape`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = image_shape
  try:
    with Image.open(path) as img:
      channels = 1 if img.mode in _ONE_CHANNEL else 3
      if channels != c:
        raise DataMismatchError(
            f'{path} is a {channels}-channel image (PIL mode {img.mode}), but the teacher takes '
            f'{c}-channel inputs: convert the images to {"grayscale" if c == 1 else "RGB"}, or '
            'distill a teacher trained on such images.')
      if img.size != (w, h) and not resize:
        raise DataMismatchError(f'{path} is {img.size[0]}x{img.size[1]}, but the teacher takes '
                                f'{w}x{h} inputs: {_resize_hint(resize_flag, h)}.')
      img = img.convert('L' if c == 1 else 'RGB')
      if img.size != (w, h):
        img = image_files.resize_center_crop(img, h, h)
      arr = np.asarray(img, np.uint8)
  except (DataMismatchError, FileNotFoundError):
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataCorruptError(f'Cannot decode image {path} ({type(e).__name__}: {e}); it is '
                           f'truncated or not an image. {REPLACE}') from e
  return arr[..., None] if c == 1 else arr


def load_folder(directory: str, image_shape: Sequence[int], resize: bool = False,
                resize_flag: str = '--resize') -> TransferSet:
  """Every image file in or below `directory` (sorted), unlabeled."""
  paths = folders.class_images(directory)
  if not paths:
    raise DataNotFoundError(
        f'{directory} holds no image files ({", ".join(image_files.IMAGE_EXTENSIONS)}) in it or '
        'below it: point the transfer set at the folder of images (e.g. the extracted '
        'cmi-preinverted-wrn402/) or at a synthetic.npz.')
  out = np.empty((len(paths),) + tuple(image_shape), np.uint8)

  def work(i):
    out[i] = read_image(paths[i], image_shape, resize, resize_flag)
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for f in [pool.submit(work, i) for i in range(len(paths))]:
      f.result()  # re-raises the first error
  return TransferSet(out, None)


def load_npz(path: str, image_shape: Sequence[int], num_classes: int, resize: bool = False,
             resize_flag: str = '--resize') -> TransferSet:
  """experiments/synthesize.py's synthetic.npz: `images` [N, H, W, C] uint8 and
  optional `labels` [N] (class ids of the teacher's classes)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataCorruptError(f'Cannot read {path} ({type(e).__name__}: {e}): not an intact .npz. '
                           'Write it again (experiments/synthesize.py).') from e
  expected = ('expected the synthesize CLI\'s synthetic.npz: images [N, H, W, C] uint8, '
              'labels [N] int')
  images = arrays.get('images')
  if images is None or images.ndim != 4 or images.dtype != np.uint8 or not len(images):
    what = ('no "images" array (it holds ' + ', '.join(sorted(arrays)) + ')' if images is None
            else f'images of shape {images.shape}, dtype {images.dtype}')
    raise DataCorruptError(f'{path} has {what}; {expected}.')
  h, w, c = image_shape
  if images.shape[3] != c:
    raise DataMismatchError(f'{path} holds {images.shape[3]}-channel images, but the teacher '
                            f'takes {c}-channel inputs: use a transfer set made for this '
                            'teacher (experiments/synthesize.py --teacher=<it>).')
  if images.shape[1:3] != (h, w):
    if not resize:
      raise DataMismatchError(f'{path} holds {images.shape[2]}x{images.shape[1]} images, but the '
                              f'teacher takes {w}x{h} inputs: {_resize_hint(resize_flag, h)}.')
    images = image_files.resize_arrays(images, h)
  labels = arrays.get('labels')
  if labels is not None:
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
      raise DataCorruptError(f'{path}: labels have shape {labels.shape}, dtype {labels.dtype}; '
                             f'{expected} (one class id per image).')
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
      raise DataMismatchError(
          f'{path} labels an image with class {int(bad[0])}, which the teacher\'s '
          f'{num_classes} classes (0..{num_classes - 1}) do not include: the file was made '
          'for another teacher; synthesize one for this teacher, or drop its labels.')
    labels = labels.astype(np.int32)
  return TransferSet(images, labels)


def load_transfer_set(path: str, image_shape: Sequence[int], num_classes: int,
                      resize: bool = False, resize_flag: str = '--resize') -> TransferSet:
  """A folder of images or an .npz (see the module docstring), checked against the
  teacher's `image_shape` and `num_classes`. `resize_flag` is named in the errors."""
  if os.path.isdir(path):
    return load_folder(path, image_shape, resize, resize_flag)
  if os.path.isfile(path):
    if not path.endswith('.npz'):
      raise DataMismatchError(f'{path} is a file but not an .npz: give a synthetic.npz '
                              '(experiments/synthesize.py) or a folder of images.')
    return load_npz(path, image_shape, num_classes, resize, resize_flag)
  raise DataNotFoundError(f'No transfer set at {path} (looked in {os.getcwd()}): give a '
                          'synthetic.npz, a folder of images, or a dataset name.')

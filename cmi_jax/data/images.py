"""Image files decoded with PIL, resized as torchvision's eval transforms do, and
`FolderImages`: a split's images decoded batch by batch, on access.

Decoding converts every image to RGB, as torchvision's `default_loader` does
(TV:datasets/folder.py:260-264): some Tiny-ImageNet and ImageNet JPEGs are
grayscale or CMYK.
"""

import concurrent.futures
import os
from typing import Sequence, Tuple

import numpy as np

from cmi_jax.data.base import REPLACE, DataCorruptError, DataNotFoundError

# torchvision's IMG_EXTENSIONS (TV:datasets/folder.py), compared case-insensitively.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def resize_center_crop(img, resize: int, crop: int):
  """torchvision `Resize(resize)` then `CenterCrop(crop)` on a PIL image.

  Resize scales the shorter side to `resize` (the longer one to
  int(resize * long / short)) with PIL's bilinear filter, and leaves an image
  whose shorter side already is `resize` untouched; the crop takes the centre
  (offsets rounded as torchvision rounds them).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  if short != resize:
    new_long = int(resize * long / short)
    size = (resize, new_long) if w <= h else (new_long, resize)
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
  if (w, h) != (crop, crop):
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
  return img


def decode(path: str, resize: int, crop: int, channels: int = 3) -> np.ndarray:
  """One image file -> [crop, crop, channels] uint8 (RGB, or L for one channel)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      img = img.convert('RGB' if channels == 3 else 'L')
  except FileNotFoundError as e:
    raise DataNotFoundError(f'Image {path} vanished after the folder was listed; restore it '
                            'or point data.dir at a complete copy.') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataCorruptError(f'Cannot decode image {path} ({type(e).__name__}: {e}); it is '
                           f'truncated or not an image. {REPLACE}') from e
  if resize < crop:
    raise ValueError(f'resize={resize} is smaller than the crop {crop}.')
  arr = np.asarray(resize_center_crop(img, resize, crop), np.uint8)
  return arr if channels == 3 else arr[..., None]


def decode_all(paths: Sequence[str], resize: int, crop: int, channels: int = 3) -> np.ndarray:
  """[N, crop, crop, channels] uint8, decoded on a few threads (PIL releases the GIL)."""
  out = np.empty((len(paths), crop, crop, channels), np.uint8)
  if len(paths) <= 8:
    for i, p in enumerate(paths):
      out[i] = decode(p, resize, crop, channels)
    return out

  def work(i):
    out[i] = decode(paths[i], resize, crop, channels)
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for f in [pool.submit(work, i) for i in range(len(paths))]:
      f.result()  # re-raises the first decoding error
  return out


def resize_arrays(images: np.ndarray, size: int) -> np.ndarray:
  """[N, H, W, C] uint8 -> [N, size, size, C]: `Resize(size)` + `CenterCrop(size)` per
  image (MNIST at 32 as the reference registry has it, DF:registry.py:95-109)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  n, _, _, c = images.shape
  out = np.empty((n, size, size, c), np.uint8)
  for i in range(n):
    img = Image.fromarray(images[i, ..., 0] if c == 1 else images[i])
    arr = np.asarray(resize_center_crop(img, size, size), np.uint8)
    out[i] = arr[..., None] if c == 1 else arr
  return out


class FolderImages:
  """The images of a split too large to hold in memory (ImageNet): file paths
  that decode when indexed.

  Acts as the [N, H, W, C] uint8 array of a `Split` where the evaluation reads
  it (`len`, `shape`, `dtype`, slicing): a slice is another FolderImages (no
  decoding), an integer or an index array decodes those images, and
  `np.asarray` decodes the whole view. `distill.evaluate` thus decodes one batch
  at a time, and a multi-host evaluation's shard is only a view.
  """

  def __init__(self, paths: Sequence[str], resize: int, crop: int, channels: int = 3):
    self.paths = np.asarray(paths, dtype=object)  # [N] file paths
    self.resize, self.crop, self.channels = resize, crop, channels

  @property
  def shape(self) -> Tuple[int, int, int, int]:
    return (len(self.paths), self.crop, self.crop, self.channels)

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return FolderImages(self.paths[index], self.resize, self.crop, self.channels)
    if isinstance(index, (int, np.integer)):
      return decode(self.paths[index], self.resize, self.crop, self.channels)
    return decode_all(list(self.paths[np.asarray(index)]), self.resize, self.crop,
                      self.channels)

  def __array__(self, dtype=None, copy=None):
    del copy  # always a fresh array
    out = decode_all(list(self.paths), self.resize, self.crop, self.channels)
    return out if dtype is None else out.astype(dtype)

  def __repr__(self) -> str:
    return f'FolderImages({len(self)} files, shape={self.shape})'

"""Image files decoded with PIL, resized as torchvision's eval transforms do, or
cropped as its RandomResizedCrop + RandomHorizontalFlip train transform does, and
`FolderImages`: a split's images decoded batch by batch, on access.

Decoding converts every image to RGB, as torchvision's `default_loader` does
(TV:datasets/folder.py:260-264): some Tiny-ImageNet and ImageNet JPEGs are
grayscale or CMYK.
"""

import concurrent.futures
import math
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


def _open(path: str, channels: int):
  """The decoded PIL image (RGB, or L for one channel); errors name the file and the fix."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      return img.convert('RGB' if channels == 3 else 'L')
  except FileNotFoundError as e:
    raise DataNotFoundError(f'Image {path} vanished after the folder was listed; restore it '
                            'or point data.dir at a complete copy.') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataCorruptError(f'Cannot decode image {path} ({type(e).__name__}: {e}); it is '
                           f'truncated or not an image. {REPLACE}') from e


def decode(path: str, resize: int, crop: int, channels: int = 3) -> np.ndarray:
  """One image file -> [crop, crop, channels] uint8 (RGB, or L for one channel)."""
  img = _open(path, channels)
  if resize < crop:
    raise ValueError(f'resize={resize} is smaller than the crop {crop}.')
  arr = np.asarray(resize_center_crop(img, resize, crop), np.uint8)
  return arr if channels == 3 else arr[..., None]


def _decode_many(n: int, shape: Tuple[int, int, int], one) -> np.ndarray:
  """[n, *shape] uint8 with out[i] = one(i), on a few threads (PIL releases the GIL)."""
  out = np.empty((n,) + tuple(shape), np.uint8)
  if n <= 8:
    for i in range(n):
      out[i] = one(i)
    return out

  def work(i):
    out[i] = one(i)
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for f in [pool.submit(work, i) for i in range(n)]:
      f.result()  # re-raises the first decoding error
  return out


def decode_all(paths: Sequence[str], resize: int, crop: int, channels: int = 3) -> np.ndarray:
  """[N, crop, crop, channels] uint8, decoded on a few threads."""
  return _decode_many(len(paths), (crop, crop, channels),
                      lambda i: decode(paths[i], resize, crop, channels))


# ---------------------------------------------------------------- train transform

# torchvision RandomResizedCrop's defaults: aspect ratios (3/4, 4/3), 10 tries.
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_TRIES = 10
RRC_DRAWS = 4  # uniforms per try: area fraction, log aspect ratio, top, left
_TRAIN_STREAM = 0x52524331  # keeps the train-transform draws apart from other seeded streams


def resized_crop_box(width: int, height: int, draws: np.ndarray, scale: Sequence[float],
                     ratio: Sequence[float] = RRC_RATIO) -> Tuple[int, int, int, int]:
  """The (top, left, height, width) crop of torchvision `RandomResizedCrop.get_params`
  for uniform draws in [0, 1) given up front.

  Try t (draws[t] = u_area, u_ratio, u_top, u_left): target area = W * H * (s0 + u_area
  * (s1 - s0)), aspect = exp(log r0 + u_ratio * (log r1 - log r0)), w = round(sqrt(area *
  aspect)), h = round(sqrt(area / aspect)); accepted when 0 < w <= W and 0 < h <= H, then
  top = floor(u_top * (H - h + 1)), left = floor(u_left * (W - w + 1)) (torch.randint's
  range). The first accepted try wins. If none is: a centred crop of the whole image,
  narrowed to the nearest aspect ratio in range when the image's own is outside it.

  Args:
    width, height: the image's size.
    draws: [tries, 4] uniforms (RRC_TRIES tries for torchvision's behaviour).
    scale, ratio: RandomResizedCrop's area-fraction and aspect-ratio ranges.
  """
  draws = np.asarray(draws, np.float64)
  if draws.ndim != 2 or draws.shape[1] != RRC_DRAWS:
    raise ValueError(f'draws must be [tries, {RRC_DRAWS}], got {draws.shape}.')
  area = width * height
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  for u_area, u_ratio, u_top, u_left in draws:
    target = area * (scale[0] + u_area * (scale[1] - scale[0]))
    aspect = math.exp(lo + u_ratio * (hi - lo))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
  own = width / height
  if own < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif own > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def decode_train(path: str, size: int, draws: np.ndarray, flip: bool,
                 scale: Sequence[float], ratio: Sequence[float] = RRC_RATIO,
                 channels: int = 3) -> np.ndarray:
  """One image file through torchvision's `RandomResizedCrop(size, scale, ratio)` (crop
  box from `resized_crop_box`, then a bilinear resize of the crop to size x size, as
  `F.resized_crop` on a PIL image) and `RandomHorizontalFlip` (flipped where `flip`)
  -> [size, size, channels] uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = _open(path, channels)
  top, left, h, w = resized_crop_box(img.size[0], img.size[1], draws, scale, ratio)
  img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  if flip:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  arr = np.asarray(img, np.uint8)
  return arr if channels == 3 else arr[..., None]


def train_draws(seed: int, step: int, batch: int) -> Tuple[np.ndarray, np.ndarray]:
  """The random numbers of one step's train transform: ([batch, RRC_TRIES, RRC_DRAWS]
  crop uniforms, [batch] flip coins), a function of (seed, step) only (numpy's
  generator seeded with them), so a resumed run crops every image as before."""
  rng = np.random.default_rng([seed, _TRAIN_STREAM, step])
  return rng.random((batch, RRC_TRIES, RRC_DRAWS)), rng.random(batch) < 0.5


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

  def train_views(self, index, draws: np.ndarray, flips: np.ndarray, scale: Sequence[float],
                  ratio: Sequence[float] = RRC_RATIO) -> np.ndarray:
    """[len(index), crop, crop, channels] uint8: images `index` through the train
    transform (`decode_train`), image i with draws[i] and flips[i] (`train_draws`)."""
    paths = list(self.paths[np.asarray(index)])
    return _decode_many(len(paths), self.shape[1:], lambda i: decode_train(
        paths[i], self.crop, draws[i], bool(flips[i]), scale, ratio, self.channels))

  def __array__(self, dtype=None, copy=None):
    del copy  # always a fresh array
    out = decode_all(list(self.paths), self.resize, self.crop, self.channels)
    return out if dtype is None else out.astype(dtype)

  def __repr__(self) -> str:
    return f'FolderImages({len(self)} files, shape={self.shape})'

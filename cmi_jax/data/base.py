"""What every loader shares: the dataset record, the split type and the errors.

The bottom of the data package: it imports nothing else of cmi_jax.data, so
every loader module can import it.
"""

import dataclasses
from typing import NamedTuple, Tuple

import numpy as np

from cmi_jax.errors import UserError

SPLITS = ('train', 'test')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Shape, classes, normalization, standard augmentation and on-disk layout of a dataset."""
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
  layout: str = ''                    # the 'files' loader: a key of cmi_jax.data.LOADERS
  eval_resize: int = 0                # folders: shorter side resized to this before the
                                      # center crop to image_shape (0: no larger than the crop)
  crop_scale: Tuple[float, ...] = ()  # standard train augmentation RandomResizedCrop(scale)
                                      # + flip instead of the padded crop (ImageNet)


class Split(NamedTuple):
  images: np.ndarray  # [N, H, W, C] uint8 (or a data.FolderImages decoding on access)
  labels: np.ndarray  # [N] int32


class DataNotFoundError(UserError, FileNotFoundError):
  """Data files are absent or unreadable; the message says how to fix it."""


class DataCorruptError(DataNotFoundError):
  """A data file exists but is damaged (truncated, wrong size or format). `load`
  raises it at once rather than trying the next folder, and the runner stops on
  it rather than switching evaluation off: a damaged file must be replaced."""


class DataMismatchError(UserError, ValueError):
  """Data that do not fit the teacher (image size, channel count, class ids); the
  message names the file, what it holds, what the teacher takes and the fix."""


REPLACE = ('Replace the file with an intact copy (download it again or reinstall the '
           'package), or point data.dir at another folder.')

"""tensorflow-datasets backend (optional `[tfds]` extra), never downloading."""

from typing import Optional

import numpy as np

from cmi_jax.data.base import DataNotFoundError, DatasetInfo, Split


def load_tfds(info: DatasetInfo, split: str, data_dir: Optional[str]) -> Split:
  """tensorflow-datasets backend; never downloads (download=False)."""
  if not info.tfds_name:
    raise DataNotFoundError(f'{info.name} has no tensorflow-datasets version here; use '
                            'data.backend="files" with its files under data.dir.')
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataNotFoundError(
        'data.backend="tfds" needs tensorflow-datasets: pip install -e ".[tfds]" '
        '(or use data.backend="files").') from e
  try:
    # Batched iteration, not batch_size=-1: that asks tf.data for one batch of
    # the split's recorded size, which aborts the process when the size is
    # unknown (tfds.testing.mock_data without metadata).
    ds = tfds.load(info.tfds_name, split=split, data_dir=data_dir, download=False,
                   as_supervised=True)
    batches = list(tfds.as_numpy(ds.batch(10_000)))
  except Exception as e:  # tfds raises assorted errors when data are absent
    raise DataNotFoundError(
        f'tfds could not load {info.tfds_name!r} split {split!r} from data_dir={data_dir!r} '
        f'without downloading ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). '
        'Prepare it once where you have internet (tfds.builder(name).download_and_prepare()) '
        'and set data.dir to that folder, or use data.backend="files".') from e
  if not batches:
    raise DataNotFoundError(f'tfds split {split!r} of {info.tfds_name!r} in data_dir={data_dir!r} '
                            'is empty.')
  images = np.concatenate([np.asarray(b[0], np.uint8) for b in batches])
  labels = np.concatenate([np.asarray(b[1]) for b in batches])
  if images.ndim == 3:
    images = images[..., None]
  return Split(images, np.asarray(labels, np.int32))

"""The run's inputs: the frozen teacher (directory, .pth, or 'random' for smoke
tests), the real test split used for evaluation (none: evaluation is off) and
the pre-inverted images KD draws from beside the pool (kd.init_pool)."""

from typing import Optional

import numpy as np

import jax
from absl import logging

from cmi_jax import classifiers, data, models
from cmi_jax.teacher import Teacher


def load_teacher(cfg, info: data.DatasetInfo, dtype) -> Teacher:
  """The frozen teacher from a directory, a .pth, or 'random' (smoke tests).

  config.teacher.arch is a zoo name or your own model's factory
  'package.module:factory' (cmi_jax.classifiers)."""
  if cfg.teacher.checkpoint == 'random':
    logging.warning('teacher.checkpoint=random: a randomly initialized teacher (tests only).')
    module = classifiers.get(cfg.teacher.arch, info.num_classes)
    variables = models.init(module, jax.random.fold_in(jax.random.key(cfg.seed), 99),
                            (1,) + info.image_shape, train=False)
  else:
    from cmi_jax import teacher_io  # pylint: disable=g-import-not-at-top
    _, variables, card = teacher_io.load_teacher(
        cfg.teacher.checkpoint, arch=cfg.teacher.arch, num_classes=info.num_classes,
        input_shape=info.image_shape)
    del card
  # Rebuild with the compute dtype (params stay float32).
  module = classifiers.get(cfg.teacher.arch, info.num_classes, dtype=dtype,
                           remat=cfg.synthesis.remat)
  return Teacher(module, variables)



def load_test_split(cfg) -> Optional[data.Split]:
  """The real test split for evaluation (data.eval_limit examples when set, never
  decoded beyond them), or None (training is data-free)."""
  try:
    return data.load(cfg.data.name, 'test', cfg.data.dir or None, cfg.data.backend,
                     limit=cfg.data.eval_limit, **data.config_options(cfg.data))
  except data.DataCorruptError:
    raise  # a damaged file must be replaced, not silently skipped
  except data.DataNotFoundError as e:
    print(f'Evaluation is off: {e}')
    return None


def load_init_pool(cfg, info: data.DatasetInfo) -> Optional[np.ndarray]:
  """kd.init_pool's images [M, H, W, C] uint8 (a folder of images or a synthetic.npz,
  checked against the teacher's input shape; labels are not used), or None."""
  if not cfg.kd.init_pool:
    return None
  images = data.load_transfer_set(cfg.kd.init_pool, info.image_shape, info.num_classes,
                                  cfg.kd.init_resize, '--config.kd.init_resize=True').images
  print(f'KD draws from the synthesized pool plus the {len(images)} images of '
        f'{cfg.kd.init_pool} (kd.init_pool; never entering the memory bank).')
  return images

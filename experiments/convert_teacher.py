r"""Converts a reference PyTorch teacher checkpoint (.pth) into a cmi_jax teacher directory.

  python -m experiments.convert_teacher --arch=wrn_40_2 \
      --checkpoint=checkpoints/pretrained/cifar10_wrn_40_2.pth --out=teachers/cifar10_wrn_40_2

Takes seconds on a CPU and needs no torch: the file is read with an allow-listed
unpickler (it never runs code from the checkpoint) and mapped strictly (any
missing, unexpected or mis-shaped key aborts). Load the result with
`cmi_jax.teacher_io.load_teacher(out)`.
"""

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from cmi_jax import convert, errors, models, teacher_io

_ARCH = flags.DEFINE_enum('arch', None, sorted(models.CLASSIFIERS), 'Teacher architecture.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Zip-format torch .pth file.')
_OUT = flags.DEFINE_string('out', None, 'Teacher directory to write.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 10, 'Classifier outputs.')
_INPUT_SHAPE = flags.DEFINE_string('input_shape', '32,32,3', 'H,W,C of one input image.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing teacher at --out.')
flags.mark_flags_as_required(['arch', 'checkpoint', 'out'])


def parse_input_shape(text: str):
  """'32,32,3' -> (32, 32, 3); errors name the bad value."""
  try:
    shape = tuple(int(d) for d in text.split(','))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise app.UsageError(f'--input_shape must be H,W,C with positive ints, got {text!r}.')
  return shape


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  input_shape = parse_input_shape(_INPUT_SHAPE.value)
  _, variables = convert.load_pth(_CHECKPOINT.value, _ARCH.value, _NUM_CLASSES.value,
                                  input_shape)
  meta = convert.conversion_meta(_CHECKPOINT.value, _ARCH.value, _NUM_CLASSES.value,
                                 input_shape)
  out = teacher_io.save_teacher(_OUT.value, arch=_ARCH.value, num_classes=_NUM_CLASSES.value,
                                input_shape=input_shape, variables=variables, meta=meta,
                                overwrite=_OVERWRITE.value)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  logging.info('Converted %s (%s, %d params, sha256 %s) -> %s', _CHECKPOINT.value,
               _ARCH.value, n_params, meta['source_sha256'], out)
  print(f'Wrote teacher {_ARCH.value} ({n_params:,} params) to {out}')


if __name__ == '__main__':
  app.run(errors.main_guard(main))  # a damaged or unsafe .pth: one `error:` line, exit 2

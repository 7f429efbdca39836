r"""Exports a run's distilled student for PyTorch or ONNX Runtime.

  python -m experiments.export --workdir=runs/fmnist_cmi --format=pth --out=student.pth
  python -m experiments.export --workdir=runs/fmnist_cmi --format=onnx --out=student.onnx

`pth`: {'state_dict': ...} in the reference code's keys and layouts, loadable with
`load_state_dict(strict=True)` into the reference's class (needs the [torch] extra).
`onnx`: the eval-mode forward, NCHW input, dynamic batch (needs the [onnx] extra
and jax2onnx, see the README). Both take normalised float32 NCHW images; the card
`<out>.json` beside the file gives arch, classes, input shape, mean/std and the
run's accuracy. Seconds on a CPU. Bad input (no run, no checkpoint, unknown
format, unwritable --out): one `error:` line, exit status 2.
"""

from absl import app
from absl import flags
from absl import logging

from cmi_jax import errors
from experiments import student_export

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run\'s workdir (experiments.run --workdir).')
_FORMAT = flags.DEFINE_string('format', None, f'One of {student_export.FORMATS}; default: '
                              'from the --out suffix.')
_OUT = flags.DEFINE_string('out', None, 'File to write; its card goes to <out>.json.')
_WHICH = flags.DEFINE_string('which', 'final', f'One of {student_export.WHICH}: the final '
                             'student (a run saves no best-epoch student, so best is refused).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'Unexpected arguments: {argv[1:]}.')
  logging.set_verbosity(logging.WARNING)  # orbax narrates every read at INFO
  fmt = _FORMAT.value
  if fmt is None:
    fmt = _OUT.value.rpartition('.')[2] if '.' in _OUT.value else ''
    if fmt not in student_export.FORMATS:
      raise errors.UserError(f'--out={_OUT.value}: cannot tell the format from its suffix; '
                             f'pass --format (one of {student_export.FORMATS}).')
  card = student_export.export_student(_WORKDIR.value, fmt, _OUT.value, _WHICH.value,
                                       _OVERWRITE.value)
  acc = card['student_accuracy']
  print(f'Wrote {card["which"]} student {card["arch"]} (round {card["round"]}, test accuracy '
        f'{"n/a" if acc is None else f"{acc:.2f}%"}) as {fmt} to {_OUT.value}; card '
        f'{_OUT.value}.json')


if __name__ == '__main__':
  app.run(errors.main_guard(main), flags_parser=errors.parse_flags)

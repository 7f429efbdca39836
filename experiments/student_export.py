"""A run's distilled student out of its workdir: a reference-layout `.pth` or ONNX.

Behind `experiments.export` (the CLI). The student comes from the run's newest
checkpoint (`<workdir>/checkpoints`, read in part: params and BN statistics
only) with its architecture and dataset from `<workdir>/config.json`. Both
formats are the inference forward in eval mode (BN running statistics) and take
what the reference's nets take: float32 NCHW images, normalised per channel,
`(pixel / 255 - mean) / std`. Beside the file, `<out>.json` (the card) says so:
architecture, classes, input shape and layout, mean/std, and the run's accuracy.

A run keeps only its latest checkpoints (log.max_checkpoints) and never saves
the best epoch's student, so only the final student can be exported.
"""

import json
import logging
import os
from typing import Any, Dict, NamedTuple

import jax
import numpy as np

from cmi_jax import checkpoint, convert, data, models
from cmi_jax.errors import CheckpointError, OutputError, UserError, WorkdirError

FORMATS = ('pth', 'onnx')
WHICH = ('final', 'best')
ONNX_OPSET = 23
_INPUT_NAME, _OUTPUT_NAME = 'images', 'logits'
# jax2onnx's metadata pins orbax-checkpoint<0.11.37 (its converter never imports orbax), which
# clashes with cmi_jax's orbax>=0.12: it is installed without its declared dependencies.
_EXTRA = {'pth': ('torch', "pip install 'cmi_jax[torch]'"),
          'onnx': ('jax2onnx', "pip install 'cmi_jax[onnx]' && pip install --no-deps "
                   'jax2onnx==0.17.1')}


class RunStudent(NamedTuple):
  """The exportable student: module, {'params', 'batch_stats'} and its card."""
  module: Any
  variables: Dict[str, Any]
  card: Dict[str, Any]


def _read_json(path: str, what: str) -> Dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f'Cannot read the run\'s {what} {path} ({type(e).__name__}: {e}).') from e


def load_run_student(workdir: str, which: str = 'final') -> RunStudent:
  """The student of the run in `workdir`, from its newest checkpoint.

  Args:
    workdir: an `experiments.run` workdir (config.json, checkpoints/).
    which: 'final' (the newest checkpoint's student); 'best' is refused with a
      `UserError`, as no run saves the best epoch's student.

  Raises:
    UserError (WorkdirError, CheckpointError): no run there, no checkpoint yet,
      an unreadable checkpoint, or which='best'.
  """
  workdir = os.path.abspath(workdir)
  if which not in WHICH:
    raise UserError(f'--which={which!r} is invalid: choose one of {WHICH}.')
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise WorkdirError(f'No run at --workdir={workdir}: no such folder.')
  if not os.path.isfile(config_path):
    raise WorkdirError(f'No run at --workdir={workdir}: it has no config.json (the file '
                       'python -m experiments.run writes first).')
  cfg = _read_json(config_path, 'config')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
    raise CheckpointError(f'The run at --workdir={workdir} has no checkpoint yet (runs save '
                          'one at round boundaries); run or resume it first.')
  if which == 'best':
    raise UserError(
        f'--which=best: the run at {workdir} has no best student to export: a run keeps '
        'only its latest checkpoints (log.max_checkpoints), not the best epoch\'s student '
        '(summary.json reports that epoch\'s accuracy only). Export --which=final.')
  part, meta, step = checkpoint.read_part(
      ckpt_dir, lambda t: {'student': {k: t['student'][k] for k in ('params', 'batch_stats')}})
  info = data.get_info(cfg['data']['name'], cfg['data'].get('dir') or None,
                       **data.config_options(cfg['data']))
  arch = cfg['student']['arch']
  module = models.get(arch, info.num_classes)  # float32, whatever the run computed in
  variables = jax.tree_util.tree_map(np.asarray, part['student'])
  evals = [h for h in meta.get('history', []) if 'student_accuracy' in h]
  accs = [h['student_accuracy'] for h in evals]
  h, w, c = info.image_shape
  card = {
      'arch': arch, 'num_classes': info.num_classes, 'dataset': info.name,
      'input_shape': [c, h, w], 'input_layout': 'NCHW', 'input_dtype': 'float32',
      'mean': list(info.mean), 'std': list(info.std),
      'preprocessing': 'x[c] = (pixel[c] / 255 - mean[c]) / std[c], pixels uint8 in [0, 255]',
      'output': f'logits [N, {info.num_classes}] (eval mode: BN running statistics)',
      'which': which, 'checkpoint_step': int(step), 'round': int(meta.get('round', step)),
      'student_accuracy': accs[-1] if accs else None,   # % top-1 on the run's test split
      'accuracy_round': evals[-1]['round'] if evals else None,  # < round: stopped mid-epoch
      'best_student_accuracy': max(accs) if accs else None,
      'teacher': cfg.get('teacher', {}).get('arch'), 'teacher_accuracy':
      meta.get('teacher_accuracy'), 'method': cfg.get('method'), 'workdir': workdir,
      'eval_limit': cfg['data'].get('eval_limit') or None,  # accuracy on this many images
  }
  return RunStudent(module, variables, card)


def _check_out(out: str, fmt: str, overwrite: bool) -> str:
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  if os.path.isdir(out):
    raise OutputError(f'--out={out} is a folder; name the .{fmt} file to write.')
  if not os.path.isdir(parent):
    raise OutputError(f'--out={out}: its folder {parent} does not exist.')
  if not os.access(parent, os.W_OK):
    raise OutputError(f'--out={out}: its folder {parent} is not writable.')
  if os.path.exists(out) and not overwrite:
    raise OutputError(f'--out={out} exists; pass --overwrite to replace it.')
  return out


def _eval_forward(student: RunStudent):
  """NHWC images -> logits, eval mode, the variables closed over (constants)."""
  return lambda x: student.module.apply(student.variables, x, train=False)


def write_pth(student: RunStudent, path: str) -> None:
  """{'state_dict': ...} in the reference's keys and layouts (convert.flax_to_torch)."""
  convert.save_torch_state_dict(student.variables, path)


def write_onnx(student: RunStudent, path: str) -> None:
  """The eval forward traced by jax2onnx, NCHW input, dynamic batch axis (the card
  needs 'arch' and 'input_shape' [C, H, W] only).

  On the CPU backend the convolutions carry a custom VJP (cmi_jax/models/layers.py:
  explicit gradients); jax2onnx converts the forward inside it, which is all an
  inference graph needs.
  """
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  c, h, w = student.card['input_shape']
  # jax2onnx imports all its plugins, warning (with a traceback) for each whose
  # optional dependency (dm_pix, equinox, ...) is absent: none is used here.
  quiet = logging.getLogger('jax2onnx')
  level, quiet.level = quiet.level, logging.ERROR
  try:
    proto = to_onnx(_eval_forward(student), [('N', h, w, c)], model_name=student.card['arch'],
                    opset=ONNX_OPSET, inputs_as_nchw=[0], input_names=[_INPUT_NAME],
                    output_names=[_OUTPUT_NAME])
  finally:
    quiet.setLevel(level)
  with open(path, 'wb') as f:
    f.write(proto.SerializeToString())


_WRITERS = {'pth': write_pth, 'onnx': write_onnx}


def export_student(workdir: str, fmt: str, out: str, which: str = 'final',
                   overwrite: bool = False) -> Dict[str, Any]:
  """Writes the run's student to `out` (format `fmt`) and its card to `out + '.json'`.

  Returns:
    The card, with 'format' and 'file' added.

  Raises:
    UserError: a bad argument, workdir or output path, or the format's extra missing.
  """
  if fmt not in FORMATS:
    raise UserError(f'--format={fmt!r} is unknown: choose one of {FORMATS}.')
  out = _check_out(out, fmt, overwrite)
  student = load_run_student(workdir, which)
  tmp = f'{out}.tmp-{os.getpid()}'  # renamed into place once complete
  try:
    _WRITERS[fmt](student, tmp)
    os.replace(tmp, out)
  except ImportError as e:
    package, hint = _EXTRA[fmt]
    raise UserError(f'--format={fmt} needs {e.name or package}: {hint}.') from e
  except OSError as e:
    raise OutputError(f'Cannot write --out={out} ({type(e).__name__}: {e}).') from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  card = dict(student.card, format=fmt, file=os.path.basename(out))
  with open(out + '.json', 'w') as f:
    json.dump(card, f, indent=2)
  return card

"""Converted teachers on disk: an orbax checkpoint of the variables plus a JSON card.

Layout of a teacher directory:
  <dir>/variables/    orbax StandardCheckpointer tree {'params', 'batch_stats'}
  <dir>/teacher.json  {'arch', 'num_classes', 'input_shape', 'meta'}
`load_teacher` also takes a reference `.pth` file and converts it on the fly
(`cmi_jax.convert`), so experiments accept either form.
"""

import json
import pathlib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from cmi_jax import convert, models

VARIABLES_DIR = 'variables'
CARD_FILE = 'teacher.json'
_COLLECTIONS = ('params', 'batch_stats')


def _json_scalar(value):
  """numpy/jax scalars and small arrays (e.g. an accuracy metric) as JSON values."""
  if hasattr(value, 'tolist'):
    return value.tolist()
  raise TypeError(f'meta value {value!r} ({type(value).__name__}) is not JSON-serializable; '
                  'pass numbers, strings, lists or dicts.')


def save_teacher(out_dir, *, arch: str, num_classes: int, input_shape: Sequence[int],
                 variables: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None,
                 overwrite: bool = False) -> pathlib.Path:
  """Saves a classifier's variables and its card into `out_dir`.

  Args:
    out_dir: directory to create (or reuse when overwrite=True).
    arch: `cmi_jax.models.CLASSIFIERS` name, e.g. 'wrn_40_2'.
    num_classes: classifier outputs.
    input_shape: (H, W, C) of one input image.
    variables: {'params', 'batch_stats'} of `models.get(arch, num_classes)`.
    meta: JSON-serializable provenance (e.g. `convert.conversion_meta`).
    overwrite: replace an existing teacher in `out_dir`.
  Returns:
    The absolute teacher directory.
  """
  out_dir = pathlib.Path(out_dir).resolve()
  missing = [c for c in _COLLECTIONS if c not in variables]
  if missing:
    raise ValueError(f'variables lack {missing}; expected keys {_COLLECTIONS}.')
  if (out_dir / VARIABLES_DIR).exists() and not overwrite:
    raise FileExistsError(f'A teacher already exists at {out_dir}; pass overwrite=True or '
                          'choose another directory.')
  card = {'arch': arch, 'num_classes': int(num_classes),
          'input_shape': [int(d) for d in input_shape], 'meta': dict(meta or {})}
  # Serialized before anything is written, so an unserializable meta leaves no half teacher.
  card_text = json.dumps(card, indent=2, sort_keys=True, default=_json_scalar) + '\n'
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / CARD_FILE).unlink(missing_ok=True)  # the card is written last: its presence = complete
  checkpointer = ocp.StandardCheckpointer()
  # Plain dicts on disk, so the restore target from eval_shape has the same structure.
  tree = {c: flax.core.unfreeze(variables[c]) for c in _COLLECTIONS}
  checkpointer.save(out_dir / VARIABLES_DIR, tree, force=overwrite)
  checkpointer.wait_until_finished()
  checkpointer.close()
  (out_dir / CARD_FILE).write_text(card_text)
  return out_dir


def _load_dir(path: pathlib.Path) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
  card_path, var_path = path / CARD_FILE, path / VARIABLES_DIR
  if not card_path.is_file() or not var_path.is_dir():
    raise FileNotFoundError(
        f'Incomplete teacher directory {path}: expected {CARD_FILE} and {VARIABLES_DIR}/ '
        f'(found {sorted(p.name for p in path.iterdir())}). Re-run '
        'experiments/convert_teacher.py, or pass the original .pth file.')
  card = json.loads(card_path.read_text())
  info = {'arch': card['arch'], 'num_classes': int(card['num_classes']),
          'input_shape': tuple(card['input_shape']), 'meta': card.get('meta', {})}
  module = models.get(info['arch'], info['num_classes'])
  # Restore into the exact abstract tree so shapes and dtypes come back right,
  # onto this process's first device: the saved sharding names the saver's
  # device, which another host of a multi-host run does not have.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
      convert.abstract_variables(module, info['input_shape']))
  checkpointer = ocp.StandardCheckpointer()
  variables = checkpointer.restore(var_path, {c: abstract[c] for c in _COLLECTIONS})
  checkpointer.close()
  return module, dict(variables), info


def load_teacher(path, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
                 input_shape: Optional[Sequence[int]] = None
                 ) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
  """Loads a teacher directory (from `save_teacher`) or converts a reference `.pth`.

  Args:
    path: teacher directory, or a zip-format torch checkpoint file.
    arch, num_classes, input_shape: required for a `.pth` file (it does not
      record them); for a directory they are optional checks against its card.
  Returns:
    (module, variables, info) with info = {'arch', 'num_classes', 'input_shape', 'meta'}.
  """
  path = pathlib.Path(path).resolve()
  given = {'arch': arch, 'num_classes': num_classes,
           'input_shape': None if input_shape is None else tuple(input_shape)}
  if path.is_dir():
    module, variables, info = _load_dir(path)
    for name, value in given.items():
      if value is not None and value != info[name]:
        raise ValueError(f'{name}={value!r} was requested but the teacher at {path} has '
                         f'{name}={info[name]!r}.')
    return module, variables, info
  if not path.is_file():
    raise FileNotFoundError(f'No teacher at {path}: pass a directory written by save_teacher '
                            '(experiments/convert_teacher.py) or a .pth checkpoint file.')
  for name, value in given.items():
    if value is None:
      raise ValueError(f'Loading the checkpoint file {path} needs {name}= (a .pth file does '
                       'not record arch, num_classes or input_shape).')
  module, variables = convert.load_pth(path, arch, num_classes, given['input_shape'])
  meta = convert.conversion_meta(path, arch, num_classes, given['input_shape'])
  info = {'arch': arch, 'num_classes': int(num_classes),
          'input_shape': given['input_shape'], 'meta': meta}
  return module, variables, info

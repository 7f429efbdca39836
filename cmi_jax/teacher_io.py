"""Converted teachers on disk: an orbax checkpoint of the variables plus a JSON card.

Layout of a teacher directory:
  <dir>/variables/    orbax StandardCheckpointer tree {'params', 'batch_stats'}
  <dir>/teacher.json  {'arch', 'num_classes', 'input_shape', 'meta'}
`load_teacher` also takes a reference `.pth` file and converts it on the fly
(`cmi_jax.convert`), so experiments accept either form.
"""

import hashlib
import json
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from cmi_jax import classifiers, convert
from cmi_jax.errors import TeacherError, TeacherNotFoundError

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
    arch: `cmi_jax.models.CLASSIFIERS` name, e.g. 'wrn_40_2', or your own model's
      factory 'package.module:factory' (cmi_jax.classifiers; importable where loaded).
    num_classes: classifier outputs.
    input_shape: (H, W, C) of one input image.
    variables: {'params', 'batch_stats'} of `classifiers.get(arch, num_classes)`.
    meta: JSON-serializable provenance (e.g. `convert.conversion_meta`).
    overwrite: replace an existing teacher in `out_dir`.
  Returns:
    The absolute teacher directory.
  """
  out_dir = pathlib.Path(out_dir).resolve()
  # Your own model without BatchNorm has no batch_stats; every zoo classifier has them.
  needed = ('params',) if classifiers.is_factory_spec(arch) else _COLLECTIONS
  missing = [c for c in needed if c not in variables]
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
  tree = {c: flax.core.unfreeze(variables[c]) for c in _COLLECTIONS if c in variables}
  checkpointer.save(out_dir / VARIABLES_DIR, tree, force=overwrite)
  checkpointer.wait_until_finished()
  checkpointer.close()
  (out_dir / CARD_FILE).write_text(card_text)
  return out_dir


def _read_card(path: pathlib.Path) -> Dict[str, Any]:
  """The card's fields, checked: valid JSON, known arch, positive ints."""
  card_path = path / CARD_FILE
  fix = (f'Restore the original {CARD_FILE} (e.g. git checkout of the shipped teacher), or '
         're-create the directory with experiments/convert_teacher.py / train_teacher.py.')
  try:
    card = json.loads(card_path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise TeacherError(f'{card_path} is not valid JSON ({e}). {fix}') from None
  if not isinstance(card, dict):
    raise TeacherError(f'{card_path} holds a {type(card).__name__}, not the card object. {fix}')
  missing = [k for k in ('arch', 'num_classes', 'input_shape') if k not in card]
  if missing:
    raise TeacherError(f'{card_path} lacks {missing}. {fix}')
  arch, k, shape = card['arch'], card['num_classes'], card['input_shape']
  try:
    classifiers.check_arch(arch)
  except ValueError as e:
    raise TeacherError(f'{card_path}: {e} {fix}') from None
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise TeacherError(f'{card_path}: num_classes={k!r} must be a positive int. {fix}')
  if (not isinstance(shape, list) or len(shape) != 3 or
      not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
    raise TeacherError(f'{card_path}: input_shape={shape!r} must be [H, W, C] positive ints. '
                       f'{fix}')
  return {'arch': arch, 'num_classes': k, 'input_shape': tuple(shape),
          'meta': card.get('meta', {})}


def _saved_shapes(var_path: pathlib.Path) -> Dict[str, Tuple[int, ...]]:
  """'collection/a/b/leaf' -> shape of every array saved under variables/."""
  meta = ocp.StandardCheckpointer().metadata(var_path)
  tree = getattr(getattr(meta, 'item_metadata', meta), 'tree', None)
  tree = getattr(meta, 'item_metadata', meta) if tree is None else tree
  flat = flax.traverse_util.flatten_dict(dict(tree), sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}


def _check_card_fits(path: pathlib.Path, info: Dict[str, Any], abstract) -> None:
  """The card must describe the saved weights: an edited arch, num_classes or
  input channel count shows as missing, extra or re-shaped arrays."""
  want = {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(dict(abstract), sep='/').items()}
  try:
    have = _saved_shapes(path / VARIABLES_DIR)
  except Exception as e:  # orbax raises assorted errors for damaged metadata
    raise TeacherError(f'Cannot read the weights in {path / VARIABLES_DIR} '
                       f'({type(e).__name__}: {e}); the directory is damaged: re-create it '
                       'with experiments/convert_teacher.py / train_teacher.py.') from None
  diffs: List[str] = [f'{k}: card implies {want[k]}, saved {have[k]}'
                      for k in sorted(want) if k in have and want[k] != have[k]]
  diffs += [f'{k}: missing from the saved weights' for k in sorted(set(want) - set(have))]
  diffs += [f'{k}: saved but not in {info["arch"]}' for k in sorted(set(have) - set(want))]
  if diffs:
    more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
    raise TeacherError(
        f'The card {path / CARD_FILE} (arch={info["arch"]!r}, num_classes={info["num_classes"]}, '
        f'input_shape={list(info["input_shape"])}) does not describe the weights in '
        f'{path / VARIABLES_DIR}: {"; ".join(diffs[:3])}{more}. The card was edited or belongs '
        'to another teacher: restore the original card, or re-create the directory with '
        'experiments/convert_teacher.py / train_teacher.py.')


def check_finite(variables: Mapping[str, Any], source) -> None:
  """Refuses weights that hold NaN or inf (a damaged file or a diverged training):
  such a teacher poisons every synthesized batch."""
  bad = []
  for key, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)),
                                                   sep='/').items():
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      bad.append(f'{key} ({int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} inf of '
                 f'{a.size})')
  if bad:
    more = f' and {len(bad) - 3} more arrays' if len(bad) > 3 else ''
    raise TeacherError(f'The teacher at {source} holds non-finite weights: '
                       f'{", ".join(bad[:3])}{more}. The file is damaged or its training '
                       'diverged: re-convert or re-train it, or use another teacher.')


def content_hash(path) -> str:
  """SHA-256 over a teacher's files (a directory: every file's relative path and
  bytes, in sorted order; a .pth: its bytes). Identifies the weights a run used,
  whatever the folder is called or where it lies."""
  path = pathlib.Path(path).resolve()
  h = hashlib.sha256()
  files = sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path]
  for f in files:
    if path.is_dir():
      h.update(f.relative_to(path).as_posix().encode() + b'\0')
    with open(f, 'rb') as fh:
      for chunk in iter(lambda: fh.read(1 << 20), b''):
        h.update(chunk)
    h.update(b'\0')
  return h.hexdigest()


def _load_dir(path: pathlib.Path) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
  card_path, var_path = path / CARD_FILE, path / VARIABLES_DIR
  if not card_path.is_file() or not var_path.is_dir():
    raise TeacherNotFoundError(
        f'Incomplete teacher directory {path}: expected {CARD_FILE} and {VARIABLES_DIR}/ '
        f'(found {sorted(p.name for p in path.iterdir())}). Re-run '
        'experiments/convert_teacher.py, or pass the original .pth file.')
  info = _read_card(path)
  module = classifiers.get(info['arch'], info['num_classes'])
  # Restore into the exact abstract tree so shapes and dtypes come back right,
  # onto this process's first device: the saved sharding names the saver's
  # device, which another host of a multi-host run does not have.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
      convert.abstract_variables(module, info['input_shape'], train=False))
  abstract = {c: abstract[c] for c in _COLLECTIONS if c in abstract}
  _check_card_fits(path, info, abstract)
  checkpointer = ocp.StandardCheckpointer()
  try:
    variables = checkpointer.restore(var_path, abstract)
  except Exception as e:  # a truncated or edited array file fails deep inside orbax/tensorstore
    raise TeacherError(f'Cannot read the weights in {var_path} ({type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else ""}); the directory is damaged: '
                       're-create it with experiments/convert_teacher.py / train_teacher.py.'
                       ) from None
  finally:
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
        raise TeacherError(f'{name}={value!r} was requested but the teacher at {path} has '
                           f'{name}={info[name]!r}: use a teacher made for this data and '
                           'architecture (the run takes num_classes and input_shape from '
                           'config.data.name, arch from config.teacher.arch), or change the '
                           'request to match the teacher.')
    check_finite(variables, path)
    return module, variables, info
  if not path.is_file():
    raise TeacherNotFoundError(f'No teacher at {path}: pass a directory written by save_teacher '
                            '(experiments/convert_teacher.py) or a .pth checkpoint file.')
  for name, value in given.items():
    if value is None:
      raise ValueError(f'Loading the checkpoint file {path} needs {name}= (a .pth file does '
                       'not record arch, num_classes or input_shape).')
  if classifiers.is_factory_spec(arch):
    raise TeacherError(f'arch={arch!r} is your own model: a .pth file cannot be mapped onto it '
                       '(convert.py knows the zoo only). Save its variables with '
                       'teacher_io.save_teacher(dir, arch=...) and pass the directory.')
  module, variables = convert.load_pth(path, arch, num_classes, given['input_shape'])
  check_finite(variables, path)
  meta = convert.conversion_meta(path, arch, num_classes, given['input_shape'])
  info = {'arch': arch, 'num_classes': int(num_classes),
          'input_shape': given['input_shape'], 'meta': meta}
  return module, variables, info

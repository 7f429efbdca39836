"""PyTorch `.pth` checkpoints to Flax variables, without torch and without running code.

Files are read by `cmi_jax.pth` (zip and legacy torch.save formats, allow-listed
unpickling: a checkpoint never runs code); its public names are re-exported here.
Accepted layouts: the reference's `{'state_dict': ...}`, a `{'model': ...}` dict,
or a raw state_dict (torchvision's published weights).

The key mapping is a table because the Flax modules in `cmi_jax.models` carry
the PyTorch submodule names: `a.b.weight` (conv, OIHW) <-> params `a/b/kernel`
(HWIO), Linear `weight` (out, in) <-> `kernel` (in, out), BN `weight` <->
`scale`, `running_mean`/`running_var` <-> batch_stats `mean`/`var`.
Loading is strict: any missing, unexpected or mis-shaped key is an error.
"""

import collections
import hashlib
import pathlib
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmi_jax import models
from cmi_jax.pth import CheckpointFormatError, UnsafeCheckpointError, load_pth_object

StateDict = Dict[str, np.ndarray]

_MODULE_PREFIX = 'module.'  # added by torch.nn.DataParallel / DistributedDataParallel
_DROPPED_SUFFIX = '.num_batches_tracked'  # BN step counter: no Flax counterpart
_CONTAINER_KEYS = ('state_dict', 'model')  # where training scripts put the weights
_MAX_LISTED = 8  # problems spelled out in one mismatch error
_HASH_CHUNK = 1 << 20

# Axis orders between the two layouts.
_OIHW_TO_HWIO = (2, 3, 1, 0)
_HWIO_TO_OIHW = (3, 2, 0, 1)
_TRANSPOSE_2D = (1, 0)

_PARAM_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_STATS_TO_TORCH = {'mean': 'running_mean', 'var': 'running_var'}


class CheckpointMismatchError(ValueError):
  """The state_dict does not fit the target architecture (missing/unexpected/shape)."""


# ----------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------

def extract_state_dict(obj: Any, source: str = 'checkpoint') -> StateDict:
  """The weights of a loaded checkpoint as {torch key: array}.

  Accepts a raw state_dict or a dict holding one under 'state_dict' or 'model';
  strips a DataParallel 'module.' prefix and drops BN 'num_batches_tracked'.
  """
  if isinstance(obj, Mapping):
    for key in _CONTAINER_KEYS:
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not obj:
    kind = type(obj).__name__
    keys = list(obj)[:_MAX_LISTED] if isinstance(obj, Mapping) else None
    raise ValueError(f'{source}: expected a state_dict or a dict with one of '
                     f'{_CONTAINER_KEYS}, got {kind} with keys {keys}.')
  out: StateDict = {}
  for key, value in obj.items():
    if not isinstance(key, str) or not hasattr(value, 'shape'):
      raise ValueError(f'{source}: state_dict entry {key!r} is a {type(value).__name__}, '
                       'not a tensor; pass the weights dict itself.')
    if key.endswith(_DROPPED_SUFFIX) or key == _DROPPED_SUFFIX[1:]:
      continue
    out[key[len(_MODULE_PREFIX):] if key.startswith(_MODULE_PREFIX) else key] = np.asarray(value)
  return out


def read_pth(path) -> StateDict:
  """Reads the state_dict of a `.pth` file (zip or legacy) safely (see `load_pth_object`)."""
  return extract_state_dict(load_pth_object(path), source=str(path))


class _Entry(NamedTuple):
  """Where one torch key lives in the Flax variables, and how to lay it out."""
  collection: str
  path: Tuple[str, ...]
  flax_shape: Tuple[int, ...]
  dtype: Any
  to_flax: Optional[Tuple[int, ...]]  # axis permutation torch -> flax, None = same layout

  @property
  def torch_shape(self) -> Tuple[int, ...]:
    if self.to_flax is None:
      return self.flax_shape
    return tuple(self.flax_shape[self.to_flax.index(i)] for i in range(len(self.flax_shape)))


def _key_table(variables: Mapping[str, Any]) -> Dict[str, _Entry]:
  """{torch key: _Entry} for every leaf of variables['params'] and ['batch_stats']."""
  table: Dict[str, _Entry] = {}
  names = {'params': _PARAM_TO_TORCH, 'batch_stats': _STATS_TO_TORCH}
  for collection, leaf_names in names.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      keys = tuple(str(p.key) for p in path)
      if keys[-1] not in leaf_names:
        raise ValueError(f'No torch name for Flax variable {collection}/{"/".join(keys)}; '
                         f'known leaf names: {sorted(leaf_names)}.')
      perm = None
      if keys[-1] == 'kernel':
        perm = {4: _OIHW_TO_HWIO, 2: _TRANSPOSE_2D}.get(len(leaf.shape))
        if perm is None:
          raise ValueError(f'Unsupported kernel rank {len(leaf.shape)} at {"/".join(keys)}.')
      torch_key = '.'.join(keys[:-1] + (leaf_names[keys[-1]],))
      table[torch_key] = _Entry(collection, keys, tuple(leaf.shape), leaf.dtype, perm)
  return table


def _describe_mismatch(state_dict: Mapping[str, np.ndarray], table: Mapping[str, _Entry],
                       arch: str) -> Optional[str]:
  """None when the keys and shapes match exactly, else an error message."""
  problems = []
  for key, value in state_dict.items():  # checkpoint order: the first bad key comes first
    if key not in table:
      problems.append(f'{key!r} is unexpected (no such entry in {arch})')
    elif tuple(value.shape) != table[key].torch_shape:
      problems.append(f'{key!r} has shape {tuple(value.shape)} in the checkpoint but '
                      f'{table[key].torch_shape} in {arch}')
  problems += [f'{k!r} is missing from the checkpoint' for k in table if k not in state_dict]
  if not problems:
    return None
  listed = '\n  '.join(problems[:_MAX_LISTED])
  more = f'\n  ... and {len(problems) - _MAX_LISTED} more' if len(problems) > _MAX_LISTED else ''
  return (f'Checkpoint does not fit architecture {arch}: first bad key {problems[0]}. '
          f'{len(problems)} problem(s):\n  {listed}{more}\n'
          'Check the architecture name, num_classes and input channels against the '
          'checkpoint (nothing was loaded).')


def abstract_variables(module: nn.Module, input_shape: Sequence[int],
                       **init_kwargs) -> Dict[str, Any]:
  """Shapes/dtypes of `models.init(module, ...)` on one example, computing nothing.

  Args:
    module: an unbound Flax module from `cmi_jax.models`.
    input_shape: per-example input shape, e.g. (32, 32, 3) or (nz,) for a
      generator; a batch axis of 1 is prepended.
  """
  shape = (1, *(int(d) for d in input_shape))
  return jax.eval_shape(lambda rng: models.init(module, rng, shape, **init_kwargs),
                        jax.random.key(0))


def torch_to_flax(state_dict: Mapping[str, Any], module: nn.Module, input_shape: Sequence[int],
                  arch_name: Optional[str] = None) -> Dict[str, Any]:
  """Maps a PyTorch state_dict onto `module`'s variables {'params', 'batch_stats'}.

  Args:
    state_dict: {torch key: array} (numpy or torch tensors); a 'module.' prefix
      and 'num_batches_tracked' entries are tolerated.
    module: the matching Flax module (its submodule names are the torch names).
    input_shape: per-example input shape used to build the target tree.
    arch_name: name used in errors (default: the module's class name).
  Returns:
    Variables with the model's dtypes (float32).
  Raises:
    CheckpointMismatchError: naming the first bad key, shapes and architecture.
  """
  arch = arch_name or type(module).__name__
  if isinstance(module, models.NLGenerator):
    raise CheckpointMismatchError(
        "NAYER's NLGenerator is not converted: its noisy layers (one Linear per chunk of C "
        'samples, stacked here into one kernel) depend on the batch size and are re-drawn '
        'N(0, 1) at every loop, and the whole generator is replaced every g_life epochs, so '
        'a trained NLGenerator state_dict holds nothing a later run keeps. Start NAYER from '
        "a fresh generator (synthesis.algorithm='nayer' does); teachers and students convert.")
  state_dict = extract_state_dict(dict(state_dict), source=arch)
  table = _key_table(abstract_variables(module, input_shape))
  error = _describe_mismatch(state_dict, table, arch)
  if error:
    raise CheckpointMismatchError(error)
  variables: Dict[str, Any] = {}
  for key, entry in table.items():
    value = state_dict[key]
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise CheckpointMismatchError(f'{key!r} has dtype {value.dtype} in the checkpoint, '
                                    f'expected a float tensor for {arch}.')
    if entry.to_flax is not None:
      value = np.transpose(value, entry.to_flax)
    node = variables.setdefault(entry.collection, {})
    for name in entry.path[:-1]:
      node = node.setdefault(name, {})
    node[entry.path[-1]] = jnp.asarray(np.asarray(value, np.float32), entry.dtype)
  return variables


def flax_to_torch(variables: Mapping[str, Any], num_batches_tracked: bool = False) -> StateDict:
  """Exports {'params', 'batch_stats'} back to torch key names and layouts (numpy).

  With num_batches_tracked=True every BN also gets a zero int64 step counter,
  so `torch_module.load_state_dict(sd, strict=True)` accepts the result.
  """
  out: StateDict = collections.OrderedDict()
  for key, entry in _key_table(variables).items():
    node = variables[entry.collection]
    for name in entry.path:
      node = node[name]
    value = np.asarray(node, np.float32)
    if entry.to_flax is not None:
      value = np.transpose(value, tuple(np.argsort(entry.to_flax)))
    out[key] = np.ascontiguousarray(value)
    if num_batches_tracked and key.endswith('.running_var'):
      out[key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return out


def save_torch_state_dict(variables: Mapping[str, Any], path) -> None:
  """Writes {'state_dict': ...} with torch.save (needs the [torch] extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("save_torch_state_dict needs torch: pip install 'cmi_jax[torch]'.") from e
  sd = collections.OrderedDict(
      (k, torch.from_numpy(np.array(v))) for k, v in
      flax_to_torch(variables, num_batches_tracked=True).items())
  torch.save({'state_dict': sd}, str(path))


# ----------------------------------------------------------------------------
# Whole checkpoints
# ----------------------------------------------------------------------------

def load_pth(path, arch: str, num_classes: int,
             input_shape: Sequence[int] = (32, 32, 3)) -> Tuple[nn.Module, Dict[str, Any]]:
  """Reads a reference `.pth` classifier into (module, variables), strictly.

  Args:
    path: torch checkpoint, zip or legacy format (raw state_dict, or dict with
      'state_dict'/'model').
    arch: a `cmi_jax.models.CLASSIFIERS` name, e.g. 'wrn_40_2'.
    num_classes: classifier outputs.
    input_shape: (H, W, C) of one input image.
  """
  module = models.get(arch, num_classes)
  try:
    variables = torch_to_flax(read_pth(path), module, input_shape, arch_name=arch)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f'{path}: {e}') from None
  return module, variables


def file_sha256(path) -> str:
  """Hex SHA-256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b''):
      digest.update(chunk)
  return digest.hexdigest()


def conversion_meta(path, arch: str, num_classes: int,
                    input_shape: Sequence[int]) -> Dict[str, Any]:
  """Provenance of a converted teacher: what it is and exactly which file it came from."""
  path = pathlib.Path(path)
  return {'arch': arch, 'num_classes': int(num_classes),
          'input_shape': [int(d) for d in input_shape],
          'source': str(path.resolve()), 'source_sha256': file_sha256(path)}


__all__ = ['CheckpointFormatError', 'CheckpointMismatchError', 'UnsafeCheckpointError',
           'abstract_variables', 'conversion_meta', 'extract_state_dict', 'file_sha256',
           'flax_to_torch', 'load_pth', 'load_pth_object', 'read_pth', 'save_torch_state_dict',
           'torch_to_flax']

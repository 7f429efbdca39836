"""PyTorch `.pth` checkpoints to Flax variables, without torch and without running code.

A zip-format `torch.save` file holds `<archive>/data.pkl` (the object graph)
and `<archive>/data/<key>` (raw tensor storages). The reference code's
checkpoints are plain pickles loaded with full unpickling, so a downloaded
teacher could run arbitrary code; here the unpickler resolves only an explicit
allow-list of globals (tensor rebuilders, storage types, OrderedDict, plain
containers) and builds numpy arrays straight from the storage bytes.

The key mapping is a table because the Flax modules in `cmi_jax.models` carry
the PyTorch submodule names: `a.b.weight` (conv, OIHW) <-> params `a/b/kernel`
(HWIO), Linear `weight` (out, in) <-> `kernel` (in, out), BN `weight` <->
`scale`, `running_mean`/`running_var` <-> batch_stats `mean`/`var`.
Loading is strict: any missing, unexpected or mis-shaped key is an error.
"""

import collections
import hashlib
import io
import pathlib
import pickle
import zipfile
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cmi_jax import models

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


class CheckpointFormatError(ValueError):
  """The file is not a readable zip-format torch checkpoint (legacy, truncated, corrupt)."""


class UnsafeCheckpointError(ValueError):
  """The pickle asks for a global outside the allow-list; nothing was executed."""


class CheckpointMismatchError(ValueError):
  """The state_dict does not fit the target architecture (missing/unexpected/shape)."""


# ----------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------

class _StorageType(NamedTuple):
  """Stand-in for a torch storage class (e.g. torch.FloatStorage): only its dtype."""
  name: str
  dtype: np.dtype


_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}


def _int_tuple(value, what: str) -> Tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise CheckpointFormatError(f'tensor {what} must be a tuple of ints, got {value!r}.')
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied out."""
  del requires_grad, backward_hooks, metadata  # autograd bookkeeping only
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise CheckpointFormatError(f'tensor storage must come from the archive, got {storage!r}.')
  size, stride = _int_tuple(size, 'size'), _int_tuple(stride, 'stride')
  offset = _int_tuple((storage_offset,), 'storage_offset')[0]
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise CheckpointFormatError(
        f'invalid tensor layout: offset={offset}, size={size}, stride={stride}.')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  # as_strided does no bounds checking: refuse any view reaching past the storage.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise CheckpointFormatError(
        f'tensor (offset={offset}, size={size}, stride={stride}) reads element {last} of a '
        f'storage with {storage.size} elements.')
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride],
      writeable=False)
  return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """torch._utils._rebuild_parameter(_with_state): the Parameter's data."""
  del requires_grad, backward_hooks, state
  return data


def _latin1_encode(text, encoding='latin1'):
  """_codecs.encode as protocol-2 pickles use it for bytes; no other codec."""
  if encoding != 'latin1' or not isinstance(text, str):
    raise UnsafeCheckpointError(f'_codecs.encode is only allowed with latin1, got {encoding!r}.')
  return text.encode('latin1')


_ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'Size'): tuple,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('_codecs', 'encode'): _latin1_encode,
    **{('builtins', c.__name__): c for c in (dict, list, tuple, set, frozenset, bytearray)},
    **{(m, name): _StorageType(name, np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()
       for m in ('torch', 'torch.storage')},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED_GLOBALS`; storages are read from the zip archive."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages: Dict[str, np.ndarray] = {}  # tensors that share a storage share bytes

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f'refused to load global {module}.{name}: only tensors, storages and plain '
          'containers are allowed (a checkpoint must never run code). If you trust this '
          "file, re-save just its weights: torch.save({'state_dict': sd}, path).") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise CheckpointFormatError(f'unsupported persistent id {pid!r}.')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      name = f'{self._prefix}data/{key}'
      try:
        info = self._archive.getinfo(name)
      except KeyError:
        raise CheckpointFormatError(f'storage {name!r} is missing from the archive.') from None
      dtype = storage_type.dtype.newbyteorder('<' if self._byteorder == 'little' else '>')
      # Checked before reading, so a compressed entry cannot inflate past what is declared.
      if not isinstance(numel, int) or info.file_size != numel * dtype.itemsize:
        raise CheckpointFormatError(f'storage {name!r} has {info.file_size} bytes, expected '
                                    f'{numel!r} x {dtype.itemsize}.')
      raw = self._archive.read(info)
      self._storages[key] = np.frombuffer(raw, dtype).astype(storage_type.dtype)
    return self._storages[key]


def _format_hint(path: pathlib.Path, head: bytes) -> str:
  if head.startswith(b'PK'):
    return (f'{path} is a truncated or corrupt zip archive; download or save it again.')
  if head.startswith(b'\x80'):
    return (f'{path} uses the legacy (pre-1.6, non-zip) torch format, which is not supported; '
            're-save it with a recent torch: torch.save(torch.load(old), new).')
  return f'{path} is not a zip-format torch checkpoint (first bytes {head!r}).'


def load_pth_object(path) -> Any:
  """Unpickles a zip-format `.pth` file with the allow-list; tensors become numpy arrays.

  Raises:
    FileNotFoundError: no file at `path`.
    CheckpointFormatError: legacy, truncated or corrupt file (message names it).
    UnsafeCheckpointError: the pickle references a global outside the allow-list.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  with open(path, 'rb') as f:
    head = f.read(8)
  if not zipfile.is_zipfile(path):
    raise CheckpointFormatError(_format_hint(path, head))
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
      if len(pickles) != 1:
        raise CheckpointFormatError(
            f'{path}: expected one <archive>/data.pkl entry, found {pickles}; is this a '
            'torch.save file?')
      prefix = pickles[0][:-len('data.pkl')]
      byteorder = 'little'  # files without the entry predate big-endian support
      if prefix + 'byteorder' in archive.namelist():
        byteorder = archive.read(prefix + 'byteorder').decode('ascii').strip()
      if byteorder not in ('little', 'big'):
        raise CheckpointFormatError(f'{path}: unknown byteorder {byteorder!r}.')
      return _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, byteorder).load()
  except UnsafeCheckpointError as e:
    raise UnsafeCheckpointError(f'{path}: {e}') from None
  except CheckpointFormatError as e:
    msg = str(e)
    raise CheckpointFormatError(msg if msg.startswith(str(path)) else f'{path}: {msg}') from None
  except Exception as e:  # untrusted bytes fail in many ways (zlib, CRC, EOF, pickle)
    raise CheckpointFormatError(
        f'{path} is truncated or corrupt ({type(e).__name__}: {e}); download or save it '
        'again.') from e


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
  """Reads the state_dict of a zip-format `.pth` file safely (see `load_pth_object`)."""
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
    path: zip-format torch checkpoint (raw state_dict, or dict with 'state_dict'/'model').
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

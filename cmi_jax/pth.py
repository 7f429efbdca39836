"""Reading torch.save files safely: no code from the file ever runs.

Two on-disk formats:
- zip (torch >= 1.6): `<archive>/data.pkl` (the object graph) and
  `<archive>/data/<key>` (raw tensor storages, byte order in `<archive>/byteorder`);
- legacy (torch < 1.6, e.g. torchvision's 2017-18 ImageNet weights): a stream of
  pickles on one file (magic number, protocol version 1001, system info, the
  object graph, the sorted list of storage keys), then each storage as an int64
  element count followed by its raw bytes.

The reference code loads checkpoints with full unpickling, so a downloaded
teacher could run arbitrary code; here the unpickler resolves only an explicit
allow-list of globals (tensor rebuilders, storage types, OrderedDict, plain
containers) and builds numpy arrays straight from the storage bytes. Legacy files
rebuild their tensors before the storage bytes are read, so tensors are first
recorded as `_PendingTensor`s and materialized once every storage is filled.
"""

import collections
import io
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Dict, NamedTuple, Tuple

import ml_dtypes
import numpy as np

class CheckpointFormatError(ValueError):
  """The file is not a readable torch checkpoint (truncated, corrupt, not torch.save)."""


class UnsafeCheckpointError(ValueError):
  """The pickle asks for a global outside the allow-list; nothing was executed."""



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


class _PendingTensor:
  """A legacy-format tensor whose storage bytes come later in the file.

  Stands for `_rebuild_tensor(_v2)(storage, offset, size, stride, ...)` (called
  with the arguments) and for the oldest form, `torch.FloatTensor()` + BUILD with
  the state (storage, offset, size, stride) (torch <= 0.1.10, still accepted by
  torch's own loader). `materialize` builds the array once the storage is filled.
  """

  def __init__(self, *args):
    self.args = args

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) != 4:
      raise CheckpointFormatError(f'unsupported legacy tensor state {state!r}.')
    self.args = state

  def materialize(self) -> np.ndarray:
    if len(self.args) < 4:
      raise CheckpointFormatError(f'legacy tensor without storage/layout: {self.args!r}.')
    return _rebuild_tensor(*self.args)


_TENSOR_REBUILDERS = (('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_tensor'))
_LEGACY_TENSOR_TYPES = {(m, name[:-len('Storage')] + 'Tensor')
                        for name in _STORAGE_DTYPES if name != 'UntypedStorage'
                        for m in ('torch', 'torch.cuda')}

_ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    **{key: _rebuild_tensor for key in _TENSOR_REBUILDERS},
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'Size'): tuple,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('_codecs', 'encode'): _latin1_encode,
    **{('builtins', c.__name__): c for c in (dict, list, tuple, set, frozenset, bytearray)},
    **{(m, name): _StorageType(name, np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()
       for m in ('torch', 'torch.storage')},
}


_REFUSED = ('refused to load global {}.{}: only tensors, storages and plain containers are '
            'allowed (a checkpoint must never run code). If you trust this file, re-save just '
            "its weights: torch.save({{'state_dict': sd}}, path).")


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED_GLOBALS`; refuses persistent ids (plain pickles)."""

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(_REFUSED.format(module, name)) from None

  def persistent_load(self, pid):
    raise CheckpointFormatError(f'unexpected persistent id {pid!r}.')


class _ZipUnpickler(_RestrictedUnpickler):
  """data.pkl of a zip archive; storages are read from `<prefix>data/<key>`."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages: Dict[str, np.ndarray] = {}  # tensors that share a storage share bytes

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


class _LegacyUnpickler(_RestrictedUnpickler):
  """The object graph of a legacy file: storages are allocated here (filled later,
  in place) and tensors become `_PendingTensor`s."""

  def __init__(self, f, file_bytes: int):
    super().__init__(f)
    self.storages: Dict[str, Tuple[np.ndarray, _StorageType]] = {}
    self._budget = file_bytes  # the storages' bytes are in the file: allocate no more

  def find_class(self, module: str, name: str):
    if (module, name) in _TENSOR_REBUILDERS or (module, name) in _LEGACY_TENSOR_TYPES:
      return _PendingTensor
    return super().find_class(module, name)

  def persistent_load(self, pid):
    # ('storage', type, root key, location, root numel, view) with view None or
    # (view key, offset, numel) in files from torch <= 0.4 that pickled storage slices.
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0):
      raise CheckpointFormatError(f'unsupported legacy persistent id {pid!r}.')
    _, storage_type, key, _, numel, view = pid
    if key not in self.storages:
      self._budget -= numel * storage_type.dtype.itemsize
      if self._budget < 0:
        raise CheckpointFormatError(f'storage {key!r} ({numel} elements) would not fit in the '
                                    'file: its declared sizes exceed the file size.')
      self.storages[key] = (np.zeros(numel, storage_type.dtype), storage_type)
    root = self.storages[key][0]
    if view is None:
      return root
    if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])
            and 0 <= view[1] and view[1] + view[2] <= root.size):
      raise CheckpointFormatError(f'invalid storage view {view!r} of a {root.size}-element '
                                  'storage.')
    return root[view[1]:view[1] + view[2]]  # a view: filled with its root


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


def _materialize(obj):
  """Replaces every _PendingTensor inside plain containers by its array."""
  if isinstance(obj, _PendingTensor):
    return obj.materialize()
  if isinstance(obj, dict):  # OrderedDict too; in place keeps its order and attributes
    for key, value in obj.items():
      obj[key] = _materialize(value)
    return obj
  if isinstance(obj, list):
    obj[:] = [_materialize(v) for v in obj]
    return obj
  if isinstance(obj, tuple):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _load_legacy(data: bytes) -> Any:
  """The object of a legacy torch.save stream (torch/serialization.py `_legacy_save`)."""
  f = io.BytesIO(data)
  plain = lambda: _RestrictedUnpickler(f).load()
  if plain() != _LEGACY_MAGIC:
    raise CheckpointFormatError('not a torch.save file (legacy magic number missing).')
  protocol = plain()
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointFormatError(f'unsupported legacy protocol version {protocol!r}.')
  sys_info = plain()
  little = not isinstance(sys_info, dict) or sys_info.get('little_endian', True)
  unpickler = _LegacyUnpickler(f, file_bytes=len(data))
  obj = unpickler.load()
  keys = plain()
  if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
    raise CheckpointFormatError(f'storage key list {keys!r} does not match the tensors '
                                f'({sorted(unpickler.storages)}).')
  for key in keys:  # each: int64 element count, then the raw bytes
    storage, storage_type = unpickler.storages[key]
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointFormatError(f'file ends before storage {key!r}.')
    numel = struct.unpack('<q' if little else '>q', head)[0]
    dtype = storage_type.dtype.newbyteorder('<' if little else '>')
    if numel != storage.size:
      raise CheckpointFormatError(f'storage {key!r} has {numel} elements in the file, expected '
                                  f'{storage.size}.')
    raw = f.read(numel * dtype.itemsize)
    if len(raw) != numel * dtype.itemsize:
      raise CheckpointFormatError(f'file ends inside storage {key!r}.')
    storage[:] = np.frombuffer(raw, dtype)
  return _materialize(obj)


def _load_zip(path: pathlib.Path) -> Any:
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
    return _ZipUnpickler(archive.read(pickles[0]), archive, prefix, byteorder).load()


def load_pth_object(path) -> Any:
  """Unpickles a `.pth` file (zip or legacy format) with the allow-list; tensors
  become numpy arrays.

  Raises:
    FileNotFoundError: no file at `path`.
    CheckpointFormatError: truncated, corrupt or non-torch file (message names it).
    UnsafeCheckpointError: the pickle references a global outside the allow-list.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  with open(path, 'rb') as f:
    head = f.read(8)
  is_zip = zipfile.is_zipfile(path)
  if not is_zip and not head.startswith(b'\x80'):  # a pickle starts with PROTO
    what = 'a truncated or corrupt zip archive' if head.startswith(b'PK') else (
        f'not a zip-format torch checkpoint nor a legacy one (first bytes {head!r})')
    raise CheckpointFormatError(f'{path} is {what}; download or save it again.')
  try:
    return _load_zip(path) if is_zip else _load_legacy(path.read_bytes())
  except UnsafeCheckpointError as e:
    raise UnsafeCheckpointError(f'{path}: {e}') from None
  except CheckpointFormatError as e:
    msg = str(e)
    raise CheckpointFormatError(msg if msg.startswith(str(path)) else f'{path}: {msg}') from None
  except Exception as e:  # untrusted bytes fail in many ways (zlib, CRC, EOF, pickle)
    raise CheckpointFormatError(
        f'{path} is truncated or corrupt ({type(e).__name__}: {e}); download or save it '
        'again.') from e

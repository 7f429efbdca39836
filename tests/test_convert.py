"""Tests for cmi_jax.convert (safe .pth reading, strict key mapping) and cmi_jax.teacher_io.

The safety and mismatch tests need no torch: they build torch.save-format
archives byte by byte with the pickle opcodes torch itself emits. Parity tests
(marked `torch`) use the PyTorch rebuilds of the reference architectures
(benchmarks/torch_models.py) and compare logits / generator images with the Flax models.
"""

import collections
import functools
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from cmi_jax import convert, models, teacher_io

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY_ATOL = 1e-4  # fp32 logits / images, eval-mode BN (train mode for the generator)
BATCH = 3
CALIBRATION_BATCH = 8  # random images that set the reference nets' BN running stats
MIN_LOGIT_SPREAD = 0.03  # logits must depend on the input for parity to mean anything

# ----------------------------------------------------------------------------
# A torch.save-compatible writer made of raw pickle opcodes (protocol 2).
# ----------------------------------------------------------------------------

_STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
                  np.dtype(np.float64): 'DoubleStorage', np.dtype(np.int64): 'LongStorage'}


def _op_str(s: str) -> bytes:
  data = s.encode('utf-8')
  return b'X' + struct.pack('<I', len(data)) + data  # BINUNICODE


def _op_int(i: int) -> bytes:
  return b'J' + struct.pack('<i', i)  # BININT


def _op_global(module: str, name: str) -> bytes:
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'  # GLOBAL


def _op_tuple(*items: bytes) -> bytes:
  return b'(' + b''.join(items) + b't'  # MARK ... TUPLE


_EMPTY_ORDERED_DICT = _op_global('collections', 'OrderedDict') + b')R'


def _op_tensor(key: str, storage: np.ndarray, offset: int, size, stride) -> bytes:
  """_rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())."""
  pid = _op_tuple(_op_str('storage'), _op_global('torch', _STORAGE_NAMES[storage.dtype]),
                  _op_str(key), _op_str('cpu'), _op_int(storage.size)) + b'Q'  # BINPERSID
  args = _op_tuple(pid, _op_int(offset), _op_tuple(*map(_op_int, size)),
                   _op_tuple(*map(_op_int, stride)), b'\x89', _EMPTY_ORDERED_DICT)
  return _op_global('torch._utils', '_rebuild_tensor_v2') + args + b'R'


def _contiguous_strides(shape):
  strides, acc = [], 1
  for n in reversed(shape):
    strides.append(acc)
    acc *= n
  return tuple(reversed(strides))


def _state_dict_ops(sd, storages) -> bytes:
  items = []
  for key, value in sd.items():
    value = np.asarray(value)
    storage_key = str(len(storages))
    storages[storage_key] = value.reshape(-1)
    items.append(_op_str(key) + _op_tensor(storage_key, value.reshape(-1), 0, value.shape,
                                           _contiguous_strides(value.shape)))
  return _EMPTY_ORDERED_DICT + b'(' + b''.join(items) + b'u'  # SETITEMS


def _write_archive(path, pickle_body: bytes, storages, byteorder='little', prefix='archive'):
  """Zip layout of torch.save: <prefix>/data.pkl, <prefix>/data/<key>, byteorder, version."""
  order = '<' if byteorder == 'little' else '>'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(f'{prefix}/data.pkl', b'\x80\x02' + pickle_body + b'.')
    archive.writestr(f'{prefix}/byteorder', byteorder)
    for key, array in storages.items():
      archive.writestr(f'{prefix}/data/{key}', array.astype(array.dtype.newbyteorder(order))
                       .tobytes())
    archive.writestr(f'{prefix}/version', '3\n')
  return path


def write_state_dict_pth(path, sd, wrap=True, byteorder='little'):
  """torch.save({'state_dict': sd}, path) (or the bare sd) without torch."""
  storages = {}
  body = _state_dict_ops(sd, storages)
  if wrap:
    body = b'}' + _op_str('state_dict') + body + b's'  # EMPTY_DICT key value SETITEM
  return _write_archive(path, body, storages, byteorder)


@functools.lru_cache(maxsize=None)
def _abstract(arch, num_classes=10, input_shape=(32, 32, 3)):
  return convert.abstract_variables(models.get(arch, num_classes), input_shape)


def random_state_dict(arch, num_classes=10, input_shape=(32, 32, 3), seed=0):
  """A full torch-layout state_dict for `arch` with random values (positive variances)."""
  rng = np.random.default_rng(seed)
  shapes = convert.flax_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                              _abstract(arch, num_classes, input_shape)))
  return {k: (rng.uniform(0.5, 2.0, v.shape) if k.endswith('running_var')
              else rng.normal(0.0, 0.1, v.shape)).astype(np.float32)
          for k, v in shapes.items()}


def _torch_order_first(sd, first):
  """The same dict with `first` moved to the front (torch puts the stem conv first)."""
  return {first: sd[first], **{k: v for k, v in sd.items() if k != first}}


# ----------------------------------------------------------------------------
# Reading .pth files without torch
# ----------------------------------------------------------------------------

def test_read_pth_handmade_archive(tmp_path):
  sd = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
        'module.b.bias': np.array([1.5, -2.0], np.float16),
        'bn.num_batches_tracked': np.array(7, np.int64)}
  out = convert.read_pth(write_state_dict_pth(tmp_path / 'x.pth', sd))
  assert list(out) == ['a.weight', 'b.bias']  # prefix stripped, step counter dropped
  np.testing.assert_array_equal(out['a.weight'], sd['a.weight'])
  assert out['b.bias'].dtype == np.float16
  np.testing.assert_array_equal(out['b.bias'], sd['module.b.bias'])


def test_read_pth_big_endian_and_bare_state_dict(tmp_path):
  sd = {'w': np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
  path = write_state_dict_pth(tmp_path / 'be.pth', sd, wrap=False, byteorder='big')
  np.testing.assert_array_equal(convert.read_pth(path)['w'], sd['w'])


def test_read_pth_offset_and_strides(tmp_path):
  storage = np.arange(12, dtype=np.float32)
  offset, size, stride = 1, (3, 2), (1, 4)  # a transposed slice sharing the storage
  body = (_EMPTY_ORDERED_DICT + b'(' + _op_str('t') + _op_tensor('0', storage, offset, size, stride)
          + _op_str('u') + _op_tensor('0', storage, 0, (12,), (1,)) + b'u')
  path = _write_archive(tmp_path / 's.pth', body, {'0': storage})
  out = convert.read_pth(path)
  expected = np.array([[storage[offset + i * stride[0] + j * stride[1]] for j in range(2)]
                       for i in range(3)])
  np.testing.assert_array_equal(out['t'], expected)
  np.testing.assert_array_equal(out['u'], storage)


def test_view_past_storage_is_refused(tmp_path):
  storage = np.arange(12, dtype=np.float32)
  body = _EMPTY_ORDERED_DICT + b'(' + _op_str('t') + _op_tensor('0', storage, 0, (4, 4),
                                                                (4, 1)) + b'u'
  path = _write_archive(tmp_path / 'oob.pth', body, {'0': storage})
  with pytest.raises(convert.CheckpointFormatError, match='reads element 15 of a storage'):
    convert.read_pth(path)


def test_storage_size_mismatch(tmp_path):
  storage = np.arange(4, dtype=np.float32)
  body = _EMPTY_ORDERED_DICT + b'(' + _op_str('t') + _op_tensor('0', storage, 0, (4,), (1,)) + b'u'
  path = _write_archive(tmp_path / 'short.pth', body, {'0': storage[:3]})  # 12 bytes, not 16
  with pytest.raises(convert.CheckpointFormatError, match=r'has 12 bytes, expected 4 x 4'):
    convert.read_pth(path)


@pytest.mark.parametrize('module,name', [('builtins', 'eval'), ('builtins', 'exec'),
                                         ('os', 'system'), ('posix', 'system')])
def test_malicious_pickle_is_refused(tmp_path, module, name):
  marker = tmp_path / 'pwned'
  if name == 'system':
    code = f'touch {marker}'
  else:
    code = f'open({str(marker)!r}, "w").close()'
  payload = _op_global(module, name) + _op_tuple(_op_str(code)) + b'R'
  # Hidden next to real weights, as an attacker would ship it.
  storages = {}
  body = (b'}' + _op_str('state_dict') + _state_dict_ops({'w': np.ones(2, np.float32)}, storages)
          + b's' + _op_str('extra') + payload + b's')
  path = _write_archive(tmp_path / 'evil.pth', body, storages)
  with pytest.raises(convert.UnsafeCheckpointError, match=rf'{module}\.{name}') as err:
    convert.read_pth(path)
  assert str(path) in str(err.value)
  assert not marker.exists()


def test_malicious_payload_is_real(tmp_path):
  """The eval payload above does run under plain pickle: the refusal is what stops it."""
  marker = tmp_path / 'ran'
  payload = (b'\x80\x02' + _op_global('builtins', 'eval')
             + _op_tuple(_op_str(f'open({str(marker)!r}, "w").close()')) + b'R.')
  pickle.loads(payload)
  assert marker.exists()


def test_whole_module_pickle_is_refused(tmp_path):
  body = _op_global('torch.nn.modules.conv', 'Conv2d') + b')R'
  with pytest.raises(convert.UnsafeCheckpointError, match='torch.nn.modules.conv.Conv2d'):
    convert.read_pth(_write_archive(tmp_path / 'module.pth', body, {}))


def test_unknown_storage_global_is_refused(tmp_path):
  storage = np.ones(2, np.float32)
  tensor = _op_tensor('0', storage, 0, (2,), (1,)).replace(
      _op_global('torch', 'FloatStorage'), _op_global('os', 'system'))
  path = _write_archive(tmp_path / 'st.pth', tensor, {'0': storage})
  with pytest.raises(convert.UnsafeCheckpointError, match='os.system'):
    convert.read_pth(path)


@pytest.mark.parametrize('keep', [0.05, 0.5, 0.99])
def test_truncated_file(tmp_path, keep):
  path = write_state_dict_pth(tmp_path / 'ok.pth', random_state_dict('wrn_16_1'))
  data = path.read_bytes()
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(convert.CheckpointFormatError, match='truncated or corrupt') as err:
    convert.read_pth(cut)
  assert str(cut) in str(err.value)


def test_corrupt_storage_bytes(tmp_path):
  w = np.arange(64, dtype=np.float32)
  path = write_state_dict_pth(tmp_path / 'c.pth', {'w': w})
  data = bytearray(path.read_bytes())
  data[data.find(w.tobytes()) + 10] ^= 0xFF  # zip CRC no longer matches
  path.write_bytes(bytes(data))
  with pytest.raises(convert.CheckpointFormatError, match='truncated or corrupt'):
    convert.read_pth(path)


def test_legacy_and_foreign_files(tmp_path):
  # A plain pickle is no legacy torch.save stream (those are read: tests/test_zoo.py).
  legacy = tmp_path / 'legacy.pth'
  legacy.write_bytes(pickle.dumps({'state_dict': {}}, protocol=2))
  with pytest.raises(convert.CheckpointFormatError, match='legacy magic number missing'):
    convert.read_pth(legacy)
  text = tmp_path / 'notes.pth'
  text.write_text('hello')
  with pytest.raises(convert.CheckpointFormatError, match='not a zip-format torch checkpoint'):
    convert.read_pth(text)
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    convert.read_pth(tmp_path / 'missing.pth')


def test_non_tensor_state_dict_entry():
  with pytest.raises(ValueError, match="'epoch' is a int"):
    convert.extract_state_dict({'w': np.ones(1), 'epoch': 3})


# ----------------------------------------------------------------------------
# Strict mapping
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('arch,input_shape', [
    ('wrn_16_1', (32, 32, 3)), ('wrn_40_2', (32, 32, 3)), ('resnet18', (28, 28, 1)),
    ('resnet34', (32, 32, 3)), ('vgg11', (32, 32, 3))])
def test_round_trip(arch, input_shape):
  sd = random_state_dict(arch, input_shape=input_shape)
  variables = convert.torch_to_flax(sd, models.get(arch, 10), input_shape, arch_name=arch)
  back = convert.flax_to_torch(variables)
  assert set(back) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


def test_round_trip_generator():
  gen = models.Generator(nz=16, ngf=8, img_size=16, nc=3)
  abstract = convert.abstract_variables(gen, (16,))
  rng = np.random.default_rng(1)
  sd = convert.flax_to_torch(jax.tree.map(lambda s: rng.normal(size=s.shape), abstract))
  assert sd['l1.0.weight'].shape == (2 * 8 * 4 * 4, 16)
  assert sd['conv_blocks.9.bias'].shape == (3,)
  back = convert.flax_to_torch(convert.torch_to_flax(sd, gen, (16,)))
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


def test_prefix_and_counters_are_tolerated():
  sd = random_state_dict('wrn_16_1')
  dp = {'module.' + k: v for k, v in sd.items()}
  dp['module.bn1.num_batches_tracked'] = np.array(3, np.int64)
  a = convert.torch_to_flax(sd, models.get('wrn_16_1', 10), (32, 32, 3))
  b = convert.torch_to_flax(dp, models.get('wrn_16_1', 10), (32, 32, 3))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_wrong_architecture_names_first_bad_key():
  sd = _torch_order_first(random_state_dict('wrn_16_1'), 'conv1.weight')
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"resnet18: first bad key 'conv1.weight' has shape \(16, 3, 3, 3\) "
                           r'in the checkpoint but \(64, 3, 3, 3\) in resnet18'):
    convert.torch_to_flax(sd, models.get('resnet18', 10), (32, 32, 3), arch_name='resnet18')
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"vgg11: first bad key 'conv1.weight' is unexpected"):
    convert.torch_to_flax(sd, models.get('vgg11', 10), (32, 32, 3), arch_name='vgg11')


def test_num_classes_mismatch_names_both_shapes():
  sd = random_state_dict('wrn_16_1', num_classes=100)
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"'fc.weight' has shape \(100, 64\) in the checkpoint but \(10, 64\)"):
    convert.torch_to_flax(sd, models.get('wrn_16_1', 10), (32, 32, 3), arch_name='wrn_16_1')


def test_missing_and_unexpected_keys():
  module = models.get('wrn_16_1', 10)
  sd = random_state_dict('wrn_16_1')
  missing = dict(sd)
  del missing['block2.layer.0.convShortcut.weight']
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"'block2.layer.0.convShortcut.weight' is missing"):
    convert.torch_to_flax(missing, module, (32, 32, 3))
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"first bad key 'head.0.weight' is unexpected"):
    convert.torch_to_flax({**sd, 'head.0.weight': np.ones((4, 4), np.float32)}, module,
                          (32, 32, 3))
  with pytest.raises(convert.CheckpointMismatchError, match=r"'bn1.weight' has dtype int64"):
    convert.torch_to_flax({**sd, 'bn1.weight': np.ones(64, np.int64)}, module, (32, 32, 3))


def test_load_pth_mismatch_names_file(tmp_path):
  path = write_state_dict_pth(tmp_path / 'w.pth', random_state_dict('wrn_16_1'))
  with pytest.raises(convert.CheckpointMismatchError, match=rf'{path}.*wrn_16_2'):
    convert.load_pth(path, 'wrn_16_2', 10)


# ----------------------------------------------------------------------------
# teacher_io and the CLI
# ----------------------------------------------------------------------------

def test_teacher_save_load_round_trip(tmp_path):
  sd = random_state_dict('wrn_16_1')
  module = models.get('wrn_16_1', 10)
  variables = convert.torch_to_flax(sd, module, (32, 32, 3))
  meta = {'source': 'x.pth', 'source_sha256': '0' * 64}
  out = teacher_io.save_teacher(tmp_path / 't', arch='wrn_16_1', num_classes=10,
                                input_shape=(32, 32, 3), variables=variables, meta=meta)
  module2, variables2, info = teacher_io.load_teacher(out)
  assert module2 == module
  assert info == {'arch': 'wrn_16_1', 'num_classes': 10, 'input_shape': (32, 32, 3),
                  'meta': meta}
  assert jax.tree.structure(variables2) == jax.tree.structure(variables)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               variables, variables2)
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(variables),
                                                jax.tree.leaves(variables2)))
  with pytest.raises(FileExistsError, match='overwrite=True'):
    teacher_io.save_teacher(out, arch='wrn_16_1', num_classes=10, input_shape=(32, 32, 3),
                            variables=variables)
  with pytest.raises(ValueError, match='num_classes=100 was requested'):
    teacher_io.load_teacher(out, num_classes=100)


def test_teacher_meta_accepts_numpy_scalars(tmp_path):
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _abstract('wrn_16_1'))
  out = teacher_io.save_teacher(tmp_path / 't', arch='wrn_16_1', num_classes=np.int64(10),
                                input_shape=(32, 32, 3), variables=variables,
                                meta={'test_accuracy': np.float32(91.5)})
  assert teacher_io.load_teacher(out)[2]['meta'] == {'test_accuracy': 91.5}


def test_teacher_missing_or_incomplete(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'No teacher at {tmp_path / "nope"}'):
    teacher_io.load_teacher(tmp_path / 'nope')
  (tmp_path / 'half').mkdir()
  with pytest.raises(FileNotFoundError, match='Incomplete teacher directory.*teacher.json'):
    teacher_io.load_teacher(tmp_path / 'half')


def test_teacher_from_pth_needs_arguments(tmp_path):
  sd = random_state_dict('wrn_16_1')
  path = write_state_dict_pth(tmp_path / 't.pth', sd)
  with pytest.raises(ValueError, match='needs num_classes='):
    teacher_io.load_teacher(path, arch='wrn_16_1', input_shape=(32, 32, 3))
  _, variables, info = teacher_io.load_teacher(path, arch='wrn_16_1', num_classes=10,
                                               input_shape=(32, 32, 3))
  assert info['meta']['source_sha256'] == convert.file_sha256(path)
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], sd['fc.weight'].T)


def test_convert_teacher_cli(tmp_path):
  sd = random_state_dict('wrn_16_1', num_classes=7)
  path = write_state_dict_pth(tmp_path / 'cli.pth', sd)
  out = tmp_path / 'teacher'
  subprocess.run([sys.executable, '-m', 'experiments.convert_teacher', '--arch=wrn_16_1',
                  f'--checkpoint={path}', f'--out={out}', '--num_classes=7'],
                 cwd=REPO, check=True, capture_output=True)
  _, variables, info = teacher_io.load_teacher(out)
  assert info['num_classes'] == 7 and info['meta']['source'] == str(path.resolve())
  np.testing.assert_array_equal(variables['batch_stats']['bn1']['var'], sd['bn1.running_var'])


def test_convert_teacher_cli_damaged_file_is_one_error_line(tmp_path):
  """A file that is no PyTorch checkpoint: `error: ...` naming it, exit 2, no traceback,
  nothing written."""
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a zip archive')
  out = tmp_path / 'teacher'
  proc = subprocess.run([sys.executable, '-m', 'experiments.convert_teacher', '--arch=wrn_16_1',
                         f'--checkpoint={bad}', f'--out={out}'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith('error: ') and str(bad) in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr and not out.exists()


# ----------------------------------------------------------------------------
# Parity with the reference PyTorch architectures
# ----------------------------------------------------------------------------

def _reference_nets():
  """torch and the PyTorch rebuilds of the reference architectures (benchmarks/torch_models.py)."""
  torch = pytest.importorskip('torch')
  from benchmarks.torch_models import reference_nets  # pylint: disable=import-outside-toplevel
  classifier, generator = reference_nets()
  return torch, classifier, generator


def _randomize(torch, net, seed, input_shape=None):
  """Random weights and BN statistics (tests/torch_zoo.py `randomize`): Linear weights
  with variance 2 / fan_in, the calibration batch of this file, no variance floor."""
  del torch
  from tests.torch_zoo import randomize  # pylint: disable=import-outside-toplevel
  return randomize(net, seed, input_shape, head_gain=2.0, var_floor=0.0,
                   calibration_batch=CALIBRATION_BATCH)


PARITY_CASES = [
    ('wrn_16_1', (32, 32, 3)), ('wrn_16_1', (28, 28, 1)),
    ('wrn_16_2', (32, 32, 3)), ('wrn_40_2', (32, 32, 3)), ('wrn_40_2', (28, 28, 1)),
    ('resnet18', (32, 32, 3)), ('resnet18', (28, 28, 1)),
    ('resnet34', (32, 32, 3)), ('resnet34', (28, 28, 1)),
    ('vgg11', (32, 32, 3)), ('vgg11', (64, 64, 3)),
]


@pytest.mark.torch
@pytest.mark.parametrize('arch,input_shape', PARITY_CASES)
def test_classifier_parity(tmp_path, arch, input_shape):
  torch, classifier, _ = _reference_nets()
  num_classes = 10 if input_shape[-1] == 3 else 7
  torch.manual_seed(0)
  net = _randomize(torch, classifier(arch, num_classes, input_shape[-1]), seed=1,
                   input_shape=input_shape).eval()
  path = tmp_path / f'{arch}.pth'
  torch.save({'state_dict': net.state_dict(), 'best_acc': 0.5}, path)  # the reference's layout
  module, variables = convert.load_pth(path, arch, num_classes, input_shape)
  x = np.random.default_rng(2).normal(size=(BATCH, *input_shape)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  logits = jax.jit(functools.partial(module.apply, train=False))(variables, x)
  diff = float(np.max(np.abs(np.asarray(logits) - expected)))
  spread = float(np.mean(np.std(expected, axis=0)))
  print(f'parity {arch} {input_shape}: max |logits diff| = {diff:.2e} '
        f'(logit spread over inputs {spread:.2f})')
  assert spread > MIN_LOGIT_SPREAD, spread
  assert diff <= PARITY_ATOL, (arch, input_shape, diff)


@pytest.mark.torch
@pytest.mark.parametrize('layout', ['module_prefix', 'bare', 'model_key'])
def test_checkpoint_layouts(tmp_path, layout):
  torch, classifier, _ = _reference_nets()
  net = _randomize(torch, classifier('wrn_16_1', 10, 3), seed=3).eval()
  sd = net.state_dict()
  obj = {'module_prefix': {'state_dict': collections.OrderedDict(
      ('module.' + k, v) for k, v in sd.items())},
         'bare': sd, 'model_key': {'model': sd, 'epoch': 9}}[layout]
  path = tmp_path / 'ckpt.pth'
  torch.save(obj, path)
  _, variables, info = teacher_io.load_teacher(path, arch='wrn_16_1', num_classes=10,
                                               input_shape=(32, 32, 3))
  assert info['meta']['arch'] == 'wrn_16_1'
  back = convert.flax_to_torch(variables)
  expected = {k: v.numpy() for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  assert set(back) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.torch
def test_handmade_writer_matches_torch_load(tmp_path):
  """The torch-free writer used above produces files torch itself reads back."""
  torch, _, _ = _reference_nets()
  sd = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.ones(3, np.float16)}
  loaded = torch.load(write_state_dict_pth(tmp_path / 'h.pth', sd), weights_only=True)
  for key, value in sd.items():
    np.testing.assert_array_equal(loaded['state_dict'][key].numpy(), value)


@pytest.mark.torch
def test_read_pth_dtypes_and_views_from_torch(tmp_path):
  torch, _, _ = _reference_nets()
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  sd = {'f64': base.double(), 'f16': base.half(), 'bf16': base.bfloat16(),
        'i64': base.long(), 'view': base.t()[1:, ::2], 'scalar': torch.tensor(2.5)}
  torch.save({'state_dict': sd, 'epoch': 3, 'opt': {'lr': [0.1], 'b': b'xy'}}, tmp_path / 'd.pth')
  out = convert.read_pth(tmp_path / 'd.pth')
  for key, value in sd.items():
    assert out[key].shape == tuple(value.shape), key
    np.testing.assert_array_equal(out[key].astype(np.float64), value.double().numpy(),
                                  err_msg=key)
  assert out['bf16'].dtype.name == 'bfloat16' and out['f16'].dtype == np.float16


@pytest.mark.torch
def test_export_loads_into_torch(tmp_path):
  torch, classifier, _ = _reference_nets()
  net = _randomize(torch, classifier('wrn_16_1', 10, 3), seed=4)
  torch.save({'state_dict': net.state_dict()}, tmp_path / 'in.pth')
  _, variables = convert.load_pth(tmp_path / 'in.pth', 'wrn_16_1', 10)
  convert.save_torch_state_dict(variables, tmp_path / 'out.pth')
  fresh = classifier('wrn_16_1', 10, 3)
  fresh.load_state_dict(torch.load(tmp_path / 'out.pth', weights_only=True)['state_dict'],
                        strict=True)
  for (key, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
    if not key.endswith('num_batches_tracked'):
      assert torch.equal(a, b), key


@pytest.mark.torch
@pytest.mark.parametrize('large', [False, True])
def test_generator_parity_train_mode(tmp_path, large):
  torch, _, generator = _reference_nets()
  nz, ngf, img_size, nc = 32, 16, 32, 3
  torch.manual_seed(5)
  net = _randomize(torch, generator(nz, ngf, img_size, nc, large), seed=6).train()
  torch.save({'state_dict': net.state_dict()}, tmp_path / 'g.pth')
  gen = models.Generator(nz=nz, ngf=ngf, img_size=img_size, nc=nc, large=large)
  variables = convert.torch_to_flax(convert.read_pth(tmp_path / 'g.pth'), gen, (nz,),
                                    arch_name='generator')
  z = np.random.default_rng(7).normal(size=(4, nz)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(z)).permute(0, 2, 3, 1).numpy()
  images, state = gen.apply(variables, z, train=True, mutable=['batch_stats'])
  diff = float(np.max(np.abs(np.asarray(images) - expected)))
  print(f'parity generator large={large}: max |image diff| = {diff:.2e}')
  assert diff <= PARITY_ATOL
  # One train step also moves the running statistics the same way (momentum, unbiased var).
  updated = convert.flax_to_torch({'params': variables['params'], **state})
  for key, value in net.state_dict().items():
    if 'running' in key:
      np.testing.assert_allclose(updated[key], value.numpy(), atol=PARITY_ATOL, err_msg=key)


def test_nlgenerator_is_refused_with_the_reason():
  """NAYER's generator (batch-size-dependent noisy layers, re-drawn every loop) is not
  converted: one clear error saying why and what to do instead."""
  gen = models.NLGenerator(batch_size=20, chunk=10, le_emb_size=8, ngf=4, img_size=8, nc=1)
  with pytest.raises(convert.CheckpointMismatchError, match='NLGenerator is not converted'):
    convert.torch_to_flax({'l1.0.weight': np.zeros((8, 8), np.float32)}, gen, (8,))

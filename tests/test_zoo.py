"""The model zoo of issue 20 against zoo-and-datasets.md sections 1-2, and the legacy
torch.save format: sizes, BN and tap counts, key names, input-size rules, names
and aliases, grouped convs, parity with torch twins (tests/torch_zoo.py)."""

import functools
import pickle
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import convert, models, pth
from cmi_jax.models import layers
from cmi_jax.models.shufflenetv2 import channel_shuffle
from cmi_jax.teacher import Teacher
from tests.test_convert import _EMPTY_ORDERED_DICT, _op_global, _op_int, _op_str, _op_tuple

PARITY_ATOL = 1e-4  # per unit of the largest |logit| (float32 forwards of deep nets)

# name: (params at 10 classes (M), at 100 classes (M), BN layers, CMI dim = all BN inputs,
#        state_dict tensors without num_batches_tracked); zoo-and-datasets.md section 1.
CIFAR_ZOO = {
    'resnet8': (0.0780, 0.0839, 9, 336, 47),
    'resnet20': (0.2725, 0.2783, 21, 784, 107),
    'resnet32': (0.4669, 0.4728, 33, 1232, 167),
    'resnet56': (0.8558, 0.8616, 57, 2128, 287),
    'resnet110': (1.7307, 1.7366, 111, 4144, 557),
    'resnet8x4': (1.2104, 1.2335, 10, 1376, 52),
    'resnet32x4': (7.4107, 7.4339, 34, 4960, 172),
    'vgg8': (3.9189, 3.9650, 5, 1472, 32),
    'vgg13': (9.4160, 9.4622, 10, 2944, 62),
    'shufflenetv2': (1.2633, 1.3555, 56, 8090, 282),
    'mobilenetv2': (2.2367, 2.3520, 52, 17056, 262),
    'resnet50': (23.5208, 23.7053, 53, 26560, 267),
}
# name: (params at 1000 classes (M), BN layers, CMI dim); section 2.
IMAGENET_ZOO = {
    'resnet18_imagenet': (11.6895, 20, 4800),
    'resnet34_imagenet': (21.7977, 36, 8512),
    'resnet50_imagenet': (25.5570, 53, 26560),
    'mobilenetv2_imagenet': (3.5049, 52, 17056),
}


def _millions(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)) / 1e6


@functools.lru_cache(maxsize=None)
def _shapes(arch, num_classes, size=32):
  """Abstract variables and TeacherOutput of one traced init + forward (nothing computed)."""
  module = models.get(arch, num_classes)
  x = jnp.zeros((2, size, size, 3))

  def fwd():
    variables = models.init(module, jax.random.key(0), x.shape)
    return variables, Teacher(module, variables)(x)
  return jax.eval_shape(fwd)


def _torch_shapes(arch, num_classes):
  variables = _shapes(arch, num_classes)[0]
  return {k: v.shape for k, v in convert.flax_to_torch(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), variables)).items()}


# ---------------------------------------------------------------- sizes and taps

@pytest.mark.parametrize('arch', sorted(CIFAR_ZOO))
def test_cifar_zoo_counts(arch):
  p10, p100, n_bn, cmi_dim, n_tensors = CIFAR_ZOO[arch]
  variables, out = _shapes(arch, 10)
  feat = out.penultimate.shape[-1]
  assert abs(_millions(variables['params']) - p10) < 5e-5
  # 100 classes: 90 more rows of (feat weights + 1 bias) in the head.
  assert abs(_millions(variables['params']) + 90 * (feat + 1) / 1e6 - p100) < 5e-5
  assert len(out.bn) == n_bn and len(jax.tree.leaves(variables['batch_stats'])) == 2 * n_bn
  assert out.features.shape == (2, cmi_dim)  # the reference default: every BN input
  assert len(jax.tree.leaves(variables)) == n_tensors
  assert out.logits.shape == (2, 10)


@pytest.mark.parametrize('arch', sorted(IMAGENET_ZOO))
def test_imagenet_zoo_counts(arch):
  params, n_bn, cmi_dim = IMAGENET_ZOO[arch]
  variables, out = _shapes(arch, 1000)
  assert abs(_millions(variables['params']) - params) < 5e-5
  assert len(out.bn) == n_bn and out.features.shape == (2, cmi_dim)


def test_reference_key_names_and_shapes():
  """Spot checks of the state_dict listings in the facts file (torch layouts)."""
  expected = {
      'resnet8x4': {'conv1.weight': (32, 3, 3, 3), 'layer1.0.downsample.0.weight': (64, 32, 1, 1),
                    'layer1.0.downsample.1.running_var': (64,), 'fc.weight': (10, 256)},
      'resnet20': {'layer2.0.downsample.0.weight': (32, 16, 1, 1), 'layer3.2.conv2.weight':
                   (64, 64, 3, 3), 'fc.bias': (10,)},
      'vgg13': {'block0.3.weight': (64, 64, 3, 3), 'block0.4.running_mean': (64,),
                'block4.3.bias': (512,), 'classifier.weight': (10, 512)},
      'shufflenetv2': {'layer1.0.conv1.weight': (24, 1, 3, 3), 'layer1.0.conv2.weight':
                       (58, 24, 1, 1), 'layer1.0.conv4.weight': (58, 1, 3, 3),
                       'layer1.1.conv1.weight': (58, 58, 1, 1), 'layer3.3.bn3.bias': (232,),
                       'conv2.weight': (1024, 464, 1, 1), 'linear.weight': (10, 1024)},
      'mobilenetv2': {'features.0.0.weight': (32, 3, 3, 3), 'features.1.conv.0.0.weight':
                      (32, 1, 3, 3), 'features.1.conv.1.weight': (16, 32, 1, 1),
                      'features.1.conv.2.running_var': (16,), 'features.2.conv.1.0.weight':
                      (96, 1, 3, 3), 'features.17.conv.3.bias': (320,),
                      'features.18.0.weight': (1280, 320, 1, 1), 'classifier.1.weight': (10, 1280)},
      'resnet50': {'layer1.0.conv1.weight': (64, 64, 1, 1), 'layer1.0.conv3.weight':
                   (256, 64, 1, 1), 'layer1.0.shortcut.0.weight': (256, 64, 1, 1),
                   'layer2.0.conv2.weight': (128, 128, 3, 3), 'layer2.0.shortcut.0.weight':
                   (512, 256, 1, 1), 'linear.weight': (10, 2048)},
  }
  for arch, keys in expected.items():
    shapes = _torch_shapes(arch, 10)
    for key, shape in keys.items():
      assert shapes.get(key) == shape, (arch, key, shapes.get(key))
  assert not any('shortcut' in k or 'linear' in k for k in _torch_shapes('resnet8x4', 10))
  assert not any('downsample' in k for k in _torch_shapes('resnet50', 10))


def test_imagenet_key_names():
  r18 = _torch_shapes('resnet18_imagenet', 1000)
  assert r18['conv1.weight'] == (64, 3, 7, 7) and r18['fc.weight'] == (1000, 512)
  assert r18['layer2.0.downsample.0.weight'] == (128, 64, 1, 1)
  assert 'layer1.0.downsample.0.weight' not in r18
  r50 = _torch_shapes('resnet50_imagenet', 1000)
  assert r50['layer2.0.downsample.0.weight'] == (512, 256, 1, 1)
  assert r50['layer1.0.conv3.weight'] == (256, 64, 1, 1) and r50['fc.weight'] == (1000, 2048)
  assert r50['layer2.0.conv2.weight'] == (128, 128, 3, 3)  # the 3x3 conv carries the stride
  assert _torch_shapes('mobilenetv2_imagenet', 1000) == _torch_shapes('mobilenetv2', 1000)


def test_bottleneck_strides_on_the_3x3():
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Conv) and context.method_name == '__call__':
      calls.append(('.'.join(context.module.path), args[0].shape[1], context.module.stride))
    return next_fun(*args, **kwargs)
  module = models.get('resnet50_imagenet', 1000)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  seen = {path: (side, stride) for path, side, stride in calls}
  assert seen['conv1'] == (224, 2)
  assert seen['layer1.0.conv1'] == (56, 1)  # after the max-pool
  assert seen['layer2.0.conv1'] == (56, 1) and seen['layer2.0.conv2'] == (56, 2)
  assert seen['layer4.2.conv3'] == (7, 1)


# ---------------------------------------------------------------- input sizes, names

@pytest.mark.parametrize('arch', ['resnet8', 'resnet32x4', 'shufflenetv2'])
@pytest.mark.parametrize('size', [64, 16])
def test_fixed_pool_nets_name_the_size_that_works(arch, size):
  module = models.get(arch, 10)
  with pytest.raises(ValueError, match=rf'{arch} works at 32x32 inputs only.*{size}x{size} input'):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  assert models.FIXED_INPUT_SIZE[arch] == 32


@pytest.mark.parametrize('arch,size', [('vgg8', 64), ('mobilenetv2', 64), ('resnet50', 64),
                                       ('mobilenetv2_imagenet', 224), ('resnet18_imagenet', 64)])
def test_other_sizes_work(arch, size):
  module = models.get(arch, 7)
  out = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0),
                                                       jnp.zeros((2, size, size, 3)))[0])
  assert out.shape == (2, 7) and out.dtype == jnp.float32


def test_reference_spellings():
  for alias, name in models.ALIASES.items():
    assert name in models.CLASSIFIERS and models.canonical_name(alias) == name
    assert models.get(alias, 10) == models.get(name, 10)
  for name in ('wrn40_2', 'wrn16_1', 'resnet50_imagenet', 'resnet18_imagenet',
               'mobilenetv2_imagenet', 'resnet8x4', 'vgg13', 'shufflenetv2'):
    assert name in models.CLASSIFIERS  # so the CLI flags and config checks accept them too
  with pytest.raises(ValueError, match='Unknown architecture'):
    models.get('resnet34x4', 10)


# ---------------------------------------------------------------- grouped convs

@pytest.mark.parametrize('cin,cout,groups,ksize,stride', [
    (6, 6, 6, 3, 1), (8, 8, 8, 3, 2), (4, 6, 2, 3, 2), (6, 12, 3, 1, 1)])
def test_grouped_conv_explicit_grad_matches_xla(cin, cout, groups, ksize, stride):
  rng = np.random.default_rng(cin * groups + stride)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, cin)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(ksize, ksize, cin // groups, cout)), jnp.float32)
  pad = ksize // 2
  y = jax.lax.conv_general_dilated(x, k, (stride, stride), [(pad, pad)] * 2,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=groups)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)

  def grads(impl):
    return jax.grad(lambda a, b: jnp.sum(layers.conv2d(a, b, stride, pad, impl, groups) * g),
                    argnums=(0, 1))(x, k)
  # Depthwise convs (the first two) are summed in another order: float32 rounding apart.
  np.testing.assert_allclose(layers.conv2d(x, k, stride, pad, 'explicit_grad', groups), y,
                             rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(y))))
  for a, b in zip(grads('explicit_grad'), grads('xla')):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def _np_depthwise(x, k, stride, pad):
  """float64 numpy depthwise cross-correlation: x [N, H, W, C], k [kh, kw, C]."""
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, _ = k.shape
  ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, x.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride] * k[i, j]
  return out


@pytest.mark.parametrize('h,w,ksize,stride,pad', [
    (7, 7, 3, 1, 1), (8, 8, 3, 2, 1), (7, 6, 3, 2, 1), (9, 9, 5, 2, 2), (6, 6, 3, 1, 0),
    (5, 7, 1, 2, 0)])
def test_depthwise_conv_matches_float64_reference(h, w, ksize, stride, pad):
  """The CPU depthwise path (shifted multiply-adds, conv_taps) against numpy in float64:
  the forward and both gradients (odd sizes, stride 2, 5x5 and 1x1 kernels, no padding)."""
  rng = np.random.default_rng(h * 10 + ksize + stride)
  c = 5
  x = rng.normal(size=(2, h, w, c))
  k = rng.normal(size=(ksize, ksize, 1, c))
  want = _np_depthwise(x, k[:, :, 0], stride, pad)
  ct = rng.normal(size=want.shape)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, vjp = jax.vjp(lambda a, b: layers.conv2d(a, b, stride, pad, 'explicit_grad', c), f32(x), f32(k))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  dx, dk = vjp(f32(ct))
  # Independent gradients in float64: dL/dx scatters ct * k back over the windows,
  # dL/dk[i, j] sums window_ij(x) * ct.
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dxp, dk_want = np.zeros_like(xp), np.zeros((ksize, ksize, c))
  ho, wo = want.shape[1:3]
  for i in range(ksize):
    for j in range(ksize):
      sl = (slice(None), slice(i, i + (ho - 1) * stride + 1, stride),
            slice(j, j + (wo - 1) * stride + 1, stride))
      dxp[sl] += ct * k[i, j, 0]
      dk_want[i, j] = np.sum(xp[sl] * ct, axis=(0, 1, 2))
  dx_want = dxp[:, pad:pad + h, pad:pad + w]
  np.testing.assert_allclose(dx, dx_want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk[:, :, 0], dk_want, rtol=1e-5, atol=1e-4)


def test_depthwise_cpu_path_uses_no_xla_conv():
  """conv2d routes a depthwise conv (groups == C_in == C_out) to the shifted multiply-adds
  on the explicit-gradient path: no convolution op in the forward or the gradients;
  a channel multiplier (C_out = 2 C_in) stays a grouped conv."""
  x = jnp.ones((1, 6, 6, 4))
  def ops(k, groups):
    f = lambda a, b: jnp.sum(layers.conv2d(a, b, 2, 1, 'explicit_grad', groups))
    return str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, k))
  assert 'conv_general_dilated' not in ops(jnp.ones((3, 3, 1, 4)), 4)
  assert 'conv_general_dilated' in ops(jnp.ones((3, 3, 1, 8)), 4)
  assert 'conv_general_dilated' in ops(jnp.ones((3, 3, 2, 4)), 2)
  y = layers.conv2d(x.astype(jnp.bfloat16), jnp.ones((3, 3, 1, 4), jnp.bfloat16), 1, 1,
                    'explicit_grad', 4)
  assert y.dtype == jnp.bfloat16 and float(y[0, 2, 2, 0]) == 9.0


def test_conv_groups_shape_and_validation():
  v = jax.eval_shape(lambda: layers.Conv(12, 3, groups=4).init(jax.random.key(0),
                                                               jnp.zeros((1, 5, 5, 8))))
  assert v['params']['kernel'].shape == (3, 3, 2, 12)
  with pytest.raises(ValueError, match='groups=3 must divide'):
    layers.Conv(12, 3, groups=3).init(jax.random.key(0), jnp.zeros((1, 5, 5, 8)))


def test_channel_shuffle_order():
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  # output channel 2j + i = input channel i * C/2 + j (DF:shufflenetv2.py:15-19)
  np.testing.assert_array_equal(channel_shuffle(x)[0, 0, 0], [0, 4, 1, 5, 2, 6, 3, 7])


# ---------------------------------------------------------------- legacy torch.save format

_MAGIC = 0x1950a86a20f9469cfc6c


def _legacy_pid(key, numel, view=None):
  view_ops = b'N' if view is None else _op_tuple(_op_str(view[0]), _op_int(view[1]),
                                                  _op_int(view[2]))
  return _op_tuple(_op_str('storage'), _op_global('torch', 'FloatStorage'), _op_str(key),
                   _op_str('cpu'), _op_int(numel), view_ops) + b'Q'  # BINPERSID


def _write_legacy(path, body, storages, little=True):
  """The legacy stream by hand: magic, protocol, sys_info, object, keys, storages."""
  order = '<' if little else '>'
  data = b''.join(pickle.dumps(v, protocol=2) for v in (
      _MAGIC, 1001, {'protocol_version': 1001, 'little_endian': little,
                     'type_sizes': {'short': 2, 'int': 4, 'long': 4}}))
  data += b'\x80\x02' + body + b'.' + pickle.dumps(sorted(storages), protocol=2)
  for key in sorted(storages):
    a = storages[key]
    data += struct.pack(order + 'q', a.size) + a.astype(a.dtype.newbyteorder(order)).tobytes()
  path.write_bytes(data)
  return path


@pytest.mark.parametrize('little', [True, False])
def test_legacy_oldest_tensor_form_and_views(tmp_path, little):
  """torch <= 0.1.10 pickled `torch.FloatTensor()` + BUILD (storage, offset, size, stride);
  torch <= 0.4 could pickle storage views; _rebuild_tensor (v1) came in between."""
  root = np.arange(12, dtype=np.float32)
  old = (_op_global('torch', 'FloatTensor') + b')R'
         + _op_tuple(_legacy_pid('7', 12), _op_int(1), _op_tuple(_op_int(3), _op_int(2)),
                     _op_tuple(_op_int(1), _op_int(4))) + b'b')  # BUILD
  v1 = (_op_global('torch._utils', '_rebuild_tensor')
        + _op_tuple(_legacy_pid('7', 12, ('view', 4, 6)), _op_int(0), _op_tuple(_op_int(6)),
                    _op_tuple(_op_int(1))) + b'R')
  body = _EMPTY_ORDERED_DICT + b'(' + _op_str('a') + old + _op_str('b') + v1 + b'u'
  out = convert.read_pth(_write_legacy(tmp_path / 'old.pth', body, {'7': root}, little))
  np.testing.assert_array_equal(out['a'], [[1, 5], [2, 6], [3, 7]])
  np.testing.assert_array_equal(out['b'], root[4:10])


def test_legacy_malicious_global_is_refused(tmp_path):
  marker = tmp_path / 'pwned'
  payload = (_op_global('builtins', 'eval')
             + _op_tuple(_op_str(f'open({str(marker)!r}, "w").close()')) + b'R')
  body = b'}' + _op_str('state_dict') + payload + b's'
  with pytest.raises(convert.UnsafeCheckpointError, match=r'builtins\.eval'):
    convert.read_pth(_write_legacy(tmp_path / 'evil.pth', body, {}))
  assert not marker.exists()


def test_legacy_truncated_and_inconsistent(tmp_path):
  body = (_EMPTY_ORDERED_DICT + b'(' + _op_str('w')
          + _op_global('torch._utils', '_rebuild_tensor_v2')
          + _op_tuple(_legacy_pid('0', 4), _op_int(0), _op_tuple(_op_int(4)),
                      _op_tuple(_op_int(1)), b'\x89', _EMPTY_ORDERED_DICT) + b'R' + b'u')
  good = _write_legacy(tmp_path / 'ok.pth', body, {'0': np.ones(4, np.float32)})
  np.testing.assert_array_equal(convert.read_pth(good)['w'], np.ones(4))
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(good.read_bytes()[:-3])
  with pytest.raises(convert.CheckpointFormatError, match='file ends inside storage'):
    convert.read_pth(cut)
  short = _write_legacy(tmp_path / 'short.pth', body, {'0': np.ones(3, np.float32)})
  with pytest.raises(convert.CheckpointFormatError, match='has 3 elements in the file, expected 4'):
    convert.read_pth(short)
  huge = _write_legacy(tmp_path / 'huge.pth', body.replace(_op_int(4), _op_int(1 << 30), 1),
                       {'0': np.ones(4, np.float32)})  # declares a 4 GB storage
  with pytest.raises(convert.CheckpointFormatError, match='exceed the file size'):
    convert.read_pth(huge)
  for keep in (0.3, 0.7):
    cut.write_bytes(good.read_bytes()[:int(len(good.read_bytes()) * keep)])
    with pytest.raises(convert.CheckpointFormatError, match=str(cut)):
      convert.read_pth(cut)
  assert convert.load_pth_object is pth.load_pth_object  # the old names still import


@pytest.mark.torch
def test_torch_written_legacy_file(tmp_path):
  torch = pytest.importorskip('torch')
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  sd = {'f64': base.double(), 'f16': base.half(), 'i64': base.long(), 'view': base.t()[1:, ::2],
        'shared': base[1], 'scalar': torch.tensor(2.5),
        'param': torch.nn.Parameter(base[2:].clone())}
  path = tmp_path / 'legacy.pth'
  torch.save({'state_dict': sd, 'epoch': 3, 'opt': {'lr': [0.1]}}, path,
             _use_new_zipfile_serialization=False)
  assert path.read_bytes()[:2] == b'\x80\x02'  # a pickle stream, not a zip archive
  out = convert.read_pth(path)
  for key, value in sd.items():
    assert out[key].shape == tuple(value.shape), key
    np.testing.assert_array_equal(out[key].astype(np.float64), value.detach().double().numpy(),
                                  err_msg=key)
  assert out['f16'].dtype == np.float16 and out['i64'].dtype == np.int64


# ---------------------------------------------------------------- parity with torch twins

def _check_parity(tmp_path, arch, size, layout, num_classes=10, batch=2, fp64=False):
  """fp64: also cmi_jax's forward in float64 against torch's, to the logits' final float32
  cast (2^-24 relative, x2): then both compute the same function and the float32 gap is
  rounding, however deep the net (benchmarks/zoo_parity.py `verdict`)."""
  pytest.importorskip('torch')
  from tests.torch_zoo import parity  # pylint: disable=import-outside-toplevel
  r = parity(arch, tmp_path / f'{arch}.pth', (size, size, 3), num_classes, batch, layout=layout,
             fp64=fp64)
  print(f'parity {arch} {size}x{size} ({layout}): max |logit diff| {r["max_abs_diff"]:.2e}, '
        f'max |logit| {r["max_abs_logit"]:.2f}, spread {r["logit_spread"]:.2f}')
  assert r['logit_spread'] > 0.03, r  # the logits depend on the input
  assert r['max_abs_diff'] <= PARITY_ATOL * max(1.0, r['max_abs_logit']), r
  if fp64:
    assert r['jax_fp64_vs_torch_fp64'] <= 2.0 ** -23 * r['max_abs_logit'], r


# (arch, input side, file layout, classes, batch). The default suite covers each family
# and each file layout once; the slow mark holds the rest (all measured by
# benchmarks/zoo_parity.py, figures in the README).
FAST_PARITY = [('resnet8', 32, 'reference', 10, 2), ('resnet8x4', 32, 'reference', 10, 2),
               ('vgg8', 32, 'reference', 10, 2), ('shufflenetv2', 32, 'reference', 10, 2),
               ('mobilenetv2', 32, 'torchvision', 10, 2),
               # torchvision's published ResNet-18 is a raw state_dict in the legacy format.
               ('resnet18_imagenet', 224, 'legacy', 1000, 2)]
_FAST = {case[0] for case in FAST_PARITY}
FP64_FAST = {'shufflenetv2'}  # depthwise and 1x1 convs, channel shuffle: the float64 check too
SLOW_PARITY = ([(a, 32, 'reference', 10, 2) for a in sorted(set(CIFAR_ZOO) - _FAST)]
               + [(a, 32, 'torchvision', 10, 2) for a in sorted(IMAGENET_ZOO)]
               + [(a, 224, 'legacy', 1000, 2) for a in sorted(set(IMAGENET_ZOO) - _FAST)])


@pytest.mark.torch
@pytest.mark.parametrize('arch,size,layout,num_classes,batch', FAST_PARITY)
def test_parity(tmp_path, arch, size, layout, num_classes, batch):
  _check_parity(tmp_path, arch, size, layout, num_classes, batch, fp64=arch in FP64_FAST)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize('arch,size,layout,num_classes,batch', SLOW_PARITY)
def test_parity_slow(tmp_path, arch, size, layout, num_classes, batch):
  _check_parity(tmp_path, arch, size, layout, num_classes, batch, fp64=True)

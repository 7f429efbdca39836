"""Model zoo against the reference: sizes, key names, padding, BN semantics, generator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import models
from cmi_jax.models import layers
from cmi_jax.models.generator import Generator
from tests.helpers import abstract_variables, random_variables


def _flat(tree, prefix=()):
  """{('a', 'b', 'kernel'): leaf} for a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _torch_keys(variables):
  """Reference state_dict key names implied by the Flax variables."""
  leaf = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
          ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
          ('batch_stats', 'var'): 'running_var'}
  keys = set()
  for col in ('params', 'batch_stats'):
    for path in _flat(variables[col]):
      keys.add('.'.join(path[:-1] + (leaf[(col, path[-1])],)))
  return keys


def _bn_keys(prefix):
  return {f'{prefix}.{s}' for s in ('weight', 'bias', 'running_mean', 'running_var')}


def _record_bn_inputs():
  """Interceptor recording (module path, input) of every BatchNorm call."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.BatchNorm) and context.method_name == '__call__':
      calls.append(('.'.join(context.module.path), args[0]))
    return next_fun(*args, **kwargs)
  return calls, interceptor


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize('arch, millions', [
    ('wrn_40_2', 2.24), ('wrn_16_1', 0.175), ('resnet34', 21.28), ('resnet18', 11.17),
    ('vgg11', 9.23)])
def test_param_counts_match_reference(arch, millions):
  variables = abstract_variables(models.get(arch, 10), (1, 32, 32, 3))
  assert abs(_count(variables['params']) / 1e6 - millions) <= 0.01


@pytest.mark.parametrize('arch, n_bn', [('wrn_40_2', 37), ('wrn_16_1', 13)])
def test_bn_layer_and_tap_counts(arch, n_bn):
  module = models.get(arch, 10)
  variables = abstract_variables(module, (1, 32, 32, 3))
  assert len(_flat(variables['batch_stats'])) == 2 * n_bn  # mean and var per BN
  _, taps = jax.eval_shape(
      lambda v: module.apply(v, jnp.zeros((2, 32, 32, 3)), mutable=[models.TAPS]),
      {k: variables[k] for k in ('params', 'batch_stats')})
  bn = []
  for path, value in _flat(taps[models.TAPS]).items():
    if path[-1] == 'bn':
      bn.extend(value)
  assert len(bn) == n_bn


def test_models_any_size_and_class_count():
  """[N, K] logits at 28x28x1, 32x32x3, 64x64x3; one real forward, the rest traced."""
  module = models.get('wrn_16_1', 7)
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  variables = random_variables(module, x.shape)
  logits = module.apply(variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # The nets of the original seven; the rest of the zoo is traced in tests/test_zoo.py.
  for arch in ('wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2', 'resnet18', 'resnet34', 'vgg11'):
    for shape, k in (((2, 28, 28, 1), 7), ((2, 32, 32, 3), 100), ((2, 64, 64, 3), 10)):
      m = models.get(arch, k)
      out = jax.eval_shape(lambda: m.init_with_output(jax.random.key(0), jnp.zeros(shape))[0])
      assert out.shape == (2, k) and out.dtype == jnp.float32, (arch, shape)


@pytest.mark.parametrize('size, spatial', [
    # BN input side per block: pools after block0..2, after block3 only at 64x64.
    (64, (64, 32, 16, 8, 4)), (32, (32, 16, 8, 4, 4)), (28, (28, 14, 7, 3, 3))])
def test_vgg_pool_rule(size, spatial):
  module = models.get('vgg11', 10)
  calls, interceptor = _record_bn_inputs()

  def fwd():
    with nn.intercept_methods(interceptor):
      return module.init_with_output(jax.random.key(0), jnp.zeros((1, size, size, 3)))[0]
  jax.eval_shape(fwd)
  seen = {}
  for path, x in calls:
    seen.setdefault(path.split('.')[0], set()).add(x.shape[1:3])
  assert seen == {f'block{b}': {(s, s)} for b, s in enumerate(spatial)}


def test_vgg_64_forward_uses_extra_pool():
  """A real 64x64 forward: block4 runs at 4x4, the logits are the numpy head on it."""
  module = models.get('vgg11', 5)
  x = jax.random.uniform(jax.random.key(2), (1, 64, 64, 3))
  variables = random_variables(module, x.shape)
  calls, interceptor = _record_bn_inputs()
  with nn.intercept_methods(interceptor):
    logits = module.apply(variables, x)
  assert np.all(np.isfinite(logits))
  # block4's last BN input -> BN (eval) -> relu -> mean -> classifier.
  path, h = calls[-1]
  assert path == 'block4.4' and h.shape == (1, 4, 4, 512)
  p, s = variables['params']['block4']['4'], variables['batch_stats']['block4']['4']
  h = np.asarray(h)
  y = (h - s['mean']) / np.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']
  feat = np.maximum(y, 0).mean(axis=(1, 2))
  c = variables['params']['classifier']
  np.testing.assert_allclose(logits, feat @ c['kernel'] + c['bias'], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- key names

def test_wrn_16_1_keys():
  v = abstract_variables(models.get('wrn_16_1', 10), (1, 32, 32, 3))
  expected = {'conv1.weight', 'fc.weight', 'fc.bias'} | _bn_keys('bn1')
  in_planes = 16
  for g, out_planes in enumerate((16, 32, 64), start=1):
    for i in range(2):
      p = f'block{g}.layer.{i}'
      expected |= _bn_keys(f'{p}.bn1') | _bn_keys(f'{p}.bn2')
      expected |= {f'{p}.conv1.weight', f'{p}.conv2.weight'}
      if i == 0 and in_planes != out_planes:
        expected.add(f'{p}.convShortcut.weight')
      in_planes = out_planes
  keys = _torch_keys(v)
  assert keys == expected
  assert 'block1.layer.0.convShortcut.weight' not in keys
  assert 'block2.layer.0.convShortcut.weight' in keys


def test_resnet18_keys():
  v = abstract_variables(models.get('resnet18', 10), (1, 32, 32, 3))
  expected = {'conv1.weight', 'linear.weight', 'linear.bias'} | _bn_keys('bn1')
  for k in range(1, 5):
    for j in range(2):
      p = f'layer{k}.{j}'
      expected |= {f'{p}.conv1.weight', f'{p}.conv2.weight'}
      expected |= _bn_keys(f'{p}.bn1') | _bn_keys(f'{p}.bn2')
      if k > 1 and j == 0:
        expected |= {f'{p}.shortcut.0.weight'} | _bn_keys(f'{p}.shortcut.1')
  keys = _torch_keys(v)
  assert keys == expected
  assert 'layer2.0.shortcut.0.weight' in keys and 'layer1.0.shortcut.0.weight' not in keys


def test_vgg11_keys():
  v = abstract_variables(models.get('vgg11', 10), (1, 32, 32, 3))
  expected = {'classifier.weight', 'classifier.bias'}
  for b, n_conv in enumerate((1, 1, 2, 2, 2)):
    for i in range(n_conv):
      expected |= {f'block{b}.{3 * i}.weight', f'block{b}.{3 * i}.bias'}
      expected |= _bn_keys(f'block{b}.{3 * i + 1}')
  keys = _torch_keys(v)
  assert keys == expected
  assert 'block2.3.weight' in keys


def test_generator_keys_and_shapes():
  v = abstract_variables(Generator(), (2, 256))
  expected = {'l1.0.weight', 'l1.0.bias', 'conv_blocks.2.weight', 'conv_blocks.6.weight',
              'conv_blocks.9.weight', 'conv_blocks.9.bias'}
  for i in (0, 3, 7):
    expected |= _bn_keys(f'conv_blocks.{i}')
  assert _torch_keys(v) == expected
  p = v['params']
  assert p['l1']['0']['kernel'].shape == (256, 128 * 8 * 8)
  assert p['conv_blocks']['2']['kernel'].shape == (3, 3, 128, 128)
  assert p['conv_blocks']['6']['kernel'].shape == (3, 3, 128, 64)
  assert p['conv_blocks']['9']['kernel'].shape == (3, 3, 64, 3)
  large = abstract_variables(Generator(large=True), (2, 256))['params']
  assert large['l1']['0']['kernel'].shape == (256, 256 * 8 * 8)
  assert large['conv_blocks']['2']['kernel'].shape == (3, 3, 256, 128)


# ---------------------------------------------------------------- conv

def _np_conv(x, k, stride, pad):
  """Direct NHWC x HWIO convolution with symmetric zero padding."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(np.float64)
  kh, kw, _, co = k.shape
  n, hp, wp, _ = x.shape
  ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
  y = np.zeros((n, ho, wo, co))
  for i in range(ho):
    for j in range(wo):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      y[:, i, j, :] = np.einsum('nhwc,hwco->no', patch, k)
  return y


@pytest.mark.parametrize('impl', ['xla', 'explicit_grad'])
def test_stride2_conv_pads_symmetrically(impl):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  k = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  y = layers.conv2d(jnp.asarray(x), jnp.asarray(k), 2, 1, impl)
  assert y.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(y, _np_conv(x, k, 2, 1), rtol=1e-5, atol=1e-5)
  # Flax 'SAME' pads (0, 1) here: the reference would not match it.
  same = jax.lax.conv_general_dilated(x, k, (2, 2), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert not np.allclose(same, _np_conv(x, k, 2, 1), atol=1e-3)


def test_conv_module_matches_numpy():
  conv = layers.Conv(5, 3, 2, 1, use_bias=True)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 7, 7, 2)).astype(np.float32)
  p = {'kernel': rng.normal(size=(3, 3, 2, 5)).astype(np.float32),
       'bias': rng.normal(size=(5,)).astype(np.float32)}
  variables = {'params': p}
  expected = _np_conv(np.asarray(x), np.asarray(p['kernel']), 2, 1) + np.asarray(p['bias'])
  np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('ksize', [3, 1])
@pytest.mark.parametrize('size', [8, 7])
def test_explicit_grad_conv_matches_xla(stride, ksize, size):
  rng = np.random.default_rng(ksize * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(ksize, ksize, 3, 4)), jnp.float32)
  pad = ksize // 2
  y_xla = layers.conv2d(x, k, stride, pad, 'xla')
  g = jnp.asarray(rng.normal(size=y_xla.shape), jnp.float32)

  def grads(impl):
    return jax.grad(lambda x_, k_: jnp.sum(layers.conv2d(x_, k_, stride, pad, impl) * g),
                    argnums=(0, 1))(x, k)
  np.testing.assert_allclose(layers.conv2d(x, k, stride, pad, 'explicit_grad'), y_xla, rtol=1e-5,
                             atol=1e-5)
  for a, b in zip(grads('explicit_grad'), grads('xla')):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    assert float(jnp.max(jnp.abs(b))) > 0


def test_conv_impl_rejects_unknown():
  with pytest.raises(ValueError, match='explicit_grad'):
    layers.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), 1, 1, 'fft')


# ---------------------------------------------------------------- BatchNorm

def test_batchnorm_train_mode_matches_pytorch_semantics():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(3, 4, 5, 2)) * [1.0, 3.0] + [0.5, -2.0]).astype(np.float32)
  scale, bias = np.array([1.5, 0.7], np.float32), np.array([0.1, -0.3], np.float32)
  ra_mean, ra_var = np.array([0.2, -0.4], np.float32), np.array([2.0, 0.5], np.float32)
  bn = layers.BatchNorm()
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': {'mean': ra_mean, 'var': ra_var}}
  y, new = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  x64 = x.astype(np.float64)
  mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))  # biased
  np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  n = 3 * 4 * 5
  np.testing.assert_allclose(new['batch_stats']['mean'], 0.9 * ra_mean + 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(new['batch_stats']['var'],
                             0.9 * ra_var + 0.1 * var * n / (n - 1), rtol=1e-6)
  # Eval mode: running statistics, nothing updated.
  y_eval, same = bn.apply(variables, x, train=False, mutable=['batch_stats'])
  np.testing.assert_allclose(y_eval, (x64 - ra_mean) / np.sqrt(ra_var + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(same['batch_stats']['mean'], ra_mean)


# ---------------------------------------------------------------- generator

@pytest.mark.parametrize('size, nc', [(28, 1), (32, 3)])
def test_generator_output_range_shape_train_mode(size, nc):
  gen = Generator(nz=8, ngf=4, img_size=size, nc=nc)
  z = jax.random.normal(jax.random.key(0), (3, 8))
  variables = random_variables(gen, z.shape)
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.BatchNorm):
      calls.append((context.module.name, out))
    return out
  with nn.intercept_methods(interceptor):
    x, new = gen.apply(variables, z, mutable=['batch_stats'])  # train=True by default
  assert x.shape == (3, size, size, nc)
  assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
  # Train-mode BN: each output channel has batch mean = BN bias, batch std ~ |scale|,
  # and the running stats moved.
  assert [name for name, _ in calls] == ['0', '3', '7']
  for name, out in calls:
    p = variables['params']['conv_blocks'][name]
    np.testing.assert_allclose(np.mean(out, axis=(0, 1, 2)), p['bias'], atol=1e-4)
    np.testing.assert_allclose(np.std(out, axis=(0, 1, 2)), np.abs(p['scale']), rtol=1e-2)
  assert not np.allclose(new['batch_stats']['conv_blocks']['0']['mean'], 0.0)


def test_generator_l1_reshape_is_nchw():
  gen = Generator(nz=4, ngf=2, img_size=8, nc=1)  # width 4, 2x2 after l1
  z = jnp.ones((2, 4))
  variables = random_variables(gen, z.shape)
  c, s = 4, 2
  bias = np.arange(c * s * s, dtype=np.float32)
  params = dict(variables['params'])
  params['l1'] = {'0': {'kernel': jnp.zeros((4, c * s * s)), 'bias': jnp.asarray(bias)}}
  calls, interceptor = _record_bn_inputs()
  with nn.intercept_methods(interceptor):
    gen.apply({**variables, 'params': params}, z, mutable=['batch_stats'])
  path, h = calls[0]
  assert path == 'conv_blocks.0'
  expected = bias.reshape(c, s, s).transpose(1, 2, 0)  # PyTorch .view(B, C, S, S), as NHWC
  np.testing.assert_array_equal(h, np.broadcast_to(expected, (2, s, s, c)))


def test_generator_rejects_size_not_multiple_of_4():
  with pytest.raises(ValueError, match='multiple of 4'):
    Generator(img_size=30).init(jax.random.key(0), jnp.zeros((1, 256)))

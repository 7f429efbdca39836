"""The inference form (issue 24, item 3): BN folded into the conv before it gives the
unfolded network's logits within 1e-5 for every zoo classifier (random weights and
running statistics), folds exactly the BNs that directly follow a conv (counted by
hand per architecture), leaves a BN alone when something else also reads the conv's
output, and serves evaluation, the teacher's logits and their input gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import distill, models
from cmi_jax.models import fold
from cmi_jax.teacher import Teacher
from tests.helpers import random_variables

# arch -> (input size, BN layers, BNs that fold), counted from the architectures:
#   WRN (pre-activation): each block's bn2 follows its conv1 and folds; bn1 and the
#     final BN read residual sums, except block1.0.bn1 when the stem's output feeds
#     it alone (in != out channels: widen 2, not widen 1, where the identity shortcut
#     reads the stem too): wrn_16_2 6 + 1 of 13, wrn_16_1 6 of 13, wrn_40_x 18 (+ 1).
#   ResNets (post-activation): every BN follows a conv: stem + 2 or 3 per block +
#     projection shortcuts (resnet20: 1 + 18 + 2; resnet18: 1 + 16 + 3; resnet50:
#     1 + 48 + 4). VGG: one BN per conv (vgg8: 5). MobileNetV2: stem + 2 (first
#     block) + 16 x 3 + last conv = 52. ShuffleNetV2: every BN follows a conv.
DEFAULT = {
    'wrn_16_2': (32, 13, 7),
    'resnet18': (32, 20, 20),
    'resnet20': (32, 21, 21),
    'vgg8': (32, 5, 5),
    'mobilenetv2': (32, 52, 52),
    'shufflenetv2': (32, 56, 56),
    'resnet50': (32, 53, 53),
    'resnet18_imagenet': (64, 20, 20),
}
SLOW = {
    'wrn_40_2': (32, 37, 19), 'wrn_16_1': (32, 13, 6), 'wrn_40_1': (32, 37, 18),
    'resnet34': (32, 36, 36), 'vgg11': (32, 8, 8), 'vgg13': (32, 10, 10),
    'resnet8': (32, 9, 9), 'resnet32x4': (32, 34, 34), 'resnet8x4': (32, 10, 10),
    'resnet56': (32, 57, 57), 'resnet110': (32, 111, 111),
    'resnet34_imagenet': (64, 36, 36), 'resnet50_imagenet': (64, 53, 53),
}


def _check_arch(arch, size, n_bn, n_fold):
  module = models.get(arch, 10)
  shape = (size, size, 3)
  variables = random_variables(module, (1,) + shape, seed=1)
  assert len(jax.tree_util.tree_leaves(variables['batch_stats'])) == 2 * n_bn
  x = jax.random.normal(jax.random.key(3), (3,) + shape)
  pairs = fold.pairs_for(module, variables, x)
  assert len(pairs) == n_fold, [(p.conv, p.bn) for p in pairs]
  want = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  got = jax.jit(lambda v, x: fold.inference_apply(module, v, x))(variables, x)
  scale = float(jnp.max(jnp.abs(want)))
  assert scale > 0.1  # a real signal, not a net of zeros
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, scale))
  return pairs


@pytest.mark.parametrize('arch', sorted(DEFAULT))
def test_folded_logits_match_unfolded(arch):
  _check_arch(arch, *DEFAULT[arch])


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(SLOW))
def test_folded_logits_match_unfolded_rest_of_zoo(arch):
  _check_arch(arch, *SLOW[arch])


def test_wrn_pairs_are_the_convs_before_their_bns():
  pairs = _check_arch('wrn_16_2', *DEFAULT['wrn_16_2'])
  want = [(('conv1',), ('block1', 'layer', '0', 'bn1'))] + [
      ((f'block{b}', 'layer', str(i), 'conv1'), (f'block{b}', 'layer', str(i), 'bn2'))
      for b in (1, 2, 3) for i in (0, 1)]
  assert [(p.conv, p.bn) for p in pairs] == want
  assert all(p.epsilon == 1e-5 for p in pairs)


class _FlaxNet(nn.Module):
  """A user's model of flax layers: conv_a's output also feeds a skip connection, so
  its BN must stay; conv_b (with its own bias) -> bn_b folds; eps differs per BN."""

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(8, (3, 3), use_bias=False, name='conv_a')(x)
    z = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=1e-3, name='bn_a')(y)) + y
    z = nn.Conv(8, (3, 3), use_bias=True, name='conv_b')(z)
    z = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn_b')(z))
    return nn.Dense(5, name='fc')(jnp.mean(z, axis=(1, 2)))


def test_flax_layers_fold_and_a_shared_conv_output_does_not():
  module = _FlaxNet()
  variables = random_variables(module, (1, 8, 8, 2), seed=4, train=False)
  x = jax.random.normal(jax.random.key(5), (4, 8, 8, 2))
  pairs = fold.pairs_for(module, variables, x)
  assert [(p.conv, p.bn, p.epsilon) for p in pairs] == [(('conv_b',), ('bn_b',), 1e-5)]
  want = module.apply(variables, x, train=False)
  got = fold.inference_apply(module, variables, x)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  # The folded variables by hand: conv_b's kernel and bias times mul, bn_b's add as the
  # FOLDED bias, and the skip marker on bn_b (none on the shared pair).
  bn, st = variables['params']['bn_b'], variables['batch_stats']['bn_b']
  mul = np.asarray(bn['scale']) / np.sqrt(np.asarray(st['var']) + 1e-5)
  fv = fold.fold_variables(variables, pairs)
  np.testing.assert_allclose(fv['params']['conv_b']['kernel'],
                             np.asarray(variables['params']['conv_b']['kernel']) * mul, rtol=1e-6)
  np.testing.assert_allclose(fv['params']['conv_b']['bias'],
                             np.asarray(variables['params']['conv_b']['bias']) * mul, rtol=1e-6)
  np.testing.assert_allclose(fv[fold.FOLDED]['conv_b']['bias'],
                             np.asarray(bn['bias']) - np.asarray(st['mean']) * mul, rtol=1e-6,
                             atol=1e-7)
  assert set(fv[fold.FOLDED]) == {'conv_b', 'bn_b'}


def test_train_mode_bn_is_never_folded():
  module = _FlaxNet()
  variables = random_variables(module, (1, 8, 8, 2), seed=4, train=False)

  def spy_train(v, x):  # what find_pairs would see if a model kept BN in train mode
    return module.apply(v, x, train=True, mutable=['batch_stats'])[0]
  x = jax.ShapeDtypeStruct((2, 8, 8, 2), jnp.float32)
  found = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      found.append(fold._bn_in_inference(context.module, args, kwargs))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    jax.eval_shape(spy_train, variables, x)
  assert found == [False, False]


def test_teacher_logits_and_input_gradients_use_the_folded_form():
  module = models.get('wrn_16_1', 10)
  variables = random_variables(module, (1, 16, 16, 3), seed=6)
  teacher = Teacher(module, variables)
  x = jax.random.normal(jax.random.key(7), (4, 16, 16, 3))
  w = jax.random.normal(jax.random.key(8), (4, 10))

  def folded(x):
    return jnp.sum(w * teacher(x, taps=False).logits)

  def plain(x):
    return jnp.sum(w * module.apply(variables, x, train=False))
  (v1, g1), (v0, g0) = jax.jit(jax.value_and_grad(folded))(x), jax.value_and_grad(plain)(x)
  assert v1 == pytest.approx(float(v0), rel=1e-5)
  np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(g0))))
  # taps=True still reads the unfolded network's BN inputs (13 of them for a WRN-16).
  assert len(teacher(x).bn) == 13


def test_eval_fn_of_a_module_is_folded_and_counts_as_the_plain_one():
  module = models.get('wrn_16_1', 10)
  variables = random_variables(module, (1, 16, 16, 3), seed=9)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 20).astype(np.int32)
  mean, std = (0.5,) * 3, (0.25,) * 3
  plain = distill.evaluate(distill.make_eval_fn(module.apply, mean, std), variables, images,
                           labels, batch_size=8)
  folded = distill.evaluate(distill.make_eval_fn(module, mean, std), variables, images, labels,
                            batch_size=8)
  assert folded['accuracy'] == plain['accuracy']
  assert folded['loss'] == pytest.approx(plain['loss'], rel=1e-5)
  # and by hand from the unfolded logits
  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.25
  logits = np.asarray(module.apply(variables, x, train=False), np.float64)
  assert folded['accuracy'] == pytest.approx(100.0 * np.mean(logits.argmax(-1) == labels))


class _SquaredConv(nn.Conv):
  """A subclass whose __call__ is not linear in the kernel: must never fold."""

  def __call__(self, x):
    return jnp.square(super().__call__(x))


class _SubclassNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    y = _SquaredConv(4, (3, 3), use_bias=False, name='sq')(x)
    y = nn.BatchNorm(use_running_average=not train, name='bn')(y)
    return nn.Dense(3, name='fc')(jnp.mean(y, axis=(1, 2)))


def test_conv_subclasses_are_not_folded():
  module = _SubclassNet()
  variables = random_variables(module, (1, 6, 6, 2), seed=2, train=False)
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2))
  assert fold.pairs_for(module, variables, x) == ()
  np.testing.assert_array_equal(fold.inference_apply(module, variables, x),
                                module.apply(variables, x, train=False))

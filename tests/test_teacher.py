"""Frozen teacher: BN-input taps, contrastive features, gradients, jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import models
from cmi_jax.models import layers
from cmi_jax.models.layers import BlockStack
from cmi_jax.teacher import Teacher, subset_batch_stats
from tests.helpers import random_variables


def _capture(module_type):
  """Interceptor recording (path, first argument) of every call of `module_type`."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, module_type) and context.method_name == '__call__':
      calls.append(('.'.join(context.module.path), np.asarray(args[0], np.float64)))
    return next_fun(*args, **kwargs)
  return calls, interceptor


def _get(tree, path):
  for k in path.split('.'):
    tree = tree[k]
  return tree


@pytest.fixture(scope='module')
def wrn():
  """wrn_16_1 teacher on 8x8x3 inputs, its output and the BN inputs seen eagerly."""
  module = models.get('wrn_16_1', 10)
  teacher = Teacher(module, random_variables(module, (1, 8, 8, 3)))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  calls, interceptor = _capture(layers.BatchNorm)
  with nn.intercept_methods(interceptor):
    out = teacher(x)
  return teacher, x, out, calls


def test_bn_taps_equal_numpy_statistics(wrn):
  teacher, _, out, calls = wrn
  assert len(out.bn) == len(calls) == 13
  for tap, (path, h) in zip(out.bn, calls):
    np.testing.assert_allclose(tap.mean, h.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tap.var, h.var(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    stats = _get(teacher.variables['batch_stats'], path)
    np.testing.assert_array_equal(tap.running_mean, stats['mean'])
    np.testing.assert_array_equal(tap.running_var, stats['var'])
    for k in (None, 1, 3):
      mu, var = subset_batch_stats(tap, k)
      rows = h if k is None else h[:k]
      np.testing.assert_allclose(mu, rows.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(var, rows.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_wrn_features_are_bn_input_means_in_forward_order(wrn):
  _, _, out, calls = wrn
  expected = np.concatenate([h.mean(axis=(1, 2)) for _, h in calls], axis=-1)
  widths = [16, 16, 16, 16, 16, 32, 32, 32, 32, 64, 64, 64, 64]  # BN inputs, forward order
  assert [h.shape[-1] for _, h in calls] == widths
  assert out.features.shape == (4, sum(widths))
  np.testing.assert_allclose(out.features, expected, rtol=1e-5, atol=1e-5)
  # Forward order: block1.layer.0.bn1 first, the head's bn1 last.
  assert calls[0][0] == 'block1.layer.0.bn1' and calls[-1][0] == 'bn1'
  assert out.penultimate.shape == (4, 64)


def test_wrn_40_2_feature_dims():
  module = models.get('wrn_40_2', 10)
  variables = jax.eval_shape(lambda: models.init(module, jax.random.key(0), (1, 32, 32, 3)))
  out = jax.eval_shape(lambda v, x: Teacher(module, v)(x), variables,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.features.shape == (2, 2704)
  assert len(out.bn) == 37 and out.logits.shape == (2, 10)


def test_resnet18_features_are_layer_input_means():
  module = models.get('resnet18', 10)
  teacher = Teacher(module, random_variables(module, (1, 8, 8, 3), seed=1))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  calls, interceptor = _capture(BlockStack)
  with nn.intercept_methods(interceptor):
    out = teacher(x)
  assert [p for p, _ in calls] == ['layer1', 'layer2', 'layer3', 'layer4']
  expected = np.concatenate([h.mean(axis=(1, 2)) for _, h in calls], axis=-1)
  assert out.features.shape == (2, 512)
  np.testing.assert_allclose(out.features, expected, rtol=1e-5, atol=1e-5)
  assert len(out.bn) == 20  # stem + 4 * 2 * 2 + 3 shortcuts


def test_teacher_is_frozen_and_differentiable_in_x(wrn):
  teacher, x, out, _ = wrn
  before = jax.tree_util.tree_map(np.array, teacher.variables)

  def loss(t, x):
    o = t(x)
    bn = sum(jnp.sum(tap.mean * tap.running_mean) + jnp.sum(tap.var * tap.running_var)
             for tap in o.bn)
    return jnp.sum(o.logits) + jnp.sum(o.features) + bn

  g_teacher, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(teacher, x)
  for leaf in jax.tree_util.tree_leaves(g_teacher):
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(jnp.max(jnp.abs(g_x))) > 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, teacher.variables, before)
  # Inference mode: running stats are used, so one sample's logits don't depend on the others.
  logits_alone = teacher(x[:1], taps=False).logits
  np.testing.assert_allclose(logits_alone, out.logits[:1], rtol=1e-5, atol=1e-5)


def test_teacher_under_jit(wrn):
  teacher, x, out, _ = wrn
  traces = []

  @jax.jit
  def run(t, x):
    traces.append(1)
    o = t(x)
    return o.logits, o.features, t(x, taps=False).logits

  logits, features, logits_no_taps = run(teacher, x)
  np.testing.assert_allclose(logits, out.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(features, out.features, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits_no_taps, out.logits, rtol=1e-5, atol=1e-5)
  # Variables are pytree leaves: other values, same trace.
  other = Teacher(teacher.module, jax.tree_util.tree_map(lambda v: v * 1.5, teacher.variables))
  logits2, _, _ = run(other, x)
  assert len(traces) == 1
  assert not np.allclose(logits2, logits)

"""The train-mode BatchNorm's own VJP (norm_ops.batch_norm_train): values and every
gradient against a float64 numpy derivation and against PyTorch's BatchNorm2d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax.models import layers, norm_ops


def _data(seed=0, shape=(4, 5, 6, 3), offset=(0.5, -2.0, 40.0), spread=(1.0, 3.0, 0.5)):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=shape) * spread + offset).astype(np.float32)
  c = shape[-1]
  scale = rng.normal(size=c).astype(np.float32) + 1.0
  bias = rng.normal(size=c).astype(np.float32)
  w = rng.normal(size=shape).astype(np.float32)       # a cotangent for y
  wm = rng.normal(size=c).astype(np.float32)           # ... for the batch mean
  wv = rng.normal(size=c).astype(np.float32)           # ... for the batch variance
  return x, scale, bias, w, wm, wv


def _numpy_grads(x, scale, bias, w, wm, wv, eps=1e-5):
  """d/d(x, scale, bias) of sum(w * y) + sum(wm * mean) + sum(wv * var), in float64,
  from the textbook BN backward (mean and biased variance over N, H, W)."""
  x, scale, bias, w, wm, wv = (a.astype(np.float64) for a in (x, scale, bias, w, wm, wv))
  axes = (0, 1, 2)
  n = x.size // x.shape[-1]
  mean, var = x.mean(axes), x.var(axes)
  rstd = 1.0 / np.sqrt(var + eps)
  xhat = (x - mean) * rstd
  y = xhat * scale + bias
  dbias, dscale = w.sum(axes), (w * xhat).sum(axes)
  dx = scale * rstd * (w - w.mean(axes) - xhat * (w * xhat).mean(axes))
  dx = dx + wm / n + wv * 2.0 * (x - mean) / n
  return (y, mean, var), (dx, dscale, dbias)


@pytest.mark.parametrize('offset', [(0.5, -2.0, 0.0), (0.5, -2.0, 40.0)])
def test_batch_norm_train_values_and_gradients_match_float64(offset):
  # Channel 2 at mean 40, std 0.5: where a plain one-pass E[x^2] - E[x]^2 in float32
  # loses 3 digits of the variance (measured 0.45 %); the shifted sums must not.
  x, scale, bias, w, wm, wv = _data(offset=offset)
  (y64, m64, v64), grads64 = _numpy_grads(x, scale, bias, w, wm, wv)

  def objective(x, scale, bias):
    y, m, v = norm_ops.batch_norm_train(x, scale, bias, 1e-5)
    return jnp.sum(w * y) + jnp.sum(wm * m) + jnp.sum(wv * v)

  y, m, v = norm_ops.batch_norm_train(jnp.asarray(x), scale, bias, 1e-5)
  np.testing.assert_allclose(m, m64, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(v, v64, rtol=1e-5)
  np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)
  for got, want, name in zip(jax.grad(objective, (0, 1, 2))(jnp.asarray(x), scale, bias),
                             grads64, ('x', 'scale', 'bias')):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_batchnorm_module_train_gradients_match_autodiff_of_the_two_pass_form():
  """The module (with its running-mean centre) against autodiff of the plain formula."""
  x, scale, bias, w, _, _ = _data(1, (3, 4, 4, 3), (1.0, -3.0, 8.0), (2.0, 0.5, 1.0))
  ra_mean, ra_var = np.array([0.9, -2.5, 7.0], np.float32), np.ones(3, np.float32)
  bn = layers.BatchNorm()

  def module_loss(params, x):
    y, _ = bn.apply({'params': params, 'batch_stats': {'mean': ra_mean, 'var': ra_var}}, x,
                    train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y) * w)

  def formula_loss(params, x):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    y = (x - mean) / jnp.sqrt(var + 1e-5) * params['scale'] + params['bias']
    return jnp.sum(jnp.sin(y) * w)

  params = {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}
  got = jax.grad(module_loss, (0, 1))(params, jnp.asarray(x))
  want = jax.grad(formula_loss, (0, 1))(params, jnp.asarray(x))
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.torch
def test_batchnorm_train_forward_backward_and_running_stats_match_pytorch():
  torch = pytest.importorskip('torch')
  x, scale, bias, w, _, _ = _data(2, (8, 6, 6, 4), (0.3, -1.0, 5.0, 0.0), (1.0, 2.0, 0.7, 4.0))
  ra_mean, ra_var = np.full(4, 0.2, np.float32), np.full(4, 1.5, np.float32)

  tbn = torch.nn.BatchNorm2d(4, eps=1e-5, momentum=0.1)
  with torch.no_grad():
    tbn.weight.copy_(torch.from_numpy(scale))
    tbn.bias.copy_(torch.from_numpy(bias))
    tbn.running_mean.copy_(torch.from_numpy(ra_mean))
    tbn.running_var.copy_(torch.from_numpy(ra_var))
  tbn.train()
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  ty = tbn(tx)
  (ty * torch.from_numpy(w.transpose(0, 3, 1, 2).copy())).sum().backward()

  bn = layers.BatchNorm()

  def loss(params, x):
    y, new = bn.apply({'params': params, 'batch_stats': {'mean': ra_mean, 'var': ra_var}}, x,
                      train=True, mutable=['batch_stats'])
    return jnp.sum(y * w), (y, new['batch_stats'])

  params = {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}
  (_, (y, stats)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params,
                                                                              jnp.asarray(x))
  np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp['scale'], tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp['bias'], tbn.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['mean'], tbn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stats['var'], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('offset', [0.0, 30.0])
def test_sample_moments_values_and_gradient_match_float64(offset):
  """The BN-input tap's per-sample moments (one pass, own VJP) against float64."""
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(3, 5, 7, 4)) * [1.0, 0.2, 2.0, 0.5] + offset).astype(np.float32)
  gm, gv = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  m, v = norm_ops.sample_moments(jnp.asarray(x))
  x64 = x.astype(np.float64)
  m64, v64 = x64.mean((1, 2)), x64.var((1, 2))
  np.testing.assert_allclose(m, m64, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(v, v64, rtol=2e-5)
  grad = jax.grad(lambda x: jnp.sum(norm_ops.sample_moments(x)[0] * gm)
                  + jnp.sum(norm_ops.sample_moments(x)[1] * gv))(jnp.asarray(x))
  want = (gm[:, None, None, :] + 2.0 * gv[:, None, None, :] * (x64 - m64[:, None, None, :])) / 35
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)

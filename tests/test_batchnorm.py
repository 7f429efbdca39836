"""The train-mode BatchNorm and the BN-input taps, on both paths (norm_ops' one-pass
VJPs, the CPU's; the textbook forms, GPU/TPU's): values and every gradient against a
float64 numpy derivation and against PyTorch's BatchNorm2d (forward, backward, running
stats)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax.models import layers


@pytest.fixture(params=[True, False], ids=['one_pass', 'textbook'], autouse=True)
def bn_path(request, monkeypatch):
  """Every test on both BN paths: norm_ops' one-pass VJPs (the CPU's) and the textbook
  forms (GPU/TPU), whichever backend runs the tests."""
  monkeypatch.setattr(layers, 'one_pass_bn', lambda: request.param)
  return request.param


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
def test_batchnorm_train_values_and_gradients_match_float64(offset):
  # Channel 2 at mean 40, std 0.5: a one-pass E[x^2] - E[x]^2 in float32 would lose
  # 3 digits of the variance there (measured 0.45 %); the two-pass form must not.
  x, scale, bias, w, _, _ = _data(offset=offset)
  (y64, _, _), grads64 = _numpy_grads(x, scale, bias, w, np.zeros(3), np.zeros(3))
  bn = layers.BatchNorm()
  stats = {'mean': np.zeros(3, np.float32), 'var': np.ones(3, np.float32)}

  def objective(x, scale, bias):
    y, _ = bn.apply({'params': {'scale': scale, 'bias': bias}, 'batch_stats': stats}, x,
                    train=True, mutable=['batch_stats'])
    return jnp.sum(w * y), y

  (_, y), grads = jax.value_and_grad(objective, (0, 1, 2), has_aux=True)(
      jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  # y = x * mul + (bias - mean * mul): at |mean| / std = 80 the two terms (~|x| * mul)
  # cancel, so y keeps float32 precision of ~|x| * mul, not of y (measured 4.7e-5 at
  # |x| * mul ~ 80); a real bug (a wrong mean, variance or eps) is off by far more.
  scale_of_terms = np.max(np.abs(x) * np.abs(scale) / np.sqrt(x.var((0, 1, 2)) + 1e-5))
  np.testing.assert_allclose(y, y64, rtol=1e-5, atol=max(1e-5, 2e-6 * scale_of_terms))
  for got, want, name in zip(grads, grads64, ('x', 'scale', 'bias')):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


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



def test_input_tap_moments_and_gradient_match_float64():
  # The teacher's BN-input taps (per-sample spatial mean and biased variance, what L_bn
  # and the contrastive features read) in one pass, shifted by each sample's first
  # pixel: channel 2 sits at mean 40 with std 0.5, where an unshifted one-pass
  # E[x^2] - E[x]^2 would lose ~3 digits of the variance in float32.
  x, _, _, _, _, _ = _data(3, (3, 5, 7, 3))
  rng = np.random.default_rng(4)
  wm, wv = rng.normal(size=(2, 3, 3)).astype(np.float32)
  x64 = x.astype(np.float64)
  m64, v64 = x64.mean((1, 2)), x64.var((1, 2))
  n = 5 * 7
  dx64 = (wm[:, None, None, :] + 2.0 * wv[:, None, None, :] * (x64 - m64[:, None, None, :])) / n

  def objective(x):
    tap = layers.input_tap(x, jnp.zeros(3), jnp.ones(3))
    return jnp.sum(wm * tap.mean) + jnp.sum(wv * tap.var), tap

  (_, tap), dx = jax.value_and_grad(objective, has_aux=True)(jnp.asarray(x))
  np.testing.assert_allclose(tap.mean, m64, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(tap.var, v64, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=1e-6)
  # [N, C] features (a BN1d input): each sample is its own mean, with variance 0.
  flat = layers.input_tap(jnp.asarray(x[:, 0, 0, :]), jnp.zeros(3), jnp.ones(3))
  np.testing.assert_array_equal(flat.mean, x[:, 0, 0, :])
  np.testing.assert_array_equal(flat.var, np.zeros((3, 3), np.float32))

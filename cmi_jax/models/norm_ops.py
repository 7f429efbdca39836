"""BatchNorm's memory-bound parts with their own VJPs: the train-mode normalization
(`batch_norm_train`) and the per-sample moments of a BN input (`sample_moments`, the
teacher's taps). Both take one pass over the activations for their statistics and
one or two for the backward, where autodiff of the textbook two-pass forms reads the
activations several more times; on the CPU these passes, not FLOPs, are the cost.
Exact to float32 rounding (tests/test_batchnorm.py: float64 and PyTorch).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def sample_moments(x: jax.Array):
  """Per-sample spatial mean and biased variance of float32 x [N, ..., C] -> 2 x [N, C].

  One pass over x (sums of x - c and its square, c each sample's first pixel, a
  constant that keeps the variance in float32 precision), and a one-pass
  backward, dx = (g_mean + 2 g_var (x - mean)) / n, where autodiff of the
  two-pass form reads x several times: the teacher taps every BN input of every
  synthesis step, and these passes are memory-bound.
  """
  return _moments_fwd(x)[0]


def _moments_fwd(x):
  axes = tuple(range(1, x.ndim - 1))
  n = math.prod(x.shape[1:-1])
  c = lax.stop_gradient(x[(slice(None),) + (slice(0, 1),) * len(axes)])
  d = x - c
  s1, s2 = jnp.sum(d, axis=axes), jnp.sum(jnp.square(d), axis=axes)
  m1 = s1 / n
  mean = jnp.reshape(c, m1.shape) + m1
  var = jnp.maximum(s2 / n - jnp.square(m1), 0.0)
  return (mean, var), (x, mean)


def _moments_bwd(res, g):
  x, mean = res
  g_mean, g_var = g
  axes = tuple(range(1, x.ndim - 1))
  n = math.prod(x.shape[1:-1])
  expand = lambda a: jnp.expand_dims(a, axes)
  return ((expand(g_mean) + 2.0 * expand(g_var) * (x - expand(mean))) / n,)


sample_moments.defvjp(_moments_fwd, _moments_bwd)


def _channel_sums(arrays, axis_name):
  """Per-channel sums over every axis but the last, of each array, psummed under pmap."""
  sums = tuple(jnp.sum(a, axis=tuple(range(a.ndim - 1))) for a in arrays)
  return sums if axis_name is None else lax.psum(sums, axis_name)


def _bn_count(x, axis_name):
  n = x.size // x.shape[-1]
  return n if axis_name is None else n * lax.psum(1, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon, axis_name=None):
  """Train-mode BN of float32 x [N, ..., C]: (y, batch mean, biased batch variance).

  One pass over x for both statistics, one for y; the backward is two passes too
  (see _bn_train_bwd), where autodiff of the two-pass form takes several more: BN
  is memory-bound on CPU, so passes are what it costs. The one-pass sums are of
  x - c, c the first sample's per-channel mean (a constant near the batch mean),
  so the variance keeps float32 precision when |mean| >> std.
  """
  return _bn_train_fwd(x, scale, bias, epsilon, axis_name)[0]


def _bn_train_fwd(x, scale, bias, epsilon, axis_name):
  n = _bn_count(x, axis_name)
  center = lax.stop_gradient(jnp.mean(x[0], axis=tuple(range(x.ndim - 2))))
  if axis_name is not None:
    center = lax.pmean(center, axis_name)  # one shift for the global sums
  d = x - center
  s1, s2 = _channel_sums((d, jnp.square(d)), axis_name)
  m1 = s1 / n
  mean = center + m1
  var = jnp.maximum(s2 / n - jnp.square(m1), 0.0)
  rstd = lax.rsqrt(var + epsilon)
  mul = scale * rstd
  y = x * mul + (bias - mean * mul)
  return (y, mean, var), (x, mean, rstd, scale)


def _bn_train_bwd(epsilon, axis_name, res, cotangents):
  """dx = scale * rstd * (gy - mean(gy) - xhat * mean(gy * xhat)) plus the terms of
  the mean's and variance's own cotangents (1/n and 2 (x - mean) / n).

  Under pmap (axis_name) dx needs the global sums (every device's x moved the shared
  statistics), but scale and bias get this device's own sums, as autodiff of the
  pmean'd textbook form gives them: the caller's gradient pmean then averages them.
  """
  del epsilon
  x, mean, rstd, scale = res
  gy, gmean, gvar = cotangents
  n = _bn_count(x, axis_name)
  xc = x - mean
  local = _channel_sums((gy, gy * xc), None)
  dbias, dxc = local
  dscale = dxc * rstd
  if axis_name is not None:  # one collective for the four global sums dx needs
    dbias, dxc, gmean, gvar = lax.psum(local + (gmean, gvar), axis_name)
  mul = scale * rstd
  a = mul * dxc * rstd * rstd / n - 2.0 * gvar / n        # coefficient of (x - mean)
  b = gmean / n - mul * dbias / n                          # constant per channel
  dx = gy * mul - xc * a + b
  return dx, dscale, local[0]


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)

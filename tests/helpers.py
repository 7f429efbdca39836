"""Shared test helpers (imported by test modules; not a test module itself)."""

import jax
import jax.numpy as jnp
import numpy as np


def abstract_variables(module, shape, **kwargs):
  """Variables as ShapeDtypeStructs (no real init cost)."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), **kwargs))


def random_variables(module, shape, seed=0):
  """Random params/batch_stats of the right shapes, drawn in numpy (real init is slow
  on a busy CPU); kernels scaled by 1/sqrt(fan_in), running stats non-trivial."""
  rng = np.random.default_rng(seed)
  abstract = abstract_variables(module, shape)

  def draw(path, x):
    name = path[-1].key
    if name == 'kernel':
      v = rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    elif name in ('scale', 'var'):
      v = rng.uniform(0.5, 1.5, size=x.shape)
    else:  # bias, mean
      v = 0.1 * rng.normal(size=x.shape)
    return jnp.asarray(v, x.dtype)
  return {k: jax.tree_util.tree_map_with_path(draw, abstract[k])
          for k in ('params', 'batch_stats')}

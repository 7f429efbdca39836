"""The contrastive head h (Eq. 6-7, CMI): projects teacher features to the unit sphere.

kind='mlp' (the paper's default): Linear(D, D) -> ReLU -> Linear(D, head_dim);
'linear': Linear(D, head_dim); 'none': identity. The output is L2-normalized
in every case (cosine similarity, Eq. 6). Names follow the reference MLPHead
(`head.0`, `head.2`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmi_jax.models.layers import torch_default_init

HEAD_KINDS = ('mlp', 'linear', 'none')


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) along the last axis (F.normalize semantics).

  The max is taken on the squared norm, so the gradient stays finite at x = 0
  (an all-zero row, e.g. an unfilled bank slot through a fresh head).
  """
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class _HeadLayers(nn.Module):
  kind: str
  head_dim: int

  @nn.compact
  def __call__(self, x):
    dense = lambda f, name: nn.Dense(f, kernel_init=torch_default_init, name=name)
    if self.kind == 'mlp':
      return dense(self.head_dim, '2')(nn.relu(dense(x.shape[-1], '0')(x)))
    return dense(self.head_dim, '0')(x)


class Head(nn.Module):
  kind: str = 'mlp'
  head_dim: int = 256

  @nn.compact
  def __call__(self, x):
    if self.kind not in HEAD_KINDS:
      raise ValueError(f'head kind must be one of {HEAD_KINDS}, got {self.kind!r}.')
    x = x.astype(jnp.float32)
    if self.kind != 'none':
      x = _HeadLayers(self.kind, self.head_dim, name='head')(x)
    return l2_normalize(x)

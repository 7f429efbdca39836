"""VGG-8/11/13 with BatchNorm, the reference (CRD-style) layout (DF:vgg.py cfgs S, A, B).

Keys: `block0.{0,1}`, `block1.{0,1}`, `block{2,3,4}.{0,1,3,4}` (conv, bn, [relu], conv, bn),
`classifier`. Max-pool after block0..block2, after block3 only for 64x64 inputs.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmi_jax.models.layers import TAPS, BatchNorm, Conv, global_avg_pool, torch_default_init

VGG11_BLOCKS = ((64,), (128,), (256, 256), (512, 512), (512, 512))
VGG8_BLOCKS = ((64,), (128,), (256,), (512,), (512,))
VGG13_BLOCKS = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


class _VGGBlock(nn.Module):
  """conv-bn-relu ... conv-bn (the last ReLU is applied by the parent)."""
  widths: Sequence[int]
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    for i, w in enumerate(self.widths):
      if i:
        x = nn.relu(x)
      x = Conv(w, 3, 1, 1, use_bias=True, dtype=self.dtype,
               name=str(3 * i))(x)
      x = BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=str(3 * i + 1))(x, train)
    return x


def _max_pool(x):
  # window_shape by keyword: jax2onnx's stand-in for nn.max_pool takes it no other way.
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding='VALID')


class VGG(nn.Module):
  blocks: Sequence[Sequence[int]] = VGG11_BLOCKS
  num_classes: int = 10
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x.shape[1]
    for b, widths in enumerate(self.blocks):
      x = nn.relu(_VGGBlock(tuple(widths), self.dtype, self.axis_name, name=f'block{b}')(x, train))
      if b < 3 or (b == 3 and h == 64):
        x = _max_pool(x)
    feat = global_avg_pool(x)
    self.sow(TAPS, 'penultimate', feat.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype,
                    name='classifier')(feat).astype(jnp.float32)

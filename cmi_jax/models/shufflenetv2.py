"""ShuffleNetV2 (net_size 1), RepDistiller's CIFAR layout (DF:shufflenetv2.py).

Keys: `conv1` (1x1, 3 -> 24), `bn1`; `layer{1,2,3}.0` = DownBlock
(`conv1..conv5`, `bn1..bn5`), `layer{K}.{1..n}` = BasicBlock (`conv1..conv3`,
`bn1..bn3`), n = (3, 7, 3), widths (116, 232, 464); `conv2` (1x1 464 -> 1024), `bn2`;
`linear`. No conv has a bias. The head is avg_pool2d(4) on the 4x4 map of a
32x32 input, so other sizes raise (naming 32x32). Contrastive features: every
BN input (8090 dims).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmi_jax.models.layers import (TAPS, BatchNorm, Conv, fixed_avg_pool,
                                   torch_default_init)

WIDTHS = (116, 232, 464)
NUM_BLOCKS = (3, 7, 3)
STEM, LAST = 24, 1024


def channel_shuffle(x: jax.Array, groups: int = 2) -> jax.Array:
  """Output channel j*groups + i = input channel i*C/groups + j (DF:shufflenetv2.py:15-19)."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


class _Units(nn.Module):
  """Named conv/BN factories shared by both blocks (conv k x k, pad k//2, no bias)."""
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  def conv(self, features, k, stride=1, groups=1, *, name):
    return Conv(features, k, stride, k // 2, groups=groups, dtype=self.dtype, name=name)

  def bn(self, name):
    return BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=name)


class BasicBlock(_Units):
  """Split in half; the second half goes 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU; concat, shuffle."""

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1] // 2
    x1, x2 = x[..., :c], x[..., c:]
    out = nn.relu(self.bn('bn1')(self.conv(c, 1, name='conv1')(x2), train))
    out = self.bn('bn2')(self.conv(c, 3, groups=c, name='conv2')(out), train)
    out = nn.relu(self.bn('bn3')(self.conv(c, 1, name='conv3')(out), train))
    return channel_shuffle(jnp.concatenate([x1, out], axis=-1))


class DownBlock(_Units):
  """Stride-2 block: left dw3x3/2-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU, dw3x3/2-BN,
  1x1-BN-ReLU; concat [left, right], shuffle. Output width `out`."""
  out: int = 0

  @nn.compact
  def __call__(self, x, train: bool):
    cin, mid = x.shape[-1], self.out // 2
    left = self.bn('bn1')(self.conv(cin, 3, 2, groups=cin, name='conv1')(x), train)
    left = nn.relu(self.bn('bn2')(self.conv(mid, 1, name='conv2')(left), train))
    right = nn.relu(self.bn('bn3')(self.conv(mid, 1, name='conv3')(x), train))
    right = self.bn('bn4')(self.conv(mid, 3, 2, groups=mid, name='conv4')(right), train)
    right = nn.relu(self.bn('bn5')(self.conv(mid, 1, name='conv5')(right), train))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1))


class _Stage(nn.Module):
  """`layerK`: '0' DownBlock, '1'..'n' BasicBlocks."""
  out: int
  num_blocks: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = DownBlock(self.dtype, self.axis_name, out=self.out, name='0')(x, train)
    for i in range(self.num_blocks):
      x = BasicBlock(self.dtype, self.axis_name, name=str(i + 1))(x, train)
    return x


class ShuffleNetV2(nn.Module):
  widths: Sequence[int] = WIDTHS
  num_blocks: Sequence[int] = NUM_BLOCKS
  num_classes: int = 10
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    input_hw = x.shape[1:3]
    bn = lambda name: BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=name)
    x = nn.relu(bn('bn1')(Conv(STEM, 1, 1, 0, dtype=self.dtype, name='conv1')(x), train))
    for k, (w, n) in enumerate(zip(self.widths, self.num_blocks)):
      x = _Stage(w, n, self.dtype, self.axis_name, name=f'layer{k + 1}')(x, train)
    x = nn.relu(bn('bn2')(Conv(LAST, 1, 1, 0, dtype=self.dtype, name='conv2')(x), train))
    feat = fixed_avg_pool(x, 4, 'shufflenetv2', input_hw)
    self.sow(TAPS, 'penultimate', feat.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype,
                    name='linear')(feat).astype(jnp.float32)

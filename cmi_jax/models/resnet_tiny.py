"""RepDistiller-layout CIFAR ResNets: resnet8/20/32/56/110 and resnet8x4/32x4 (DF:resnet_tiny.py).

Keys: `conv1`, `bn1`, `layer{1,2,3}.{j}.{conv1,bn1,conv2,bn2}`,
`layer{K}.0.downsample.{0,1}` (1x1 conv + BN when the stride or width changes),
`fc`. Note `downsample` and `fc` here where the CIFAR resnet18/34 say `shortcut`
and `linear`. The head is AvgPool2d(8), so these nets work at 32x32 only (other
sizes raise, naming 32x32). Contrastive features: every BN input (the reference's
default for all nets but resnet34).
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmi_jax.models.layers import (TAPS, BatchNorm, BlockStack, Conv, fixed_avg_pool,
                                   torch_default_init)
from cmi_jax.models.resnet import BasicBlock

NARROW = (16, 16, 32, 64)    # resnet8 ... resnet110
WIDE = (32, 64, 128, 256)    # resnet8x4, resnet32x4


class TinyResNet(nn.Module):
  """ResNet-depth for 32x32 inputs: (depth - 2) / 6 BasicBlocks per stage, 3 stages."""
  depth: int
  widths: Sequence[int] = NARROW
  num_classes: int = 10
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6:
      raise ValueError(f'resnet depth must be 6n+2, got depth={self.depth}.')
    n = (self.depth - 2) // 6
    input_hw = x.shape[1:3]
    x = Conv(self.widths[0], 3, 1, 1, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name='bn1')(x, train))
    block = functools.partial(BasicBlock, shortcut_name='downsample')
    for k, stride in enumerate((1, 2, 2)):
      x = BlockStack(block, n, self.widths[k + 1], stride, self.dtype, self.axis_name,
                     name=f'layer{k + 1}')(x, train)
    wide = 'x4' if tuple(self.widths) == WIDE else ''
    feat = fixed_avg_pool(x, 8, f'resnet{self.depth}{wide}', input_hw)
    self.sow(TAPS, 'penultimate', feat.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype,
                    name='fc')(feat).astype(jnp.float32)

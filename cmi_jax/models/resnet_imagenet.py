"""torchvision-layout ImageNet ResNet-18/34/50 (DF:resnet_in.py, torchvision.models.resnet).

Keys: `conv1` (7x7, stride 2), `bn1`, `layer{1..4}.{j}.{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
`layer{K}.0.downsample.{0,1}`, `fc`. Stem: conv 7x7/2 pad 3, BN, ReLU, max-pool
3x3/2 pad 1 (padding with -inf): 224 -> 112 -> 56; stages at 56, 28, 14, 7.
The Bottleneck strides on its 3x3 conv ("ResNet V1.5"). Works at any input size
the stride-32 pyramid allows. Contrastive features: every BN input.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmi_jax.models.layers import (TAPS, BatchNorm, BlockStack, Conv, global_avg_pool,
                                   torch_default_init)
from cmi_jax.models.resnet import BasicBlock, Bottleneck


def max_pool_3x3_s2(x):
  """nn.MaxPool2d(3, 2, 1): padded cells are -inf, so they never win."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ImageNetResNet(nn.Module):
  num_blocks: Sequence[int]
  bottleneck: bool = False
  num_classes: int = 1000
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  remat: bool = False  # each residual block under nn.remat (synthesis.remat)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(64, 7, 2, 3, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name='bn1')(x, train))
    x = max_pool_3x3_s2(x)
    block = functools.partial(Bottleneck if self.bottleneck else BasicBlock,
                              shortcut_name='downsample')
    for k, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
      x = BlockStack(block, self.num_blocks[k], planes, stride, self.dtype, self.axis_name,
                     self.remat, name=f'layer{k + 1}')(x, train)
    feat = global_avg_pool(x)
    self.sow(TAPS, 'penultimate', feat.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype,
                    name='fc')(feat).astype(jnp.float32)

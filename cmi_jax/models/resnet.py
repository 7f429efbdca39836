"""CIFAR ResNet-18 / ResNet-34 (3x3 stem, no max-pool).

Names mirror the reference keys: `conv1`, `bn1`, `layer{1..4}.{j}.{conv1,bn1,conv2,bn2}`,
`layer{K}.{j}.shortcut.{0,1}`, `linear`. The contrastive features are the
per-sample spatial means of the inputs of layer1..layer4 (what the reference
CMI hooks on ResNets; 512 dims for resnet18/34).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn

from cmi_jax.models.layers import (TAPS, BatchNorm, BlockStack, Conv, global_avg_pool,
                                   spatial_mean, torch_default_init)
import jax.numpy as jnp


class _Shortcut(nn.Module):
  """`shortcut`: '0' 1x1 conv, '1' BN."""
  planes: int
  stride: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(self.planes, 1, self.stride, 0, dtype=self.dtype, name='0')(x)
    return BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name='1')(x, train)


class BasicBlock(nn.Module):
  planes: int
  stride: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=name)
    out = nn.relu(bn('bn1')(Conv(self.planes, 3, self.stride, 1, dtype=self.dtype,
                                 name='conv1')(x), train))
    out = bn('bn2')(Conv(self.planes, 3, 1, 1, dtype=self.dtype, name='conv2')(out), train)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = _Shortcut(self.planes, self.stride, self.dtype, self.axis_name,
                    name='shortcut')(x, train)
    return nn.relu(out + x)


class ResNet(nn.Module):
  num_blocks: Sequence[int]
  num_classes: int = 10
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(64, 3, 1, 1, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name='bn1')(x, train))
    for k, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
      self.sow(TAPS, 'feat', spatial_mean(x))
      x = BlockStack(BasicBlock, self.num_blocks[k], planes, stride, self.dtype,
                     self.axis_name, name=f'layer{k + 1}')(x, train)
    feat = global_avg_pool(x)
    self.sow(TAPS, 'penultimate', feat.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype,
                    name='linear')(feat).astype(jnp.float32)

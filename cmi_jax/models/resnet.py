"""CIFAR ResNet-18 / ResNet-34 / ResNet-50 (3x3 stem, no max-pool).

Names mirror the reference keys: `conv1`, `bn1`, `layer{1..4}.{j}.{conv1,bn1,conv2,bn2}`
(Bottleneck: also `conv3`, `bn3`), `layer{K}.{j}.shortcut.{0,1}`, `linear`. The
contrastive features of resnet18/34 are the per-sample spatial means of the
inputs of layer1..layer4 (what the reference CMI hooks on ResNets; 512 dims);
resnet50 (DAFL layout, DF:resnet.py) uses every BN input, as the reference does.

BasicBlock and Bottleneck are shared with the torchvision-layout nets
(resnet_tiny, resnet_imagenet), which call the shortcut `downsample`.
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
  """conv3x3(stride)-bn-relu-conv3x3-bn, + shortcut, relu (output width `planes`)."""
  planes: int
  stride: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  shortcut_name: str = 'shortcut'  # torchvision / RepDistiller: 'downsample'

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=name)
    out = nn.relu(bn('bn1')(Conv(self.planes, 3, self.stride, 1, dtype=self.dtype,
                                 name='conv1')(x), train))
    out = bn('bn2')(Conv(self.planes, 3, 1, 1, dtype=self.dtype, name='conv2')(out), train)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = _Shortcut(self.planes, self.stride, self.dtype, self.axis_name,
                    name=self.shortcut_name)(x, train)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """conv1x1-bn-relu, conv3x3(stride)-bn-relu, conv1x1(4 planes)-bn, + shortcut, relu.

  The stride sits on the 3x3 conv in both reference layouts (DF:resnet.py:44, and
  torchvision's "ResNet V1.5", DF:resnet_in.py:78-98).
  """
  planes: int
  stride: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  shortcut_name: str = 'shortcut'
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=name)
    conv = lambda w, k, s, name: Conv(w, k, s, k // 2, dtype=self.dtype, name=name)
    out = nn.relu(bn('bn1')(conv(self.planes, 1, 1, 'conv1')(x), train))
    out = nn.relu(bn('bn2')(conv(self.planes, 3, self.stride, 'conv2')(out), train))
    out = bn('bn3')(conv(self.expansion * self.planes, 1, 1, 'conv3')(out), train)
    if self.stride != 1 or x.shape[-1] != self.expansion * self.planes:
      x = _Shortcut(self.expansion * self.planes, self.stride, self.dtype, self.axis_name,
                    name=self.shortcut_name)(x, train)
    return nn.relu(out + x)


class ResNet(nn.Module):
  num_blocks: Sequence[int]
  num_classes: int = 10
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  bottleneck: bool = False  # resnet50
  layer_features: bool = True  # sow the layer1..4 inputs as the contrastive features

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(64, 3, 1, 1, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name='bn1')(x, train))
    block = Bottleneck if self.bottleneck else BasicBlock
    for k, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
      if self.layer_features:
        self.sow(TAPS, 'feat', spatial_mean(x))
      x = BlockStack(block, self.num_blocks[k], planes, stride, self.dtype,
                     self.axis_name, name=f'layer{k + 1}')(x, train)
    feat = global_avg_pool(x)
    self.sow(TAPS, 'penultimate', feat.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype,
                    name='linear')(feat).astype(jnp.float32)

"""Pre-activation Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Submodule names mirror the reference PyTorch keys one-to-one:
`conv1`, `block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`.
Dropout rate is 0 in the reference (no parameters), so it is not modelled.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmi_jax.models.layers import (TAPS, BatchNorm, BlockStack, Conv, global_avg_pool,
                                   torch_default_init)


class BasicBlock(nn.Module):
  """Reference WRN block: the shortcut sees relu(bn1(x)) only when widths differ."""
  out_planes: int
  stride: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    equal_in_out = x.shape[-1] == self.out_planes
    bn = lambda name: BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=name)
    o = nn.relu(bn('bn1')(x, train))
    out = Conv(self.out_planes, 3, self.stride, 1, dtype=self.dtype, name='conv1')(o)
    out = nn.relu(bn('bn2')(out, train))
    out = Conv(self.out_planes, 3, 1, 1, dtype=self.dtype, name='conv2')(out)
    if equal_in_out:
      shortcut = x
    else:
      shortcut = Conv(self.out_planes, 1, self.stride, 0, dtype=self.dtype,
                      name='convShortcut')(o)
    return shortcut + out


class NetworkBlock(nn.Module):
  """`blockX`: holds `layer` (reference NetworkBlock)."""
  num_blocks: int
  out_planes: int
  stride: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    return BlockStack(BasicBlock, self.num_blocks, self.out_planes, self.stride,
                      self.dtype, self.axis_name, name='layer')(x, train)


class WideResNet(nn.Module):
  """WRN-depth-widen for any input size/channels; returns logits.

  Sows into 'taps': every BN input (`BNTap`) and the pooled penultimate
  features ('penultimate'), read by `cmi_jax.teacher`.
  """
  depth: int
  widen_factor: int
  num_classes: int = 10
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f'WRN depth must be 6n+4, got depth={self.depth}.')
    n = (self.depth - 4) // 6
    widths = [16, 16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    x = Conv(widths[0], 3, 1, 1, dtype=self.dtype, name='conv1')(x)
    for g, stride in enumerate((1, 2, 2)):
      x = NetworkBlock(n, widths[g + 1], stride, self.dtype, self.axis_name,
                       name=f'block{g + 1}')(x, train)
    x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name='bn1')(x, train))
    feat = global_avg_pool(x)
    self.sow(TAPS, 'penultimate', feat.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype,
                    name='fc')(feat).astype(jnp.float32)

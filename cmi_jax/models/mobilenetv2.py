"""MobileNetV2, torchvision's ImageNet layout (DF:mobilenetv2.py = torchvision.models.mobilenet_v2).

The reference's CIFAR `mobilenetv2` is this same net (stride-2 stem, unchanged
strides: a 32x32 input is 1x1 from `features.14` on); `mobilenetv2_imagenet` is
torchvision's own, at 224x224 (final map 7x7x1280). Keys:
- `features.0.{0,1}`: ConvBNReLU6 3x3/2, 3 -> 32 (conv, BN).
- `features.1.conv.{0.0, 0.1, 1, 2}` (t=1): depthwise ConvBNReLU6, 1x1 projection, BN.
- `features.{2..17}.conv.{0.0, 0.1, 1.0, 1.1, 2, 3}` (t=6): 1x1 expand ConvBNReLU6,
  depthwise 3x3 ConvBNReLU6 (stride on the group's first block), 1x1 projection, BN.
- `features.18.{0,1}`: ConvBNReLU6 1x1 320 -> 1280; `classifier.1`: Linear(1280 -> C).
No conv has a bias. Residual add iff stride 1 and in == out. Contrastive features:
every BN input (17056 dims).

Dropout(0.2) (`classifier.0`) is off by default (dropout_rate=0): inference is
unaffected, and the KD loops pass no dropout key. Set dropout_rate=0.2 and pass
rngs={'dropout': key} to train as the reference does.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmi_jax.models.layers import TAPS, BatchNorm, Conv, global_avg_pool, torch_default_init

# (expand ratio t, output channels c, blocks n, first stride s), DF:mobilenetv2.py:134-143.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))
STEM, LAST = 32, 1280


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 6.0)


class ConvBNReLU6(nn.Module):
  """'0' conv (k x k, pad (k-1)/2, no bias), '1' BN, then ReLU6."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  groups: int = 1
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(self.features, self.kernel_size, self.stride, (self.kernel_size - 1) // 2,
             groups=self.groups, dtype=self.dtype, name='0')(x)
    return relu6(BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name='1')(x, train))


class _InvertedBody(nn.Module):
  """The block's `conv` Sequential: [expand,] depthwise, projection conv, BN."""
  out: int
  stride: int
  expand_ratio: int
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    hidden = int(round(x.shape[-1] * self.expand_ratio))
    cbr = lambda *a, name, **kw: ConvBNReLU6(*a, dtype=self.dtype, axis_name=self.axis_name,
                                             name=name, **kw)
    i = 0
    if self.expand_ratio != 1:
      x = cbr(hidden, 1, name='0')(x, train)
      i = 1
    x = cbr(hidden, 3, self.stride, groups=hidden, name=str(i))(x, train)
    x = Conv(self.out, 1, 1, 0, dtype=self.dtype, name=str(i + 1))(x)
    return BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=str(i + 2))(x, train)


class InvertedResidual(_InvertedBody):
  """The block: its body under `conv`, plus the identity when the shape allows."""

  @nn.compact
  def __call__(self, x, train: bool):
    y = _InvertedBody(self.out, self.stride, self.expand_ratio, self.dtype, self.axis_name,
                      name='conv')(x, train)
    return x + y if self.stride == 1 and x.shape[-1] == self.out else y


class _Features(nn.Module):
  """`features`: children '0' (stem) .. '18' (1x1 to 1280)."""
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, axis_name=self.axis_name)
    x = ConvBNReLU6(STEM, 3, 2, name='0', **kw)(x, train)
    block = nn.remat(InvertedResidual, static_argnums=(2,)) if self.remat else InvertedResidual
    i = 1
    for t, c, n, s in SETTINGS:
      for j in range(n):
        x = block(c, s if j == 0 else 1, t, name=str(i), **kw)(x, train)
        i += 1
    return ConvBNReLU6(LAST, 1, name=str(i), **kw)(x, train)


class _Classifier(nn.Module):
  """`classifier`: '0' Dropout (no parameters), '1' Linear."""
  num_classes: int
  dropout_rate: float = 0.0
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train, name='0')(x)
    return nn.Dense(self.num_classes, kernel_init=torch_default_init, dtype=self.dtype,
                    name='1')(x)


class MobileNetV2(nn.Module):
  num_classes: int = 1000
  dropout_rate: float = 0.0
  dtype: Optional[Any] = None
  axis_name: Optional[str] = None
  remat: bool = False  # each inverted residual under nn.remat (synthesis.remat)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _Features(self.dtype, self.axis_name, self.remat, name='features')(x, train)
    feat = global_avg_pool(x)
    self.sow(TAPS, 'penultimate', feat.astype(jnp.float32))
    return _Classifier(self.num_classes, self.dropout_rate, self.dtype,
                       name='classifier')(feat, train).astype(jnp.float32)

"""Model zoo: classifiers by name, the generators and the contrastive head.

`get(name, num_classes)` returns an unbound Flax module; every classifier maps
[N, H, W, C] (normalized) to float32 logits and sows its BN-input statistics and
features into the 'taps' collection (read by `cmi_jax.teacher`).
"""

from typing import Any, Callable, Dict, Optional

import flax.linen as nn

from cmi_jax.models.generator import Generator, NLGenerator
from cmi_jax.models.head import HEAD_KINDS, Head, l2_normalize
from cmi_jax.models.layers import TAPS, BatchNorm, BNTap, Conv
from cmi_jax.models.resnet import ResNet
from cmi_jax.models.vgg import VGG
from cmi_jax.models.wresnet import WideResNet

CLASSIFIERS: Dict[str, Callable[..., nn.Module]] = {
    'wrn_16_1': lambda **kw: WideResNet(depth=16, widen_factor=1, **kw),
    'wrn_16_2': lambda **kw: WideResNet(depth=16, widen_factor=2, **kw),
    'wrn_40_1': lambda **kw: WideResNet(depth=40, widen_factor=1, **kw),
    'wrn_40_2': lambda **kw: WideResNet(depth=40, widen_factor=2, **kw),
    'resnet18': lambda **kw: ResNet(num_blocks=(2, 2, 2, 2), **kw),
    'resnet34': lambda **kw: ResNet(num_blocks=(3, 4, 6, 3), **kw),
    'vgg11': lambda **kw: VGG(**kw),
}


def get(name: str, num_classes: int, dtype: Optional[Any] = None,
        axis_name: Optional[str] = None) -> nn.Module:
  """Builds a classifier by its reference name (e.g. 'wrn_40_2', 'resnet34', 'vgg11')."""
  if name not in CLASSIFIERS:
    raise ValueError(f'Unknown architecture {name!r}; choose one of {sorted(CLASSIFIERS)}.')
  if num_classes < 2:
    raise ValueError(f'num_classes must be >= 2, got {num_classes}.')
  return CLASSIFIERS[name](num_classes=num_classes, dtype=dtype, axis_name=axis_name)


def init(module: nn.Module, rng, input_shape, **kwargs) -> Dict[str, Any]:
  """Initializes `module` on zeros of `input_shape`; returns its variables
  without the 'taps' collection (init would otherwise record taps)."""
  import jax.numpy as jnp
  variables = module.init(rng, jnp.zeros(input_shape, jnp.float32), **kwargs)
  return {k: v for k, v in variables.items() if k != TAPS}


__all__ = ['init', 'CLASSIFIERS', 'get', 'Generator', 'NLGenerator', 'Head', 'HEAD_KINDS', 'l2_normalize', 'TAPS',
           'BatchNorm', 'BNTap', 'Conv', 'ResNet', 'VGG', 'WideResNet']

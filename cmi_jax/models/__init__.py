"""Model zoo: classifiers by name, the generators and the contrastive head.

`get(name, num_classes)` returns an unbound Flax module; every classifier maps
[N, H, W, C] (normalized) to float32 logits and sows its BN-input statistics and
features into the 'taps' collection (read by `cmi_jax.teacher`).

Names are cmi_jax's (`wrn_40_2`) and, as aliases in the same table, the DataFree
registry's spellings (`wrn40_2`, `resnet50_imagenet`, ...; DF:registry.py:40-71),
so a name copied from the reference's command lines or checkpoint file names
(`cifar10_wrn40_2.pth`) works everywhere an architecture is asked for.
"""

from typing import Any, Callable, Dict, Optional

import flax.linen as nn

from cmi_jax.models.generator import DeepGenerator, Generator, NLGenerator
from cmi_jax.models.head import HEAD_KINDS, Head, l2_normalize
from cmi_jax.models.layers import TAPS, BatchNorm, BNTap, Conv
from cmi_jax.models.mobilenetv2 import MobileNetV2
from cmi_jax.models.resnet import ResNet
from cmi_jax.models.resnet_imagenet import ImageNetResNet
from cmi_jax.models.resnet_tiny import NARROW, WIDE, TinyResNet
from cmi_jax.models.shufflenetv2 import ShuffleNetV2
from cmi_jax.models.vgg import VGG, VGG8_BLOCKS, VGG13_BLOCKS
from cmi_jax.models.wresnet import WideResNet

CLASSIFIERS: Dict[str, Callable[..., nn.Module]] = {
    'wrn_16_1': lambda **kw: WideResNet(depth=16, widen_factor=1, **kw),
    'wrn_16_2': lambda **kw: WideResNet(depth=16, widen_factor=2, **kw),
    'wrn_40_1': lambda **kw: WideResNet(depth=40, widen_factor=1, **kw),
    'wrn_40_2': lambda **kw: WideResNet(depth=40, widen_factor=2, **kw),
    'resnet18': lambda **kw: ResNet(num_blocks=(2, 2, 2, 2), **kw),
    'resnet34': lambda **kw: ResNet(num_blocks=(3, 4, 6, 3), **kw),
    'vgg11': lambda **kw: VGG(**kw),
    # The rest of the DataFree CIFAR zoo (zoo-and-datasets.md section 1).
    **{f'resnet{d}': (lambda d: lambda **kw: TinyResNet(depth=d, widths=NARROW, **kw))(d)
       for d in (8, 20, 32, 56, 110)},
    'resnet8x4': lambda **kw: TinyResNet(depth=8, widths=WIDE, **kw),
    'resnet32x4': lambda **kw: TinyResNet(depth=32, widths=WIDE, **kw),
    'vgg8': lambda **kw: VGG(blocks=VGG8_BLOCKS, **kw),
    'vgg13': lambda **kw: VGG(blocks=VGG13_BLOCKS, **kw),
    'shufflenetv2': lambda **kw: ShuffleNetV2(**kw),
    'mobilenetv2': lambda **kw: MobileNetV2(**kw),
    'resnet50': lambda **kw: ResNet(num_blocks=(3, 4, 6, 3), bottleneck=True,
                                    layer_features=False, **kw),
    # torchvision-layout ImageNet nets (section 2); mobilenetv2 is the same net.
    'resnet18_imagenet': lambda **kw: ImageNetResNet(num_blocks=(2, 2, 2, 2), **kw),
    'resnet34_imagenet': lambda **kw: ImageNetResNet(num_blocks=(3, 4, 6, 3), **kw),
    'resnet50_imagenet': lambda **kw: ImageNetResNet(num_blocks=(3, 4, 6, 3), bottleneck=True,
                                                     **kw),
    'mobilenetv2_imagenet': lambda **kw: MobileNetV2(**kw),
}

# Other spellings of the same nets: the DataFree registry's (alias -> cmi_jax name).
ALIASES: Dict[str, str] = {
    'wrn16_1': 'wrn_16_1', 'wrn16_2': 'wrn_16_2', 'wrn40_1': 'wrn_40_1', 'wrn40_2': 'wrn_40_2',
    'vgg8_bn': 'vgg8', 'vgg11_bn': 'vgg11', 'vgg13_bn': 'vgg13',
}
CLASSIFIERS.update({alias: CLASSIFIERS[name] for alias, name in ALIASES.items()})

# Nets whose fixed-window head only fits one input size (H = W); the others take any size.
FIXED_INPUT_SIZE: Dict[str, int] = {
    name: 32 for name in ('resnet8', 'resnet20', 'resnet32', 'resnet56', 'resnet110',
                          'resnet8x4', 'resnet32x4', 'shufflenetv2')}


def canonical_name(name: str) -> str:
  """cmi_jax's name for `name` (itself, or what an alias stands for)."""
  return ALIASES.get(name, name)


# Nets whose blocks can run under nn.remat (jax.checkpoint): the ImageNet ones.
REMAT = ('resnet18_imagenet', 'resnet34_imagenet', 'resnet50_imagenet', 'mobilenetv2',
         'mobilenetv2_imagenet')


def get(name: str, num_classes: int, dtype: Optional[Any] = None,
        axis_name: Optional[str] = None, remat: bool = False) -> nn.Module:
  """Builds a classifier by its reference name (e.g. 'wrn_40_2' or 'wrn40_2', 'resnet34',
  'vgg11', 'resnet50_imagenet'); see CLASSIFIERS and ALIASES. remat: each residual
  block under nn.remat (recomputed in the backward pass; the nets of REMAT)."""
  if name not in CLASSIFIERS:
    raise ValueError(f'Unknown architecture {name!r}; choose one of {sorted(CLASSIFIERS)}.')
  if num_classes < 2:
    raise ValueError(f'num_classes must be >= 2, got {num_classes}.')
  if not remat:
    return CLASSIFIERS[name](num_classes=num_classes, dtype=dtype, axis_name=axis_name)
  if canonical_name(name) not in REMAT:
    raise ValueError(f'remat (synthesis.remat=True) is implemented for {list(REMAT)}, not '
                     f'{name!r}: set synthesis.remat=False for it.')
  return CLASSIFIERS[name](num_classes=num_classes, dtype=dtype, axis_name=axis_name,
                           remat=True)


def init(module: nn.Module, rng, input_shape, **kwargs) -> Dict[str, Any]:
  """Initializes `module` on zeros of `input_shape`; returns its variables
  without the 'taps' collection (init would otherwise record taps)."""
  import jax.numpy as jnp
  variables = module.init(rng, jnp.zeros(input_shape, jnp.float32), **kwargs)
  return {k: v for k, v in variables.items() if k != TAPS}


__all__ = ['init', 'ALIASES', 'REMAT', 'CLASSIFIERS', 'FIXED_INPUT_SIZE', 'canonical_name', 'get',
           'ImageNetResNet', 'MobileNetV2', 'ShuffleNetV2', 'TinyResNet',
           'DeepGenerator', 'Generator', 'NLGenerator', 'Head', 'HEAD_KINDS', 'l2_normalize', 'TAPS',
           'BatchNorm', 'BNTap', 'Conv', 'ResNet', 'VGG', 'WideResNet']

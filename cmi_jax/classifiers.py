"""A classifier by name: a zoo architecture or the user's own Flax model.

`arch` is either a `cmi_jax.models.CLASSIFIERS` name ('wrn_40_2') or a factory
spec 'package.module:factory' naming any callable that returns a `flax.linen`
classifier (a Module class works). The factory is called as
`factory(num_classes=K)`, plus `dtype=` when it accepts it, and the model as
`module.apply(variables, x, train=False)` on normalized NHWC images. Its
`nn.BatchNorm` layers feed L_bn and the contrastive features without any edit
(`cmi_jax.teacher`). The runner takes the spec as `config.teacher.arch`, teacher
directories record it in their card, and `cmi_jax.synthesize` takes the module
and its variables directly.
"""

import importlib
import inspect
from typing import Any, Callable, Dict, Optional

import flax.linen as nn

from cmi_jax import models


def is_factory_spec(arch: str) -> bool:
  """Whether `arch` names a user factory ('package.module:factory')."""
  return isinstance(arch, str) and ':' in arch


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
  """Imports the callable named by 'package.module:factory' (dots within the
  factory part walk attributes: 'pkg.mod:Zoo.small'); ValueError naming the fix."""
  module_name, _, attr = spec.partition(':')
  if not module_name or not attr:
    raise ValueError(f"arch={spec!r}: a factory is named 'package.module:factory'.")
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'arch={spec!r}: cannot import {module_name!r} ({e}); put its folder '
                     'on PYTHONPATH or install the package.') from None
  for part in attr.split('.'):
    if not hasattr(obj, part):
      raise ValueError(f'arch={spec!r}: {obj.__name__ if hasattr(obj, "__name__") else obj} '
                       f'has no attribute {part!r}.')
    obj = getattr(obj, part)
  if not callable(obj):
    raise ValueError(f'arch={spec!r} names a {type(obj).__name__}, not a callable factory.')
  return obj


def _accepts(fn: Callable, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def get(arch: str, num_classes: int, dtype: Optional[Any] = None,
        remat: bool = False) -> nn.Module:
  """An unbound classifier for a zoo name or a factory spec (remat: its blocks under
  nn.remat; a factory must then accept `remat`)."""
  if not is_factory_spec(arch):
    return models.get(arch, num_classes, dtype=dtype, remat=remat)
  factory = resolve_factory(arch)
  kwargs: Dict[str, Any] = {'num_classes': num_classes}
  if dtype is not None and _accepts(factory, 'dtype'):
    kwargs['dtype'] = dtype
  if remat:
    if not _accepts(factory, 'remat'):
      raise ValueError(f'arch={arch!r}: synthesis.remat=True, but the factory takes no '
                       '`remat` argument; add one (wrap your blocks in nn.remat) or set '
                       'synthesis.remat=False.')
    kwargs['remat'] = True
  module = factory(**kwargs)
  if not isinstance(module, nn.Module):
    raise ValueError(f'arch={arch!r}: the factory returned a {type(module).__name__}, not a '
                     'flax.linen Module.')
  return module


def check_arch(arch: str) -> None:
  """ValueError unless `arch` is a zoo name or an importable factory spec."""
  if is_factory_spec(arch):
    resolve_factory(arch)
  elif arch not in models.CLASSIFIERS:
    raise ValueError(f"arch={arch!r} is not one of {sorted(models.CLASSIFIERS)} nor a factory "
                     "spec 'package.module:factory' (your own Flax model).")


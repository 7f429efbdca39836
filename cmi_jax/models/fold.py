"""The inference form of a classifier: each BatchNorm that directly follows a
convolution folded into that convolution.

In inference a BN is the affine map y = x * mul + add per channel (mul = scale /
sqrt(running_var + eps), add = bias - running_mean * mul), so conv -> BN is one
convolution with the kernel's output channels scaled by mul plus a bias `add`:
a frozen network needs no BN at run time. `inference_apply` is
`module.apply(variables, x, train=False)` in that form: the same logits up to
float32 rounding (tests/test_fold.py: every zoo classifier within 1e-5), and a
conv + bias (+ ReLU), which XLA's GPU backend can fuse into one cuDNN call (not
measured here).

Which BNs fold is found by tracing, not by architecture: a BN (cmi_jax's or flax's,
in running-average mode) folds into the conv (cmi_jax's or flax's; those classes
exactly, not subclasses) whose output is its input and nothing else's. Pre-activation
nets (WRN: bn -> relu -> conv) fold the BNs that follow a conv (7 of WRN-16-2's 13); a
BN after a residual sum stays. The "nothing else's" is checked on the traced program
(the conv's output has exactly one consumer, the BN), so a model that also reads a
conv's raw output (a tap, a skip connection) keeps that BN as it is. No BN statistics
or taps come out of this form: L_bn and the contrastive features read the unfolded
network (`Teacher`).
"""

import functools
from typing import Any, Callable, Dict, NamedTuple, Tuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from cmi_jax.models import layers

FOLDED = 'folded'  # variables collection: a folded conv's 'bias', a folded BN's 'skip'
# Exactly these classes (not subclasses, which may compute something else in __call__).
_CONVS = (layers.Conv, nn.Conv)
_BNS = (layers.BatchNorm, nn.BatchNorm)
_MARK = 'cmi_jax_fold_'  # names of the identity jits that mark a pair in the traced program

Path = Tuple[str, ...]


class Pair(NamedTuple):
  """A conv and the BN folded into it: scope paths and the BN's epsilon."""
  conv: Path
  bn: Path
  epsilon: float


def _bn_in_inference(module: nn.Module, args, kwargs) -> bool:
  """Whether this BN call uses its running statistics (and normalizes the last axis)."""
  if isinstance(module, layers.BatchNorm):
    train = args[1] if len(args) > 1 else kwargs.get('train')
    return train is False
  use_ra = args[1] if len(args) > 1 else kwargs.get('use_running_average')
  use_ra = nn.merge_param('use_running_average', module.use_running_average, use_ra)
  axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
  return bool(use_ra) and axis in (-1, args[0].ndim - 1, (-1,), (args[0].ndim - 1,))


def _marker(name: str) -> Callable[[jax.Array], jax.Array]:
  """An identity that shows up in a jaxpr as one named call (jax inlines named_call)."""
  def ident(t):
    return t
  ident.__name__ = name
  return jax.jit(ident)


def _consumers(jaxpr, counts: Dict[str, Any]) -> None:
  """Fills counts[name] for every conv marker call in jaxpr and its sub-jaxprs: the names
  of the equations that read the marker's output ('out' where the jaxpr returns it)."""
  readers: Dict[Any, list] = {}
  for eqn in jaxpr.eqns:
    name = str(eqn.params.get('name', ''))
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal):
        readers.setdefault(v, []).append(name)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      _consumers(sub, counts)
  for v in jaxpr.outvars:
    if not isinstance(v, jex_core.Literal):
      readers.setdefault(v, []).append('out')
  for eqn in jaxpr.eqns:
    name = str(eqn.params.get('name', ''))
    if name.startswith(_MARK + 'conv'):
      counts[name] = readers.get(eqn.outvars[0], [])


def find_pairs(module: nn.Module, variables: Any, x: Any) -> Tuple[Pair, ...]:
  """The (conv, BN) pairs of `module` that fold, by tracing apply(variables, x,
  train=False) once (nothing runs; x and variables may be abstract)."""
  convs, pairs = [], []

  def spy(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != '__call__' or not args:
      return next_fun(*args, **kwargs)
    if type(m) in _CONVS:
      y = _marker(f'{_MARK}conv{len(convs)}')(next_fun(*args, **kwargs))
      convs.append((m.scope.path, y))
      return y
    if type(m) in _BNS and _bn_in_inference(m, args, kwargs):
      for i, (path, y) in enumerate(convs):
        if args[0] is y:
          pairs.append((i, Pair(path, m.scope.path, float(m.epsilon))))
          args = (_marker(f'{_MARK}bn{i}')(args[0]),) + tuple(args[1:])
          break
    return next_fun(*args, **kwargs)

  def traced(v, x):
    with nn.intercept_methods(spy):
      return module.apply(v, x, train=False)

  closed = jax.make_jaxpr(traced)(variables, x)
  readers: Dict[str, Any] = {}
  _consumers(closed.jaxpr, readers)
  return tuple(p for i, p in pairs if readers.get(f'{_MARK}conv{i}') == [f'{_MARK}bn{i}'])


def fold_variables(variables: Any, pairs: Tuple[Pair, ...]) -> Dict[str, Any]:
  """Variables of the inference form: each pair's conv kernel (and bias, if any) scaled
  by its BN's mul per output channel, the BN's `add` as the conv's FOLDED bias, and a
  FOLDED 'skip' marker on the BN. Pure and cheap (per-channel products): call it
  inside the jitted function, so new variables need no new fold."""
  params = traverse_util.flatten_dict(variables['params'])
  stats = traverse_util.flatten_dict(variables['batch_stats'])
  folded = {}
  for p in pairs:
    mean, var = (stats[p.bn + (k,)].astype(jnp.float32) for k in ('mean', 'var'))
    scale = params.get(p.bn + ('scale',), jnp.ones_like(var)).astype(jnp.float32)
    bias = params.get(p.bn + ('bias',), jnp.zeros_like(var)).astype(jnp.float32)
    mul = scale * lax.rsqrt(var + p.epsilon)
    for name in ('kernel', 'bias'):  # the conv's own bias too, where it has one
      if p.conv + (name,) in params:
        w = params[p.conv + (name,)]
        params[p.conv + (name,)] = (w * mul).astype(w.dtype)
    folded[p.conv + ('bias',)] = bias - mean * mul
    folded[p.bn + ('skip',)] = jnp.zeros((), jnp.float32)
  return dict(variables, params=traverse_util.unflatten_dict(params),
              **{FOLDED: traverse_util.unflatten_dict(folded)})


def _run_folded(next_fun, args, kwargs, context):
  """Interceptor of the inference form: a folded conv adds its bias (in float32, as
  the BN computed), a folded BN passes its input through in the BN's output dtype."""
  m = context.module
  if context.method_name == '__call__' and args:
    if type(m) in _CONVS and m.has_variable(FOLDED, 'bias'):
      y = next_fun(*args, **kwargs)
      return (y.astype(jnp.float32) + m.get_variable(FOLDED, 'bias')).astype(y.dtype)
    if type(m) in _BNS and m.has_variable(FOLDED, 'skip'):
      x = args[0]
      if isinstance(m, layers.BatchNorm):
        return x.astype(m.dtype or x.dtype)
      return x.astype(m.dtype or jnp.promote_types(x.dtype, m.param_dtype))
  return next_fun(*args, **kwargs)


def _signature(variables, x) -> Tuple:
  """A hashable key of the variables' tree, their shapes and dtypes, and x's."""
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  return (treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves),
          tuple(x.shape), str(x.dtype))


@functools.lru_cache(maxsize=64)
def _cached_pairs(module: nn.Module, signature: Tuple) -> Tuple[Pair, ...]:
  treedef, leaves, x_shape, x_dtype = signature
  variables = jax.tree_util.tree_unflatten(
      treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
  return find_pairs(module, variables, jax.ShapeDtypeStruct(x_shape, x_dtype))


def pairs_for(module: nn.Module, variables: Any, x: Any) -> Tuple[Pair, ...]:
  """find_pairs, cached per module and variable / input shapes (a trace per new shape)."""
  variables = {k: v for k, v in variables.items() if k not in (layers.TAPS, FOLDED)}
  try:
    return _cached_pairs(module, _signature(variables, x))
  except TypeError:  # an unhashable module: trace every time (nothing runs)
    return find_pairs(module, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))


def inference_apply(module: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
  """module.apply(variables, x, train=False) with every foldable BN folded into its
  conv (see the module docstring); works inside jit and on abstract values."""
  variables = {k: v for k, v in variables.items() if k not in (layers.TAPS, FOLDED)}
  pairs = pairs_for(module, variables, x)
  if not pairs:
    return module.apply(variables, x, train=False)
  with nn.intercept_methods(_run_folded):
    return module.apply(fold_variables(variables, pairs), x, train=False)

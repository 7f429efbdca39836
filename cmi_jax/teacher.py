"""Frozen networks: the teacher (and the student while images are synthesized).

A `Teacher` is a pytree holding an unbound classifier module and its variables.
Applying it runs BN in inference mode with the running statistics as frozen
constants (stop_gradient, never updated), stays differentiable with respect to
the input image, and returns the logits plus what the inversion losses need:
for every BN layer the statistics of its *input* (`BNTap`), the contrastive
features (per-sample spatial means of the BN inputs, a selection of them, or the
architecture's own feature taps: ResNet uses the inputs of layer1..layer4 as the
reference does for resnet34), and the pooled penultimate features (DAFL's
activation loss).

Any `flax.linen` classifier works, not only the zoo's: flax's own `nn.BatchNorm`
layers are intercepted (`nn.intercept_methods`) and record the same `BNTap` as
cmi_jax's BatchNorm, and the input of the last `nn.Dense` stands in for the
penultimate features when the model sows none. The model is called as
`module.apply(variables, x, train=False)`.
"""

from typing import Any, List, NamedTuple, Optional, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from cmi_jax.models import fold
from cmi_jax.models.layers import TAPS, BNTap, input_tap

# synthesis.feature_layers: which BN inputs make CMI's contrastive features.
#   'auto'   the architecture's own feature taps where it sows them (the zoo's ResNet:
#            the inputs of layer1..layer4, the reference's choice for resnet34), else 'all';
#   'all'    the spatial mean of every BN layer's input (the reference's default);
#   'stages' the architecture's own taps, else the input of the first BN layer of each
#            stage: each child of the deepest module holding every BN (`layer1`, `block2`
#            of the model or of the backbone it wraps; a BN there is a stage of its own):
#            far fewer dimensions for deep teachers.
FEATURE_LAYERS = ('auto', 'all', 'stages')


class TeacherOutput(NamedTuple):
  logits: jax.Array                 # [N, K] float32
  bn: Tuple[BNTap, ...]             # one per BN layer, forward order
  features: Optional[jax.Array]     # [N, D] contrastive features (float32)
  penultimate: Optional[jax.Array]  # [N, F] pooled features before the classifier


def _record_flax_layers(next_fun, args, kwargs, context):
  """Method interceptor: flax's own BatchNorm and Dense sow what BNTap / DAFL need.

  Only while the 'taps' collection is mutable (a Teacher call with taps=True);
  cmi_jax's own BatchNorm is another class and sows by itself.
  """
  module = context.module
  if context.method_name == '__call__' and module.is_mutable_collection(TAPS) and args:
    if isinstance(module, nn.BatchNorm) and module.has_variable('batch_stats', 'mean'):
      module.sow(TAPS, 'bn', input_tap(jnp.moveaxis(args[0], module.axis, -1),
                                       module.get_variable('batch_stats', 'mean'),
                                       module.get_variable('batch_stats', 'var')))
    elif isinstance(module, nn.Dense):
      module.sow(TAPS, 'dense_input', args[0].astype(jnp.float32))
  return next_fun(*args, **kwargs)


def _collect(tree, path: Tuple[str, ...], out: List) -> None:
  """(module path, kind, value) of the sown 'taps' dict in insertion (= forward
  call) order."""
  for key, value in tree.items():
    if isinstance(value, dict):
      _collect(value, path + (key,), out)
    else:
      out.extend((path, key, v) for v in value)


def _stage_inputs(sown: List) -> List[jax.Array]:
  """The spatial mean of the first BN input in each stage.

  A stage is a child of the deepest module that holds every BN layer (the model
  itself, or the backbone it wraps): `layer1`, `block2`, or a BN of its own.
  """
  paths = [p for p, kind, _ in sown if kind == 'bn']
  depth = 0
  while all(len(p) > depth + 1 and p[depth] == paths[0][depth] for p in paths):
    depth += 1
  first = {}
  for p, kind, v in sown:
    if kind == 'bn':
      first.setdefault(p[:depth + 1], v.mean)
  return list(first.values())


def select_features(sown: List, bn: Tuple[BNTap, ...], feature_layers: str
                    ) -> Optional[jax.Array]:
  """[N, D] contrastive features from the collected taps (see FEATURE_LAYERS)."""
  if feature_layers not in FEATURE_LAYERS:
    raise ValueError(f'feature_layers must be one of {FEATURE_LAYERS}, got {feature_layers!r}.')
  own = [v for _, kind, v in sown if kind == 'feat']
  if own and feature_layers != 'all':
    feat = own
  elif feature_layers == 'stages' and bn:
    feat = _stage_inputs(sown)
  else:
    feat = [t.mean for t in bn]
  return jnp.concatenate(feat, axis=-1) if feat else None


@struct.dataclass
class Teacher:
  """A classifier with frozen variables ({'params', 'batch_stats'})."""
  module: nn.Module = struct.field(pytree_node=False)
  variables: Any

  def __call__(self, x: jax.Array, taps: bool = True,
               feature_layers: str = 'auto') -> TeacherOutput:
    """Inference-mode forward on normalized NHWC images.

    Args:
      x: [N, H, W, C] normalized images (any float dtype).
      taps: also return BN-input statistics and features. With taps=False only
        logits are computed (KD, the adversarial student), by the inference form
        (`models.fold`: BN folded into the convs, the same logits to float32 rounding).
      feature_layers: which BN inputs form `features` (FEATURE_LAYERS).
    Returns:
      TeacherOutput; gradients flow to `x` only.
    """
    chex.assert_rank(x, 4)
    variables = jax.lax.stop_gradient(
        {k: v for k, v in self.variables.items() if k != TAPS})
    if not taps:  # logits only: the inference form, each conv's BN folded into it
      return TeacherOutput(fold.inference_apply(self.module, variables, x), (), None, None)
    with nn.intercept_methods(_record_flax_layers):
      logits, state = self.module.apply(variables, x, train=False, mutable=[TAPS])
    sown = []
    _collect(state.get(TAPS, {}), (), sown)
    bn = tuple(v for _, kind, v in sown if kind == 'bn')
    pen = ([v for _, kind, v in sown if kind == 'penultimate'] or
           [v for _, kind, v in sown if kind == 'dense_input'][-1:])
    return TeacherOutput(logits, bn, select_features(sown, bn, feature_layers),
                         pen[0] if pen else None)


def subset_batch_stats(tap: BNTap, rows: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
  """Per-channel batch mean and biased variance over the first `rows` samples.

  Exact by the law of total variance: var = mean_i(var_i) + var_i(mean_i), so
  the statistics of the global view come out of a teacher call on
  [global; local] without recomputing anything from the activations.
  """
  m, v = (tap.mean, tap.var) if rows is None else (tap.mean[:rows], tap.var[:rows])
  mu = jnp.mean(m, axis=0)
  var = jnp.mean(v, axis=0) + jnp.mean(jnp.square(m - mu), axis=0)
  return mu, var

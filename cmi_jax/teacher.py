"""Frozen networks: the teacher (and the student while images are synthesized).

A `Teacher` is a pytree holding an unbound classifier module and its variables.
Applying it runs BN in inference mode with the running statistics as frozen
constants (stop_gradient, never updated), stays differentiable with respect to
the input image, and returns the logits plus what the inversion losses need:
for every BN layer the statistics of its *input* (`BNTap`), the contrastive
features (per-sample spatial means of the BN inputs, or the architecture's own
feature taps: ResNet uses the inputs of layer1..layer4 as the reference does),
and the pooled penultimate features (DAFL's activation loss).
"""

from typing import Any, List, NamedTuple, Optional, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from cmi_jax.models.layers import TAPS, BNTap


class TeacherOutput(NamedTuple):
  logits: jax.Array                 # [N, K] float32
  bn: Tuple[BNTap, ...]             # one per BN layer, forward order
  features: Optional[jax.Array]     # [N, D] contrastive features (float32)
  penultimate: Optional[jax.Array]  # [N, F] pooled features before the classifier


def _collect(tree, bn: List, feat: List, pen: List) -> None:
  """Walks the sown 'taps' dict in insertion (= forward call) order."""
  for key, value in tree.items():
    if isinstance(value, dict):
      _collect(value, bn, feat, pen)
    elif key == 'bn':
      bn.extend(value)
    elif key == 'feat':
      feat.extend(value)
    elif key == 'penultimate':
      pen.extend(value)


@struct.dataclass
class Teacher:
  """A classifier with frozen variables ({'params', 'batch_stats'})."""
  module: nn.Module = struct.field(pytree_node=False)
  variables: Any

  def __call__(self, x: jax.Array, taps: bool = True) -> TeacherOutput:
    """Inference-mode forward on normalized NHWC images.

    Args:
      x: [N, H, W, C] normalized images (any float dtype).
      taps: also return BN-input statistics and features. With taps=False only
        logits are computed (KD, the adversarial student).
    Returns:
      TeacherOutput; gradients flow to `x` only.
    """
    chex.assert_rank(x, 4)
    variables = jax.lax.stop_gradient(
        {k: v for k, v in self.variables.items() if k != TAPS})
    if not taps:
      logits = self.module.apply(variables, x, train=False)
      return TeacherOutput(logits, (), None, None)
    logits, state = self.module.apply(variables, x, train=False, mutable=[TAPS])
    bn, feat, pen = [], [], []
    _collect(state.get(TAPS, {}), bn, feat, pen)
    feat = feat or [t.mean for t in bn]
    features = jnp.concatenate(feat, axis=-1) if feat else None
    return TeacherOutput(logits, tuple(bn), features, pen[0] if pen else None)


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

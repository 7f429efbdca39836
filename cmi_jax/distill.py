"""Classifier updates and evaluation: the KD step (student from the teacher on
synthetic images) and the supervised step (teachers / students from scratch)
share one update, `classifier_step`.
"""

from typing import Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cmi_jax.state import ClassifierState


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean (reference KD criterion)."""
  t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.mean(kl) * temperature ** 2


def classifier_step(state: ClassifierState, x: jax.Array,
                    loss_of_logits: Callable[[jax.Array], jax.Array]
                    ) -> Tuple[ClassifierState, Dict[str, jax.Array]]:
  """One optimizer step of a BN classifier in train mode on normalized images x.

  loss_of_logits maps the [N, K] logits to the scalar loss (CE on labels, or KD).
  Non-finite losses leave the state unchanged (no NaN ever reaches the params).
  """
  chex.assert_rank(x, 4)

  def loss_fn(params):
    logits, new_vars = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, x,
                                      train=True, mutable=['batch_stats'])
    return loss_of_logits(logits), (logits, new_vars['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  ok = jnp.isfinite(loss)
  new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_state, state)
  return new_state, {'loss': loss, 'logits': logits, 'finite': ok}


def supervised_loss(labels: jax.Array) -> Callable[[jax.Array], jax.Array]:
  return lambda logits: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_eval_fn(apply_fn: Callable, mean, std) -> Callable:
  """Jitted (variables, uint8 images, labels, valid mask) -> (#correct, summed CE)."""
  from cmi_jax.augment import normalize, to_float  # pylint: disable=g-import-not-at-top

  @jax.jit
  def eval_batch(variables, images, labels, valid):
    logits = apply_fn(variables, normalize(to_float(images), mean, std), train=False)
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return correct, jnp.sum(jnp.where(valid, ce, 0.0))
  return eval_batch


def evaluate(eval_fn: Callable, variables, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> Dict[str, float]:
  """Top-1 accuracy (%) and mean CE over a labeled split.

  Batches have a fixed size (the last is zero-padded and masked), so one
  compilation serves the whole split.
  """
  n = len(labels)
  if n == 0:
    raise ValueError('evaluate() got an empty split.')
  correct, ce = 0, 0.0
  for i in range(0, n, batch_size):
    xb, yb = images[i:i + batch_size], labels[i:i + batch_size]
    m = len(yb)
    valid = np.arange(batch_size) < m
    if m < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - m,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros(batch_size - m, yb.dtype)])
    c, e = eval_fn(variables, xb, yb, valid)
    correct += int(c)
    ce += float(e)
  return {'accuracy': 100.0 * correct / n, 'loss': ce / n}

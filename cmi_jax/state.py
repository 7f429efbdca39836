"""Train-state structs: classifiers (student/teacher training) with BN stats.

The synthesis states (generator, head, latent) live in `cmi_jax.synthesis`.
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from cmi_jax import models


# Named PRNG streams derived once from the root key (fold_in of fixed constants);
# per round / step use fold_in(stream, counter), so a resumed run needs only counters.
RNG_STREAMS = {'student_init': 0, 'head': 1, 'synthesis': 2, 'kd': 3, 'generator': 4,
               'pre_synthesis': 5}


def rng_stream(root: jax.Array, name: str) -> jax.Array:
  """The named stream `name` of the root key."""
  return jax.random.fold_in(root, RNG_STREAMS[name])


class ClassifierState(train_state.TrainState):
  """TrainState + BN running statistics (flax imagenet example layout)."""
  batch_stats: Any


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float, weight_decay: float,
        nesterov: bool = False) -> optax.GradientTransformation:
  """PyTorch-style SGD: weight decay added to the gradient of every parameter."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def cosine_per_epoch(base_lr: float, epochs: int, steps_per_epoch: int,
                     eta_min: float = 0.0) -> optax.Schedule:
  """Cosine annealing stepped once per epoch (the reference's CosineAnnealingLR(T_max=epochs,
  eta_min)).

  lr(step) = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / epochs)) / 2 with
  epoch = step // steps_per_epoch.
  """
  import jax.numpy as jnp
  steps_per_epoch = max(int(steps_per_epoch), 1)

  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    return eta_min + (base_lr - eta_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return schedule


def multistep_per_epoch(base_lr: float, milestones: Sequence[int], gamma: float,
                        steps_per_epoch: int) -> optax.Schedule:
  """Step decay once per epoch (the reference's MultiStepLR(milestones, gamma), stepped at
  each epoch end; DF:train_scratch.py:198-199).

  lr(step) = base_lr * gamma ** (number of milestones m <= epoch), epoch = step // steps_per_epoch.
  """
  import jax.numpy as jnp
  steps_per_epoch = max(int(steps_per_epoch), 1)
  # No milestones: one bound no run reaches, so the lr stays base_lr.
  bounds = jnp.asarray(sorted(int(m) for m in milestones) or [2 ** 30], jnp.int32)

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    passed = jnp.sum(epoch >= bounds)
    return base_lr * jnp.power(gamma, passed.astype(jnp.float32))
  return schedule


def create_state(cls, **fields):
  """`cls.create(**fields)` (a flax TrainState subclass) with `step` a strong int32 array,
  not flax's Python 0: the step a jitted update returns is such an array, so a state passed
  back in (round 2, KD chunk 2) has the first call's signature and does not recompile."""
  return cls.create(**fields).replace(step=jnp.zeros((), jnp.int32))


def create_classifier_state(module: nn.Module, rng: jax.Array, input_shape: Sequence[int],
                            tx: optax.GradientTransformation,
                            variables: Optional[Any] = None) -> ClassifierState:
  """Initializes (or wraps given) variables into a ClassifierState."""
  if variables is None:
    variables = models.init(module, rng, tuple(input_shape))
  return create_state(ClassifierState, apply_fn=module.apply, params=variables['params'],
                      batch_stats=variables['batch_stats'], tx=tx)


def select(pred: jax.Array, new, old):
  """`new` where the traced bool `pred` holds, else `old`, leaf by leaf (a
  non-finite step or round changes nothing)."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)

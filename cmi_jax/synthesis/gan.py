"""GAN-style baselines (DAFL, ZSKT, DFQ, DFAD): one generator trained continuously.

Unlike CMI, the generator is never re-initialized, z is drawn fresh at every
step (not optimized), nothing is kept in an image pool: each round takes
g_steps generator steps, then the student distills on fresh generator samples
(`sample`). The loss is the same unified inversion loss (`inversion_terms`),
computed on the normalized generator output without augmentation.
"""

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cmi_jax import augment
from cmi_jax.state import ClassifierState, create_state, select
from cmi_jax.parallel import constrain
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.synthesis.round_kit import inversion_terms, weighted_sum
from cmi_jax.teacher import Teacher


def init_generator_state(cfg: SynthesisConfig, rng: jax.Array) -> ClassifierState:
  """The persistent generator (params, BN stats) with Adam(lr_g, betas)."""
  gen = cfg.make_generator()
  variables = gen.init(rng, jnp.zeros((2,) + cfg.latent_shape, jnp.float32))
  return create_state(ClassifierState, apply_fn=gen.apply, params=variables['params'],
                      batch_stats=variables['batch_stats'],
                      tx=optax.adam(cfg.lr_g, b1=cfg.betas[0], b2=cfg.betas[1]))


class FreshSource(struct.PyTreeNode):
  """KD image source for the GAN baselines: the current generator."""
  gen: ClassifierState
  nz: int = struct.field(pytree_node=False)


def sample(source: FreshSource, rng: jax.Array, batch_size: int) -> jax.Array:
  """Fresh images in [0, 1] from the generator (BN in train mode, no gradient)."""
  gen = source.gen
  z = jax.random.normal(rng, (batch_size, source.nz), jnp.float32)
  x, _ = gen.apply_fn({'params': gen.params, 'batch_stats': gen.batch_stats}, z, train=True,
                      mutable=['batch_stats'])
  return jax.lax.stop_gradient(x.astype(jnp.float32))


def gan_round(cfg: SynthesisConfig, teacher: Teacher, student: Optional[Teacher],
              gen: ClassifierState, rng: jax.Array, data_sharding: Optional[Any] = None
              ) -> Tuple[ClassifierState, Dict[str, jax.Array]]:
  """g_steps generator updates, each on a fresh z batch of cfg.batch_size (one scan)."""
  b = cfg.batch_size
  needs_taps = bool(cfg.weights.bn or cfg.weights.act)
  use_adv = cfg.weights.adv > 0 and student is not None
  if cfg.adv_against_teacher:  # the reference's early bug, on request: L_adv == 0
    student = teacher

  def loss_fn(params, batch_stats, z):
    x, new_vars = gen.apply_fn({'params': params, 'batch_stats': batch_stats}, z, train=True,
                               mutable=['batch_stats'])
    x = x.astype(jnp.float32)
    xn = augment.normalize(x, cfg.mean, cfg.std).astype(cfg.compute_dtype)
    out = teacher(xn, taps=needs_taps)
    s_logits = student(xn, taps=False).logits if use_adv else None
    terms = inversion_terms(cfg, teacher_out=out, rows=b, targets=None,
                            student_logits=s_logits, x=x)
    return weighted_sum(cfg, terms), (new_vars['batch_stats'], terms)

  def step(gen, key):
    z = constrain(jax.random.normal(key, (b, cfg.nz), jnp.float32), data_sharding)
    (loss, (stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        gen.params, gen.batch_stats, z)
    new = gen.apply_gradients(grads=grads, batch_stats=stats)
    ok = jnp.isfinite(loss)
    gen = select(ok, new, gen)
    return gen, {'loss': loss, **{f'l_{k}': v for k, v in terms.items()}}

  gen, rows = jax.lax.scan(step, gen, jax.random.split(rng, cfg.g_steps))
  return gen, rows


def preview(cfg: SynthesisConfig, teacher: Teacher, gen: ClassifierState, rng: jax.Array,
            n: int) -> Tuple[jax.Array, jax.Array]:
  """n fresh samples and the teacher's predicted class for each (for image grids)."""
  x = sample(FreshSource(gen, cfg.nz), rng, n)
  logits = teacher(augment.normalize(x, cfg.mean, cfg.std), taps=False).logits
  return x, jnp.argmax(logits, -1)

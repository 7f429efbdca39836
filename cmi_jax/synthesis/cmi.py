"""The CMI synthesis round (Algorithm 1, CMI), as one pure jittable function.

A round: re-initialize the generator, draw a trainable latent z, and for
g_steps iterations render x = G(z), make a global view (crop + flip) and a
local view (random resized crop + flip), run the frozen teacher once on both,
compute L_inv = bn*L_bn + oh*L_oh + adv*L_adv on the global view and
L_cr on [local, bank_local] vs [global, bank_global] through the head,
and take one Adam step on (generator, z) and one on the head. The iterate of
lowest total loss is tracked on device; at the end its images enter the image
pool and its raw [local | global] features the memory bank.

The whole round is one `lax.scan`: no host sync, no Python-side state. The
same function runs the pixel-space variants (DeepInversion, the "w/o
generator" ablation) through `SynthesisConfig.synthesizer='pixels'`.
"""

import warnings
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import struct
from flax.training import train_state

from cmi_jax.parallel import constrain
from cmi_jax.state import create_state, select
from cmi_jax.synthesis import config as _config
from cmi_jax.synthesis import footprint, losses
from cmi_jax.synthesis.bank import RingBuffer, ring_add, ring_init, ring_sample_distinct
from cmi_jax.synthesis.round_kit import (RoundOutput, all_finite, check_teacher, diagnostics,
                                         init_pool, inversion_terms, to_uint8, track_best,
                                         views, weighted_sum)
from cmi_jax.teacher import Teacher, TeacherOutput

class SynthState(struct.PyTreeNode):
  """What persists across rounds: the head and its Adam, the bank, the pool."""
  head: train_state.TrainState
  bank: RingBuffer   # [bank_size, 2D] float32 raw [local | global] teacher features
  pool: RingBuffer   # {'images': [pool_size, H, W, C] uint8, 'targets': [pool_size] int32}
  round: jax.Array   # int32 rounds done


def init_state(cfg: _config.SynthesisConfig, teacher: Teacher, rng: jax.Array) -> SynthState:
  """Fresh head (+ Adam), empty bank and pool; first checks the teacher has what
  the loss reads and that head, bank and pool fit the device (footprint.py)."""
  d = check_teacher(cfg, teacher)
  logging.info(footprint.check_fits(cfg, d).message)
  head = cfg.make_head()
  params = head.init(rng, jnp.zeros((1, d), jnp.float32))['params'] \
      if cfg.head_kind != 'none' and d else {}
  head_state = create_state(train_state.TrainState, apply_fn=head.apply, params=params,
                            tx=optax.adam(cfg.lr_head))
  bank = ring_init(cfg.bank_size, jax.ShapeDtypeStruct((2 * d,), jnp.float32))
  return SynthState(head_state, bank, init_pool(cfg), jnp.zeros((), jnp.int32))


def _contrastive(cfg, head_state, head_params, feat_l, feat_g, bank_feats, bank_valid):
  """L_cr through the head on [local, bank_local] vs [global, bank_global].

  The head is row-wise, so it runs as three calls instead of one on the
  concatenation (same values): the global rows are stop-gradient (no backward
  at all), the bank's local rows are constants (weight gradient only), and only
  the B current local rows need an input gradient. One call would run the whole
  backward over all 2(B + n_neg) rows, most of them with a zero cotangent.
  """
  b = feat_l.shape[0]
  head = lambda x: head_state.apply_fn({'params': head_params}, x)
  if bank_feats is not None:
    bank_l, bank_g = jnp.split(bank_feats, 2, axis=1)
    p_l = jnp.concatenate([head(feat_l), head(bank_l)], axis=0)
    p_g = head(jnp.concatenate([feat_g, bank_g], axis=0))
  else:
    p_l, p_g = head(feat_l), head(feat_g)
  # contrastive_loss stops p_g's gradient: its (separate) head call gets no backward.
  return losses.contrastive_loss(p_l, p_g, b, bank_valid, cfg.cr_temperature)


def _view_rows(out: TeacherOutput, j: int) -> TeacherOutput:
  """Rows j, j+2, ... of a teacher call on interleaved [global, local] views
  (per-sample fields only; the running statistics are shared)."""
  pick = lambda a: None if a is None else a.reshape((-1, 2) + a.shape[1:])[:, j]
  bn = tuple(t._replace(mean=pick(t.mean), var=pick(t.var)) for t in out.bn)
  return out._replace(logits=pick(out.logits), bn=bn, features=pick(out.features),
                      penultimate=pick(out.penultimate))


def _init_trainables(cfg: _config.SynthesisConfig, rng: jax.Array):
  """Round start: a freshly initialized generator + latent z, or raw pixels."""
  k_g, k_z = jax.random.split(rng)
  b = cfg.batch_size
  if cfg.synthesizer == 'pixels':
    # DeepInversion: pixels ~ N(0, 1) in normalized space.
    return {'pixels': jax.random.normal(k_z, (b,) + tuple(cfg.image_shape), jnp.float32)}, None
  z = jax.random.normal(k_z, (b,) + cfg.latent_shape, jnp.float32)
  variables = cfg.make_generator().init(k_g, z)
  return {'generator': variables['params'], 'z': z}, variables['batch_stats']


def _render(cfg: _config.SynthesisConfig, trainables, gen_stats) -> jax.Array:
  """Images in [0, 1], [B, H, W, C] float32."""
  if cfg.synthesizer == 'pixels':
    mean = jnp.asarray(cfg.mean, jnp.float32)
    std = jnp.asarray(cfg.std, jnp.float32)
    return trainables['pixels'] * std + mean
  x, _ = cfg.make_generator().apply({'params': trainables['generator'], 'batch_stats': gen_stats},
                               trainables['z'], train=True, mutable=['batch_stats'])
  return x.astype(jnp.float32)


def _clip_pixels(cfg: _config.SynthesisConfig, trainables):
  """Keeps pixel iterates inside the valid image range (DeepInversion's clip)."""
  if cfg.synthesizer != 'pixels':
    return trainables
  mean = jnp.asarray(cfg.mean, jnp.float32)
  std = jnp.asarray(cfg.std, jnp.float32)
  return {'pixels': jnp.clip(trainables['pixels'], -mean / std, (1.0 - mean) / std)}


def synthesis_round(cfg: _config.SynthesisConfig, teacher: Teacher, student: Optional[Teacher],
                    state: SynthState, rng: jax.Array, targets: Optional[jax.Array] = None,
                    data_sharding: Optional[Any] = None) -> Tuple[SynthState, RoundOutput]:
  """One CMI round (g_steps iterations); pure, jit it with `cfg` static.

  Args:
    cfg: synthesis hyperparameters.
    teacher: frozen teacher.
    student: frozen student for the adversarial term (None disables L_adv).
    state: head, bank and pool from the previous rounds.
    rng: this round's key (e.g. fold_in(synthesis_key, round_index)).
    targets: [B] class ids; default random, sorted (as the reference).
    data_sharding: NamedSharding splitting batch arrays over devices (see
      cmi_jax.parallel); the math is the same with or without it.
  Returns:
    (new state with the round's best images in the pool and features in the
    bank, RoundOutput with the images, targets and per-step metrics).
  """
  b = cfg.batch_size
  k_init, k_t, k_steps = jax.random.split(rng, 3)
  if targets is None:
    targets = jnp.sort(jax.random.randint(k_t, (b,), 0, cfg.num_classes))
  targets = constrain(targets, data_sharding)
  trainables, gen_stats = _init_trainables(cfg, k_init)
  # z / pixels are per-sample: split them, XLA propagates the split downstream.
  trainables = {k: constrain(v, data_sharding) if k in ('z', 'pixels') else v
                for k, v in trainables.items()}
  opt = optax.adam(cfg.lr_g, b1=cfg.betas[0], b2=cfg.betas[1])
  use_cr = cfg.weights.cr > 0 and cfg.views == 'cmi'
  use_adv = cfg.weights.adv > 0 and student is not None
  use_bank = use_cr and cfg.n_neg > 0

  def loss_fn(trainables, head_params, key, bank_feats, bank_valid):
    k_views, _ = jax.random.split(key)
    x = constrain(_render(cfg, trainables, gen_stats), data_sharding)
    xg, xl = views(cfg, k_views, x)
    if xl is None:
      out = out_l = teacher(constrain(xg, data_sharding).astype(cfg.compute_dtype),
                            feature_layers=cfg.feature_layers)
    else:
      # One teacher call on interleaved rows [g0, l0, g1, l1, ...]: each device
      # holds both views of its own samples, so neither the call nor the split
      # below moves data between devices (a [xg; xl] concatenation would).
      rows = jnp.stack([xg, xl], axis=1).reshape((2 * b,) + xg.shape[1:])
      both = teacher(constrain(rows, data_sharding).astype(cfg.compute_dtype),
                     feature_layers=cfg.feature_layers)
      out, out_l = _view_rows(both, 0), _view_rows(both, 1)
    s_logits = student(xg.astype(cfg.compute_dtype), taps=False).logits if use_adv else None
    terms = inversion_terms(cfg, teacher_out=out, rows=b, targets=targets,
                            student_logits=s_logits, x=x)
    no_feats = jnp.zeros((b, 0), jnp.float32)
    feat_g = out.features if out.features is not None else no_feats
    feat_l = out_l.features if out_l.features is not None else no_feats
    if use_cr:
      terms['cr'] = _contrastive(cfg, state.head, head_params, feat_l, feat_g, bank_feats,
                                 bank_valid)
    loss = weighted_sum(cfg, terms)
    aux = {'x': x, 'features': jnp.concatenate([feat_l, feat_g], axis=1),
           'logits': out.logits[:b], 'terms': terms}
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def step(carry, key):
    trainables, opt_state, head, best, i = carry
    k_loss, k_bank = jax.random.split(key)
    bank_feats, bank_valid = (ring_sample_distinct(state.bank, k_bank, cfg.n_neg)
                              if use_bank else (None, None))
    (loss, aux), (g_t, g_h) = grad_fn(trainables, head.params, k_loss, bank_feats, bank_valid)
    updates, new_opt_state = opt.update(g_t, opt_state, trainables)
    new_trainables = _clip_pixels(cfg, optax.apply_updates(trainables, updates))
    new_head = head.apply_gradients(grads=g_h) if use_cr else head
    # A non-finite step changes nothing; a NaN loss never compares lower, so it
    # is never kept either, while the first finite iterate always is.
    ok = jnp.isfinite(loss) & all_finite((g_t, g_h))
    keep = lambda new, old: select(ok, new, old)
    best = track_best(best, {'loss': loss, 'x': aux['x'], 'features': aux['features'],
                             'logits': aux['logits'], 'step': i})
    row = {'loss': loss, **{f'l_{k}': v for k, v in aux['terms'].items()}}
    return (keep(new_trainables, trainables), keep(new_opt_state, opt_state),
            keep(new_head, head), best, i + 1), row

  d2 = state.bank.data.shape[-1]
  best0 = {'loss': jnp.array(jnp.inf, jnp.float32),
           'x': jnp.zeros((b,) + tuple(cfg.image_shape), jnp.float32),
           'features': jnp.zeros((b, d2), jnp.float32),
           'logits': jnp.zeros((b, cfg.num_classes), jnp.float32),
           'step': jnp.zeros((), jnp.int32)}
  carry0 = (trainables, opt.init(trainables), state.head, best0, jnp.zeros((), jnp.int32))
  (_, _, head, best, _), rows = jax.lax.scan(step, carry0,
                                             jax.random.split(k_steps, cfg.g_steps))

  ok = jnp.isfinite(best['loss'])
  bank = ring_add(state.bank, best['features'], ok) if use_cr else state.bank
  pool = ring_add(state.pool, {'images': to_uint8(best['x']), 'targets': targets}, ok)
  new_state = SynthState(head, bank, pool, state.round + 1)
  metrics = dict(rows)
  metrics.update(diagnostics(best['logits'], best['features'], targets, cfg.num_classes))
  metrics['best_loss'] = best['loss']
  metrics['best_step'] = best['step']
  return new_state, RoundOutput(best['x'], targets, metrics)


# Moved to `cmi_jax.synthesis.config` (the config of every method; what every round
# shares is in `cmi_jax.synthesis.round_kit`). Importing them from here still works
# for one release, with a DeprecationWarning.
_MOVED = {name: _config for name in ('SynthesisConfig', 'LossWeights', 'SYNTHESIZERS',
                                     'GENERATORS', 'VIEWS', 'OH_KINDS')}


def __getattr__(name: str):
  if name in _MOVED:
    module = _MOVED[name]
    warnings.warn(f'cmi_jax.synthesis.cmi.{name} moved to {module.__name__}.{name}; the old '
                  'path goes away in the next release.', DeprecationWarning, stacklevel=2)
    return getattr(module, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

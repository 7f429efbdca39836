"""The NAYER synthesis round (Tran et al., CVPR 2024), as one pure jittable function.

A round is one epoch's synthesis (reference `datafree/synthesis/nayer.py:147-243`):
  1. when round % g_life == 0 or (round - warmup_rounds) % g_life == 0 (the
     reference's rule, `nayer.py:154-155`) the generator is replaced by a freshly
     initialised one; otherwise it persists across loops and rounds;
  2. `loops` loops (gwp_loops during the synthesis-only warm-up, g_loops after);
     each loop re-draws the noisy layers (W ~ N(0, 1), b = 0), takes class-cyclic
     targets (each noisy layer serves one sample of every class), starts a fresh
     Adam over all generator parameters and runs g_steps iterations of
       L = bn * L_bn^mmt + oh * CE(t(x_aug), y) + adv * L_adv
     on x_aug = normalize(flip(crop(G(LTE[y])))) (losses.momentum_bn_loss; L_adv
     the masked KL against the student in eval mode, on from round
     adv_start_round);
  3. after each loop the teacher's BN-statistics EMA is updated from the loop's
     last forward and the loop's lowest-loss iterate enters the uint8 pool.

The round is one `lax.scan` over loops, each a `lax.scan` over g_steps: one
compiled call per round, whose loop body compiles once whatever the number of
loops (unrolling the loops would compile the step scan once per loop). The
warm-up and the KD rounds are the runner's two compiled programs (pre_round,
round), which differ only in the static loop count (g_loops = kd.pre_loops, the
reference's gwp_loops, in the warm-up) and the adversarial weight. No host sync, no Python-side state.
"""

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cmi_jax.models import NLGenerator
from cmi_jax.models.generator import reinit_noisy
from cmi_jax.parallel import constrain
from cmi_jax.state import select
from cmi_jax.synthesis import embeddings, losses
from cmi_jax.synthesis.bank import RingBuffer, ring_add
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.synthesis.round_kit import (RoundOutput, all_finite, check_teacher, diagnostics,
                                         feature_dim,
                                         init_pool, inversion_terms, to_uint8, track_best, views,
                                         weighted_sum)
from cmi_jax.teacher import Teacher


class NayerState(struct.PyTreeNode):
  """What persists across rounds (all of it checkpointed: resume is exact)."""
  generator: Any          # NLGenerator variables {'params', 'batch_stats'}
  bn_ema: losses.BNEma    # EMA of the teacher's BN-input statistics
  pool: RingBuffer        # {'images': [pool_size, H, W, C] uint8, 'targets': [pool_size] int32}
  embeddings: jax.Array   # [C, E] float32, the frozen label embeddings (LTE)
  round: jax.Array        # int32 rounds done (= epochs, warm-up included)


def make_generator(cfg: SynthesisConfig) -> NLGenerator:
  """NAYER's generator for `cfg` (the embedding width follows its input)."""
  h, _, c = cfg.image_shape
  return NLGenerator(batch_size=cfg.batch_size, chunk=cfg.num_classes,
                     le_emb_size=cfg.le_emb_size, ngf=cfg.ngf, img_size=h, nc=c,
                     dtype=cfg.compute_dtype)


def init_generator(cfg: SynthesisConfig, emb_dim: int, rng: jax.Array):
  """A freshly initialised NLGenerator's variables (the reference's `reinit()`)."""
  gen = make_generator(cfg)
  variables = gen.init(rng, jnp.zeros((cfg.batch_size, emb_dim), jnp.float32))
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def generator_resets(rounds: jax.Array, g_life: int, warmup_rounds: int) -> jax.Array:
  """Whether round `rounds` (0-based, warm-up included) starts from a fresh generator:
  (epoch - warmup) % g_life == 0 or epoch % g_life == 0, floor modulo as Python's."""
  return (rounds % g_life == 0) | ((rounds - warmup_rounds) % g_life == 0)


def class_cyclic_targets(rng: jax.Array, batch_size: int, num_classes: int) -> jax.Array:
  """[B] int32: B // C copies of [0, ..., C-1], then B % C random classes
  (reference `generate_ys`), so chunk i of C samples holds every class once."""
  reps, rest = divmod(batch_size, num_classes)
  tail = jax.random.randint(rng, (rest,), 0, num_classes, jnp.int32)
  return jnp.concatenate([jnp.tile(jnp.arange(num_classes, dtype=jnp.int32), reps), tail])


def init_state(cfg: SynthesisConfig, teacher: Teacher, rng: jax.Array) -> NayerState:
  """Label embeddings (teacher-derived or the user's .npy), a fresh generator,
  an empty BN EMA and pool."""
  check_teacher(cfg, teacher)
  k_emb, k_gen = jax.random.split(rng)
  table = jnp.asarray(embeddings.label_embeddings(cfg, teacher, k_emb), jnp.float32)
  spec = jax.eval_shape(lambda t: t(jnp.zeros((2,) + tuple(cfg.image_shape))), teacher)
  return NayerState(init_generator(cfg, table.shape[1], k_gen), losses.bn_ema_init(spec.bn),
                    init_pool(cfg), table, jnp.zeros((), jnp.int32))


def nayer_round(cfg: SynthesisConfig, teacher: Teacher, student: Optional[Teacher],
                state: NayerState, rng: jax.Array, targets: Optional[jax.Array] = None,
                data_sharding: Optional[Any] = None) -> Tuple[NayerState, RoundOutput]:
  """One NAYER round (= one epoch of synthesis); pure, jit it with `cfg` static.

  Args:
    cfg: synthesis hyperparameters (algorithm 'nayer'); g_loops loops (the
      runner's warm-up config carries gwp_loops there: kd.pre_loops).
    teacher: frozen teacher.
    student: frozen student (eval mode) for L_adv; None disables it.
    state: generator, BN EMA, pool, embeddings, round counter.
    rng: this round's key (e.g. fold_in(synthesis_key, round_index)).
    targets: [B] class ids used by every loop; default class-cyclic.
    data_sharding: NamedSharding splitting batch arrays over devices; the math
      (BN over the whole batch, noisy-layer chunks by global sample index) is
      the same with or without it.
  Returns:
    (new state, RoundOutput with every loop's kept images and targets
    ([loops * B, ...], what the pool received, in its order; a non-finite loop's
    rows are zeros and were not written), per-step metrics concatenated over
    loops ([loops * g_steps]), 'best_loss' of the last loop, 'loops_kept').
  """
  b, c = cfg.batch_size, cfg.num_classes
  loops = cfg.g_loops
  emb_dim = state.embeddings.shape[1]
  gen = make_generator(cfg)
  d = feature_dim(teacher, cfg.image_shape)
  k_fresh, k_loops = jax.random.split(rng)
  # 1. A fresh generator every g_life rounds, counted from 0 and from the end of the
  # warm-up (warm-up 2, g_life 5: rounds 0, 2, 5, 7, 10, 12, ...).
  reset = generator_resets(state.round, cfg.g_life, cfg.warmup_rounds)
  fresh = init_generator(cfg, emb_dim, k_fresh)
  generator = jax.tree_util.tree_map(lambda f, o: jnp.where(reset, f, o), fresh, state.generator)
  use_adv = cfg.weights.adv > 0 and student is not None
  adv_on = (state.round >= cfg.adv_start_round).astype(jnp.float32)
  inv_cfg = dataclasses.replace(cfg, weights=dataclasses.replace(cfg.weights, bn=0.0))
  opt = optax.adam(cfg.lr_g, b1=cfg.betas[0], b2=cfg.betas[1])
  given = None if targets is None else constrain(jnp.asarray(targets, jnp.int32), data_sharding)

  def one_loop(carry, key):
    generator, ema, pool = carry
    k_noisy, k_t, k_steps = jax.random.split(key, 3)
    # 2. Fresh noisy layers, class-cyclic targets, a fresh Adam over all params.
    params = reinit_noisy(generator['params'], k_noisy)
    y = given if given is not None else constrain(class_cyclic_targets(k_t, b, c), data_sharding)
    emb = constrain(state.embeddings[y], data_sharding)                      # [B, E]

    def loss_fn(params, gen_stats, key):
      x, new_vars = gen.apply({'params': params, 'batch_stats': gen_stats}, emb, train=True,
                              mutable=['batch_stats'])
      x = constrain(x.astype(jnp.float32), data_sharding)
      xa, _ = views(cfg, key, x)  # views 'crop': crop (zero padding) + flip + normalize
      xa = constrain(xa, data_sharding)
      out = teacher(xa.astype(cfg.compute_dtype))
      s_logits = student(xa.astype(cfg.compute_dtype), taps=False).logits if use_adv else None
      terms = inversion_terms(inv_cfg, teacher_out=out, rows=b, targets=y,
                              student_logits=s_logits, x=x)
      if use_adv:
        terms['adv'] = adv_on * terms['adv']
      if cfg.weights.bn:
        terms['bn'] = losses.momentum_bn_loss(out.bn, ema, cfg.bn_mmt)
      feats = out.features if out.features is not None else jnp.zeros((b, 0), jnp.float32)
      aux = {'x': x, 'stats': new_vars['batch_stats'], 'terms': terms, 'logits': out.logits,
             'features': feats, 'ema': losses.bn_ema_update(ema, out.bn, cfg.bn_mmt)}
      return weighted_sum(cfg, terms), aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(carry, key):
      params, gen_stats, opt_state, best, ema_next, i = carry
      (loss, aux), grads = grad_fn(params, gen_stats, key)
      updates, new_opt_state = opt.update(grads, opt_state, params)
      # A non-finite step changes nothing; a NaN loss is never kept as the best.
      ok = jnp.isfinite(loss) & all_finite(grads)
      keep = lambda new, old: select(ok, new, old)
      best = track_best(best, {'loss': loss, 'x': aux['x'], 'logits': aux['logits'],
                               'features': aux['features'], 'step': i})
      row = {'loss': loss, **{f'l_{k}': v for k, v in aux['terms'].items()}}
      return (keep(optax.apply_updates(params, updates), params),
              keep(aux['stats'], gen_stats), keep(new_opt_state, opt_state), best,
              keep(aux['ema'], ema_next), i + 1), row

    best0 = {'loss': jnp.array(jnp.inf, jnp.float32),
             'x': jnp.zeros((b,) + tuple(cfg.image_shape), jnp.float32),
             'logits': jnp.zeros((b, c), jnp.float32), 'features': jnp.zeros((b, d), jnp.float32),
             'step': jnp.zeros((), jnp.int32)}
    carry0 = (params, generator['batch_stats'], opt.init(params), best0, ema,
              jnp.zeros((), jnp.int32))
    (params, gen_stats, _, best, ema_next, _), rows = jax.lax.scan(
        step, carry0, jax.random.split(k_steps, cfg.g_steps))
    # 3. EMA from the loop's last (finite) forward; the best iterate into the pool.
    ok = jnp.isfinite(best['loss'])
    ema = select(ok, ema_next, ema)
    pool = ring_add(pool, {'images': to_uint8(best['x']), 'targets': y}, ok)
    out = {'x': best['x'], 'y': y, 'logits': best['logits'], 'features': best['features'],
           'best_loss': best['loss'], 'best_step': best['step'], 'rows': rows}
    return ({'params': params, 'batch_stats': gen_stats}, ema, pool), out

  (generator, ema, pool), outs = jax.lax.scan(
      one_loop, (generator, state.bn_ema, state.pool), jax.random.split(k_loops, loops))
  new_state = NayerState(generator, ema, pool, state.embeddings, state.round + 1)
  last = jax.tree_util.tree_map(lambda a: a[-1], outs)
  metrics = {k: v.reshape(-1) for k, v in outs['rows'].items()}  # [loops * g_steps]
  feats = last['features']
  metrics.update(diagnostics(last['logits'], jnp.concatenate([feats, feats], axis=1),
                              last['y'], c))
  metrics['best_loss'] = last['best_loss']
  metrics['best_step'] = last['best_step']
  metrics['loops_kept'] = jnp.sum(jnp.isfinite(outs['best_loss'])).astype(jnp.int32)
  metrics['generator_reset'] = reset.astype(jnp.int32)
  # Every loop's kept batch, in pool order: [loops * B, ...].
  images = outs['x'].reshape((loops * b,) + tuple(cfg.image_shape))
  kept = outs['y'].reshape(loops * b)
  return new_state, RoundOutput(constrain(images, data_sharding), constrain(kept, data_sharding),
                                metrics)


"""FastDFKD (Fang et al., AAAI 2022; `fast_meta` in the authors' code) as one jittable round.

What persists across rounds (`FastState`): the meta-generator theta (CMI's
generator net) with its meta-Adam (lr_meta = K * lr_g, betas (0.5, 0.999)),
the EMA of the teacher's BN-input statistics (the momentum L_bn), the
keep-everything image pool and the round counter. Nothing else: no head, no bank.

One round (`fast_round`, successor-methods.md section 1.1):
  1. at round `reset_l0_round` (reference: 120 + warmup), re-draw theta's first
     Linear and first BatchNorm (reset_l0);
  2. fresh z ~ N(0, I) [B, nz] and uniform random targets;
  3. a fast copy theta' <- theta and a new inner Adam over {theta' at lr_g, z at lr_z};
  4. K = g_steps inner steps of
       L = bn * L_bn^mmt + oh * CE(t(x_aug), y) + adv * L_adv,
     x_aug = normalise(flip(crop(G_theta'(z)))), L_adv the masked KL at T = 1
     against the frozen (eval-mode) student, on from round `adv_start_round`;
  5. the first-order meta-gradient g = sum_k grad_theta' L(theta'_k, z_k) (k = 0
     included, where theta'_0 = theta), then one meta-Adam step on theta;
  6. the BN EMA from the last inner forward; 7. the lowest-loss (pre-update)
     iterate into the pool.
The ImageNet recipe (zoo-and-datasets.md section 5; preset 'fast_imagenet') is
the same round with four config choices: generator 'deep' (DeepGenerator, a
spatial latent) and views 'resized' (RandomResizedCrop(local_scale) + flip);
z_life > 1: z persists in the state, trained in place by each round's inner Adam
(its Reptile difference is 0, so it gets no meta step) and is redrawn, with a
fresh meta-Adam (meta_reset), every z_life rounds; meta_rule 'reptile': the meta
gradient is theta - theta'_K; pool_iterate 'last': the last inner iterate (the
final forward's images) goes into the pool. CIFAR's defaults (z_life 1,
'fomaml', 'best') reproduce steps 2, 5 and 7 above.
The whole round is one `lax.scan` inside one compiled call. A round with no
finite step (or a non-finite meta-gradient) writes nothing: theta, the meta-Adam,
the EMA and the pool keep their values (the round counter still advances, as CMI's).

The generator's BN runs in train mode (batch statistics) everywhere, so its
running buffers never change an image: the meta-generator's buffers stay as
initialized, as the reference's (only the fast copies run forward there).
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cmi_jax.parallel import constrain
from cmi_jax.state import ClassifierState, select
from cmi_jax.synthesis import gan, losses
from cmi_jax.synthesis.bank import RingBuffer, ring_add
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.synthesis.round_kit import (RoundOutput, all_finite, check_teacher, diagnostics,
                                         init_pool,
                                         inversion_terms, to_uint8, track_best, views,
                                         weighted_sum)
from cmi_jax.teacher import Teacher


class FastState(struct.PyTreeNode):
  """What persists across FastDFKD rounds."""
  gen: ClassifierState    # meta-generator theta (params, BN buffers) + meta-Adam
  bn_ema: losses.BNEma    # EMA of the teacher's BN-input batch statistics
  pool: RingBuffer        # {'images': [pool_size, H, W, C] uint8, 'targets': [pool_size] int32}
  round: jax.Array        # int32 rounds done
  z: jax.Array            # [B, *latent_shape] the latent (redrawn every z_life rounds)


def meta_lr(cfg: SynthesisConfig) -> float:
  """The meta-Adam's learning rate: lr_meta, or K * lr_g (the reference) when lr_meta <= 0."""
  return cfg.lr_meta if cfg.lr_meta > 0 else cfg.g_steps * cfg.lr_g


def torch_default_params(params: Dict[str, Any], rng: jax.Array) -> Dict[str, Any]:
  """PyTorch's default initialization of every layer (the reference's meta-generator is
  never re-initialized, unlike CMI's per-round N(0, 0.02) reset): Linear/Conv weights
  and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BatchNorm scale 1 and bias 0."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  fan_in = {}
  for path, leaf in leaves:
    if path[-1].key == 'kernel':
      fan_in[tuple(p.key for p in path[:-1])] = math.prod(leaf.shape[:-1])
  out = []
  for i, (path, leaf) in enumerate(leaves):
    layer, name = tuple(p.key for p in path[:-1]), path[-1].key
    key = jax.random.fold_in(rng, i)
    if layer in fan_in:  # Linear / Conv: kernel and bias
      bound = 1.0 / fan_in[layer] ** 0.5
      out.append(jax.random.uniform(key, leaf.shape, leaf.dtype, -bound, bound))
    else:  # BatchNorm
      out.append(jnp.ones_like(leaf) if name == 'scale' else jnp.zeros_like(leaf))
  return jax.tree_util.tree_unflatten(treedef, out)


def init_state(cfg: SynthesisConfig, teacher: Teacher, rng: jax.Array) -> FastState:
  """A meta-generator with PyTorch's default init + meta-Adam, an empty BN EMA and pool."""
  if cfg.synthesizer != 'generator':
    raise ValueError(f"synthesis.synthesizer={cfg.synthesizer!r} is invalid for algorithm "
                     "'fast': FastDFKD meta-learns a generator; use 'generator'.")
  check_teacher(cfg, teacher)
  k_shapes, k_params = jax.random.split(rng)
  gen = gan.init_generator_state(dataclasses.replace(cfg, lr_g=meta_lr(cfg)), k_shapes)
  gen = gen.replace(params=torch_default_params(gen.params, k_params))
  gen = gen.replace(opt_state=gen.tx.init(gen.params))
  taps = jax.eval_shape(lambda t: t(jnp.zeros((2,) + tuple(cfg.image_shape))), teacher).bn
  z = jax.random.normal(jax.random.fold_in(rng, 1), (cfg.batch_size,) + cfg.latent_shape,
                        jnp.float32)
  return FastState(gen, losses.bn_ema_init(taps), init_pool(cfg), jnp.zeros((), jnp.int32), z)


def reset_l0(params: Dict[str, Any], rng: jax.Array) -> Dict[str, Any]:
  """The reference's reset_l0: `l1.0` Linear W ~ N(0, 0.02), b = 0, and the first
  BatchNorm (`conv_blocks.0`) gamma ~ N(0, 0.02), beta = 0; the rest unchanged."""
  k_w, k_g = jax.random.split(rng)
  l1, bn0 = params['l1']['0'], params['conv_blocks']['0']
  new_l1 = {'kernel': 0.02 * jax.random.normal(k_w, l1['kernel'].shape, l1['kernel'].dtype),
            'bias': jnp.zeros_like(l1['bias'])}
  new_bn0 = {'scale': 0.02 * jax.random.normal(k_g, bn0['scale'].shape, bn0['scale'].dtype),
             'bias': jnp.zeros_like(bn0['bias'])}
  return {**params, 'l1': {**params['l1'], '0': new_l1},
          'conv_blocks': {**params['conv_blocks'], '0': new_bn0}}


def inner_optimizer(cfg: SynthesisConfig) -> optax.GradientTransformation:
  """The per-round Adam over {'generator': theta' at lr_g, 'z': z at lr_z}."""
  adam = lambda lr: optax.adam(lr, b1=cfg.betas[0], b2=cfg.betas[1])
  labels = lambda p: {'generator': jax.tree_util.tree_map(lambda _: 'generator',
                                                          p['generator']), 'z': 'z'}
  return optax.multi_transform({'generator': adam(cfg.lr_g), 'z': adam(cfg.lr_z)}, labels)


def meta_optimizer(cfg: SynthesisConfig) -> optax.GradientTransformation:
  """The persistent meta-Adam over theta (what `init_state` puts in `gen.tx`)."""
  return optax.adam(meta_lr(cfg), b1=cfg.betas[0], b2=cfg.betas[1])


def round_keys(rng: jax.Array) -> Dict[str, jax.Array]:
  """The round key's named sub-keys (z, targets, inner steps, reset_l0)."""
  k_z, k_t, k_steps, k_reset = jax.random.split(rng, 4)
  return {'z': k_z, 'targets': k_t, 'steps': k_steps, 'reset': k_reset}


def make_loss_fn(cfg: SynthesisConfig, teacher: Teacher, student: Optional[Teacher],
                 gen_stats: Any, ema: losses.BNEma, targets: jax.Array, adv_on: jax.Array,
                 data_sharding: Optional[Any] = None) -> Callable:
  """loss_fn(fast, key) -> (L, aux) for fast = {'generator': params, 'z': [B, *latent]}.

  aux: 'best' (kept at the lowest loss: images, teacher logits and features),
  'last' (kept from the last step: the EMA updated with this forward's
  statistics) and 'row' (the step's unweighted loss terms).
  """
  b = cfg.batch_size
  gen = cfg.make_generator()
  use_adv = cfg.weights.adv > 0 and student is not None
  # inversion_terms computes CE and L_adv; L_bn is the momentum variant here.
  cfg_terms = dataclasses.replace(cfg, weights=dataclasses.replace(cfg.weights, bn=0.0))

  def loss_fn(fast, key):
    x, _ = gen.apply({'params': fast['generator'], 'batch_stats': gen_stats}, fast['z'],
                     train=True, mutable=['batch_stats'])
    x = constrain(x.astype(jnp.float32), data_sharding)
    x_aug, _ = views(cfg, key, x)
    x_aug = constrain(x_aug, data_sharding).astype(cfg.compute_dtype)
    out = teacher(x_aug)
    s_logits = student(x_aug, taps=False).logits if use_adv else None
    terms = inversion_terms(cfg_terms, teacher_out=out, rows=b, targets=targets,
                            student_logits=s_logits, x=x)
    if cfg.weights.bn:
      terms['bn'] = losses.momentum_bn_loss(out.bn, ema, cfg.bn_mmt)
    if 'adv' in terms:
      terms['adv'] = adv_on * terms['adv']
    loss = weighted_sum(cfg, terms)
    feats = out.features if out.features is not None else jnp.zeros((b, 0), jnp.float32)
    aux = {'best': {'x': x, 'logits': out.logits.astype(jnp.float32), 'features': feats},
           'last': losses.bn_ema_update(ema, out.bn, cfg.bn_mmt),
           'row': {f'l_{k}': v for k, v in terms.items()}}
    return loss, aux

  return loss_fn


def inner_loop(loss_fn: Callable, opt: optax.GradientTransformation, fast0: Dict[str, Any],
               keys: jax.Array, keep: str = 'best'):
  """K inner steps (one lax.scan, K = len(keys)) on fast = {'generator', 'z'}.

  Returns (fast_K, meta_grad, best, last, rows): meta_grad = sum over the finite
  steps of d L / d fast['generator'] at the pre-update iterate; best = {'loss',
  'step', 'aux'} of the lowest-loss step (keep 'best') or of the last finite step
  (keep 'last'), both pre-update, NaN never kept; last =
  aux['last'] of the last finite step; rows = per-step {'loss', ...aux['row']}.
  A non-finite step changes neither the iterate, the inner Adam nor meta_grad.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  aux_spec = jax.eval_shape(loss_fn, fast0, keys[0])[1]
  zeros = lambda spec: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), spec)

  def step(carry, key):
    fast, opt_state, acc, best, last, i = carry
    (loss, aux), g = grad_fn(fast, key)
    ok = jnp.isfinite(loss) & all_finite(g)
    updates, new_opt_state = opt.update(g, opt_state, fast)
    sel = lambda new, old: select(ok, new, old)
    new_acc = jax.tree_util.tree_map(jnp.add, acc, g['generator'])
    cand = {'loss': loss, 'step': i, 'aux': aux['best']}
    best = track_best(best, cand) if keep == 'best' else select(ok, cand, best)
    carry = (sel(optax.apply_updates(fast, updates), fast), sel(new_opt_state, opt_state),
             sel(new_acc, acc), best, sel(aux['last'], last), i + 1)
    return carry, {'loss': loss, **aux['row']}

  best0 = {'loss': jnp.array(jnp.inf, jnp.float32), 'step': jnp.zeros((), jnp.int32),
           'aux': zeros(aux_spec['best'])}
  acc0 = jax.tree_util.tree_map(jnp.zeros_like, fast0['generator'])
  carry0 = (fast0, opt.init(fast0), acc0, best0, zeros(aux_spec['last']),
            jnp.zeros((), jnp.int32))
  (fast, _, acc, best, last, _), rows = jax.lax.scan(step, carry0, keys)
  return fast, acc, best, last, rows


def fast_round(cfg: SynthesisConfig, teacher: Teacher, student: Optional[Teacher],
               state: FastState, rng: jax.Array, targets: Optional[jax.Array] = None,
               data_sharding: Optional[Any] = None) -> Tuple[FastState, RoundOutput]:
  """One FastDFKD round (K = g_steps inner steps + one meta step); pure, jit with cfg static.

  Args and returns as `cmi.synthesis_round`: `student` (frozen, eval mode) feeds
  L_adv from round cfg.adv_start_round on (None: off); `targets` default uniform
  random class ids (not sorted or balanced, as the reference).
  """
  b = cfg.batch_size
  keys = round_keys(rng)
  if targets is None:
    targets = jax.random.randint(keys['targets'], (b,), 0, cfg.num_classes)
  targets = constrain(targets, data_sharding)
  theta = state.gen.params
  # A fresh latent (every round when z_life is 1) and, with it, a fresh meta-Adam.
  redraw = (state.round + 1) % cfg.z_life == 0
  z_new = jax.random.normal(keys['z'], (b,) + cfg.latent_shape, jnp.float32)
  z = constrain(jnp.where(redraw, z_new, state.z), data_sharding)
  meta = state.gen
  if cfg.meta_reset:
    meta = meta.replace(opt_state=select(redraw, meta.tx.init(theta), meta.opt_state))
  if cfg.reset_l0_round >= 0:
    theta = jax.tree_util.tree_map(lambda n, o: jnp.where(state.round == cfg.reset_l0_round, n, o),
                                   reset_l0(theta, keys['reset']), theta)
  adv_on = (state.round >= cfg.adv_start_round).astype(jnp.float32)
  loss_fn = make_loss_fn(cfg, teacher, student, state.gen.batch_stats, state.bn_ema, targets,
                         adv_on, data_sharding)
  fast_k, meta_grad, best, ema, rows = inner_loop(
      loss_fn, inner_optimizer(cfg), {'generator': theta, 'z': z},
      jax.random.split(keys['steps'], cfg.g_steps), cfg.pool_iterate)
  if cfg.meta_rule == 'reptile':  # theta - theta'_K, no scale (the reference's is_maml 0)
    meta_grad = jax.tree_util.tree_map(jnp.subtract, theta, fast_k['generator'])

  ok = jnp.isfinite(best['loss']) & all_finite(meta_grad)
  gen = meta.replace(params=theta).apply_gradients(grads=meta_grad)
  keep = lambda new, old: select(ok, new, old)
  kept = best['aux']
  pool = ring_add(state.pool, {'images': to_uint8(kept['x']), 'targets': targets}, ok)
  new_state = FastState(keep(gen, state.gen), keep(ema, state.bn_ema), pool, state.round + 1,
                        keep(fast_k['z'], state.z))
  metrics = dict(rows)
  feats = kept['features']
  # diagnostics reads the second half of [local | global] features: only one view here.
  metrics.update(diagnostics(kept['logits'], jnp.concatenate([feats, feats], 1), targets,
                             cfg.num_classes))
  metrics['best_loss'] = best['loss']
  metrics['best_step'] = best['step']
  metrics['adv_on'] = adv_on
  metrics['z_redrawn'] = redraw.astype(jnp.float32)
  metrics['meta_grad_norm'] = jnp.sqrt(sum(jnp.sum(jnp.square(g))
                                         for g in jax.tree_util.tree_leaves(meta_grad)))
  return new_state, RoundOutput(kept['x'], targets, metrics)

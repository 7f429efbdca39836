"""Inversion loss terms: small pure functions, float32, batch-mean scalars.

L_inv = bn * L_bn + oh * L_oh + adv * L_adv (Eq. 4, CMI), plus the contrastive
term L_cr (Eq. 7) and the baselines' extra priors (class balance, activation,
total variation). Each mirrors the reference code (reference-facts section 2/5).
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from cmi_jax.models.layers import BNTap
from cmi_jax.teacher import subset_batch_stats

ADV_KINDS = ('masked_kl', 'kl', 'js', 'l1')
_MASKED_LOGIT = -1e9


def bn_loss(taps: Sequence[BNTap], rows: Optional[int] = None) -> jax.Array:
  """L_bn (Eq. 1): sum over BN layers of ||mu - running_mean||_2 + ||var - running_var||_2.

  Statistics of each layer's input over the first `rows` samples (all if None);
  L2 norms, not squared, equal weight per layer (DeepInversionHook).
  """
  total = jnp.zeros((), jnp.float32)
  for tap in taps:
    mu, var = subset_batch_stats(tap, rows)
    total = total + jnp.linalg.norm(mu - tap.running_mean) + jnp.linalg.norm(var - tap.running_var)
  return total


class BNEma(NamedTuple):
  """EMA of the teacher's per-layer BN-input batch statistics, carried across
  rounds (FastDFKD's momentum BN term; NAYER reuses it).

  mean, var: one [C] float32 array per BN layer, forward order.
  valid: float32 scalar, 0 before the first round has written the EMA.
  """
  mean: Tuple[jax.Array, ...]
  var: Tuple[jax.Array, ...]
  valid: jax.Array


def bn_ema_init(taps_spec: Sequence[BNTap]) -> BNEma:
  """An empty EMA shaped like the teacher's BN layers (e.g. from jax.eval_shape)."""
  zeros = lambda: tuple(jnp.zeros(t.running_mean.shape, jnp.float32) for t in taps_spec)
  # Separate buffers for mean and var: a jitted round may donate the state.
  return BNEma(zeros(), zeros(), jnp.zeros((), jnp.float32))


def batch_bn_stats(taps: Sequence[BNTap], rows: Optional[int] = None
                   ) -> Tuple[Tuple[jax.Array, ...], Tuple[jax.Array, ...]]:
  """Per-layer batch mean and biased variance of the BN inputs (first `rows` rows)."""
  stats = [subset_batch_stats(t, rows) for t in taps]
  return tuple(m for m, _ in stats), tuple(v for _, v in stats)


def momentum_bn_loss(taps: Sequence[BNTap], ema: BNEma, momentum: float,
                     rows: Optional[int] = None) -> jax.Array:
  """Momentum L_bn (FastDFKD, `hooks.py` InstanceMeanHook with mmt):

    sum_l ||var_run - ((1-m) var_b + m var_ema)||_2 + ||mu_run - ((1-m) mu_b + m mu_ema)||_2

  with m = momentum while the EMA holds statistics (ema.valid = 1) and m = 0
  before (the plain `bn_loss`). The EMA is a constant here (no gradient).
  """
  m = momentum * ema.valid
  total = jnp.zeros((), jnp.float32)
  for tap, e_mu, e_var in zip(taps, ema.mean, ema.var):
    mu, var = subset_batch_stats(tap, rows)
    mu_mix = (1.0 - m) * mu + m * jax.lax.stop_gradient(e_mu)
    var_mix = (1.0 - m) * var + m * jax.lax.stop_gradient(e_var)
    total = total + jnp.linalg.norm(var_mix - tap.running_var) + \
        jnp.linalg.norm(mu_mix - tap.running_mean)
  return total


def bn_ema_update(ema: BNEma, taps: Sequence[BNTap], momentum: float,
                  rows: Optional[int] = None) -> BNEma:
  """ema <- m * ema + (1 - m) * batch statistics; the first update copies them."""
  mus, vars_ = batch_bn_stats(taps, rows)
  m = momentum * ema.valid
  mix = lambda old, new: jax.lax.stop_gradient(m * old + (1.0 - m) * new)
  return BNEma(tuple(mix(o, n) for o, n in zip(ema.mean, mus)),
               tuple(mix(o, n) for o, n in zip(ema.var, vars_)),
               jnp.ones((), jnp.float32))


def oh_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """L_oh (Eq. 2): cross-entropy of the teacher's logits against the class targets."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def kl_per_sample(p_logits: jax.Array, q_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """KL(softmax(p/T) || softmax(q/T)) per row: sum_c p_c (log p_c - log q_c)."""
  lp = jax.nn.log_softmax(p_logits / temperature, axis=-1)
  lq = jax.nn.log_softmax(q_logits / temperature, axis=-1)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def adv_loss(*, teacher_logits: jax.Array, student_logits: jax.Array, kind: str = 'masked_kl',
             temperature: float = 1.0) -> jax.Array:
  """L_adv: push the student away from the teacher (to be minimized).

  masked_kl: -mean(1[argmax t == argmax s] * KL(t || s)) (Eq. 10, decision-adversarial);
  kl: -mean KL(t || s) (ZSKT/DFQ); js: -JS(s, t) at `temperature` (DeepInversion's
  competition term); l1: -mean |s - t| (DFAD).
  """
  if kind == 'masked_kl':
    mask = (jnp.argmax(teacher_logits, -1) == jnp.argmax(student_logits, -1)).astype(jnp.float32)
    return -jnp.mean(mask * kl_per_sample(teacher_logits, student_logits, temperature))
  if kind == 'kl':
    return -jnp.mean(kl_per_sample(teacher_logits, student_logits, temperature))
  if kind == 'js':
    pt = jax.nn.softmax(teacher_logits / temperature, -1)
    ps = jax.nn.softmax(student_logits / temperature, -1)
    m = jnp.clip(0.5 * (pt + ps), 1e-7, 1.0)
    # Jensen-Shannon: 0.5 * (KL(p_s || m) + KL(p_t || m)), clipped for finite logs.
    js = 0.5 * (jnp.sum(ps * (jnp.log(jnp.clip(ps, 1e-7)) - jnp.log(m)), -1)
                + jnp.sum(pt * (jnp.log(jnp.clip(pt, 1e-7)) - jnp.log(m)), -1))
    return -jnp.mean(js)
  if kind == 'l1':
    return -jnp.mean(jnp.abs(student_logits - teacher_logits))
  raise ValueError(f'adv kind must be one of {ADV_KINDS}, got {kind!r}.')


def contrastive_loss(proj_local: jax.Array, proj_global: jax.Array, num_current: int,
                     bank_valid: Optional[jax.Array], temperature: float) -> jax.Array:
  """L_cr (Eq. 7): instance discrimination between local and global views.

  Args:
    proj_local, proj_global: [M, d] L2-normalized head outputs; rows
      [:num_current] are this batch, rows [num_current:] come from the bank.
    num_current: B, the synthesis batch size.
    bank_valid: [M - B] bool, which bank rows are real (filled slots); None
      when no bank rows are passed.
    temperature: cr_T.
  Returns:
    mean CE over the B current rows + mean CE over the valid bank rows (the
    plain mean of the current rows while the bank is empty). Positive of row i
    is column i; invalid bank columns are excluded; the global branch is
    stop-gradient (only local views and the head receive gradients).
  """
  logits = proj_local @ jax.lax.stop_gradient(proj_global).T / temperature  # [M, M]
  m = logits.shape[0]
  if bank_valid is not None:
    col_ok = jnp.concatenate([jnp.ones((num_current,), bool), bank_valid])
    # A finite stand-in for -inf: exp() underflows to exactly 0 for the valid
    # rows, and the masked-out rows stay finite so no NaN reaches the gradient.
    logits = jnp.where(col_ok[None, :], logits, _MASKED_LOGIT)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(m))
  loss = jnp.mean(ce[:num_current])
  if bank_valid is not None:
    n_valid = jnp.sum(bank_valid)
    bank_term = jnp.sum(jnp.where(bank_valid, ce[num_current:], 0.0)) / jnp.maximum(n_valid, 1)
    loss = loss + bank_term
  return loss


def balance_loss(logits: jax.Array) -> jax.Array:
  """Class-balance prior (DAFL/DFQ): sum_c p_c log p_c of the batch-mean softmax
  (minimizing it maximizes the entropy of the predicted class distribution)."""
  p = jnp.mean(jax.nn.softmax(logits, -1), axis=0)
  return jnp.sum(p * jnp.log(jnp.clip(p, 1e-12)))


def activation_loss(features: jax.Array) -> jax.Array:
  """DAFL activation prior: -mean |penultimate features|."""
  return -jnp.mean(jnp.abs(features))


def tv_loss(x: jax.Array) -> jax.Array:
  """Total-variation prior (DeepInversion, L1): mean absolute differences between
  horizontal, vertical and both diagonal neighbours, summed. x: [B, H, W, C]."""
  d1 = x[:, :, :-1] - x[:, :, 1:]
  d2 = x[:, :-1, :] - x[:, 1:, :]
  d3 = x[:, 1:, :-1] - x[:, :-1, 1:]
  d4 = x[:, :-1, :-1] - x[:, 1:, 1:]
  return sum(jnp.mean(jnp.abs(d)) for d in (d1, d2, d3, d4))

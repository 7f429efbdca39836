"""Inversion loss terms and the contrastive head against independent numpy code.

Every reference below is written from reference-facts (sections 2 and 5) in
float64 numpy; nothing calls the library to compute an expected value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax.models import BatchNorm, BNTap, Head
from cmi_jax.synthesis import losses

RTOL = 1e-5
ATOL = 1e-6


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_softmax(z):
  return np.exp(_np_log_softmax(z))


def _np_kl(p_logits, q_logits, t=1.0):
  lp = _np_log_softmax(np.asarray(p_logits, np.float64) / t)
  lq = _np_log_softmax(np.asarray(q_logits, np.float64) / t)
  return np.sum(np.exp(lp) * (lp - lq), -1)


def _f32(x):
  return jnp.asarray(np.asarray(x, np.float32))


# ---------------------------------------------------------------------------
# L_bn
# ---------------------------------------------------------------------------


def _raw_layers(seed=0, n=6):
  """Raw BN-layer inputs of different shapes, with running stats [C]."""
  rng = np.random.default_rng(seed)
  layers = []
  for shape in ((n, 4, 4, 3), (n, 2, 3, 5), (n, 1, 1, 2)):
    c = shape[-1]
    act = rng.normal(rng.normal(size=c), rng.uniform(0.5, 2.0, size=c), size=shape)
    rm = rng.normal(size=c)
    rv = rng.uniform(0.2, 3.0, size=c)
    layers.append((act.astype(np.float32), rm.astype(np.float32), rv.astype(np.float32)))
  return layers


def _np_bn_loss(layers, rows=None):
  total = 0.0
  for act, rm, rv in layers:
    a = np.asarray(act, np.float64)[:rows]
    mu = a.mean(axis=(0, 1, 2))
    var = a.var(axis=(0, 1, 2))  # biased
    total += np.linalg.norm(mu - rm) + np.linalg.norm(var - rv)
  return total


def _taps_from_raw(layers):
  """BNTaps from raw activations: per-sample spatial mean / biased variance."""
  return [BNTap(_f32(a.mean((1, 2))), _f32(a.var((1, 2))), _f32(rm), _f32(rv))
          for a, rm, rv in layers]


@pytest.mark.parametrize('rows', [None, 4, 1])
def test_bn_loss_matches_numpy(rows):
  layers = _raw_layers()
  got = losses.bn_loss(_taps_from_raw(layers), rows)
  np.testing.assert_allclose(got, _np_bn_loss(layers, rows), rtol=RTOL)


def test_bn_loss_from_batchnorm_taps():
  """The taps sown by the BN module itself give the same L_bn."""
  layers = _raw_layers(seed=1)
  taps = []
  for act, rm, rv in layers:
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.zeros(act.shape), train=False)
    variables = {'params': variables['params'],
                 'batch_stats': {'mean': _f32(rm), 'var': _f32(rv)}}
    _, state = bn.apply(variables, _f32(act), train=False, mutable=['taps'])
    (tap,) = state['taps']['bn']
    taps.append(tap)
  for rows in (None, 3):
    np.testing.assert_allclose(losses.bn_loss(taps, rows), _np_bn_loss(layers, rows),
                               rtol=RTOL)


def test_bn_loss_norms_not_squared():
  """One layer whose input has mean 3 and variance 4 against (0, 1): 3*sqrt(C) + 3*sqrt(C)."""
  c = 4
  tap = BNTap(jnp.full((2, c), 3.0), jnp.full((2, c), 4.0), jnp.zeros(c), jnp.ones(c))
  np.testing.assert_allclose(losses.bn_loss([tap]), 6.0 * np.sqrt(c), rtol=RTOL)


# ---------------------------------------------------------------------------
# L_oh, KL, L_adv
# ---------------------------------------------------------------------------


def test_oh_loss_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(5, 4)) * 3
  targets = np.array([0, 3, 1, 1, 2])
  want = -np.mean(_np_log_softmax(logits)[np.arange(5), targets])
  np.testing.assert_allclose(losses.oh_loss(_f32(logits), jnp.asarray(targets)), want,
                             rtol=RTOL)


@pytest.mark.parametrize('t', [1.0, 3.0, 20.0])
def test_kl_per_sample_matches_numpy(t):
  rng = np.random.default_rng(3)
  p, q = rng.normal(size=(2, 6, 5)) * 4
  got = losses.kl_per_sample(_f32(p), _f32(q), t)
  np.testing.assert_allclose(got, _np_kl(p, q, t), rtol=RTOL, atol=ATOL)


def _logits_with_agreement(agree, k=5, seed=4):
  """Teacher/student logits whose argmaxes agree exactly on rows where `agree`."""
  rng = np.random.default_rng(seed)
  n = len(agree)
  t = rng.normal(size=(n, k))
  s = rng.normal(size=(n, k))
  t_arg = rng.integers(0, k, n)
  t[np.arange(n), t_arg] += 5.0
  s_arg = np.where(agree, t_arg, (t_arg + 1 + rng.integers(0, k - 1, n)) % k)
  s[np.arange(n), s_arg] += 5.0
  assert np.array_equal(t.argmax(1) == s.argmax(1), np.asarray(agree))
  return t, s


def test_adv_masked_kl_partial_mask():
  agree = np.array([1, 0, 1, 1, 0, 0], bool)
  t, s = _logits_with_agreement(agree)
  kl = _np_kl(t, s)
  want = -np.mean(agree * kl)
  got = losses.adv_loss(teacher_logits=_f32(t), student_logits=_f32(s), kind='masked_kl')
  np.testing.assert_allclose(got, want, rtol=RTOL)
  # The mask matters here: the unmasked mean is far from it.
  assert abs(-np.mean(kl) - want) > 0.1


def test_adv_masked_kl_all_disagree_is_zero():
  t, s = _logits_with_agreement(np.zeros(4, bool), seed=5)
  got = losses.adv_loss(teacher_logits=_f32(t), student_logits=_f32(s), kind='masked_kl')
  assert float(got) == 0.0


@pytest.mark.parametrize('t_temp', [1.0, 4.0])
def test_adv_kl_matches_numpy(t_temp):
  t, s = _logits_with_agreement(np.array([1, 0, 0, 1, 0], bool), seed=6)
  got = losses.adv_loss(teacher_logits=_f32(t), student_logits=_f32(s), kind='kl',
                        temperature=t_temp)
  np.testing.assert_allclose(got, -np.mean(_np_kl(t, s, t_temp)), rtol=RTOL)


@pytest.mark.parametrize('t_temp', [1.0, 3.0])
def test_adv_js_matches_numpy(t_temp):
  rng = np.random.default_rng(7)
  t, s = rng.normal(size=(2, 6, 5)) * 3
  pt, ps = _np_softmax(t / t_temp), _np_softmax(s / t_temp)
  m = 0.5 * (pt + ps)
  js = 0.5 * (np.sum(ps * np.log(ps / m), -1) + np.sum(pt * np.log(pt / m), -1))
  got = losses.adv_loss(teacher_logits=_f32(t), student_logits=_f32(s), kind='js',
                        temperature=t_temp)
  np.testing.assert_allclose(got, -np.mean(js), rtol=RTOL)
  # Symmetric in its arguments, unlike KL.
  swapped = losses.adv_loss(teacher_logits=_f32(s), student_logits=_f32(t), kind='js',
                            temperature=t_temp)
  np.testing.assert_allclose(swapped, got, rtol=RTOL)


def test_adv_l1_matches_numpy():
  rng = np.random.default_rng(8)
  t, s = rng.normal(size=(2, 4, 3))
  got = losses.adv_loss(teacher_logits=_f32(t), student_logits=_f32(s), kind='l1')
  np.testing.assert_allclose(got, -np.mean(np.abs(s - t)), rtol=RTOL)


def test_adv_unknown_kind_raises():
  with pytest.raises(ValueError, match='adv kind'):
    losses.adv_loss(teacher_logits=jnp.zeros((2, 3)), student_logits=jnp.zeros((2, 3)),
                    kind='mse')


# ---------------------------------------------------------------------------
# L_cr
# ---------------------------------------------------------------------------

B, K, DIM, CR_T = 4, 6, 8, 0.1
BANK_VALID = np.array([1, 0, 1, 1, 0, 0], bool)


def _unit_rows(n, d, seed):
  x = np.random.default_rng(seed).normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _np_contrastive(pl, pg, b, valid, t):
  """Loss and d loss / d pl, computed on the valid subset only."""
  pl, pg = np.asarray(pl, np.float64), np.asarray(pg, np.float64)
  keep = np.ones(len(pl), bool)
  if valid is not None:
    keep[b:] = valid
  logits = pl[keep] @ pg[keep].T / t
  ls = _np_log_softmax(logits)
  ce = -np.diag(ls)
  n_bank = keep.sum() - b
  loss = ce[:b].mean() + (ce[b:].mean() if n_bank else 0.0)
  w = np.concatenate([np.full(b, 1.0 / b), np.full(n_bank, 1.0 / max(n_bank, 1))])
  dlogits = w[:, None] * (np.exp(ls) - np.eye(len(w)))
  grad = np.zeros_like(pl)
  grad[keep] = dlogits @ pg[keep] / t
  return loss, grad


def test_contrastive_no_bank_matches_numpy():
  pl, pg = _unit_rows(B, DIM, 10), _unit_rows(B, DIM, 11)
  got = losses.contrastive_loss(_f32(pl), _f32(pg), B, None, CR_T)
  want, _ = _np_contrastive(pl, pg, B, None, CR_T)
  np.testing.assert_allclose(got, want, rtol=RTOL)


def test_contrastive_with_bank_excludes_invalid_rows_and_columns():
  pl, pg = _unit_rows(B + K, DIM, 12), _unit_rows(B + K, DIM, 13)
  # Make the positives likelier than chance, as after some training.
  pg = pg + 0.5 * pl
  pg /= np.linalg.norm(pg, axis=1, keepdims=True)
  got = losses.contrastive_loss(_f32(pl), _f32(pg), B, jnp.asarray(BANK_VALID), CR_T)
  want, _ = _np_contrastive(pl, pg, B, BANK_VALID, CR_T)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  # Including the invalid slots (as rows or as negatives) would be far off.
  all_in, _ = _np_contrastive(pl, pg, B, np.ones(K, bool), CR_T)
  assert abs(all_in - want) > 0.1


def test_contrastive_gradients():
  pl, pg = _unit_rows(B + K, DIM, 14), _unit_rows(B + K, DIM, 15)
  fn = lambda a, b: losses.contrastive_loss(a, b, B, jnp.asarray(BANK_VALID), CR_T)
  g_l, g_g = jax.grad(fn, argnums=(0, 1))(_f32(pl), _f32(pg))
  # The global branch is stop-gradient: exactly zero.
  assert np.all(np.asarray(g_g) == 0.0)
  g_l = np.asarray(g_l)
  assert np.all(np.isfinite(g_l))
  assert np.abs(g_l[:B]).max() > 1e-3
  # Invalid bank rows take no part at all.
  assert np.all(g_l[B:][~BANK_VALID] == 0.0)
  _, want = _np_contrastive(pl, pg, B, BANK_VALID, CR_T)
  np.testing.assert_allclose(g_l, want, rtol=1e-4, atol=1e-5)


def test_contrastive_empty_bank_is_plain_mean():
  pl, pg = _unit_rows(B + K, DIM, 16), _unit_rows(B + K, DIM, 17)
  empty = jnp.zeros((K,), bool)
  got = losses.contrastive_loss(_f32(pl), _f32(pg), B, empty, CR_T)
  want, _ = _np_contrastive(pl[:B], pg[:B], B, None, CR_T)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  g_l = jax.grad(lambda a: losses.contrastive_loss(a, _f32(pg), B, empty, CR_T))(_f32(pl))
  assert np.all(np.isfinite(np.asarray(g_l)))
  assert np.all(np.asarray(g_l)[B:] == 0.0)


# ---------------------------------------------------------------------------
# Baseline priors
# ---------------------------------------------------------------------------


def test_balance_loss_matches_numpy():
  rng = np.random.default_rng(20)
  logits = rng.normal(size=(7, 5)) * 2
  p = _np_softmax(logits).mean(0)
  np.testing.assert_allclose(losses.balance_loss(_f32(logits)), np.sum(p * np.log(p)),
                             rtol=RTOL)
  # Perfectly balanced predictions reach the minimum, -log K.
  np.testing.assert_allclose(losses.balance_loss(jnp.eye(5) * 30.0), -np.log(5), rtol=1e-4)


def test_activation_loss_matches_numpy():
  f = np.random.default_rng(21).normal(size=(6, 9))
  np.testing.assert_allclose(losses.activation_loss(_f32(f)), -np.mean(np.abs(f)), rtol=RTOL)


def test_tv_loss_matches_numpy():
  x = np.random.default_rng(22).uniform(size=(2, 5, 7, 3))  # NHWC, H != W
  want = (np.abs(x[:, :, :-1] - x[:, :, 1:]).mean()          # horizontal
          + np.abs(x[:, :-1, :] - x[:, 1:, :]).mean()        # vertical
          + np.abs(x[:, 1:, :-1] - x[:, :-1, 1:]).mean()     # anti-diagonal
          + np.abs(x[:, :-1, :-1] - x[:, 1:, 1:]).mean())    # diagonal
  np.testing.assert_allclose(losses.tv_loss(_f32(x)), want, rtol=RTOL)
  # A constant image has no variation; a vertical stripe pattern only horizontal ones.
  assert float(losses.tv_loss(jnp.ones((1, 4, 4, 1)))) == 0.0
  stripes = np.tile(np.array([0.0, 1.0]), 2)[None, None, :, None].repeat(4, axis=1)
  np.testing.assert_allclose(losses.tv_loss(_f32(stripes)), 1.0 + 0.0 + 1.0 + 1.0, rtol=RTOL)


# ---------------------------------------------------------------------------
# Head
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['mlp', 'linear', 'none'])
def test_head_unit_norm_and_numpy_mlp(kind):
  d, head_dim = 12, 6
  x = np.random.default_rng(30).normal(size=(5, d)).astype(np.float32)
  head = Head(kind=kind, head_dim=head_dim)
  variables = head.init(jax.random.key(1), jnp.zeros((1, d)))
  out = np.asarray(head.apply(variables, _f32(x)))
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)

  h = np.asarray(x, np.float64)
  if kind != 'none':
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params']['head'])
    h = h @ p['0']['kernel'] + p['0']['bias']
    if kind == 'mlp':
      assert p['0']['kernel'].shape == (d, d)
      h = np.maximum(h, 0.0) @ p['2']['kernel'] + p['2']['bias']
  else:
    assert not variables.get('params')
  want = h / np.linalg.norm(h, axis=1, keepdims=True)
  assert out.shape == want.shape == (5, d if kind == 'none' else head_dim)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)

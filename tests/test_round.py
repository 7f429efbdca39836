"""The jitted synthesis round on a tiny random wrn_16_1 teacher (8x8 images).

Three configs share this module, each compiled once (the round takes ~20 s to
compile on a loaded 2-core CPU): CMI with contrast and the adversarial term,
the same without contrast or student, and DeepInversion's pixel synthesizer.
Expected values are recomputed here from the returned images with numpy
(loss terms, uint8 quantization, features), never read back from the round.
"""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import models
from cmi_jax.synthesis import cmi, round_kit
from cmi_jax.synthesis.config import LossWeights, SynthesisConfig
from cmi_jax.teacher import Teacher

pytestmark = pytest.mark.usefixtures('compilation_cache')  # whole runs: see conftest

NUM_CLASSES = 4
B = 8
D_WRN_16_1 = 464  # BN-input channels of wrn_16_1: 4*16 + (16 + 3*32) + (32 + 3*64) + 64
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

# global_padding=0 makes the global view x or flip(x) per sample, so the
# features and loss terms of the kept iterate can be recomputed from its images.
CFG_CMI = SynthesisConfig(
    image_shape=(8, 8, 1), num_classes=NUM_CLASSES, mean=(0.5,), std=(0.25,), batch_size=B,
    g_steps=4, lr_g=0.05, lr_head=0.01, n_neg=12, head_dim=8, bank_size=24, pool_size=32,
    nz=8, ngf=4, global_padding=0).validate()
CFG_NO_CR = dataclasses.replace(CFG_CMI, weights=LossWeights(cr=0.0)).validate()
# jitter=1: the (whole-batch) roll + flip has 3 * 3 * 2 outcomes, all enumerable.
CFG_PIXELS = SynthesisConfig(
    image_shape=(8, 8, 3), num_classes=NUM_CLASSES, mean=CIFAR_MEAN, std=CIFAR_STD,
    batch_size=B, g_steps=5, lr_g=0.1, betas=(0.5, 0.99),
    weights=LossWeights(bn=10.0, oh=1.0, adv=1.0, cr=0.0, tv=0.001), adv_kind='js',
    adv_temperature=3.0, synthesizer='pixels', views='jitter', jitter=1, head_dim=8,
    bank_size=8, pool_size=16).validate()

TRACES = collections.Counter()


def _counted_round(cfg, teacher, student, state, rng):
  TRACES[cfg] += 1
  return cmi.synthesis_round(cfg, teacher, student, state, rng)


ROUND = jax.jit(_counted_round, static_argnums=0)


def _run(cfg, teacher, student, state, seed):
  return ROUND(cfg, teacher, student, state, jax.random.key(seed))


# ---------------------------------------------------------------------------
# Networks and numpy references
# ---------------------------------------------------------------------------


def _nets(channels, seed, mean, std):
  """A random teacher with running stats near those of random images, and a
  student close to it (so the adversarial mask is not all zero)."""
  module = models.get('wrn_16_1', NUM_CLASSES)
  variables = models.init(module, jax.random.key(seed), (2, 8, 8, channels))
  rng = np.random.default_rng(seed)
  # One train-mode pass on uniform noise images: running <- 0.9 running + 0.1 batch,
  # solved for batch.
  x = (rng.uniform(size=(32, 8, 8, channels)) - np.asarray(mean)) / np.asarray(std)
  x = jnp.asarray(x, jnp.float32)
  _, new = module.apply(variables, x, train=True, mutable=['batch_stats', 'taps'])
  batch = jax.tree_util.tree_map(lambda n, o: (n - 0.9 * o) / 0.1, new['batch_stats'],
                                 variables['batch_stats'])
  stats = jax.tree_util.tree_map(
      lambda a: a * jnp.asarray(rng.uniform(0.7, 1.4, a.shape), jnp.float32), batch)
  teacher = Teacher(module, {'params': variables['params'], 'batch_stats': stats})
  params = jax.tree_util.tree_map(
      lambda a: a + 0.2 * jnp.asarray(rng.normal(size=a.shape), a.dtype) * jnp.std(a),
      variables['params'])
  student = Teacher(module, {'params': params, 'batch_stats': stats})
  return teacher, student


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _normalize(x, cfg):
  return (np.asarray(x, np.float32) - np.float32(cfg.mean)) / np.float32(cfg.std)


def _np_terms(cfg, teacher, student, view, x, targets):
  """Unweighted L_inv terms of a (normalized) global view, in numpy."""
  out = teacher(jnp.asarray(view))
  terms = {'bn': 0.0}
  for tap in out.bn:
    m, v = np.asarray(tap.mean, np.float64), np.asarray(tap.var, np.float64)
    mu = m.mean(0)
    var = v.mean(0) + ((m - mu) ** 2).mean(0)  # total variance of the batch
    terms['bn'] += (np.linalg.norm(mu - np.asarray(tap.running_mean))
                    + np.linalg.norm(var - np.asarray(tap.running_var)))
  lt = _log_softmax(out.logits)
  terms['oh'] = -np.mean(lt[np.arange(len(targets)), targets])
  if student is not None and cfg.weights.adv:
    s_logits = np.asarray(student(jnp.asarray(view), taps=False).logits)
    if cfg.adv_kind == 'masked_kl':
      ls = _log_softmax(s_logits)
      mask = lt.argmax(-1) == ls.argmax(-1)
      terms['adv'] = -np.mean(mask * np.sum(np.exp(lt) * (lt - ls), -1))
    else:  # js at the configured temperature
      tt = cfg.adv_temperature
      pt = np.exp(_log_softmax(np.asarray(out.logits) / tt))
      ps = np.exp(_log_softmax(s_logits / tt))
      m = 0.5 * (pt + ps)
      terms['adv'] = -np.mean(0.5 * (np.sum(ps * np.log(ps / m), -1)
                                     + np.sum(pt * np.log(pt / m), -1)))
  if cfg.weights.tv:  # on normalized pixels (reference DeepInversion)
    x = (np.asarray(x, np.float64) - np.asarray(cfg.mean)) / np.asarray(cfg.std)
    terms['tv'] = sum(np.abs(d).mean() for d in (
        x[:, :, :-1] - x[:, :, 1:], x[:, :-1] - x[:, 1:],
        x[:, 1:, :-1] - x[:, :-1, 1:], x[:, :-1, :-1] - x[:, 1:, 1:]))
  return terms, np.asarray(out.features)


def _weighted(cfg, terms):
  return sum(getattr(cfg.weights, k) * v for k, v in terms.items())


# ---------------------------------------------------------------------------
# Fixtures: each config compiled once, rounds run once
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def gray_nets():
  return _nets(1, 0, CFG_CMI.mean, CFG_CMI.std)


@pytest.fixture(scope='module')
def cmi_rounds(gray_nets):
  """Three CMI rounds chained from a fresh state (the bank is partly filled in round 2)."""
  teacher, student = gray_nets
  states = [cmi.init_state(CFG_CMI, teacher, jax.random.key(100))]
  outs = []
  for seed in (1, 2, 3):
    state, out = _run(CFG_CMI, teacher, student, states[-1], seed)
    states.append(state)
    outs.append(out)
  return states, outs


@pytest.fixture(scope='module')
def no_cr_round(gray_nets):
  teacher, _ = gray_nets
  state0 = cmi.init_state(CFG_NO_CR, teacher, jax.random.key(100))
  state1, out = _run(CFG_NO_CR, teacher, None, state0, 1)
  return state0, state1, out


@pytest.fixture(scope='module')
def pixel_round():
  teacher, student = _nets(3, 5, CIFAR_MEAN, CIFAR_STD)
  state0 = cmi.init_state(CFG_PIXELS, teacher, jax.random.key(100))
  state1, out = _run(CFG_PIXELS, teacher, student, state0, 7)
  return (teacher, student), state0, state1, out


# ---------------------------------------------------------------------------
# Lowest-loss selection
# ---------------------------------------------------------------------------


def _assert_best_is_argmin(metrics):
  loss = np.asarray(metrics['loss'])
  best = int(metrics['best_step'])
  assert np.all(np.isfinite(loss))
  assert best == int(np.argmin(loss))
  assert float(metrics['best_loss']) == loss[best]
  return best


def test_cmi_round_keeps_lowest_loss_iterate(gray_nets, cmi_rounds):
  """Images, bank features and logged terms all belong to iterate best_step.

  The global view of sample i is x_i or its mirror image: which one is read off
  the bank's global features, then L_bn, L_oh and L_adv of that view are
  recomputed and must equal the terms logged at best_step. Had the round kept
  the images after that step's update (or the previous iterate's), they would
  match a neighbouring step or none (checked: the steps differ clearly).
  """
  teacher, student = gray_nets
  states, outs = cmi_rounds
  for r, out in enumerate(outs):
    m = jax.device_get(out.metrics)
    best = _assert_best_is_argmin(m)
    x = np.asarray(out.images)
    bank_g = np.asarray(states[r + 1].bank.data)[r * B:(r + 1) * B, D_WRN_16_1:]
    _, f_plain = _np_terms(CFG_CMI, teacher, None, _normalize(x, CFG_CMI), x, out.targets)
    _, f_flip = _np_terms(CFG_CMI, teacher, None, _normalize(x[:, :, ::-1], CFG_CMI), x,
                          out.targets)
    d_plain = np.abs(f_plain - bank_g).max(1)
    d_flip = np.abs(f_flip - bank_g).max(1)
    flip = d_flip < d_plain
    tol = 1e-4 * np.abs(bank_g).max()
    assert np.all(np.minimum(d_plain, d_flip) < tol)
    assert np.all(np.maximum(d_plain, d_flip) > 100 * tol)  # the two views are distinguishable
    view = _normalize(np.where(flip[:, None, None, None], x[:, :, ::-1], x), CFG_CMI)
    terms, _ = _np_terms(CFG_CMI, teacher, student, view, x, np.asarray(out.targets))
    for k, v in terms.items():
      logged = np.asarray(m[f'l_{k}'])
      np.testing.assert_allclose(logged[best], v, rtol=2e-5, atol=1e-6, err_msg=k)
    for j in range(CFG_CMI.g_steps):
      if j != best:  # far beyond the tolerance above
        assert abs(m['l_bn'][j] - terms['bn']) > 2e-4 * terms['bn'], (j, best)


def test_pixel_round_keeps_lowest_loss_iterate(pixel_round):
  """Full loss of the returned pixels under one of the 18 possible jitters == loss[best]."""
  (teacher, student), _, _, out = pixel_round
  m = jax.device_get(out.metrics)
  best = _assert_best_is_argmin(m)
  x = np.asarray(out.images)
  targets = np.asarray(out.targets)
  candidates = []
  for sy in (-1, 0, 1):
    for sx in (-1, 0, 1):
      rolled = np.roll(x, (sy, sx), axis=(1, 2))
      for v in (rolled, rolled[:, :, ::-1]):
        terms, _ = _np_terms(CFG_PIXELS, teacher, student, _normalize(v, CFG_PIXELS), x,
                             targets)
        candidates.append(terms)
  totals = np.array([_weighted(CFG_PIXELS, t) for t in candidates])
  i = int(np.argmin(np.abs(totals - m['loss'][best])))
  np.testing.assert_allclose(totals[i], m['loss'][best], rtol=2e-5)
  for k, v in candidates[i].items():
    np.testing.assert_allclose(m[f'l_{k}'][best], v, rtol=2e-5, atol=1e-6, err_msg=k)
  others = np.delete(np.asarray(m['loss']), best)
  assert np.all(np.abs(others - m['loss'][best]) > 1e-3 * abs(m['loss'][best]))


# ---------------------------------------------------------------------------
# Determinism, state updates
# ---------------------------------------------------------------------------


def test_round_is_deterministic(gray_nets, cmi_rounds):
  teacher, student = gray_nets
  states, outs = cmi_rounds
  again_state, again = _run(CFG_CMI, teacher, student, states[0], 1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(again),
                         jax.device_get(outs[0]))
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get((again_state.bank, again_state.pool, again_state.head)),
                         jax.device_get((states[1].bank, states[1].pool, states[1].head)))
  _, other = _run(CFG_CMI, teacher, student, states[0], 4)
  assert np.abs(np.asarray(other.images) - np.asarray(outs[0].images)).max() > 1e-3


def test_round_writes_pool_and_bank(cmi_rounds):
  states, outs = cmi_rounds
  assert states[0].bank.data.shape == (CFG_CMI.bank_size, 2 * D_WRN_16_1)
  for r, out in enumerate(outs):
    prev, new = states[r], states[r + 1]
    assert int(new.round) == r + 1
    assert int(new.pool.count) == int(prev.pool.count) + B == (r + 1) * B
    assert int(new.bank.count) == min(int(prev.bank.count) + B, CFG_CMI.bank_size)
    x = np.asarray(out.images)
    assert x.dtype == np.float32 and x.shape == (B, 8, 8, 1)
    assert x.min() >= 0.0 and x.max() <= 1.0
    rows = slice(r * B, (r + 1) * B)
    want_u8 = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(new.pool.data['images'])[rows], want_u8)
    t = np.asarray(out.targets)
    assert np.all(np.diff(t) >= 0) and t.min() >= 0 and t.max() < NUM_CLASSES
    np.testing.assert_array_equal(np.asarray(new.pool.data['targets'])[rows], t)
    feats = np.asarray(new.bank.data)[rows]
    assert np.all(np.isfinite(feats))
    # [local | global]: different views, so different halves.
    assert np.abs(feats[:, :D_WRN_16_1] - feats[:, D_WRN_16_1:]).max() > 1e-3
    # Nothing else in the bank moved.
    np.testing.assert_array_equal(np.asarray(new.bank.data)[:r * B],
                                  np.asarray(prev.bank.data)[:r * B])
  # The bank is ring-shaped: 3 rounds of 8 fill 24 slots exactly.
  assert int(states[3].bank.count) == 24 and int(states[3].bank.index) == 0


def test_feature_dim_matches_teacher_taps(gray_nets):
  teacher, _ = gray_nets
  out = teacher(jnp.zeros((2, 8, 8, 1)))
  assert sum(t.mean.shape[-1] for t in out.bn) == D_WRN_16_1 == round_kit.feature_dim(teacher,
                                                                              (8, 8, 1))


def test_head_trains_only_with_contrast(cmi_rounds, no_cr_round):
  states, _ = cmi_rounds
  for prev, new in zip(states[:-1], states[1:]):
    assert int(new.head.step) == int(prev.head.step) + CFG_CMI.g_steps
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                  new.head.params, prev.head.params)
    assert min(jax.tree_util.tree_leaves(diff)) > 0.0
  state0, state1, _ = no_cr_round
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state1.head),
                         jax.device_get(state0.head))
  # No contrast: the bank is not written, the pool is.
  assert int(state1.bank.count) == 0 and int(state1.pool.count) == B


# ---------------------------------------------------------------------------
# Loss-term switches
# ---------------------------------------------------------------------------


def _assert_total_is_weighted_sum(cfg, metrics):
  terms = {k[2:]: np.asarray(v, np.float64) for k, v in metrics.items() if k.startswith('l_')}
  np.testing.assert_allclose(_weighted(cfg, terms), np.asarray(metrics['loss']), rtol=1e-5)
  assert np.asarray(metrics['loss']).shape == (cfg.g_steps,)


def test_loss_terms_follow_weights(cmi_rounds, no_cr_round, pixel_round):
  _, outs = cmi_rounds
  got = {k for k in outs[0].metrics if k.startswith('l_')}
  assert got == {'l_bn', 'l_oh', 'l_adv', 'l_cr'}
  for out in outs:
    _assert_total_is_weighted_sum(CFG_CMI, out.metrics)
  # cr = 0 and no student (adv weight still 0.5): neither term.
  out = no_cr_round[2]
  assert {k for k in out.metrics if k.startswith('l_')} == {'l_bn', 'l_oh'}
  _assert_total_is_weighted_sum(CFG_NO_CR, out.metrics)
  out = pixel_round[3]
  assert {k for k in out.metrics if k.startswith('l_')} == {'l_bn', 'l_oh', 'l_adv', 'l_tv'}
  _assert_total_is_weighted_sum(CFG_PIXELS, out.metrics)


def test_zero_adv_weight_skips_student(gray_nets):
  teacher, student = gray_nets
  x = jax.random.uniform(jax.random.key(0), (B, 8, 8, 1))
  view = (x - 0.5) / 0.25
  t_out = teacher(view)
  s_logits = student(view, taps=False).logits
  targets = jnp.arange(B) % NUM_CLASSES
  for adv, want in ((0.5, {'bn', 'oh', 'adv'}), (0.0, {'bn', 'oh'})):
    cfg = dataclasses.replace(CFG_CMI, weights=LossWeights(adv=adv))
    terms = round_kit.inversion_terms(cfg, teacher_out=t_out, rows=B, targets=targets,
                                student_logits=s_logits, x=x)
    assert set(terms) == want


# ---------------------------------------------------------------------------
# Compilation, host syncs, NaN safety, pixel range
# ---------------------------------------------------------------------------


def test_round_traces_once(gray_nets, cmi_rounds):
  teacher, student = gray_nets
  states, _ = cmi_rounds
  for seed in (11, 12):
    _run(CFG_CMI, teacher, student, states[-1], seed)
  poisoned = _poison(teacher)
  _run(CFG_CMI, poisoned, student, states[1], 13)
  assert TRACES[CFG_CMI] == 1
  assert all(n <= 1 for n in TRACES.values()), TRACES


def _primitive_names(jaxpr):
  """Every primitive in a jaxpr and, recursively, in the jaxprs of its params."""
  names = set()

  def subjaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
      yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
      yield value
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from subjaxprs(v)
    elif isinstance(value, dict):
      for v in value.values():
        yield from subjaxprs(v)

  def walk(j):
    for eqn in j.eqns:
      names.add(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          walk(sub)

  walk(jaxpr.jaxpr if isinstance(jaxpr, jax.extend.core.ClosedJaxpr) else jaxpr)
  return names


CALLBACKS = ('pure_callback', 'io_callback', 'debug_callback', 'callback', 'debug_print')


def test_primitive_walker_sees_nested_callbacks():
  def f(x):
    def body(c, _):
      jax.debug.print('{}', c)
      return c + 1.0, None
    return jax.lax.scan(body, x, None, length=2)[0]

  names = _primitive_names(jax.make_jaxpr(f)(1.0))
  assert 'scan' in names and names & {'debug_callback', 'debug_print'}


@pytest.mark.parametrize('cfg', [CFG_CMI, CFG_PIXELS], ids=['cmi', 'pixels'])
def test_round_jaxpr_has_no_host_callbacks(cfg, gray_nets):
  channels = cfg.image_shape[-1]
  teacher, student = gray_nets if channels == 1 else _nets(channels, 5, CIFAR_MEAN, CIFAR_STD)
  state = cmi.init_state(cfg, teacher, jax.random.key(0))
  jaxpr = jax.make_jaxpr(lambda *a: cmi.synthesis_round(cfg, *a))(
      teacher, student, state, jax.random.key(1))
  names = _primitive_names(jaxpr)
  assert {'scan', 'conv_general_dilated', 'dot_general'} <= names  # the walk recursed
  assert not names & set(CALLBACKS), names & set(CALLBACKS)


def test_round_runs_without_transfers(gray_nets, cmi_rounds):
  states, _ = cmi_rounds
  args = jax.device_put((*gray_nets, states[2], jax.random.key(21)))
  jax.block_until_ready(args)
  with jax.transfer_guard('disallow'):
    state, out = ROUND(CFG_CMI, *args)
    jax.block_until_ready((state, out))
  assert int(state.pool.count) == 3 * B


def _poison(teacher):
  params = dict(teacher.variables['params'])
  fc = dict(params['fc'])
  fc['bias'] = fc['bias'].at[0].set(jnp.nan)
  params['fc'] = fc
  return Teacher(teacher.module, {**teacher.variables, 'params': params})


def test_nan_teacher_writes_nothing(gray_nets, cmi_rounds):
  teacher, student = gray_nets
  states, _ = cmi_rounds
  prev = states[1]
  new, out = _run(CFG_CMI, _poison(teacher), student, prev, 5)
  assert not np.any(np.isfinite(np.asarray(out.metrics['loss'])))
  assert np.isinf(float(out.metrics['best_loss']))
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get((new.bank, new.pool, new.head)),
                         jax.device_get((prev.bank, prev.pool, prev.head)))


def test_pixel_round_stays_in_image_range(pixel_round):
  _, state0, state1, out = pixel_round
  x = np.asarray(out.images)
  assert x.shape == (B, 8, 8, 3)
  assert int(out.metrics['best_step']) > 0  # a clipped iterate, not the N(0, 1) start
  # Clipped in normalized space, so [0, 1] up to the rounding of x * std + mean.
  assert x.min() >= -1e-6 and x.max() <= 1.0 + 1e-6
  assert x.std() > 0.05  # not collapsed onto the bounds
  assert int(state1.pool.count) == int(state0.pool.count) + B
  assert int(state1.bank.count) == 0

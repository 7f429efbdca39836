"""FastDFKD (cmi_jax/synthesis/fast.py): the inner loop, the first-order
meta-gradient and the meta-Adam against numpy; the momentum L_bn term by hand
over two rounds; the adversarial schedule; exact resume; 1 vs 4 devices; the
presets and CIFAR rows; `cmi_jax.synthesize(method='fast5')`; the GAN
baselines' adv_against_teacher flag.

Tiny shapes: wrn_16_1 teacher/student at 8x8x1, batch 8, K = 3, nz 8, ngf 4.
The jitted round is compiled once per module (fixture `round_fn`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cmi_jax
from cmi_jax import data, distill, parallel
from cmi_jax.checkpoint import Checkpointer, abstract
from cmi_jax.models.layers import BNTap
from cmi_jax.state import cosine_per_epoch
from cmi_jax.synthesis import algorithms, fast, gan, losses, presets
from cmi_jax.synthesis.api import make_config
from cmi_jax.synthesis.config import LossWeights, SynthesisConfig
from cmi_jax.synthesis.round_kit import to_uint8
from cmi_jax.teacher import Teacher
from experiments import plan, runner
from tests.helpers import teacher_student

pytestmark = pytest.mark.usefixtures('compilation_cache')

NUM_CLASSES = 4
B = 8
K = 3
SHAPE = (8, 8, 1)
CFG = SynthesisConfig(
    image_shape=SHAPE, num_classes=NUM_CLASSES, mean=(0.5,), std=(0.25,), batch_size=B,
    g_steps=K, lr_g=0.01, lr_z=0.05, nz=8, ngf=4, pool_size=32, views='crop',
    global_padding=2, algorithm='fast', bn_mmt=0.9, adv_start_round=1,
    weights=LossWeights(bn=10.0, oh=0.4, adv=1.1, cr=0.0)).validate()


def _nets():
  return teacher_student(NUM_CLASSES, SHAPE)


@pytest.fixture(scope='module')
def nets():
  return _nets()


@pytest.fixture(scope='module')
def round_fn():
  return jax.jit(fast.fast_round, static_argnums=(0,))


@pytest.fixture(scope='module')
def two_rounds(nets, round_fn):
  """state0 -> round 0 -> state1 -> round 1 -> state2 (host copies)."""
  teacher, student = nets
  state0 = fast.init_state(CFG, teacher, jax.random.key(2))
  state1, out1 = round_fn(CFG, teacher, student, state0, jax.random.key(10))
  state2, out2 = round_fn(CFG, teacher, student, state1, jax.random.key(11))
  return jax.device_get((state0, state1, out1, state2, out2))


# ---------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------


class NumpyAdam:
  """optax.adam (eps 1e-8, eps_root 0) in float64 numpy, one array."""

  def __init__(self, lr, b1=0.5, b2=0.999, eps=1e-8):
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.m = self.v = 0.0
    self.t = 0

  def step(self, p, g):
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    m_hat = self.m / (1 - self.b1 ** self.t)
    v_hat = self.v / (1 - self.b2 ** self.t)
    return p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _close(got, want, rtol, atol=0.0, what=''):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol,
                               atol=atol, err_msg=what + jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------
# The inner loop and the meta step
# ---------------------------------------------------------------------------


def test_inner_loop_meta_gradient_matches_numpy_on_a_quadratic():
  """loss(w, z) = sum (w - a)^2 + (w0 + w1) * sum z^2 (gradients in closed form):
  the inner Adam on {w at lr_g, z at lr_z}, the summed pre-update gradients
  w.r.t. w (step 0 included), the lowest-loss iterate and the last aux."""
  cfg = dataclasses.replace(CFG, g_steps=4, lr_g=0.1, lr_z=0.3)
  a = np.array([1.0, -2.0, 0.5])
  w0, z0 = np.array([0.2, 0.4, -0.3]), np.array([1.5, -0.7])

  def loss_fn(f, key):
    del key
    w, z = f['generator']['w'], f['z']
    loss = jnp.sum((w - a) ** 2) + (w[0] + w[1]) * jnp.sum(z ** 2)
    return loss, {'best': {'x': 2.0 * w}, 'last': {'z': z}, 'row': {'l_q': loss}}

  f0 = {'generator': {'w': jnp.asarray(w0, jnp.float32)}, 'z': jnp.asarray(z0, jnp.float32)}
  keys = jax.random.split(jax.random.key(0), cfg.g_steps)
  f_k, meta_grad, best, last, rows = jax.jit(
      lambda f: fast.inner_loop(loss_fn, fast.inner_optimizer(cfg), f, keys))(f0)

  w, z = w0.copy(), z0.copy()
  adam_w, adam_z = NumpyAdam(cfg.lr_g), NumpyAdam(cfg.lr_z)
  acc, losses_np, iterates = np.zeros(3), [], []
  for _ in range(cfg.g_steps):
    losses_np.append(np.sum((w - a) ** 2) + (w[0] + w[1]) * np.sum(z ** 2))
    iterates.append(w.copy())
    g_w = 2 * (w - a) + np.array([1.0, 1.0, 0.0]) * np.sum(z ** 2)
    g_z = 2 * (w[0] + w[1]) * z
    acc += g_w
    z_seen = z.copy()
    w, z = adam_w.step(w, g_w), adam_z.step(z, g_z)
  # float32 vs float64: sums of terms of size ~10, so absolute tolerances.
  np.testing.assert_allclose(meta_grad['w'], acc, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(f_k['generator']['w'], w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f_k['z'], z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rows['loss'], losses_np, rtol=1e-5)
  np.testing.assert_allclose(rows['l_q'], losses_np, rtol=1e-5)
  i = int(np.argmin(losses_np))
  assert int(best['step']) == i
  np.testing.assert_allclose(best['aux']['x'], 2.0 * iterates[i], rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(best['loss'], losses_np[i], rtol=1e-5)
  # 'last' is the aux of the last step, i.e. of the iterate before the last update.
  np.testing.assert_allclose(last['z'], z_seen, rtol=1e-5, atol=1e-5)


def test_inner_loop_skips_non_finite_steps():
  """A step with a NaN loss changes neither the iterate, the Adam state nor the
  meta-gradient, and is never kept as the best."""
  cfg = dataclasses.replace(CFG, g_steps=3, lr_g=0.1)

  def loss_fn(f, key):
    w = f['generator']['w']
    loss = jnp.where(key == 1, jnp.nan, jnp.sum(w ** 2)) + 0.0 * jnp.sum(f['z'])
    return loss, {'best': {'w': w}, 'last': {}, 'row': {}}

  # The scanned per-step inputs are only handed to loss_fn: here flags, step 1 is bad.
  bad = np.array([0, 1, 0])
  keys = jnp.asarray(bad)
  f0 = {'generator': {'w': jnp.array([1.0, -1.0])}, 'z': jnp.zeros((1,))}
  _, meta_grad, best, _, _ = fast.inner_loop(loss_fn, fast.inner_optimizer(cfg), f0, keys)
  w, adam, acc = np.array([1.0, -1.0]), NumpyAdam(cfg.lr_g), np.zeros(2)
  for b in bad:
    if not b:
      acc += 2 * w
      w = adam.step(w, 2 * w)
  np.testing.assert_allclose(meta_grad['w'], acc, rtol=1e-5)
  assert np.isfinite(best['loss'])


@functools.partial(jax.jit, static_argnums=(0,))
def _reference_grad(cfg, teacher, student, gen_stats, ema, targets, adv_on, f, key):
  """value_and_grad of the round's loss at f = {'generator', 'z'}: one compile for
  every step of both reference rounds (the round's values are arguments)."""
  loss_fn = fast.make_loss_fn(cfg, teacher, student, gen_stats, ema, targets, adv_on)
  return jax.value_and_grad(loss_fn, has_aux=True)(f, key)


def _reference_round(cfg, teacher, student, state, rng, theta_adam):
  """One round as a Python loop of jax.grad on the round's loss, numpy Adam for
  the inner steps and the meta step (theta_adam: {leaf path: NumpyAdam})."""
  keys = fast.round_keys(rng)
  targets = jax.random.randint(keys['targets'], (cfg.batch_size,), 0, cfg.num_classes)
  z = jax.random.normal(keys['z'], (cfg.batch_size, cfg.nz), jnp.float32)
  adv_on = jnp.float32(int(state.round) >= cfg.adv_start_round)
  grad_fn = functools.partial(_reference_grad, cfg, teacher, student, state.gen.batch_stats,
                              state.bn_ema, targets, adv_on)
  theta = _np(state.gen.params)
  leaves, treedef = jax.tree_util.tree_flatten(theta)
  fast_w, zz = [l.copy() for l in leaves], np.asarray(z, np.float64)
  inner = [NumpyAdam(cfg.lr_g) for _ in leaves]
  inner_z = NumpyAdam(cfg.lr_z)
  acc = [np.zeros_like(l) for l in leaves]
  best = (np.inf, None)
  for key in jax.random.split(keys['steps'], cfg.g_steps):
    f = {'generator': jax.tree_util.tree_unflatten(treedef, [jnp.float32(l) if l.ndim == 0
                                                              else jnp.asarray(l, jnp.float32)
                                                              for l in fast_w]),
         'z': jnp.asarray(zz, jnp.float32)}
    (loss, aux), g = grad_fn(f, key)
    if float(loss) < best[0]:
      best = (float(loss), np.asarray(aux['best']['x']))
    last_ema = aux['last']
    g_leaves = jax.tree_util.tree_leaves(_np(g['generator']))
    acc = [a + gl for a, gl in zip(acc, g_leaves)]
    fast_w = [opt.step(w, gl) for opt, w, gl in zip(inner, fast_w, g_leaves)]
    zz = inner_z.step(zz, np.asarray(g['z'], np.float64))
  new_theta = [theta_adam[i].step(l, a) for i, (l, a) in enumerate(zip(leaves, acc))]
  return (jax.tree_util.tree_unflatten(treedef, new_theta),
          jax.tree_util.tree_unflatten(treedef, acc), best, last_ema, targets)


def test_round_matches_python_loop_and_numpy_adam_over_two_rounds(nets, two_rounds):
  """theta after rounds 1 and 2 = numpy meta-Adam (persistent moments, t = 1, 2)
  on the sums of K per-step gradients from a Python loop with numpy inner Adam;
  the pool gets the lowest-loss iterate; the EMA comes from the last forward."""
  teacher, student = nets
  state0, state1, out1, state2, out2 = two_rounds
  n_leaves = len(jax.tree_util.tree_leaves(state0.gen.params))
  theta_adam = [NumpyAdam(fast.meta_lr(CFG)) for _ in range(n_leaves)]
  assert fast.meta_lr(CFG) == pytest.approx(K * CFG.lr_g)
  for state_in, state_out, out, rng in ((state0, state1, out1, 10), (state1, state2, out2, 11)):
    theta, acc, best, last_ema, targets = _reference_round(
        CFG, teacher, student, state_in, jax.random.key(rng), theta_adam)
    # The summed gradient itself (its norm is a round metric) ...
    acc_norm = np.sqrt(sum(np.sum(a ** 2) for a in jax.tree_util.tree_leaves(acc)))
    np.testing.assert_allclose(out.metrics['meta_grad_norm'], acc_norm, rtol=1e-4)
    # ... and theta after the meta-Adam step. Adam divides each entry by its own RMS,
    # so float32 noise in a near-cancelling gradient entry shows up: 1% of a meta
    # step (a missing or extra inner gradient moves entries by up to 2 steps).
    _close(state_out.gen.params, theta, rtol=2e-3, atol=0.01 * fast.meta_lr(CFG),
           what='theta')
    np.testing.assert_array_equal(out.targets, targets)
    np.testing.assert_allclose(out.metrics['best_loss'], best[0], rtol=1e-4)
    np.testing.assert_allclose(out.images, best[1], atol=1e-4)
    _close(state_out.bn_ema, last_ema, rtol=1e-4, atol=1e-5, what='ema')
  # The meta step moved theta by about one Adam step of lr_meta per entry.
  d = np.abs(np.asarray(state1.gen.params['l1']['0']['kernel'])
             - np.asarray(state0.gen.params['l1']['0']['kernel']))
  assert 0.3 * fast.meta_lr(CFG) < np.median(d) <= 1.01 * fast.meta_lr(CFG)
  assert int(state2.gen.step) == 2 and int(state2.round) == 2
  # Pool: B images per round, stored as uint8 of the kept iterate.
  assert int(state2.pool.count) == 2 * B
  np.testing.assert_array_equal(state2.pool.data['images'][B:2 * B], to_uint8(out2.images))
  np.testing.assert_array_equal(state2.pool.data['targets'][:B], out1.targets)


def test_adversarial_term_from_adv_start_round(two_rounds):
  """adv_start_round = 1: round 0 has L_adv = 0, round 1 a non-zero L_adv."""
  _, _, out1, _, out2 = two_rounds
  assert float(out1.metrics['adv_on']) == 0.0 and np.all(out1.metrics['l_adv'] == 0.0)
  assert float(out2.metrics['adv_on']) == 1.0 and np.all(out2.metrics['l_adv'] < 0.0)
  assert out1.metrics['loss'].shape == (K,)
  assert set(out1.metrics) >= {'l_bn', 'l_oh', 'l_adv', 'best_loss', 'best_step',
                               'meta_grad_norm'}
  assert 'l_cr' not in out1.metrics


def test_non_finite_round_writes_nothing(nets, round_fn, two_rounds):
  """A teacher with NaN weights makes every step non-finite: theta, meta-Adam,
  EMA and pool keep their values; only the counter moves."""
  teacher, student = nets
  _, state1, _, _, _ = two_rounds
  bad = Teacher(teacher.module, jax.tree_util.tree_map(lambda a: a * jnp.nan, teacher.variables))
  new, out = round_fn(CFG, bad, student, state1, jax.random.key(12))
  assert not np.isfinite(float(out.metrics['best_loss']))
  new, state1 = jax.device_get((new, state1))
  _close(new.gen, state1.gen, rtol=0, what='gen')
  _close(new.bn_ema, state1.bn_ema, rtol=0, what='ema')
  _close(new.pool, state1.pool, rtol=0, what='pool')
  assert int(new.round) == int(state1.round) + 1


# ---------------------------------------------------------------------------
# Momentum BN term (losses.py) by hand over two rounds
# ---------------------------------------------------------------------------


def _taps_from_activations(acts, running):
  """BNTaps as the teacher records them, from raw activations [N, H, W, C]."""
  return [BNTap(jnp.asarray(a.mean((1, 2))), jnp.asarray(a.var((1, 2))),
                jnp.asarray(rm), jnp.asarray(rv)) for a, (rm, rv) in zip(acts, running)]


def test_momentum_bn_term_by_hand_over_two_rounds():
  rng = np.random.default_rng(0)
  m = 0.9
  running = [(rng.normal(size=3), rng.uniform(0.5, 2, size=3)),
             (rng.normal(size=5), rng.uniform(0.5, 2, size=5))]
  rounds = [[rng.normal(1.0, 2.0, size=(6, 4, 4, 3)), rng.normal(-1.0, 0.5, size=(6, 2, 2, 5))],
            [rng.normal(0.3, 1.0, size=(6, 4, 4, 3)), rng.normal(0.0, 1.5, size=(6, 2, 2, 5))]]
  ema = losses.bn_ema_init(_taps_from_activations(rounds[0], running))
  ema_np = None
  for acts in rounds:
    taps = _taps_from_activations(acts, running)
    # Batch statistics straight from the activations (biased variance over N, H, W).
    mus = [a.mean((0, 1, 2)) for a in acts]
    vars_ = [a.var((0, 1, 2)) for a in acts]
    if ema_np is None:  # round 1: no EMA yet, the plain CMI term
      want = sum(np.linalg.norm(rv - v) + np.linalg.norm(rm - mu)
                 for (rm, rv), mu, v in zip(running, mus, vars_))
      np.testing.assert_allclose(losses.bn_loss(taps), want, rtol=1e-5)
    else:
      want = sum(np.linalg.norm(rv - ((1 - m) * v + m * ev)) +
                 np.linalg.norm(rm - ((1 - m) * mu + m * em))
                 for (rm, rv), mu, v, em, ev in zip(running, mus, vars_, *ema_np))
    np.testing.assert_allclose(losses.momentum_bn_loss(taps, ema, m), want, rtol=1e-5)
    ema = losses.bn_ema_update(ema, taps, m)
    ema_np = ((mus, vars_) if ema_np is None else
              ([m * e + (1 - m) * x for e, x in zip(ema_np[0], mus)],
               [m * e + (1 - m) * x for e, x in zip(ema_np[1], vars_)]))
    for got, want_l in zip(ema.mean + ema.var, ema_np[0] + ema_np[1]):
      np.testing.assert_allclose(got, want_l, rtol=1e-5, atol=1e-6)
    assert float(ema.valid) == 1.0
  # The EMA is a constant of the loss: d L / d (per-sample mean) carries (1 - m).
  taps = _taps_from_activations(rounds[1], running)
  g_mom = jax.grad(lambda t: losses.momentum_bn_loss(t, ema, m))(taps)
  assert np.all(np.isfinite(np.asarray(g_mom[0].mean)))
  g_none = jax.grad(lambda e: losses.momentum_bn_loss(taps, e, m))(ema)
  assert all(np.all(np.asarray(x) == 0) for x in g_none.mean + g_none.var)


# ---------------------------------------------------------------------------
# reset_l0, resume, devices
# ---------------------------------------------------------------------------


def test_reset_l0_redraws_first_linear_and_bn_only(nets):
  teacher, _ = nets
  state = fast.init_state(dataclasses.replace(CFG, nz=64, ngf=16), teacher, jax.random.key(2))
  new = fast.reset_l0(state.gen.params, jax.random.key(5))
  assert np.all(np.asarray(new['l1']['0']['bias']) == 0)
  assert np.all(np.asarray(new['conv_blocks']['0']['bias']) == 0)
  for w in (new['l1']['0']['kernel'], new['conv_blocks']['0']['scale']):
    w = np.asarray(w)
    tol = 4 * 0.02 / np.sqrt(w.size)  # 4 standard errors of N(0, 0.02) estimates
    assert abs(w.std() - 0.02) < 2 * tol and abs(w.mean()) < tol, (w.mean(), w.std())
  assert not np.allclose(new['l1']['0']['kernel'], state.gen.params['l1']['0']['kernel'])
  for k in ('2', '3', '6', '7', '9'):
    _close(new['conv_blocks'][k], state.gen.params['conv_blocks'][k], rtol=0)


def test_meta_generator_starts_from_pytorch_default_init(nets):
  """U(+-1/sqrt(fan_in)) weights and biases (fan_in: nz for l1, 9 * C_in for convs),
  BatchNorm scale 1 and bias 0, as a fresh PyTorch generator."""
  teacher, _ = nets
  cfg = dataclasses.replace(CFG, nz=64, ngf=16)
  p = fast.init_state(cfg, teacher, jax.random.key(2)).gen.params
  for layer, fan_in in ((p['l1']['0'], 64), (p['conv_blocks']['2'], 9 * 32),
                        (p['conv_blocks']['6'], 9 * 32), (p['conv_blocks']['9'], 9 * 16)):
    for name, w in layer.items():
      w, bound = np.asarray(w), 1.0 / np.sqrt(fan_in)
      assert np.abs(w).max() <= bound and np.abs(w).max() > 0, name
      if w.size > 100:  # uniform: reaches the bound, std = bound / sqrt(3)
        assert np.abs(w).max() > 0.9 * bound, name
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound, name
  for k in ('0', '3', '7'):
    np.testing.assert_array_equal(p['conv_blocks'][k]['scale'], 1.0)
    np.testing.assert_array_equal(p['conv_blocks'][k]['bias'], 0.0)


def test_exact_resume_through_a_checkpoint(nets, round_fn, two_rounds, tmp_path):
  """2 rounds == 1 round, save, restore into a fresh state's structure, 1 round."""
  teacher, student = nets
  _, state1, _, state2, _ = two_rounds
  ckpt = Checkpointer(str(tmp_path / 'ckpt'))
  ckpt.save(1, jax.device_put(state1), {'round': 1})
  target = abstract(fast.init_state(CFG, teacher, jax.random.key(99)))
  restored, meta = ckpt.restore(target)
  ckpt.close()
  assert meta == {'round': 1}
  resumed, _ = round_fn(CFG, teacher, student, restored, jax.random.key(11))
  _close(jax.device_get(resumed), state2, rtol=0, what='resumed')


@pytest.mark.slow  # ~21 s: two more round compiles; tests/test_parallel.py checks CMI's 1 vs 4
def test_same_on_1_and_4_devices(nets, two_rounds):
  """The round as experiments/plan.py compiles it, on 1 and 4 fake devices."""
  teacher, student = nets
  _, state1, _, _, _ = two_rounds
  kd_cfg = distill.KDConfig(batch_size=B, crop_padding=2, mean=(0.5,), std=(0.25,))
  results = {}
  for n in (1, 4):
    mesh = parallel.make_mesh(n)
    steps = plan.compile_plan(mesh, CFG, CFG, kd_cfg, fresh=False)
    assert steps.pre_round is steps.round  # equal configs: compiled once
    args = parallel.replicate(mesh, (teacher, student, jax.device_put(state1)))
    new, out = steps.round(*args, jax.random.key(11))
    if n == 4:
      assert len(out.images.addressable_shards) == 4
      assert out.images.addressable_shards[0].data.shape == (B // 4,) + SHAPE
    results[n] = jax.device_get((new, out))
  (s1, o1), (s4, o4) = results[1], results[4]
  np.testing.assert_array_equal(o4.targets, o1.targets)
  np.testing.assert_allclose(o4.images, o1.images, atol=1e-5)
  for k, v in o1.metrics.items():
    np.testing.assert_allclose(o4.metrics[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
  # Adam normalizes each entry by its own RMS: a tiny float reordering is at most a
  # small fraction of one meta step.
  for a, b in zip(jax.tree_util.tree_leaves(s4.gen.params), jax.tree_util.tree_leaves(s1.gen.params)):
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 0.05 * fast.meta_lr(CFG)
  _close(s4.bn_ema, s1.bn_ema, rtol=1e-4, atol=1e-6, what='ema')
  np.testing.assert_array_equal(s4.pool.data['targets'], s1.pool.data['targets'])


# ---------------------------------------------------------------------------
# Presets, configs, API
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('name,k,lr_g,lr_z', [('fast2', 2, 5e-3, 0.015),
                                              ('fast5', 5, 3e-3, 0.01),
                                              ('fast10', 10, 2e-3, 0.01)])
def test_presets_are_the_reference_variants(name, k, lr_g, lr_z):
  cfg = presets.apply_to_synthesis_config(CFG, name)
  assert (cfg.algorithm, cfg.g_steps, cfg.lr_g, cfg.lr_z) == ('fast', k, lr_g, lr_z)
  assert fast.meta_lr(cfg) == pytest.approx(k * lr_g)
  assert cfg.weights == LossWeights(bn=10.0, oh=0.4, adv=1.1, cr=0.0, balance=0.0, act=0.0,
                                    tv=0.0)
  assert (cfg.bn_mmt, cfg.betas, cfg.views, cfg.adv_kind, cfg.adv_temperature) == \
      (0.9, (0.5, 0.999), 'crop', 'masked_kl', 1.0)
  assert algorithms.get(cfg.algorithm).round is fast.fast_round


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
@pytest.mark.parametrize('row,adv,oh', [('resnet34-resnet18', 1.33, 0.5),
                                        ('vgg11-resnet18', 1.0, 0.5),
                                        ('wrn40_2-wrn16_1', 1.1, 0.4),
                                        ('wrn40_2-wrn40_1', 1.1, 0.4),
                                        ('wrn40_2-wrn16_2', 1.1, 0.4)])
def test_cifar_rows(dataset, row, adv, oh):
  from configs.common import make_dataset_config  # pylint: disable=g-import-not-at-top
  c = make_dataset_config(dataset, f'{row},method=fast10')
  s, k = c.synthesis, c.kd
  assert (s.algorithm, s.g_steps, s.lr_g, s.lr_z) == ('fast', 10, 2e-3, 0.01)
  assert (s.weights.bn, s.weights.adv, s.weights.oh, s.weights.cr) == (10.0, adv, oh, 0.0)
  assert (k.pre_adv, k.pre_oh) == (adv, oh)  # the warm-up rounds run the same loss
  assert (s.batch_size, k.batch_size, k.pre_rounds + k.epochs, k.pre_rounds) == (256, 256, 220, 20)
  assert (k.kd_steps, k.ep_steps, k.temperature, k.lr, k.lr_min, k.weight_decay) == \
      (400, 400, 20.0, 0.2, 2e-4, 1e-4)
  assert (s.pool_size, s.bn_mmt) == (56320, 0.9)
  synth = runner.synthesis_config(c, data.get_info(dataset), s.weights.to_dict())
  assert (synth.adv_start_round, synth.reset_l0_round) == (19, 139)  # 20 + 120 - 1, 0-based


@pytest.mark.parametrize('pre_rounds,adv,reset', [(20, 19, 139), (5, 4, 124), (1, 0, 120),
                                                  (0, 0, 119)])
def test_adv_start_and_reset_l0_follow_the_warm_up(pre_rounds, adv, reset):
  """The reference derives both from its warm-up W: L_adv from the W-th round (1-based)
  and reset_l0 at the (120 + W)-th; changing kd.pre_rounds alone moves them. A value
  set in the config wins."""
  from configs.common import make_dataset_config  # pylint: disable=g-import-not-at-top
  c = make_dataset_config('cifar10', 'wrn40_2-wrn16_1,method=fast5')
  c.kd.pre_rounds = pre_rounds
  synth = runner.synthesis_config(c, data.get_info('cifar10'), c.synthesis.weights.to_dict())
  assert (synth.adv_start_round, synth.reset_l0_round, synth.warmup_rounds) == \
      (adv, reset, pre_rounds)
  c.synthesis.adv_start_round, c.synthesis.reset_l0_round = 3, -1
  synth = runner.synthesis_config(c, data.get_info('cifar10'), c.synthesis.weights.to_dict())
  assert (synth.adv_start_round, synth.reset_l0_round) == (3, -1)


def test_cosine_with_eta_min():
  """CosineAnnealingLR(T_max=200, eta_min=2e-4) stepped per epoch of 400 steps."""
  sched = cosine_per_epoch(0.2, 200, 400, 2e-4)
  for epoch in (0, 1, 100, 150, 199, 200):
    want = 2e-4 + (0.2 - 2e-4) * (1 + np.cos(np.pi * epoch / 200)) / 2
    np.testing.assert_allclose(sched(epoch * 400 + 17), want, rtol=1e-5)


def test_synthesize_api_fast5(nets):
  """cmi_jax.synthesize(method='fast5'): rounds x B images and labels, K = 5 losses
  per round, the pool holds them all, and a continued call picks up the state."""
  teacher, student = nets
  cfg = make_config(
      image_shape=SHAPE, num_classes=NUM_CLASSES, mean=(0.5,), std=(0.25,), method='fast5',
      batch_size=B, nz=8, ngf=4, pool_size=64, global_padding=2)
  assert (cfg.algorithm, cfg.g_steps, cfg.lr_g) == ('fast', 5, 3e-3)
  # Keyword form (explicit shape/classes/normalization with a Teacher object): same config.
  out = cmi_jax.synthesize(teacher, student=student, rounds=2, rng=0, image_shape=SHAPE,
                           num_classes=NUM_CLASSES, mean=(0.5,), std=(0.25,), method='fast5',
                           batch_size=B, nz=8, ngf=4, pool_size=64, global_padding=2)
  assert out.config == cfg
  assert out.images.shape == (2 * B,) + SHAPE and out.images.dtype == np.uint8
  assert out.labels.shape == (2 * B,) and set(np.unique(out.labels)) <= set(range(NUM_CLASSES))
  assert len(out.metrics) == 2 and out.metrics[0]['loss'].shape == (5,)
  assert int(out.state.pool.count) == 2 * B and int(out.state.round) == 2
  np.testing.assert_array_equal(np.asarray(out.state.pool.data['images'][:2 * B]), out.images)
  more = cmi_jax.synthesize(teacher, student=student, config=cfg, rounds=1, rng=0,
                            state=out.state)
  assert int(more.state.round) == 3 and int(more.state.pool.count) == 3 * B


# ---------------------------------------------------------------------------
# GAN baselines: adv_against_teacher (the reference's early bug, issue #11)
# ---------------------------------------------------------------------------


def test_adv_against_teacher_makes_the_adversarial_term_zero(nets):
  teacher, student = nets
  cfg = presets.apply_to_synthesis_config(
      dataclasses.replace(CFG, algorithm='cmi', views='cmi', g_steps=2, pool_size=32), 'dfq')
  cfg = dataclasses.replace(cfg, g_steps=2, nz=8, ngf=4)
  gen = gan.init_generator_state(cfg, jax.random.key(3))
  _, rows = gan.gan_round(cfg, teacher, student, gen, jax.random.key(4))
  assert np.all(np.asarray(rows['l_adv']) < 0)  # the student: a real adversarial term
  bug = dataclasses.replace(cfg, adv_against_teacher=True)
  _, rows_bug = gan.gan_round(bug, teacher, student, gen, jax.random.key(4))
  np.testing.assert_allclose(rows_bug['l_adv'], 0.0, atol=1e-6)
  # The other terms are the same at the first step (same generator, same z).
  np.testing.assert_allclose(rows_bug['l_bn'][0], rows['l_bn'][0], rtol=1e-5)

"""NAYER (cmi_jax/synthesis/nayer.py, NLGenerator, label embeddings): the noisy
layers' chunk mapping and their re-draw every loop, class-cyclic targets, the
g_life reset, the embedding substitutes and the user's .npy, a non-finite loop,
exact resume through a checkpoint, 1 vs 4 fake devices, the configs and
`cmi_jax.synthesize(method='nayer')`.

Small shapes: 16x16x1 images, C = 4 classes, batch 8 (2 noisy layers),
le_emb_size 16, ngf 4, 2 loops of 2 steps; one round program compiled per module.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cmi_jax
from cmi_jax import models, parallel
from cmi_jax.checkpoint import Checkpointer, abstract
from cmi_jax.models.generator import NLGenerator, chunked_linear, reinit_noisy
from cmi_jax.state import rng_stream
from cmi_jax.synthesis import api, embeddings, nayer
from cmi_jax.teacher import Teacher
from configs import cifar10, cifar100, fashion_mnist
from experiments import plan, runner
from tests.helpers import random_variables

pytestmark = pytest.mark.usefixtures('compilation_cache')  # whole runs: see conftest

C, B, SHAPE, E_USER = 4, 8, (16, 16, 1), 7
# The nayer preset through the library's config builder, at test size.
CFG = cmi_jax.make_config(
    method='nayer', image_shape=SHAPE, num_classes=C, mean=(0.5,), std=(0.25,), batch_size=B,
    g_steps=2, lr_g=1e-3, ngf=4, le_emb_size=16, pool_size=40, global_padding=2, g_loops=2,
    g_life=2, adv_start_round=1)
KD_CFG = cmi_jax.distill.KDConfig(batch_size=B, temperature=4.0, crop_padding=2, mean=(0.5,),
                                  std=(0.25,))
KEY = jax.random.key(7)


def run_round(teacher, student, state, rng):
  """The API's compiled round (one program for the whole module; it donates the
  state, so it gets a device copy)."""
  return api.jitted_round('nayer')(CFG, teacher, student, jax.device_put(state), rng)


@pytest.fixture(scope='module')
def nets():
  """A random wrn_16_1 teacher and a student near it (so the adversarial mask
  is not all zero)."""
  module = models.get('wrn_16_1', C)
  t_vars = random_variables(module, (2,) + SHAPE, seed=0)
  noise = random_variables(module, (2,) + SHAPE, seed=1)['params']
  s_params = jax.tree_util.tree_map(lambda a, e: a + 0.2 * e * jnp.std(a), t_vars['params'],
                                    noise)
  return (Teacher(module, t_vars),
          Teacher(module, {'params': s_params, 'batch_stats': t_vars['batch_stats']}))


@pytest.fixture(scope='module')
def chain(nets):
  """Rounds 0, 1, 2 through `cmi_jax.synthesize` from a fresh state (g_life 2:
  the generator is replaced in rounds 0 and 2): [(state before, round key,
  state after, SynthesisResult)], states on host."""
  teacher, student = nets
  state = jax.device_get(nayer.init_state(CFG, teacher, rng_stream(KEY, 'head')))
  out = []
  for r in range(3):
    res = cmi_jax.synthesize(teacher, student=student, config=CFG, rounds=1,
                             state=jax.device_put(state), rng=KEY)
    after = jax.device_get(res.state)
    out.append((state, jax.random.fold_in(rng_stream(KEY, 'synthesis'), r), after, res))
    state = after
  return out


# ---------------------------------------------------------------- noisy layers

def _np_chunked(x, kernel, bias, chunk):
  return np.stack([x[i] @ kernel[i // chunk] + bias[i // chunk] for i in range(len(x))])


@pytest.mark.parametrize('b', [8, 10])  # full chunks; a short last chunk
def test_chunked_linear_matches_numpy(b):
  rng = np.random.default_rng(0)
  n = -(-b // C)
  x, k, bias = rng.normal(size=(b, 5)), rng.normal(size=(n, 5, 3)), rng.normal(size=(n, 3))
  got = chunked_linear(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32),
                       jnp.asarray(bias, jnp.float32), C)
  np.testing.assert_allclose(got, _np_chunked(x, k, bias, C), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='noisy layers'):
    chunked_linear(jnp.zeros((b, 5)), jnp.zeros((n + 1, 5, 3)), jnp.zeros((n + 1, 3)), C)


def test_generator_noisy_layers_share_by_chunk():
  """Inside NLGenerator: BN1d over the batch (batch statistics, scale 1, bias 0
  at init), then sample i through noisy layer i // C; sample i and i + C see
  the same embedding but different layers, samples i and i + 1 of one chunk
  the same layer."""
  gen = NLGenerator(batch_size=B, chunk=C, le_emb_size=16, ngf=4, img_size=16, nc=1)
  emb = np.random.default_rng(1).normal(size=(C, 6)).astype(np.float32)
  y = np.tile(np.arange(C), B // C)
  variables = jax.jit(gen.init)(jax.random.key(0), jnp.asarray(emb[y]))
  kernel = np.asarray(variables['params']['le1']['kernel'])
  assert kernel.shape == (2, 6, 16)
  x, mut = jax.jit(lambda v, e: gen.apply(v, e, mutable=['batch_stats', 'intermediates'],
                                          capture_intermediates=True))(variables, emb[y])
  assert x.shape == (B,) + SHAPE and float(x.min()) >= 0 and float(x.max()) <= 1
  got = np.asarray(mut['intermediates']['le1']['__call__'][0])
  e = emb[y]
  bn = (e - e.mean(0)) / np.sqrt(e.var(0) + 1e-5)
  want = _np_chunked(bn, kernel, np.zeros((2, 16)), C)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(got[0], got[C])  # same class, other noisy layer


def test_reinit_noisy_draws_fresh_standard_normals():
  gen = NLGenerator(batch_size=64, chunk=C, le_emb_size=32, ngf=4, img_size=16, nc=1)
  params = jax.jit(gen.init)(jax.random.key(0), jnp.zeros((64, 8)))['params']
  a, b = reinit_noisy(params, jax.random.key(1)), reinit_noisy(params, jax.random.key(2))
  ka, kb = np.asarray(a['le1']['kernel']), np.asarray(b['le1']['kernel'])
  assert ka.shape == (16, 8, 32) and not np.any(ka == kb)
  for k in (ka, kb):  # 4096 draws: mean 0 +- 0.016, std 1 +- 0.011 (one sigma)
    assert abs(k.mean()) < 0.08 and 0.95 < k.std() < 1.05
  assert not np.any(a['le1']['bias'])
  for name in ('l1', 'n1', 'conv_blocks'):  # everything else untouched
    jax.tree_util.tree_map(np.testing.assert_array_equal, a[name], params[name])


def test_every_loop_redraws_the_noisy_layers(chain):
  """After a round the noisy layers are the last loop's fresh N(0, 1) draw
  moved by that loop's few Adam steps (<< 1), not the previous round's."""
  before, rng, after, _ = chain[1]
  _, k_loops = jax.random.split(rng)
  keys = jax.random.split(k_loops, CFG.g_loops)
  got = after.generator['params']['le1']['kernel']  # [2 layers, E, 16]
  draws = [np.asarray(jax.random.normal(jax.random.split(k, 3)[0], got.shape)) for k in keys]
  drift = CFG.g_steps * 20 * CFG.lr_g
  assert np.max(np.abs(got - draws[-1])) < drift
  assert np.max(np.abs(got - draws[0])) > 1.0  # the first loop had its own draw
  assert np.max(np.abs(got - before.generator['params']['le1']['kernel'])) > 1.0


# ---------------------------------------------------------------- targets

def test_class_cyclic_targets():
  t = np.asarray(nayer.class_cyclic_targets(jax.random.key(0), 10, C))
  np.testing.assert_array_equal(t[:8], [0, 1, 2, 3, 0, 1, 2, 3])
  assert t.dtype == np.int32 and np.all((t[8:] >= 0) & (t[8:] < C))
  for b in (8, 12):  # every full chunk of C samples holds each class once
    t = np.asarray(nayer.class_cyclic_targets(jax.random.key(0), b, C))
    np.testing.assert_array_equal(t, np.tile(np.arange(C), b // C))


def test_round_uses_balanced_targets_and_fills_the_pool(chain):
  before, _, after, res = chain[0]
  n = CFG.g_loops * B
  np.testing.assert_array_equal(res.labels, np.tile(np.arange(C), n // C))
  assert res.images.shape == (n,) + SHAPE and res.images.dtype == np.uint8
  assert int(after.pool.count) == n and int(after.round) == 1 and int(before.pool.count) == 0
  np.testing.assert_array_equal(after.pool.data['targets'][:n], res.labels)
  np.testing.assert_array_equal(after.pool.data['images'][:n], res.images)
  m = res.metrics[0]
  assert m['loss'].shape == (CFG.g_loops * CFG.g_steps,) and np.isfinite(m['best_loss'])
  assert int(m['loops_kept']) == CFG.g_loops and int(m['generator_reset']) == 1
  assert {k for k in m if k.startswith('l_')} == {'l_bn', 'l_oh', 'l_adv'}
  np.testing.assert_allclose(m['loss'], 10 * m['l_bn'] + 0.5 * m['l_oh'] + 1.33 * m['l_adv'],
                             rtol=1e-5)
  assert not np.any(m['l_adv'])                          # round 0 < adv_start_round
  assert np.all(chain[1][3].metrics[0]['l_adv'] <= 0)
  assert np.any(chain[1][3].metrics[0]['l_adv'] < 0)     # on from round 1
  assert float(after.bn_ema.valid) == 1.0 and float(before.bn_ema.valid) == 0.0
  assert int(chain[2][2].pool.count) == CFG.pool_size < 3 * n  # full, wrapped


# ---------------------------------------------------------------- g_life

def _max_diff(a, b, names=('l1', 'conv_blocks')):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for n in names for x, y in zip(jax.tree_util.tree_leaves(a[n]),
                                            jax.tree_util.tree_leaves(b[n])))


def test_generator_is_replaced_every_g_life_rounds(chain):
  """Rounds 0 and 2 (round % g_life == 0) start from a fresh generator (its
  kernels then move by a few Adam steps of lr 1e-3), round 1 continues the
  previous round's; a fresh init differs by O(0.1-1)."""
  drift = CFG.g_loops * CFG.g_steps * 10 * CFG.lr_g
  for r, reset in ((0, True), (1, False), (2, True)):
    before, rng, after, res = chain[r]
    fresh = nayer.init_generator(CFG, before.embeddings.shape[1],
                                 jax.random.split(rng)[0])['params']
    start = fresh if reset else before.generator['params']
    other = before.generator['params'] if reset else fresh
    assert _max_diff(after.generator['params'], start) < drift, r
    assert _max_diff(after.generator['params'], other) > 10 * drift, r
    assert int(res.metrics[0]['generator_reset']) == int(reset)


# ---------------------------------------------------------------- embeddings

def test_classifier_rows(nets):
  teacher, _ = nets
  w = np.asarray(teacher.variables['params']['fc']['kernel']).T  # [C, F]
  np.testing.assert_allclose(embeddings.classifier_rows(teacher, C),
                             w / np.linalg.norm(w, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_penultimate_means(nets):
  teacher, _ = nets
  x = jax.random.normal(jax.random.key(3), (12,) + SHAPE)
  out = teacher(x)
  logits, f = np.asarray(out.logits, np.float64), np.asarray(out.penultimate, np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  means = np.stack([(p[:, c:c + 1] * f).sum(0) / p[:, c].sum() for c in range(C)])
  means -= means.mean(0)
  want = means / np.linalg.norm(means, axis=1, keepdims=True)
  np.testing.assert_allclose(embeddings.penultimate_means(teacher, x, C), want, rtol=1e-4,
                             atol=1e-5)


def test_embedding_sources(nets):
  teacher, _ = nets
  table = lambda src: np.asarray(embeddings.label_embeddings(
      dataclasses.replace(CFG, label_embeddings=src), teacher, jax.random.key(0)))
  np.testing.assert_array_equal(table('onehot'), np.eye(C))
  assert table('random').shape == (C, embeddings.RANDOM_WIDTH)
  pen = table('penultimate')
  assert pen.shape == (C, 64) and np.allclose(np.linalg.norm(pen, axis=1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match='label_embeddings'):
    dataclasses.replace(CFG, label_embeddings='clip').validate()


def test_user_npy_embeddings(nets, tmp_path):
  teacher, _ = nets
  a = np.random.default_rng(0).normal(size=(C, E_USER)).astype(np.float32)
  path = str(tmp_path / 'lte.npy')
  np.save(path, a)
  state = nayer.init_state(dataclasses.replace(CFG, label_embeddings=path), teacher,
                           jax.random.key(0))
  np.testing.assert_array_equal(state.embeddings, a)
  assert state.generator['params']['n1']['scale'].shape == (E_USER,)
  bad = {'shape.npy': (a[:3], r'shape \(3, 7\), expected \[4, E\]'),
         'flat.npy': (a[0], r'expected \[4, E\]'),
         'nan.npy': (np.where(np.eye(C, E_USER) > 0, np.nan, a), '4 non-finite'),
         'dup.npy': (np.concatenate([a[:1], a[:3]]), 'identical'),
         'text.npy': (np.array([['a'] * E_USER] * C), 'real float')}
  for name, (value, match) in bad.items():
    np.save(str(tmp_path / name), value)
    with pytest.raises(ValueError, match=match):
      embeddings.load_user(str(tmp_path / name), C)
  with pytest.raises(ValueError, match='no such file'):
    embeddings.load_user(str(tmp_path / 'missing.npy'), C)
  # The config flag reaches the library unchanged.
  cfg = fashion_mnist.get_config('method=nayer,quick')
  cfg.synthesis.label_embeddings = path
  assert runner.synthesis_config(cfg, cmi_jax.data.get_info('fashion_mnist'),
                                 cfg.synthesis.weights.to_dict()).label_embeddings == path


# ---------------------------------------------------------------- failure, resume, devices

def test_non_finite_loop_writes_nothing(nets, chain):
  """NaN class vectors make every step non-finite: nothing reaches the pool,
  the generator, its BN statistics or the EMA."""
  teacher, student = nets
  _, _, after, _ = chain[0]  # round counter 1: no reset
  bad = after.replace(embeddings=jnp.full_like(after.embeddings, jnp.nan))
  new, out = run_round(teacher, student, bad, jax.random.key(99))
  new = jax.device_get(new)
  assert int(out.metrics['loops_kept']) == 0 and not np.isfinite(out.metrics['best_loss'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.pool, after.pool)
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.bn_ema, after.bn_ema)
  for name in ('l1', 'n1', 'conv_blocks'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, new.generator['params'][name],
                           after.generator['params'][name])
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.generator['batch_stats'],
                         after.generator['batch_stats'])


def test_resume_through_a_checkpoint_is_exact(nets, chain, tmp_path):
  """Round 1's state saved with the runner's Checkpointer and restored into an
  abstract target continues exactly like the uninterrupted chain."""
  teacher, student = nets
  _, _, after1, _ = chain[1]
  ck = Checkpointer(str(tmp_path / 'ck'), async_save=False)
  ck.save(2, {'synth': jax.device_put(after1)}, {'round': 2})
  target = abstract({'synth': nayer.init_state(CFG, teacher, jax.random.key(5))})
  restored, meta = ck.restore(target)
  ck.close()
  assert meta['round'] == 2 and isinstance(restored['synth'], nayer.NayerState)
  state, out = run_round(teacher, student, jax.device_get(restored['synth']), chain[2][1])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state), chain[2][2])
  np.testing.assert_array_equal(cmi_jax.synthesis.round_kit.to_uint8(out.images), chain[2][3].images)


def _mesh_round(n, teacher, student, state, rng):
  mesh = parallel.make_mesh(n)
  steps = plan.compile_plan(mesh, CFG, CFG, KD_CFG, fresh=False)
  args = parallel.replicate(mesh, (teacher, student, state))
  return jax.device_get(steps.round(*args, rng))


@pytest.mark.slow  # three compilations (~30 s idle); chunked_linear is tested against numpy
def test_same_on_1_and_4_devices(nets, chain):
  """A round that continues a generator (round 1: no reset, L_adv on) on 1 and
  4 devices: BN statistics and noisy-layer chunks are over the global batch."""
  teacher, student = nets
  before, rng, _, _ = chain[1]
  (s1, o1), (s4, o4) = (_mesh_round(n, teacher, student, before, rng) for n in (1, 4))
  for k, v in o1.metrics.items():
    np.testing.assert_allclose(o4.metrics[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
  np.testing.assert_array_equal(o4.targets, o1.targets)
  # The first loop's images agree to float precision. Adam divides each gradient entry by
  # its own RMS, so entries whose gradient is mostly cancellation turn float reordering
  # into visible steps (see test_parallel's head test); the second loop renders from
  # those parameters: its images agree to well under one uint8 level.
  np.testing.assert_allclose(o4.images[:B], o1.images[:B], atol=1e-5)
  np.testing.assert_allclose(o4.images, o1.images, atol=2e-3)
  diff = np.abs(s4.pool.data['images'].astype(int) - s1.pool.data['images'].astype(int))
  assert diff.max() <= 1 and np.mean(diff == 0) > 0.99  # uint8 rounding at the edges
  agree, total = 0, 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s4.generator['params']),
                          jax.tree_util.tree_leaves(s1.generator['params'])):
    err = np.abs(np.asarray(a, np.float64) - b)
    assert err.max() <= CFG.g_loops * CFG.g_steps * CFG.lr_g, jax.tree_util.keystr(path)
    agree += int(np.sum(err <= 1e-4 * np.max(np.abs(b))))
    total += err.size
  assert agree / total >= 0.99, (agree, total)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         s4.bn_ema, s1.bn_ema)


# ---------------------------------------------------------------- API and configs

def test_synthesize_api(chain):
  """`cmi_jax.make_config(method='nayer')` applies the preset; `cmi_jax.synthesize`
  runs it and continues from the returned state (the chain fixture)."""
  assert (CFG.algorithm, CFG.views, CFG.g_loops, CFG.bn_mmt, CFG.lr_g) == \
      ('nayer', 'crop', 2, 0.9, 1e-3)
  assert (CFG.weights.bn, CFG.weights.oh, CFG.weights.adv, CFG.weights.cr) == \
      (10.0, 0.5, 1.33, 0.0)
  res = chain[2][3]
  assert res.config == CFG and isinstance(res.state, nayer.NayerState)
  assert int(res.state.round) == 3 and len(res.metrics) == 1
  # Round 2's 16 images went to slots 32..39 and, wrapping, 0..7 of the 40.
  pool = np.asarray(res.state.pool.data['images'])
  np.testing.assert_array_equal(np.concatenate([pool[32:], pool[:8]]), res.images)
  assert int(res.state.pool.index) == 8


def test_cifar_rows_are_the_authors_settings():
  """scripts/nayer_{100,200,300}.sh (successor-methods.md section 2.5)."""
  for module, g_steps in ((cifar10, 30), (cifar100, 40)):
    for row in ('resnet34-resnet18', 'wrn40_2-wrn16_2'):
      for epochs in (100, 200, 300):
        cfg = module.get_config(f'{row},method=nayer,epochs={epochs}')
        s, k = cfg.synthesis, cfg.kd
        assert (s.algorithm, s.batch_size, s.g_steps, s.lr_g, s.g_loops, s.g_life,
                s.le_emb_size, s.bn_mmt) == ('nayer', 400, g_steps, 4e-3, 2, 10, 1000, 0.9)
        synth = runner.synthesis_config(cfg, cmi_jax.data.get_info(cfg.data.name),
                                        s.weights.to_dict())
        assert (synth.adv_start_round, synth.warmup_rounds) == (20, 20)
        assert s.weights.to_dict() == dict(bn=10.0, oh=0.5, adv=1.33, cr=0.0, balance=0.0,
                                           act=0.0, tv=0.0)
        assert (k.batch_size, k.lr, k.lr_min, k.temperature, k.kd_steps, k.ep_steps, k.epochs,
                k.pre_rounds, k.pre_loops, k.pre_adv, k.pre_oh) == \
            (512, 0.2, 2e-4, 20.0, 400, 400, epochs, 20, 10, 0.0, 0.5)
        assert s.pool_size == 400 * (20 * 10 + epochs * 2)  # 160k / 240k / 320k
  assert cifar100.get_config('wrn40_2-wrn16_2,method=nayer').kd.epochs == 200  # NAYER_200


def test_fashion_mnist_setting_is_valid():
  cfg = fashion_mnist.get_config('method=nayer')
  cfg.teacher.checkpoint = 'random'
  runner.validate(cfg)
  s, k = cfg.synthesis, cfg.kd
  synth = runner.synthesis_config(cfg, cmi_jax.data.get_info('fashion_mnist'),
                                  s.weights.to_dict())
  assert s.batch_size % 10 == 0 and k.pre_rounds == synth.adv_start_round == 2
  assert s.pool_size == s.batch_size * (k.pre_rounds * k.pre_loops + k.epochs * s.g_loops)


@pytest.mark.slow  # two short runs of the runner (~1-2 min idle)
def test_runner_warmup_and_exact_resume(tmp_path):
  """configs/fashion_mnist.py:method=nayer,quick with a random teacher: 1 warm-up
  pre-round of kd.pre_loops loops (no KD, L_adv off), then 2 KD epochs of g_loops
  loops each; stopped after round 2 and resumed, it ends bit-identical to the
  uninterrupted run (generator, BN EMA, pool, embeddings, student)."""
  from tests.helpers import load_checkpoint  # pylint: disable=g-import-not-at-top
  cfg = fashion_mnist.get_config('method=nayer,quick')
  cfg.teacher.checkpoint = 'random'
  cfg.data.eval_limit = 32
  cfg.log.grid_every_rounds = 10 ** 6
  s, k = cfg.synthesis, cfg.kd
  assert (k.pre_rounds, k.pre_loops, s.g_loops, k.epochs) == (1, 2, 2, 2)
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  summary = runner.run(cfg, full)
  stop = cfg.copy_and_resolve_references()
  stop.log.stop_after_rounds = 2
  assert 'stopped_at_round' in runner.run(stop, resumed)
  runner.run(cfg, resumed)
  rows = cmi_jax.report.read_metrics(f'{full}/metrics.jsonl')
  assert [r['pool_size'] for r in rows] == [s.batch_size * n for n in (2, 4, 6)]
  assert 'kd_loss' not in rows[0] and 'l_adv' not in rows[0]  # warm-up: no KD, no L_adv
  assert 'kd_loss' in rows[1] and 'l_adv' in rows[1]
  a, meta_a = load_checkpoint(full)
  b, meta_b = load_checkpoint(resumed)
  assert meta_a['round'] == meta_b['round'] == 3 and summary['rounds'] == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('warmup,g_life,want', [
    (2, 5, [0, 2, 5, 7, 10, 12]),     # configs/fashion_mnist.py:method=nayer
    (20, 10, [0, 10]),                # the CIFAR scripts: the two rules agree
    (3, 4, [0, 3, 4, 7, 8, 11, 12]),
])
def test_generator_reset_schedule_is_the_references(warmup, g_life, want):
  """The reference (`nayer.py:154-155`) replaces the generator when
  (epoch - warmup) % g_life == 0 or epoch % g_life == 0 (Python's floor modulo)."""
  rounds = jnp.arange(14)
  got = np.flatnonzero(np.asarray(nayer.generator_resets(rounds, g_life, warmup)))
  reference = [e for e in range(14) if (e - warmup) % g_life == 0 or e % g_life == 0]
  assert got.tolist() == reference == [r for r in want if r < 14]


def test_fashion_mnist_nayer_warm_up_reaches_the_round():
  cfg = fashion_mnist.get_config('method=nayer')
  synth = runner.synthesis_config(cfg, cmi_jax.data.get_info('fashion_mnist'),
                                  cfg.synthesis.weights.to_dict())
  assert (synth.g_life, synth.warmup_rounds) == (5, 2)

"""FastDFKD's ImageNet recipe (preset fast_imagenet, configs/imagenet.py): the
DeepGenerator's layers and shapes, three rounds of the Reptile round (persistent
latent redrawn with a fresh meta-Adam, last iterate into the pool) against a
Python loop with numpy Adam, the remat switch, the config rows, and an end-to-end
`:quick` run of `python -m experiments.run` on a fake ImageNet folder.

Tiny shapes for the round: wrn_16_1 teacher/student at 16x16x3 (latent 1x1x8), batch 8.
"""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import data, models, report
from cmi_jax.synthesis import fast, presets
from cmi_jax.synthesis.config import LossWeights, SynthesisConfig
from cmi_jax.synthesis.round_kit import to_uint8
from configs import imagenet
from experiments import run_config
from tests.helpers import ROOT, fake_imagenet, subprocess_env, teacher_student
from tests.test_fast import NumpyAdam, _close, _np

pytestmark = pytest.mark.usefixtures('compilation_cache')

NUM_CLASSES, B, K, SHAPE = 4, 8, 3, (16, 16, 3)
CFG = SynthesisConfig(
    image_shape=SHAPE, num_classes=NUM_CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3,
    batch_size=B, g_steps=K, lr_g=0.01, lr_z=0.05, lr_meta=1e-3, nz=8, ngf=4, pool_size=32,
    algorithm='fast', generator='deep', views='resized', local_scale=(0.75, 1.0),
    meta_rule='reptile', z_life=2, meta_reset=True, pool_iterate='last', bn_mmt=0.9,
    adv_start_round=0, reset_l0_round=-1,
    weights=LossWeights(bn=0.1, oh=0.1, adv=1.0, cr=0.0)).validate()


# ---------------------------------------------------------------- the DeepGenerator

def test_deep_generator_layers_and_shapes_at_224():
  """Five conv blocks from a [B, 14, 14, 256] latent (no Linear), widths 128, 128, 64, 64,
  64 at 14, 28, 56, 112, 224, then conv to 3 with bias: 592,451 parameters (the facts
  file's 0.59M used ones)."""
  cfg = SynthesisConfig(image_shape=(224, 224, 3), num_classes=1000, mean=(0.5,) * 3,
                        std=(0.5,) * 3, generator='deep').validate()
  assert cfg.latent_shape == (14, 14, 256)
  gen = cfg.make_generator()
  z = jnp.zeros((2,) + cfg.latent_shape)
  variables = jax.eval_shape(lambda: gen.init(jax.random.key(0), z))
  shapes = jax.tree_util.tree_map(lambda a: a.shape, variables['params'])
  widths = [(256, 128), (128, 128), (128, 64), (64, 64), (64, 64)]
  for i, (cin, cout) in enumerate(widths):
    assert shapes[f'block{4 * i}'] == {'conv': {'kernel': (3, 3, cin, cout)},
                                       'bn': {'scale': (cout,), 'bias': (cout,)}}
  assert shapes['conv19'] == {'kernel': (3, 3, 64, 3), 'bias': (3,)}
  assert set(shapes) == {'block0', 'block4', 'block8', 'block12', 'block16', 'conv19'}
  n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables['params']))
  conv = sum(9 * a * b for a, b in widths) + 9 * 64 * 3 + 3
  assert n == conv + 2 * sum(b for _, b in widths) == 592451
  out = jax.eval_shape(lambda v: gen.apply(v, z, mutable=['batch_stats'])[0], variables)
  assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32


def test_deep_generator_forward_upsamples_by_16_and_checks_its_latent():
  gen = models.DeepGenerator(nz=8, ngf=4, img_size=32)
  z = jax.random.normal(jax.random.key(0), (3, 2, 2, 8))
  variables = gen.init(jax.random.key(1), z)
  x, _ = gen.apply(variables, z, mutable=['batch_stats'])
  assert x.shape == (3, 32, 32, 3)
  assert float(x.min()) > 0.0 and float(x.max()) < 1.0  # sigmoid
  # Samples differ (no collapse through the train-mode BN).
  assert float(jnp.abs(x[0] - x[1]).mean()) > 1e-3
  with pytest.raises(ValueError, match=r'latent \[B, 2, 2, 8\]'):
    gen.apply(variables, jnp.zeros((3, 8)), mutable=['batch_stats'])
  with pytest.raises(ValueError, match='multiples of 16'):
    dataclasses.replace(CFG, image_shape=(8, 8, 3)).validate()
  with pytest.raises(ValueError, match='reset_l0_round'):
    dataclasses.replace(CFG, reset_l0_round=3).validate()


@pytest.mark.slow  # ~70 s: three networks compiled twice (with and without remat)
def test_remat_changes_no_value_nor_gradient():
  """nn.remat of the blocks (synthesis.remat): same parameters, outputs and input
  gradients for the DeepGenerator and an ImageNet ResNet; unsupported nets say so."""
  gen, gen_r = (models.DeepGenerator(nz=8, ngf=4, img_size=16, remat=r) for r in (False, True))
  z = jax.random.normal(jax.random.key(0), (2, 1, 1, 8))
  v = gen.init(jax.random.key(1), z)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
      gen_r.init(jax.random.key(1), z))
  f = lambda g: lambda z: jnp.sum(g.apply(v, z, mutable=['batch_stats'])[0] ** 2)
  np.testing.assert_allclose(jax.grad(f(gen_r))(z), jax.grad(f(gen))(z), rtol=1e-5, atol=1e-7)
  net, net_r = (models.ImageNetResNet(num_blocks=(1, 1, 1, 1), num_classes=5, remat=r)
                for r in (False, True))
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  nv = models.init(net, jax.random.key(3), x.shape)
  g = lambda n: jax.grad(lambda x: jnp.sum(n.apply(nv, x) ** 2))(x)
  np.testing.assert_allclose(g(net_r), g(net), rtol=1e-4, atol=1e-6)
  assert models.get('resnet50_imagenet', 5, remat=True).remat
  assert models.get('mobilenetv2_imagenet', 5, remat=True).remat
  with pytest.raises(ValueError, match="remat .* not 'wrn_16_1'"):
    models.get('wrn_16_1', 10, remat=True)


# ---------------------------------------------------------------- the Reptile round

def _reference_round(cfg, teacher, student, state, rng, meta_adams, python_loop=True):
  """One round with the Reptile step in numpy: K inner steps on {theta', z}, the
  gradient theta - theta'_K and a numpy meta-Adam step (meta_adams: one NumpyAdam per
  leaf, made afresh by the caller when the latent is redrawn).

  python_loop: the inner steps as a Python loop of jax.grad with numpy (float64)
  Adam; else `fast.inner_loop` (tested against numpy in tests/test_fast.py) gives
  theta'_K, and only the meta step is numpy's. Once the latent is trained, many of
  its gradient entries are near zero and float32 Adam noise there grows through the
  rounds, so a later round compares the meta step alone.
  Returns (theta, z_K, last images, last EMA, targets, redrawn)."""
  keys = fast.round_keys(rng)
  targets = jax.random.randint(keys['targets'], (cfg.batch_size,), 0, cfg.num_classes)
  redraw = (int(state.round) + 1) % cfg.z_life == 0
  z = (jax.random.normal(keys['z'], (cfg.batch_size,) + cfg.latent_shape) if redraw
       else state.z)
  loss_fn = fast.make_loss_fn(cfg, teacher, student, state.gen.batch_stats, state.bn_ema,
                              targets, jnp.float32(1.0))
  leaves, treedef = jax.tree_util.tree_flatten(_np(state.gen.params))
  step_keys = jax.random.split(keys['steps'], cfg.g_steps)
  if python_loop:
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    w, zz = [l.copy() for l in leaves], np.asarray(z, np.float64)
    inner, inner_z = [NumpyAdam(cfg.lr_g) for _ in leaves], NumpyAdam(cfg.lr_z)
    for key in step_keys:
      f = {'generator': jax.tree_util.tree_unflatten(treedef, [jnp.asarray(l, jnp.float32)
                                                                for l in w]),
           'z': jnp.asarray(zz, jnp.float32)}
      (_, aux), g = grad_fn(f, key)
      last_x, last_ema = np.asarray(aux['best']['x']), aux['last']
      w = [opt.step(p, gl) for opt, p, gl in
           zip(inner, w, jax.tree_util.tree_leaves(_np(g['generator'])))]
      zz = inner_z.step(zz, np.asarray(g['z'], np.float64))
  else:
    f0 = {'generator': state.gen.params, 'z': jnp.asarray(z)}
    fk, _, best, last_ema, _ = jax.jit(lambda f: fast.inner_loop(
        loss_fn, fast.inner_optimizer(cfg), f, step_keys, 'last'))(f0)
    w, zz = jax.tree_util.tree_leaves(_np(fk['generator'])), np.asarray(fk['z'])
    last_x = np.asarray(best['aux']['x'])
  theta = [m.step(p, p - pk) for m, p, pk in zip(meta_adams, leaves, w)]
  return jax.tree_util.tree_unflatten(treedef, theta), zz, last_x, last_ema, targets, redraw


def _mostly_close(got, want, step, what=''):
  """Every entry within 25% of a meta step `step`, and 99% of them within 1%. Reptile's
  gradient theta - theta'_K inherits the inner Adam's float32 noise on entries whose
  inner gradient is near zero (Adam moves them by a noisy fraction of lr_g), which
  the meta-Adam rescales; a wrong rule, a missing step or a missing meta-Adam reset
  moves most entries by about a whole step."""
  errs = []
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    err = np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).ravel()
    assert err.max() <= 0.25 * step, (what + jax.tree_util.keystr(path), err.max())
    errs.append(err)
  far = np.mean(np.concatenate(errs) > 0.01 * step)
  assert far <= 0.01, (what, far)


@pytest.fixture(scope='module')
def three_rounds():
  teacher, student = teacher_student(NUM_CLASSES, SHAPE)
  round_fn = jax.jit(fast.fast_round, static_argnums=(0,))
  states = [fast.init_state(CFG, teacher, jax.random.key(2))]
  outs = []
  for r in range(3):
    state, out = round_fn(CFG, teacher, student, states[-1], jax.random.key(20 + r))
    states.append(state)
    outs.append(out)
  return teacher, student, jax.device_get(states), jax.device_get(outs)


@pytest.mark.slow  # ~110 s with its fixture
def test_reptile_round_matches_numpy_over_three_rounds(three_rounds):
  """z_life 2: round 0 trains init's latent, round 1 redraws it with a fresh meta-Adam
  (Adam's t restarts: at t = 1 the step is lr_meta * sign(g)), round 2 continues the
  inner-trained z_K and the meta-Adam (t = 2); theta <- meta-Adam(theta - theta'_K);
  the pool gets the last iterate. Rounds 0 and 1 against a Python loop with numpy
  Adam throughout, round 2's meta step against numpy (see _reference_round)."""
  teacher, student, states, outs = three_rounds
  n = len(jax.tree_util.tree_leaves(states[0].gen.params))
  meta = [NumpyAdam(CFG.lr_meta) for _ in range(n)]
  redraws = []
  for r in range(3):
    s_in, s_out, out = states[r], states[r + 1], outs[r]
    if (r + 1) % CFG.z_life == 0:
      meta = [NumpyAdam(CFG.lr_meta) for _ in range(n)]
    theta, z_k, last_x, last_ema, targets, redraw = _reference_round(
        CFG, teacher, student, s_in, jax.random.key(20 + r), meta, python_loop=r < 2)
    redraws.append(redraw)
    assert float(out.metrics['z_redrawn']) == float(redraw)
    _mostly_close(s_out.gen.params, theta, CFG.lr_meta, what=f'theta {r}')
    # float32 vs float64: Adam divides by each entry's own RMS, so an entry with a
    # near-zero gradient moves by a noisy fraction of a step: 1% of an inner z step.
    np.testing.assert_allclose(s_out.z, z_k, rtol=1e-4, atol=0.01 * CFG.lr_z)
    np.testing.assert_allclose(out.images, last_x, atol=1e-4)
    assert int(out.metrics['best_step']) == K - 1  # the last iterate, whatever its loss
    np.testing.assert_array_equal(out.targets, targets)
    _close(s_out.bn_ema, last_ema, rtol=1e-4, atol=1e-5, what='ema')
    assert np.all(out.metrics['l_adv'] <= 0.0)  # L_adv from the first round
  assert redraws == [False, True, False]
  # The latent carried over is the inner-trained one, not the one the round started with.
  assert np.abs(states[1].z - states[0].z).max() > 1e-4
  assert int(states[3].pool.count) == 3 * B
  np.testing.assert_array_equal(states[3].pool.data['images'][2 * B:3 * B],
                                to_uint8(outs[2].images))


@pytest.mark.slow  # shares the three-round fixture
def test_meta_adam_restarts_with_the_latent(three_rounds):
  """A fresh meta-Adam moves every entry with a non-zero Reptile difference by exactly
  lr_meta (t = 1: m_hat / sqrt(v_hat) = sign(g)): in round 0 and again in round 1, where
  the latent is redrawn; in round 2 (t = 2) the steps spread. block16's kernel: every
  tap is used at 16x16 (block0 sees a 1x1 latent, so only its centre tap)."""
  _, _, states, _ = three_rounds
  kernel = lambda s: np.asarray(s.gen.params['block16']['conv']['kernel'], np.float64)
  exact = [np.mean(np.abs(np.abs(kernel(b) - kernel(a)) - CFG.lr_meta) < 0.01 * CFG.lr_meta)
           for a, b in zip(states[:-1], states[1:])]
  assert exact[0] > 0.95 and exact[1] > 0.95 and exact[2] < 0.5, exact


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize('row,student,adv', [
    ('resnet50-resnet50', 'resnet50_imagenet', 0.1),
    ('resnet50-resnet18', 'resnet18_imagenet', 1.0),
    ('resnet50-mobilenetv2', 'mobilenetv2_imagenet', 0.1)])
def test_fast50_rows_are_the_logged_settings(row, student, adv):
  cfg = imagenet.get_config(row)
  assert (cfg.teacher.arch, cfg.student.arch, cfg.method) == ('resnet50_imagenet', student,
                                                              'fast_imagenet')
  info = run_config.dataset_info(cfg)
  s = run_config.synthesis_config(cfg, info, cfg.synthesis.weights.to_dict())
  assert s.image_shape == (224, 224, 3) and s.latent_shape == (14, 14, 256)
  assert (s.weights.adv, s.weights.bn, s.weights.oh) == (adv, 0.1, 0.1)
  assert (s.g_steps, s.batch_size, s.lr_g, s.lr_z, s.lr_meta, s.bn_mmt) == (
      50, 100, 2e-4, 0.01, 1e-4, 0.9)
  assert (s.meta_rule, s.z_life, s.meta_reset, s.pool_iterate) == ('reptile', 50, True, 'last')
  assert (s.views, s.local_scale, s.adv_start_round, s.reset_l0_round) == (
      'resized', (0.75, 1.0), 0, -1)
  assert s.pool_size == 400 * 10 * 100
  k = cfg.kd
  assert (k.batch_size, k.kd_steps, k.ep_steps, k.epochs, k.temperature, k.lr, k.pre_rounds) \
      == (100, 100, 1000, 400, 5.0, 0.1, 0)
  assert (k.momentum, k.weight_decay, k.lr_min) == (0.9, 1e-4, 0.0)
  # KD on pool images: ImageNet's RandomResizedCrop(224) (torchvision's scale) + flip.
  kd = run_config.kd_config(cfg, info)
  assert kd.crop_scale == (0.08, 1.0) and kd.flip
  assert run_config.make_plan(cfg).total_rounds == 4000
  # At 224 pixels YNNPACK's fusions stay on (the entry point adds no XLA flag).
  assert cfg.runtime.xla_cpu_ynn_fusions is True


def test_cmi_and_deepinv_at_224():
  cmi = imagenet.get_config('method=cmi')
  assert cmi.synthesis.feature_layers == 'stages' and cmi.synthesis.algorithm == 'cmi'
  assert cmi.kd.temperature == 5.0 and cmi.synthesis.batch_size == 100
  deepinv = imagenet.get_config('resnet50-resnet18,method=deepinv')
  assert deepinv.synthesis.g_steps == 2000 and deepinv.synthesis.synthesizer == 'pixels'
  for c in (cmi, deepinv, imagenet.get_config('method=cmi,quick')):
    c.teacher.checkpoint = 'random'
    run_config.validate(c)
  with pytest.raises(ValueError, match='configs/imagenet.py has'):
    imagenet.get_config('method=nayer')
  assert presets.get('fast_imagenet')['synthesis']['generator'] == 'deep'


# ---------------------------------------------------------------- end to end

@pytest.mark.slow  # ~70 s: the :quick run end to end
def test_quick_run_on_a_fake_imagenet_folder(tmp_path, cache_dir):
  """`python -m experiments.run --config=configs/imagenet.py:quick`: 4 rounds (2 epochs
  of 2), the latent redrawn in round 2, the student evaluated on the val folder."""
  data_dir = fake_imagenet(tmp_path / 'imagenet', classes=4, per_class=1)
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config=configs/imagenet.py:quick',
       f'--config.data.dir={data_dir}', f'--workdir={workdir}'],
      cwd=ROOT, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Student accuracy on the imagenet test split' in proc.stdout
  rows = report.read_metrics(workdir / 'metrics.jsonl')
  assert [r['round'] for r in rows] == [1, 2, 3, 4]
  assert [r['z_redrawn'] for r in rows] == [0.0, 1.0, 0.0, 1.0]
  assert [r['pool_size'] for r in rows] == [8, 16, 24, 32]
  assert all(r['best_step'] == 1 for r in rows)  # g_steps 2: the last iterate
  assert [r['epoch'] for r in rows if 'epoch' in r] == [1, 2]
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['rounds'] == 4 and 0.0 <= summary['student_accuracy'] <= 100.0
  test = data.load('imagenet', 'test', data_dir, num_classes=4, image_size=16)
  assert test.images.shape == (8, 16, 16, 3)

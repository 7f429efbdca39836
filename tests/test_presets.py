"""Methods as presets (cmi_jax/synthesis/presets.py): each changes exactly the loss
terms and settings it should, through the library (`cmi_jax.make_config`) and the
runner (`synthesis_config(base_config(...))`) alike; the terms a synthesis call
computes are exactly the enabled ones; the two-stage recipe's pre rounds do no KD.

Expected values: reference-facts sections 2, 3, 5, 5b and the paper's Tables 1, 2, 4.
"""

import contextlib
import dataclasses
import functools
import io
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import cmi_jax
from cmi_jax import data, models, report
from cmi_jax.synthesis import algorithms, cmi, gan, presets
from cmi_jax.teacher import Teacher
from configs import common, fashion_mnist
from experiments import runner

pytestmark = pytest.mark.usefixtures('compilation_cache')


# CMI as published (reference-facts sections 2 and 3, 'from scratch').
CMI = dict(synthesizer='generator', generator='cmi', reinit=True, views='cmi',
           adv_kind='masked_kl', adv_temperature=1.0, oh_kind='targets', head_kind='mlp',
           g_steps=200, lr_g=1e-3, betas=(0.5, 0.999), nz=256, batch_size=256,
           cr_temperature=0.1, n_neg=4096, head_dim=256, bank_size=40960)
CMI_WEIGHTS = dict(bn=1.0, oh=1.0, adv=0.5, cr=0.8, balance=0.0, act=0.0, tv=0.0)
CMI_KD = dict(mode='pool', loss='kl', temperature=20.0, kd_steps=400, ep_steps=400, epochs=200,
              pre_rounds=0, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4)

# The GAN baselines (section 5b): large generator trained continuously, 1 step per
# round on fresh z, oh on the teacher's argmax, adv = -KL at T=1 without mask, and
# the student trained on fresh samples with that same criterion (KL at T=1).
GAN = dict(generator='large', reinit=False, g_steps=1, oh_kind='argmax', adv_kind='kl',
           adv_temperature=1.0, lr_g=1e-3, betas=(0.5, 0.999), nz=256)
GAN_KD = dict(mode='fresh', loss='kl', temperature=1.0)

# name -> (synthesis fields changed from CMI, loss weights changed from CMI,
#          kd fields changed from CMI). Unlisted fields must equal CMI's.
EXPECTED = {
    'cmi': ({}, {}, {}),
    'cmi_head_mlp': ({}, {}, {}),
    # DeepInversion (ADI): pixels N(0,1) in normalized space, Adam 0.1 (0.5, 0.99), 1000
    # steps, roll+flip jitter, bn 10, oh 1, adv 1 = -JS at T=3, TV 0.001; no contrast.
    'deepinv': (dict(synthesizer='pixels', views='jitter', g_steps=1000, lr_g=0.1,
                     betas=(0.5, 0.99), adv_kind='js', adv_temperature=3.0),
                dict(bn=10.0, adv=1.0, cr=0.0, tv=0.001), {}),
    # adv / bn / oh / act / balance: DAFL 0 / 0 / 1 / 0.001 / 20 (nz 512),
    # ZSKT 1 / 0 / 0 / 0 / 0, DFQ 1 / 1 / 1 / 0 / 20; DFAD: -L1 of logits, L1 KD.
    'dafl': (dict(GAN, nz=512), dict(bn=0.0, adv=0.0, cr=0.0, act=0.001, balance=20.0),
             dict(GAN_KD, kd_steps=5)),
    'zskt': (GAN, dict(bn=0.0, oh=0.0, adv=1.0, cr=0.0), dict(GAN_KD, kd_steps=5)),
    'dfq': (GAN, dict(adv=1.0, cr=0.0, balance=20.0), dict(GAN_KD, kd_steps=10)),
    'dfad': (dict(GAN, adv_kind='l1'), dict(bn=0.0, oh=0.0, adv=1.0, cr=0.0),
             dict(GAN_KD, kd_steps=5, loss='l1')),
    # Ablations (paper Tables 2 and 4): one component off or swapped each. Without the
    # generator the pixels take DeepInversion's pixel-update optimizer (the paper:
    # "replace the generator with pixel update as used in [Yin et al., 2020]").
    'cmi_no_contrast': ({}, dict(cr=0.0), {}),
    'cmi_no_adv': ({}, dict(adv=0.0), {}),
    'cmi_no_generator': (dict(synthesizer='pixels', lr_g=0.1, betas=(0.5, 0.99)), {}, {}),
    'cmi_head_none': (dict(head_kind='none'), {}, {}),
    'cmi_head_linear': (dict(head_kind='linear'), {}, {}),
    # Table 1 'adversarial' (section 3): ~50k non-adversarial pre-inverted images
    # (196 rounds x 256), then adv 0.5 / bn 1 / oh 0.5, 2000 KD steps per round, 40
    # epochs; the pool keeps all (196 + 40) x 256 images.
    'cmi_two_stage': (dict(pool_size=60416, warmup_rounds=196), dict(oh=0.5),
                      dict(pre_rounds=196, pre_adv=0.0, pre_oh=1.0, kd_steps=2000,
                           ep_steps=2000, epochs=40)),
    # NAYER (successor-methods.md 2.5, NAYER_200): its own round; batch 400, 30 steps per
    # loop at lr 4e-3, crop+flip view, bn 10 / oh 0.5 / adv 1.33 (on from round 20), 2
    # loops per epoch after 20 warm-up rounds of 10; KD batch 512, lr 0.2 cosine to 2e-4;
    # every loop's images kept: (20 x 10 + 200 x 2) x 400.
    'nayer': (dict(algorithm='nayer', views='crop', batch_size=400, g_steps=30, lr_g=4e-3,
                   pool_size=240000, adv_start_round=20, warmup_rounds=20),
              dict(bn=10.0, oh=0.5, adv=1.33, cr=0.0),
              dict(batch_size=512, lr=0.2, lr_min=2e-4, pre_rounds=20, pre_oh=0.5,
                   pre_loops=10)),
}
# FastDFKD (successor-methods.md 1.5, scripts/fast_cifar.sh): its own round; K / lr_g / lr_z
# per variant, crop+flip view, bn 10 / oh 0.4 / adv 1.1 (wrn rows; on from round 20), 20
# synthesis-only warm-up rounds with the same loss, reset_l0 at round 140; KD batch 256,
# lr 0.2 cosine to 2e-4; every image kept: 220 x 256.
for _name, (_k, _lr_g, _lr_z) in {'fast2': (2, 5e-3, 0.015), 'fast5': (5, 3e-3, 0.01),
                                  'fast10': (10, 2e-3, 0.01)}.items():
  EXPECTED[_name] = (dict(algorithm='fast', views='crop', g_steps=_k, lr_g=_lr_g, lr_z=_lr_z,
                          pool_size=56320, adv_start_round=19, reset_l0_round=139,
                          warmup_rounds=20),
                     dict(bn=10.0, oh=0.4, adv=1.1, cr=0.0),
                     dict(batch_size=256, lr=0.2, lr_min=2e-4, pre_rounds=20, pre_adv=1.1,
                          pre_oh=0.4))

# FastDFKD's ImageNet recipe (the logged Fast-50 runs, zoo-and-datasets.md section 5).
EXPECTED['fast_imagenet'] = (
    dict(algorithm='fast', generator='deep', views='resized', local_scale=(0.75, 1.0),
         batch_size=100, g_steps=50, lr_g=2e-4, lr_z=0.01, lr_meta=1e-4, meta_rule='reptile',
         z_life=50, meta_reset=True, pool_iterate='last', pool_size=400000,
         adv_start_round=0, reset_l0_round=-1, warmup_rounds=0),
    dict(bn=0.1, oh=0.1, adv=0.1, cr=0.0),
    dict(batch_size=100, kd_steps=100, ep_steps=1000, epochs=400, temperature=5.0, lr=0.1,
         lr_min=0.0, pre_rounds=0, pre_adv=0.1, pre_oh=0.1))

# The unweighted terms a synthesis call computes (with a student).
TERMS = {
    'cmi': {'bn', 'oh', 'adv', 'cr'}, 'cmi_head_mlp': {'bn', 'oh', 'adv', 'cr'},
    'cmi_head_none': {'bn', 'oh', 'adv', 'cr'}, 'cmi_head_linear': {'bn', 'oh', 'adv', 'cr'},
    'cmi_no_generator': {'bn', 'oh', 'adv', 'cr'}, 'cmi_two_stage': {'bn', 'oh', 'adv', 'cr'},
    'cmi_no_contrast': {'bn', 'oh', 'adv'}, 'cmi_no_adv': {'bn', 'oh', 'cr'},
    'deepinv': {'bn', 'oh', 'adv', 'tv'}, 'dafl': {'oh', 'act', 'balance'}, 'zskt': {'adv'},
    'dfq': {'bn', 'oh', 'adv', 'balance'}, 'dfad': {'adv'}, 'nayer': {'bn', 'oh', 'adv'},
    'fast2': {'bn', 'oh', 'adv'}, 'fast5': {'bn', 'oh', 'adv'}, 'fast10': {'bn', 'oh', 'adv'},
    'fast_imagenet': {'bn', 'oh', 'adv'},
}


def test_every_preset_is_covered():
  assert set(presets.PRESETS) == set(EXPECTED) == set(TERMS)


def test_cmi_preset_is_the_published_setting():
  lib = cmi_jax.make_config(dataset='cifar10')
  for k, v in CMI.items():
    assert getattr(lib, k) == v, k
  assert dataclasses.asdict(lib.weights) == CMI_WEIGHTS
  cfg = common.base_config('cifar10')
  assert {k: cfg.kd[k] for k in CMI_KD} == CMI_KD
  assert cfg.synthesis.weights.to_dict() == CMI_WEIGHTS


def _expected(base, name):
  fields, weights, _ = EXPECTED[name]
  return dataclasses.replace(base, weights=dataclasses.replace(base.weights, **weights),
                             **fields)


def _runner_synth(cfg):
  return runner.synthesis_config(cfg, data.get_info(cfg.data.name),
                                 cfg.synthesis.weights.to_dict())


# fast_imagenet's DeepGenerator needs sides that are multiples of 16, not Fashion-MNIST's 28:
# tests/test_imagenet.py checks it on configs/imagenet.py.
AT_28 = sorted(set(EXPECTED) - {'fast_imagenet'})


@pytest.mark.parametrize('name', AT_28)
def test_preset_library_config(name):
  cmi_cfg = cmi_jax.make_config(dataset='fashion_mnist', method='cmi')
  got = cmi_jax.make_config(dataset='fashion_mnist', method=name)
  assert got == _expected(cmi_cfg, name)  # every other field untouched
  assert got.image_shape == (28, 28, 1) and got.num_classes == 10


@pytest.mark.parametrize('name', AT_28)
def test_preset_runner_config(name, caplog):
  base = common.base_config('fashion_mnist', 'cmi')
  cfg = common.base_config('fashion_mnist', name)
  assert cfg.method == name
  assert _runner_synth(cfg) == _expected(_runner_synth(base), name)
  assert cfg.kd.to_dict() == {**base.kd.to_dict(), **EXPECTED[name][2]}
  for section in ('data', 'teacher', 'student', 'mesh', 'log'):
    assert cfg[section].to_dict() == base[section].to_dict()
  runner.validate(_with_random_teacher(cfg))  # every preset is a valid run...
  assert 'departs from that preset' not in caplog.text  # ...and matches its name


def _with_random_teacher(cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.teacher.checkpoint = 'random'
  return cfg


def _flat_diff(a, b):
  fa = {**dataclasses.asdict(a), **{f'w.{k}': v for k, v in dataclasses.asdict(a.weights).items()}}
  fb = {**dataclasses.asdict(b), **{f'w.{k}': v for k, v in dataclasses.asdict(b.weights).items()}}
  return {k for k in fa if k != 'weights' and fa[k] != fb[k]}


@pytest.mark.parametrize('name,diff', [
    ('cmi_no_contrast', {'w.cr'}), ('cmi_no_adv', {'w.adv'}),
    ('cmi_head_none', {'head_kind'}), ('cmi_head_linear', {'head_kind'}),
    ('cmi_no_generator', {'synthesizer', 'lr_g', 'betas'}),  # pixels + their optimizer
])
def test_ablations_change_one_component(name, diff):
  base = cmi_jax.make_config(dataset='cifar10')
  assert _flat_diff(cmi_jax.make_config(dataset='cifar10', method=name), base) == diff
  assert presets.get(name)['kd'] == presets.get('cmi')['kd']


def test_library_overrides_and_unknown_method():
  cfg = cmi_jax.make_config(dataset='cifar10', method='dafl', weights={'act': 0.01}, g_steps=3)
  assert (cfg.weights.act, cfg.weights.balance, cfg.g_steps, cfg.nz) == (0.01, 20.0, 3, 512)
  with pytest.raises(ValueError, match="'cmi_two_stage'"):
    cmi_jax.make_config(dataset='cifar10', method='cmi2')
  with pytest.raises(ValueError, match='dfq'):
    common.base_config('cifar10', 'DFQ')


# NAYER's CPU-sized Fashion-MNIST setting resizes its batch, schedule and pool (the
# structure and every weight and lr stay the preset's).
CPU_RESIZED = {'nayer': {'batch_size', 'g_steps', 'pool_size', 'adv_start_round', 'g_life',
                         'kd_steps', 'ep_steps', 'epochs', 'pre_rounds', 'pre_loops'}}
# FastDFKD's likewise (batch 64, 10 warm-up rounds, 5 rounds x 30 KD steps per epoch).
CPU_RESIZED.update({name: {'batch_size', 'pool_size', 'adv_start_round', 'reset_l0_round',
                           'kd_steps', 'ep_steps', 'epochs', 'pre_rounds'}
                    for name in ('fast2', 'fast5', 'fast10')})


def test_fashion_mnist_config_keeps_each_presets_schedule():
  """The CPU sizing of configs/fashion_mnist.py must not undo a method's own
  per-round schedule (e.g. the GAN baselines' 1 generator step per 5-10 KD steps)."""
  for name in AT_28:
    cfg = fashion_mnist.get_config(f'method={name}')
    preset = presets.get(name)
    for sec in ('synthesis', 'kd'):
      for k, v in preset[sec].items():
        if k in CPU_RESIZED.get(name, ()):
          continue
        if not isinstance(v, dict):
          assert cfg[sec][k] == v or tuple(cfg[sec][k]) == v, (name, sec, k)
    for k, v in EXPECTED[name][1].items():
      assert cfg.synthesis.weights[k] == v, (name, k)
  cmi_cfg = fashion_mnist.get_config()
  assert (cmi_cfg.synthesis.g_steps, cmi_cfg.kd.kd_steps, cmi_cfg.kd.epochs) == (40, 60, 12)
  assert fashion_mnist.get_config('method=dfq').synthesis.g_steps == 1
  assert fashion_mnist.get_config('method=deepinv').synthesis.g_steps == 1000


# ---------------------------------------------------------------- terms a call computes

TINY = dict(image_shape=(8, 8, 1), num_classes=4, mean=(0.5,), std=(0.25,), batch_size=4,
            g_steps=2, nz=8, ngf=4, n_neg=4, head_dim=4, bank_size=8, pool_size=8,
            global_padding=1, jitter=1)


@pytest.fixture(scope='module')
def tiny_nets():
  """Random wrn_16_1 teacher and student on 8x8x1 images, 4 classes."""
  module = models.get('wrn_16_1', 4)
  t = Teacher(module, models.init(module, jax.random.key(0), (1, 8, 8, 1)))
  s = Teacher(module, models.init(module, jax.random.key(1), (1, 8, 8, 1)))
  return t, s


def _tiny(name):
  return cmi_jax.make_config(method=name, **TINY)


def _call_shapes(name, teacher, student):
  """Output shapes of one synthesis call of preset `name` (traced, not compiled)."""
  cfg = _tiny(name)
  key = jax.random.key(2)
  if presets.get(name)['kd']['mode'] == 'fresh':
    gen = gan.init_generator_state(cfg, jax.random.key(3))
    return jax.eval_shape(functools.partial(gan.gan_round, cfg), teacher, student, gen, key)[1]
  algorithm = algorithms.get(cfg.algorithm)
  state = algorithm.init_state(cfg, teacher, jax.random.key(3))
  return jax.eval_shape(functools.partial(algorithm.round, cfg), teacher, student, state,
                        key)[1].metrics


@pytest.mark.parametrize('name', sorted(set(TERMS) - {'fast_imagenet'}))  # 8x8: see AT_28
def test_call_computes_exactly_the_enabled_terms(name, tiny_nets):
  metrics = _call_shapes(name, *tiny_nets)
  assert {k[2:] for k in metrics if k.startswith('l_')} == TERMS[name]
  loops = _tiny(name).g_loops if _tiny(name).algorithm == 'nayer' else 1  # steps per loop
  assert metrics['loss'].shape == (loops * TINY['g_steps'],)


def test_no_student_no_adversarial_term(tiny_nets):
  metrics = _call_shapes('cmi', tiny_nets[0], None)
  assert {k for k in metrics if k.startswith('l_')} == {'l_bn', 'l_oh', 'l_cr'}


def test_dafl_generator_steps(tiny_nets):
  """DAFL's generator steps, run: the loss is the weighted sum of its three terms at
  every step, each term in its range, and the generator persists and changes."""
  teacher, student = tiny_nets
  cfg = _tiny('dafl')
  gen0 = gan.init_generator_state(cfg, jax.random.key(3))
  gen, m = jax.jit(functools.partial(gan.gan_round, cfg))(teacher, student, gen0,
                                                          jax.random.key(4))
  m = jax.tree_util.tree_map(np.asarray, m)
  np.testing.assert_allclose(m['loss'], 1.0 * m['l_oh'] + 0.001 * m['l_act']
                             + 20.0 * m['l_balance'], rtol=1e-5)
  assert np.all(m['l_oh'] > 0) and np.all(m['l_act'] < 0)
  assert np.all((m['l_balance'] >= -math.log(4) - 1e-5) & (m['l_balance'] <= 0))
  assert int(gen.step) == TINY['g_steps']
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(gen.params),
                                                      jax.tree_util.tree_leaves(gen0.params))]
  assert all(changed)


# ---------------------------------------------------------------- the two-stage run

@pytest.mark.slow  # ~80 s: a two-stage run
def test_two_stage_pre_rounds_do_no_kd(tmp_path):
  """cmi_two_stage (quick, Fashion-MNIST, random teacher, 1 device): round 1 is a
  pre-inversion round (pre weights: adv 0, no KD), round 2 an adversarial CMI round
  followed by KD. oh and pre_oh are swapped (1 / 0.5 instead of 0.5 / 1) so that the
  pre round's weights show in its loss."""
  cfg = fashion_mnist.get_config('method=cmi_two_stage,quick')
  assert cfg.kd.pre_rounds == 1 and cfg.kd.pre_adv == 0.0
  assert (cfg.synthesis.weights.oh, cfg.kd.pre_oh) == (0.5, 1.0)
  cfg.synthesis.weights.oh, cfg.kd.pre_oh = 1.0, 0.5
  cfg.teacher.checkpoint = 'random'
  cfg.mesh.num_devices = 1  # cheaper to compile; 1 vs 4 devices: tests/test_parallel.py
  cfg.kd.epochs, cfg.kd.ep_steps = 2, 2 * cfg.kd.kd_steps
  cfg.synthesis.pool_size = cfg.synthesis.bank_size = 24
  cfg.data.dir = str(tmp_path)  # no test data: no evaluation to compile
  cfg.log.stop_after_rounds = 2
  with contextlib.redirect_stdout(io.StringIO()):
    assert runner.run(cfg, str(tmp_path / 'run'))['stopped_at_round'] == 2
  rows = report.read_metrics(tmp_path / 'run' / 'metrics.jsonl')
  assert [r['round'] for r in rows] == [1, 2]
  pre, main = rows
  b = cfg.synthesis.batch_size
  assert {k for k in pre if k.startswith('l_')} == {'l_bn', 'l_oh', 'l_cr'}  # adv 0
  assert not {'kd_loss', 'lr', 'epoch'} & set(pre) and pre['pool_size'] == b
  assert pre['loss'] == pytest.approx(pre['l_bn'] + 0.5 * pre['l_oh'] + 0.8 * pre['l_cr'],
                                      rel=1e-5)
  assert {k for k in main if k.startswith('l_')} == {'l_bn', 'l_oh', 'l_adv', 'l_cr'}
  assert {'kd_loss', 'lr'} <= set(main) and main['pool_size'] == 2 * b
  assert main['lr'] == pytest.approx(0.1)  # the first KD epoch starts after the pre rounds
  assert main['loss'] == pytest.approx(main['l_bn'] + main['l_oh'] + 0.5 * main['l_adv']
                                       + 0.8 * main['l_cr'], rel=1e-5)
  # Checkpoint 1 (after the pre round): the student never stepped.
  mngr = ocp.CheckpointManager(os.path.abspath(tmp_path / 'run' / 'checkpoints'))
  assert list(mngr.all_steps()) == [1, 2]
  states = {s: jax.tree_util.tree_map(np.asarray, mngr.restore(
      s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']) for s in (1, 2)}
  mngr.close()
  student1 = states[1]['student']
  assert int(student1['step']) == 0
  for leaf in jax.tree_util.tree_leaves(student1['opt_state']):
    if leaf.dtype.kind == 'f':
      assert not np.any(leaf)  # no momentum: no gradient step was taken
  stats = jax.tree_util.tree_flatten_with_path(student1['batch_stats'])[0]
  for path, leaf in stats:  # BN statistics still at their initial values
    np.testing.assert_array_equal(leaf, 0.0 if path[-1].key == 'mean' else 1.0)
  assert int(states[2]['student']['step']) == cfg.kd.kd_steps
  assert int(states[2]['synth']['pool']['count']) == 2 * b

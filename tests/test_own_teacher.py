"""Issue 20 items 3-4: the user's own Flax model as a teacher, and the contrastive
state's size (feature_layers, the footprint check).

The models here use flax's standard `nn.BatchNorm`, none of cmi_jax's layers; the
runner names them by factory spec ('tests.test_own_teacher:OwnNet').
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cmi_jax
from cmi_jax import classifiers, models, report, teacher_io
from cmi_jax.errors import ConfigError, TeacherError
from cmi_jax.synthesis import api, cmi, footprint, round_kit
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.synthesis.losses import bn_loss
from cmi_jax.teacher import Teacher
from tests.helpers import random_variables

EPS = 1e-5
SHAPE = (8, 8, 3)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

pytestmark = pytest.mark.usefixtures('compilation_cache')


class PointNet(nn.Module):
  """1x1 conv -> BN -> ReLU -> BN (2D) -> pool -> BN (1D) -> Dense: numpy can run it."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(5, (1, 1))(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=EPS)(h))
    h = nn.BatchNorm(use_running_average=not train, epsilon=EPS)(h)
    h = jnp.mean(h, axis=(1, 2))
    h = nn.BatchNorm(use_running_average=not train, epsilon=EPS)(h)
    return nn.Dense(self.num_classes)(h)


class _Stage(nn.Module):
  width: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(2):
      x = nn.Conv(self.width, (3, 3), dtype=self.dtype)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
    return x


class OwnNet(nn.Module):
  """A small CNN with stages: a stem BN, then two stages of two conv-BN pairs."""
  num_classes: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), dtype=self.dtype)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
    x = _Stage(6, self.dtype, name='stage1')(x, train)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = _Stage(8, self.dtype, name='stage2')(x, train)
    return nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


class Wrapped(nn.Module):
  """OwnNet as the backbone of another module: the stages are the backbone's."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    return OwnNet(self.num_classes, name='backbone')(x, train)


class NoBN(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _np_bn_terms(h, rm, rv, axes):
  mu, var = h.mean(axis=axes), h.var(axis=axes)
  return np.linalg.norm(mu - rm) + np.linalg.norm(var - rv)


def test_bn_statistics_and_l_bn_of_flax_batchnorm_match_numpy():
  module = PointNet()
  v = random_variables(module, (1,) + SHAPE, train=False)
  x = np.random.default_rng(1).normal(size=(4,) + SHAPE).astype(np.float32)
  out = Teacher(module, v)(jnp.asarray(x))
  p, s = v['params'], v['batch_stats']
  bn = lambda h, name: ((h - np.asarray(s[name]['mean'])) / np.sqrt(np.asarray(s[name]['var'])
                        + EPS) * np.asarray(p[name]['scale']) + np.asarray(p[name]['bias']))
  h0 = x @ np.asarray(p['Conv_0']['kernel'])[0, 0] + np.asarray(p['Conv_0']['bias'])
  h1 = np.maximum(bn(h0, 'BatchNorm_0'), 0)
  h2 = bn(h1, 'BatchNorm_1').mean(axis=(1, 2))                          # [N, 5]
  logits = bn(h2, 'BatchNorm_2') @ np.asarray(p['Dense_0']['kernel']) + np.asarray(
      p['Dense_0']['bias'])
  np.testing.assert_allclose(out.logits, logits, rtol=1e-4, atol=1e-5)
  assert len(out.bn) == 3
  # Per-sample spatial statistics, float32, plus the layer's running stats.
  np.testing.assert_allclose(out.bn[0].mean, h0.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.bn[1].var, h1.var(axis=(1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.bn[1].running_var, s['BatchNorm_1']['var'])
  np.testing.assert_allclose(out.bn[2].mean, h2, rtol=1e-5, atol=1e-6)   # a [N, C] input
  np.testing.assert_array_equal(out.bn[2].var, 0.0)
  # All rows, and rows 0-1 only (the global view of a [global; local] call, through
  # the total-variance identity).
  for rows in (None, 2):
    want = sum(_np_bn_terms(h[:rows], np.asarray(s[n]['mean']), np.asarray(s[n]['var']), axes)
               for h, n, axes in ((h0, 'BatchNorm_0', (0, 1, 2)),
                                  (h1, 'BatchNorm_1', (0, 1, 2)), (h2, 'BatchNorm_2', 0)))
    assert float(bn_loss(out.bn, rows)) == pytest.approx(want, rel=1e-4)
  # Features: every BN input's spatial mean; penultimate: the last Dense's input.
  np.testing.assert_allclose(out.features, np.concatenate(
      [h0.mean(axis=(1, 2)), h1.mean(axis=(1, 2)), h2], axis=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.penultimate, bn(h2, 'BatchNorm_2'), rtol=1e-4, atol=1e-5)
  # The L_bn gradient reaches the input image.
  g = jax.grad(lambda x: bn_loss(Teacher(module, v)(x).bn))(jnp.asarray(x))
  assert float(jnp.abs(g).sum()) > 0


def test_feature_layers_select_stages():
  module = OwnNet()
  v = random_variables(module, (1,) + SHAPE)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2,) + SHAPE), jnp.float32)
  t = Teacher(module, v)
  every, stages = t(x, feature_layers='all'), t(x, feature_layers='stages')
  assert every.features.shape == (2, 4 + 6 + 6 + 8 + 8)  # stem, stage1 (2), stage2 (2)
  np.testing.assert_array_equal(t(x).features, every.features)     # 'auto' = 'all' here
  # One BN input per top-level submodule: the stem BN, stage1's first, stage2's first.
  want = jnp.concatenate([every.bn[i].mean for i in (0, 1, 3)], axis=1)
  np.testing.assert_array_equal(stages.features, want)
  assert stages.features.shape == (2, 4 + 6 + 8)
  wrapped = Teacher(Wrapped(), {k: {'backbone': c} for k, c in v.items()})
  np.testing.assert_array_equal(wrapped(x, feature_layers='stages').features, want)
  # The zoo's ResNet sows its own stage taps (layer1..4 inputs): 'auto' and 'stages'
  # keep them (512), 'all' takes every BN input (4800, reference table for resnet18).
  resnet = Teacher(models.get('resnet18', 10), None)
  dims = {f: jax.eval_shape(lambda x, f=f: Teacher(
      resnet.module, models.init(resnet.module, jax.random.key(0), (1, 8, 8, 3)))(
          x, feature_layers=f).features, jnp.zeros((2, 8, 8, 3))).shape[-1]
      for f in ('auto', 'all', 'stages')}
  assert dims == {'auto': 512, 'all': 4800, 'stages': 512}
  with pytest.raises(ValueError, match='feature_layers'):
    SynthesisConfig(SHAPE, 10, MEAN, STD, feature_layers='most').validate()


def test_synthesize_with_an_own_model():
  module = OwnNet(num_classes=4)
  v = random_variables(module, (1,) + SHAPE)
  kw = dict(image_shape=SHAPE, num_classes=4, mean=MEAN, std=STD, batch_size=4, g_steps=2,
            ngf=8, nz=16, n_neg=4, bank_size=16, pool_size=8, head_dim=8, rng=0)
  out = cmi_jax.synthesize((module, v), feature_layers='stages', **kw)
  assert out.images.shape == (4,) + SHAPE and out.images.dtype == np.uint8
  l_bn = np.asarray(out.metrics[0]['l_bn'])
  assert l_bn.shape == (2,) and np.all(np.isfinite(l_bn)) and np.all(l_bn > 0)
  assert np.all(np.isfinite(out.metrics[0]['l_cr']))
  # The bank holds [local | global] stage features: 2 x 18 wide, one round's 4 rows.
  assert out.state.bank.data.shape == (16, 36)
  assert int(out.state.bank.count) == 4 and float(jnp.abs(out.state.bank.data[:4]).sum()) > 0
  assert out.state.head.params['head']['0']['kernel'].shape == (18, 18)


def test_a_model_without_batchnorm_is_a_clear_error(tmp_path):
  module = NoBN()
  v = models.init(module, jax.random.key(0), (1,) + SHAPE)
  cfg = api.make_config(image_shape=SHAPE, num_classes=10, mean=MEAN, std=STD)
  with pytest.raises(TeacherError, match=r'no BatchNorm.*L_bn.*dafl, zskt, dfad'):
    cmi.init_state(cfg, Teacher(module, v), jax.random.key(0))
  # The GAN baselines without L_bn or L_cr accept it (DAFL's activation term reads
  # the classifier Dense's input).
  for method in ('dafl', 'zskt', 'dfad'):
    c = api.make_config(image_shape=SHAPE, num_classes=10, mean=MEAN, std=STD, method=method)
    assert round_kit.check_teacher(c, Teacher(module, v)) == 0
  # Its teacher directory holds params only, and loads back.
  d = teacher_io.save_teacher(tmp_path / 'nobn', arch='tests.test_own_teacher:NoBN',
                              num_classes=10, input_shape=SHAPE, variables=v)
  m2, v2, _ = teacher_io.load_teacher(d)
  assert isinstance(m2, NoBN) and set(v2) == {'params'}
  np.testing.assert_array_equal(v2['params']['Dense_0']['kernel'], v['params']['Dense_0']['kernel'])


def test_footprint_figures_and_the_fit_check():
  assert footprint.head_params(26560, 'mlp', 256) == 26560 ** 2 + 26560 + 26560 * 256 + 256
  cfg = SynthesisConfig((32, 32, 3), 10, MEAN, STD, memory_budget_gb=16.0)
  fp = footprint.footprint(cfg, 26560)                        # resnet50, every BN input
  assert fp.bank_bytes == 40960 * 2 * 26560 * 4 == 8_703_180_800
  assert fp.head_bytes == 16 * fp.head_params                 # params, grad, 2 Adam moments
  assert fp.pool_bytes == 51200 * (32 * 32 * 3 + 4)
  assert 'head 712,259,776 parameters' in fp.message and 'bank 8.703 GB' in fp.message
  with pytest.raises(ConfigError, match="does not fit.*feature_layers='stages'"):
    footprint.check_fits(cfg, 26560)
  assert footprint.check_fits(cfg, 17056).head_params == 17056 ** 2 + 17056 * 257 + 256
  # No budget given: jax's device figure, else (CPU) host RAM over the local devices.
  budget, source = footprint.memory_budget(dataclasses.replace(cfg, memory_budget_gb=0.0))
  stats = jax.local_devices()[0].memory_stats()
  if stats and stats.get('bytes_limit'):
    assert budget == stats['bytes_limit']
  else:
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    assert budget == ram // jax.local_device_count() and 'host RAM' in source
  # init_state refuses before the head is built.
  module = OwnNet(num_classes=4)
  tiny = api.make_config(image_shape=SHAPE, num_classes=4, mean=MEAN, std=STD,
                         memory_budget_gb=1e-6)
  with pytest.raises(ConfigError, match='D=32'):
    cmi.init_state(tiny, Teacher(module, random_variables(module, (1,) + SHAPE)),
                   jax.random.key(0))


def test_own_teacher_directory_and_the_synthesize_cli(tmp_path):
  from experiments import synthesize as cli  # pylint: disable=g-import-not-at-top
  spec = 'tests.test_own_teacher:OwnNet'
  module = classifiers.get(spec, 10, dtype=jnp.bfloat16)
  assert isinstance(module, OwnNet) and module.dtype == jnp.bfloat16
  v = random_variables(OwnNet(), (1,) + SHAPE)
  d = teacher_io.save_teacher(tmp_path / 't', arch=spec, num_classes=10, input_shape=SHAPE,
                              variables=v)
  m2, v2, info = teacher_io.load_teacher(d)
  assert isinstance(m2, OwnNet) and info['arch'] == spec
  np.testing.assert_array_equal(v2['batch_stats']['stage2']['BatchNorm_1']['var'],
                                v['batch_stats']['stage2']['BatchNorm_1']['var'])
  teacher, cfg, _ = cli.build(str(d), 'cmi', 8, batch_size=4, mean=MEAN, std=STD,
                              overrides={'feature_layers': 'stages'})
  assert isinstance(teacher.module, OwnNet) and cfg.feature_layers == 'stages'
  assert round_kit.check_teacher(cfg, teacher) == 18
  # The whole command, in this process: the start-up line, then the dataset.
  from tests.test_synthesize_cli import _cli  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'synthetic'
  stdout = _cli([f'--teacher={d}', '--num_images=4', '--batch_size=4', '--g_steps=2',
                 f'--mean={",".join(map(str, MEAN))}', f'--std={",".join(map(str, STD))}',
                 '--set=feature_layers=stages', '--set=n_neg=4', '--set=bank_size=16',
                 '--set=ngf=8', '--set=nz=16', '--set=head_dim=8', f'--out={out}'])
  assert 'CMI contrastive state per device: feature dim D=18, head 494 parameters' in stdout
  with np.load(out / 'synthetic.npz') as z:
    assert z['images'].shape == (4,) + SHAPE and z['labels'].shape == (4,)
  with pytest.raises(ValueError, match='cannot import'):
    classifiers.check_arch('no_such_package.mod:f')
  (tmp_path / 'x.pth').write_bytes(b'')
  with pytest.raises(TeacherError, match='own model'):
    teacher_io.load_teacher(tmp_path / 'x.pth', arch=spec, num_classes=10, input_shape=SHAPE)


def _own_runner_config():
  from tests.test_run import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(epochs=1, rounds_per_epoch=1)
  cfg.teacher.arch = 'tests.test_own_teacher:OwnNet'
  cfg.data.eval_limit = 16
  return cfg


def test_runner_refuses_a_missing_or_too_large_own_model(tmp_path):
  """Both refused before anything compiles (a wrong attribute, a head over the budget)."""
  from experiments import runner  # pylint: disable=g-import-not-at-top
  cfg = _own_runner_config()
  bad = cfg.copy_and_resolve_references()
  bad.teacher.arch = 'tests.test_own_teacher:Nothing'
  with pytest.raises(ConfigError, match='config.teacher.arch=.*has no attribute'):
    runner.run(bad, str(tmp_path / 'bad'))
  small = cfg.copy_and_resolve_references()
  small.synthesis.memory_budget_gb = 1e-6  # 1 kB: the head alone is larger
  with pytest.raises(ConfigError, match='D=32.*does not fit'):
    runner.run(small, str(tmp_path / 'small'))


@pytest.mark.slow  # ~25 s: a whole runner run; the synthesize paths cover own models by default
def test_runner_distills_from_an_own_model(tmp_path):
  from experiments import runner  # pylint: disable=g-import-not-at-top
  cfg = _own_runner_config()
  summary = runner.run(cfg, str(tmp_path / 'run'))
  rows = report.read_metrics(os.path.join(tmp_path, 'run', 'metrics.jsonl'))
  assert summary['teacher'] == 'tests.test_own_teacher:OwnNet'
  synth_rows = [r for r in rows if 'l_bn' in r or 'best_loss' in r]
  assert synth_rows and all(np.isfinite(r.get('best_loss', 0.0)) for r in synth_rows)
  assert any(r.get('l_bn', 0) > 0 for r in rows)


def test_readme_own_model_example_runs():
  """The README's "Your own Flax model as a teacher" example, as written."""
  import re  # pylint: disable=g-import-not-at-top
  text = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md'),
              encoding='utf-8').read()
  example = next(b for b in re.findall(r'```python\n(.*?)```', text, flags=re.S)
                 if 'class MyNet' in b)
  scope = {}
  exec(compile(example, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  out = scope['out']
  assert out.images.shape == (8, 32, 32, 3)
  assert np.isfinite(out.metrics[0]['l_bn'][0]) and out.metrics[0]['l_bn'][0] > 0
  assert out.state.bank.data.shape[-1] == 2 * (16 + 32)  # every BN input, local | global


def test_startup_message_names_the_teachers_figures():
  module = OwnNet()
  t = Teacher(module, random_variables(module, (1,) + SHAPE))
  cfg = api.make_config(image_shape=SHAPE, num_classes=10, mean=MEAN, std=STD, bank_size=100,
                        feature_layers='stages')
  msg = footprint.startup_message(cfg, t)
  assert 'D=18' in msg and f'head {18 * 18 + 18 + 18 * 256 + 256:,} parameters' in msg
  assert 'bank 14.400 kB' in msg                          # 100 x 2 x 18 x 4 bytes
  fast = api.make_config(image_shape=SHAPE, num_classes=10, mean=MEAN, std=STD, method='fast5')
  assert footprint.startup_message(fast, t) == ''

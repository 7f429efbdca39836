"""configs/tiny_imagenet.py: the Table 1 row resnet34 -> resnet18 at 64x64 for every
method preset, the 64x64 synthesis settings (views, generator, features), NAYER's
Tiny-ImageNet scripts, and a quick run's build on a fake tiny-imagenet-200 folder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import data, models
from cmi_jax.synthesis import presets
from cmi_jax.teacher import Teacher
from configs import cifar10, tiny_imagenet
from experiments import runner
from tests.helpers import abstract_variables
from tests.test_data_loaders import _write_tiny

pytestmark = pytest.mark.usefixtures('compilation_cache')

INFO = data.get_info('tiny_imagenet')


def _synth(cfg, info=INFO):
  return runner.synthesis_config(cfg, info, cfg.synthesis.weights.to_dict())


def _random_teacher(cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.teacher.checkpoint = 'random'
  return cfg


@pytest.mark.parametrize('method', sorted(presets.PRESETS))
def test_every_preset_builds_at_64(method):
  cfg = tiny_imagenet.get_config(f'method={method}')
  assert cfg.to_dict() == tiny_imagenet.get_config(f'resnet34-resnet18,method={method}').to_dict()
  assert (cfg.teacher.arch, cfg.student.arch, cfg.method) == ('resnet34', 'resnet18', method)
  assert cfg.data.name == 'tiny_imagenet' and cfg.data.dir == 'data'
  assert cfg.teacher.checkpoint == 'checkpoints/pretrained/tiny_imagenet_resnet34.pth'
  s = _synth(cfg)
  assert (s.image_shape, s.num_classes) == ((64, 64, 3), 200)
  assert (s.mean, s.std) == ((0.5,) * 3, (0.5,) * 3)
  # The two views: crop 64 pad 4 (hard-coded 4 in the reference) and RRC scale (0.25, 1).
  # fast_imagenet's one view is its own RandomResizedCrop scale (0.75, 1).
  scale = (0.75, 1.0) if method == 'fast_imagenet' else (0.25, 1.0)
  assert (s.global_padding, s.local_scale) == (4, scale)
  quick = tiny_imagenet.get_config(f'method={method},quick')
  q = _synth(quick)
  assert q.image_shape == (64, 64, 3) and (q.batch_size, q.g_steps) == (8, 2)
  assert (quick.kd.batch_size, quick.kd.kd_steps, quick.kd.epochs) == (8, 2, 2)
  runner.validate(_random_teacher(quick))


def test_cmi_row_keeps_the_cifar_recipe():
  """Nothing is published for this row: cmi_jax's choice is the CIFAR CMI recipe, so
  the config differs from CIFAR-10's resnet34 row in the data section and teacher path only."""
  tiny = tiny_imagenet.get_config().to_dict()
  c10 = cifar10.get_config('resnet34-resnet18').to_dict()
  assert {k for k in tiny if tiny[k] != c10[k]} == {'data', 'teacher'}
  assert tiny['teacher']['arch'] == c10['teacher']['arch'] == 'resnet34'
  w = tiny['synthesis']['weights']
  assert (w['bn'], w['oh'], w['adv'], w['cr']) == (1.0, 1.0, 0.5, 0.8)
  s, k = tiny['synthesis'], tiny['kd']
  assert (s['g_steps'], s['batch_size'], k['kd_steps'], k['batch_size'], k['epochs']) == \
      (200, 256, 400, 128, 200)
  assert tiny['synthesis']['pool_size'] == 200 * 256  # every synthesized image kept


def test_row_and_method_errors():
  with pytest.raises(ValueError, match=r"Unknown row 'vgg11-resnet18'.*resnet34-resnet18"):
    tiny_imagenet.get_config('vgg11-resnet18')
  with pytest.raises(ValueError, match="Unknown method 'cmix'"):
    tiny_imagenet.get_config('method=cmix')


def test_fast_and_dfq_settings():
  fast = tiny_imagenet.get_config('method=fast5')
  w = fast.synthesis.weights
  assert (w.adv, w.oh, fast.kd.pre_adv, fast.kd.pre_oh) == (1.33, 0.5, 1.33, 0.5)  # resnet34 row
  dfq = tiny_imagenet.get_config('method=dfq')
  assert (dfq.synthesis.generator, dfq.kd.mode, dfq.synthesis.weights.balance) == \
      ('large', 'fresh', 20.0)
  assert _synth(dfq).make_generator().img_size == 64


@pytest.mark.parametrize('epochs,images', [(100, 160_000), (200, 240_000), (300, 320_000)])
def test_nayer_tiny_imagenet_scripts(epochs, images):
  """NY:scripts/nayer_{100,200,300}.sh at Tiny-ImageNet: 120 / 220 / 320 epochs with a
  20-epoch warm-up; 20 loops x 200 images per warm-up epoch, 4 x 200 per later one."""
  cfg = tiny_imagenet.get_config(f'method=nayer,epochs={epochs}')
  s, k = cfg.synthesis, cfg.kd
  assert (s.batch_size, s.g_steps, s.g_loops, s.lr_g, s.g_life) == (200, 60, 4, 4e-3, 10)
  assert (s.weights.bn, s.weights.oh, s.weights.adv, s.bn_mmt) == (10.0, 0.5, 1.33, 0.9)
  assert (k.batch_size, k.lr, k.lr_min, k.kd_steps, k.ep_steps) == (256, 0.1, 2e-4, 1000, 1000)
  assert (k.pre_rounds, k.pre_loops, k.epochs, k.temperature) == (20, 20, epochs, 20.0)
  assert s.pool_size == 20 * 20 * 200 + epochs * 4 * 200 == images
  synth = _synth(cfg)
  assert (synth.algorithm, synth.adv_start_round, synth.warmup_rounds) == ('nayer', 20, 20)
  assert synth.batch_size == synth.num_classes == 200  # one noisy layer


def test_generator_at_64():
  """img_size 64: l1 = Linear(256 -> 128 x 16 x 16), 8.64M parameters (zoo-and-datasets.md
  section 4), images [B, 64, 64, 3]."""
  gen = _synth(tiny_imagenet.get_config()).make_generator()
  assert (gen.img_size, gen.nz, gen.ngf) == (64, 256, 64)
  z = jnp.zeros((2, 256))
  variables = jax.eval_shape(lambda: gen.init(jax.random.key(0), z))
  assert variables['params']['l1']['0']['kernel'].shape == (256, 128 * 16 * 16)
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables['params']))
  assert round(n / 1e4) == 864
  out = jax.eval_shape(lambda v: gen.apply(v, z, mutable=['batch_stats'])[0], variables)
  assert out.shape == (2, 64, 64, 3)
  quick = _synth(tiny_imagenet.get_config('quick')).make_generator()
  assert quick.img_size == 64 and quick.ngf == 8


def test_teacher_features_at_64():
  """resnet34 at 64x64: 200 logits, contrastive features = layer1..4 inputs (512 dims)."""
  module = models.get('resnet34', 200)
  variables = abstract_variables(module, (1, 64, 64, 3))
  out = jax.eval_shape(lambda v, x: Teacher(module, v)(x), variables,
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.logits.shape == (2, 200) and out.features.shape == (2, 64 + 64 + 128 + 256)


def test_quick_config_builds_on_fake_folder(tmp_path):
  """The quick config on a tiny-imagenet-200 folder written here: validation, the data
  info at 64x64, the test split, the synthesis config."""
  _write_tiny(str(tmp_path / 'tiny-imagenet-200'), n_val=6)
  cfg = _random_teacher(tiny_imagenet.get_config('quick'))
  cfg.data.dir, cfg.data.num_classes = str(tmp_path), 3
  runner.validate(cfg)
  info = runner.dataset_info(cfg)
  assert (info.image_shape, info.num_classes, info.crop_padding) == ((64, 64, 3), 3, 4)
  test = runner.load_test_split(cfg)
  assert test.images.shape == (6, 64, 64, 3)
  np.testing.assert_array_equal(test.labels, [2, 0, 1, 2, 0, 1])  # n03, n01, n02 cycled
  s = _synth(cfg, info)
  assert (s.num_classes, s.image_shape, s.global_padding) == (3, (64, 64, 3), 4)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
  """One epoch of the quick row (resnet34 -> resnet18 at 64x64, random teacher) on the
  fake folder: it trains, checkpoints and evaluates on the 6 written val images."""
  _write_tiny(str(tmp_path / 'tiny-imagenet-200'), n_val=6)
  cfg = _random_teacher(tiny_imagenet.get_config('quick'))
  cfg.data.dir, cfg.data.num_classes = str(tmp_path), 3
  cfg.kd.epochs, cfg.kd.ep_steps, cfg.mesh.num_devices = 1, cfg.kd.kd_steps, 1
  summary = runner.run(cfg, str(tmp_path / 'run'))
  assert summary['evaluation'] == 'on' and summary['rounds'] == 1
  acc = summary['student_accuracy']
  assert 0 <= acc <= 100 and acc * 6 / 100 == pytest.approx(round(acc * 6 / 100))

"""configs/teacher.py:<dataset>,<arch> (the reference's train_scratch.py recipe for every
dataset), the multistep learning-rate schedule against hand values, its bad input, and
`:quick` teacher runs on fake CIFAR-10 pickles (with an exact resume) and a fake
tiny-imagenet-200 folder."""

import json
import os

import jax
import numpy as np
import pytest

from cmi_jax import data, teacher_io
from cmi_jax.state import multistep_per_epoch
from configs import common, teacher, teacher_fashion_mnist
from experiments import train_teacher
from tests.helpers import train_interrupted_then_resumed
from tests.test_configs import _write_cifar
from tests.test_data_loaders import _write_tiny

pytestmark = pytest.mark.usefixtures('compilation_cache')


def test_multistep_schedule_by_hand():
  """5 steps per epoch, lr x 0.1 from epoch 2 and again from epoch 3 (MultiStepLR
  stepped at epoch ends): lr(step) = 0.1 * 0.1 ** #{m <= step // 5}."""
  lr = multistep_per_epoch(0.1, (3, 2), 0.1, 5)  # order of milestones does not matter
  steps = [0, 9, 10, 14, 15, 16, 1000]
  want = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001]
  np.testing.assert_allclose([float(lr(s)) for s in steps], want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(lr)(np.int32(12)), 0.01, rtol=1e-6)
  ref = multistep_per_epoch(0.1, (120, 150, 180), 0.1, 196)  # CIFAR at batch 256
  np.testing.assert_allclose([float(ref(e * 196)) for e in (119, 120, 149, 150, 180, 199)],
                             [0.1, 0.01, 0.01, 1e-3, 1e-4, 1e-4], rtol=1e-5)
  np.testing.assert_allclose(float(multistep_per_epoch(0.2, (), 0.1, 5)(10 ** 6)), 0.2)


@pytest.mark.parametrize('dataset', teacher.DATASETS)
def test_recipe_for_every_dataset(dataset):
  arch = teacher.DEFAULT_ARCH.get(dataset, 'wrn_16_1')
  cfg = teacher.get_config(f'{dataset},{arch}')
  t = cfg.train
  assert (cfg.data.name, cfg.model.arch) == (dataset, arch)
  # DF:train_scratch.py: SGD 0.1, momentum 0.9, wd 1e-4, batch 256, 200 epochs, x0.1 at 120/150/180.
  assert (t.lr, t.momentum, t.nesterov, t.weight_decay, t.batch_size, t.epochs) == \
      (0.1, 0.9, False, 1e-4, 256, 200)
  assert (t.schedule, tuple(t.milestones), t.gamma) == ('multistep', (120, 150, 180), 0.1)
  assert cfg.data.image_size == (32 if dataset == 'mnist' else 0)
  assert teacher.get_config(f'{dataset},{arch},epochs=7').train.epochs == 7
  quick = teacher.get_config(f'{dataset},{arch},quick').train
  assert (quick.epochs, tuple(quick.milestones), quick.batch_size) == \
      (3, (1, 2), 8 if dataset == 'imagenet' else 64)


# Each dataset's train transform as zoo-and-datasets.md section 3 tabulates the reference's
# (DF:registry.py:95-334): (image size, crop padding, flip, RandomResizedCrop scale).
# fashion_mnist and image_folder are not in the reference: cmi_jax's choices (the
# shipped teacher's crop pad 2 + flip; CIFAR's crop pad 4 + flip for any folder).
TRAIN_TRANSFORMS = {
    'mnist': (32, 0, False, ()),             # Resize 32 only
    'cifar10': (32, 4, True, ()),            # crop 32 pad 4 + flip
    'cifar100': (32, 4, True, ()),
    'svhn': (32, 0, False, ()),              # none
    'tiny_imagenet': (64, 4, True, ()),      # crop 64 pad 4 + flip
    'imagenet': (224, 0, True, (0.08, 1.0)),  # RandomResizedCrop 224 + flip
    'fashion_mnist': (28, 2, True, ()),
    'image_folder': (40, 4, True, ()),
}


@pytest.mark.parametrize('dataset', teacher.DATASETS)
def test_train_augmentation_is_the_references(dataset):
  cfg = teacher.get_config(f'{dataset},{teacher.DEFAULT_ARCH.get(dataset, "wrn_16_1")}')
  if dataset == 'image_folder':
    cfg.data.image_size, cfg.data.mean, cfg.data.std, cfg.data.num_classes = \
        40, (0.5,) * 3, (0.5,) * 3, 5
  info = data.get_info(cfg.data.name, **data.config_options(cfg.data))
  assert (info.image_shape[0], info.crop_padding, info.flip, info.crop_scale) == \
      TRAIN_TRANSFORMS[dataset]
  if not info.crop_padding and not info.flip and not info.crop_scale:
    # No augmentation: train_teacher's in-memory view is the normalisation alone.
    from cmi_jax import augment  # pylint: disable=import-outside-toplevel
    x = np.random.default_rng(0).integers(0, 256, (3,) + info.image_shape, dtype=np.uint8)
    got = augment.standard_train_view(jax.random.key(0), x, info.crop_padding, info.flip,
                                      info.mean, info.std)
    want = (x / 255.0 - np.array(info.mean)) / np.array(info.std)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_parse_arg_fills_positional_keys_in_order():
  kw = dict(_positional=('dataset', 'arch'), dataset='', arch='', quick=False, epochs=200)
  assert common.parse_arg('cifar10,resnet34,quick,epochs=3', **kw) == \
      {'dataset': 'cifar10', 'arch': 'resnet34', 'quick': True, 'epochs': 3}
  assert common.parse_arg('svhn', **kw)['arch'] == ''
  with pytest.raises(ValueError, match="Unknown config argument 'extra'"):
    common.parse_arg('cifar10,resnet34,extra', **kw)


def test_default_arch_and_bad_input():
  assert teacher.get_config('tiny_imagenet').model.arch == 'resnet34'
  assert teacher.get_config('cifar100').model.arch == 'wrn_40_2'
  assert teacher.get_config('cifar10,wrn40_2').model.arch == 'wrn40_2'  # reference spelling
  assert teacher.get_config('imagenet').model.arch == 'resnet50_imagenet'
  with pytest.raises(ValueError, match=r"Unknown dataset 'places365'.*'imagenet'.*'tiny_imagenet'"):
    teacher.get_config('places365,resnet18')
  with pytest.raises(ValueError, match=r"Unknown dataset ''"):
    teacher.get_config()
  with pytest.raises(ValueError, match=r"Unknown arch 'resnet35'.*'resnet34'.*'wrn_40_2'"):
    teacher.get_config('cifar10,resnet35')
  with pytest.raises(ValueError, match=r'svhn needs an architecture.*resnet18'):
    teacher.get_config('svhn')
  with pytest.raises(ValueError, match=r"'resnet20' takes 32x32.*64x64"):
    teacher.get_config('tiny_imagenet,resnet20')
  with pytest.raises(ValueError, match="Unknown config argument 'lr'"):
    teacher.get_config('cifar10,lr=3')
  cfg = teacher.get_config('cifar10,quick')
  cfg.train.schedule = 'linear'
  with pytest.raises(ValueError, match=r"train.schedule='linear'.*'cosine', 'multistep'"):
    train_teacher.train(cfg, '/nonexistent/never_written')


def test_fashion_mnist_teacher_config_unchanged():
  """The shipped teacher's config keeps its own cosine recipe (no schedule field)."""
  cfg = teacher_fashion_mnist.get_config()
  assert 'schedule' not in cfg.train and (cfg.train.epochs, cfg.train.lr) == (10, 0.1)
  lr = train_teacher.lr_schedule(cfg.train, 10, 100)
  np.testing.assert_allclose(float(lr(50)), 0.05, rtol=1e-6)  # cosine midpoint


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def cifar_runs(tmp_path_factory):
  """cifar10,wrn_16_1,quick on 60 fake training images: batch 20 = 3 steps per epoch,
  3 epochs; once straight through, once killed after step 5 and resumed."""
  root = tmp_path_factory.mktemp('teacher_recipe')
  batches = _write_cifar(root, 'cifar10')
  cfg = teacher.get_config('cifar10,wrn_16_1,quick')
  cfg.data.dir = str(root)
  cfg.train.batch_size, cfg.train.eval_batch_size = 20, 12
  cfg.log.every_steps, cfg.log.checkpoint_every_steps = 1, 4
  summary = train_teacher.train(cfg, str(root / 'full'))
  resumed = train_interrupted_then_resumed(cfg, root / 'resumed', 5)
  return root, batches, summary, resumed


@pytest.mark.slow  # ~45 s; the tiny_imagenet quick teacher covers the recipe by default
def test_cifar10_quick_teacher_lr_and_export(cifar_runs):
  root, batches, summary, _ = cifar_runs
  rows = [r for r in _rows(root / 'full') if 'train/lr' in r]
  assert [r['step'] for r in rows] == list(range(1, 10))
  # Step s ran at epoch (s - 1) // 3; milestones 1, 2: 0.1, 0.01, 0.001 per epoch.
  np.testing.assert_allclose([r['train/lr'] for r in rows], [0.1] * 3 + [0.01] * 3 + [1e-3] * 3,
                             rtol=1e-5)
  assert [h['epoch'] for h in summary['history']] == [1, 2, 3]
  module, variables, info = teacher_io.load_teacher(root / 'full' / 'teacher')
  assert (info['arch'], info['num_classes'], tuple(info['input_shape'])) == \
      ('wrn_16_1', 10, (32, 32, 3))
  test = batches['test_batch']
  x = test['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
  d = data.get_info('cifar10')
  logits = jax.jit(module.apply)(variables, (x - np.array(d.mean)) / np.array(d.std))
  acc = 100.0 * np.mean(np.argmax(logits, -1) == np.asarray(test['labels']))
  assert acc == pytest.approx(summary['test_accuracy'])


def _assert_same_teacher(root):
  """The exported teachers of root/full and root/resumed are equal bit for bit."""
  _, v_full, _ = teacher_io.load_teacher(root / 'full' / 'teacher')
  _, v_resumed, _ = teacher_io.load_teacher(root / 'resumed' / 'teacher')
  for a, b in zip(jax.tree_util.tree_leaves(v_full), jax.tree_util.tree_leaves(v_resumed)):
    assert np.array_equal(a, b)


def test_cifar10_quick_teacher_resume_is_exact(cifar_runs):
  root, _, summary, resumed = cifar_runs
  assert resumed['history'] == summary['history']
  assert [r['step'] for r in _rows(root / 'resumed') if 'train/lr' in r] == list(range(1, 10))
  _assert_same_teacher(root)


def test_tiny_imagenet_quick_teacher(tmp_path):
  """tiny_imagenet,wrn_16_1,quick at 64x64 on a 3-class fake folder (12 train images)."""
  _write_tiny(str(tmp_path / 'tiny-imagenet-200'), per_class=4, n_val=6)
  cfg = teacher.get_config('tiny_imagenet,wrn_16_1,quick')
  cfg.data.dir, cfg.data.num_classes = str(tmp_path), 3
  cfg.train.batch_size, cfg.train.eval_batch_size, cfg.train.epochs = 6, 6, 1
  summary = train_teacher.train(cfg, str(tmp_path / 'run'))
  assert summary['dataset'] == 'tiny_imagenet' and len(summary['history']) == 1
  module, variables, info = teacher_io.load_teacher(tmp_path / 'run' / 'teacher')
  assert (info['num_classes'], tuple(info['input_shape'])) == (3, (64, 64, 3))
  test = data.load('tiny_imagenet', 'test', str(tmp_path), num_classes=3)
  logits = jax.jit(module.apply)(variables, (test.images / 255.0 - 0.5) / 0.5)
  acc = 100.0 * np.mean(np.argmax(logits, -1) == test.labels)
  assert acc == pytest.approx(summary['test_accuracy'])


def _imagenet_config(data_dir):
  """imagenet,wrn_16_1,quick at 16x16 on the fake 3-class folder (12 train JPEGs of
  assorted sizes): batch 4 = 3 steps per epoch, 2 epochs, a checkpoint every 2 steps."""
  cfg = teacher.get_config('imagenet,wrn_16_1,quick')
  cfg.data.dir, cfg.data.num_classes, cfg.data.image_size = data_dir, 3, 16
  cfg.train.batch_size, cfg.train.eval_batch_size, cfg.train.epochs = 4, 4, 2
  cfg.log.every_steps, cfg.log.checkpoint_every_steps = 1, 2
  return cfg


@pytest.fixture(scope='module')
def imagenet_run(tmp_path_factory):
  """One streamed run, recording how many images each decoding call held."""
  from tests.helpers import fake_imagenet  # pylint: disable=import-outside-toplevel
  from cmi_jax.data import images  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('teacher_imagenet')
  data_dir = fake_imagenet(root / 'imagenet')
  sizes = []
  decode_many = images._decode_many  # pylint: disable=protected-access

  def counting(n, shape, one):
    sizes.append(n)
    return decode_many(n, shape, one)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(images, '_decode_many', counting)
    summary = train_teacher.train(_imagenet_config(data_dir), str(root / 'full'))
  return root, data_dir, summary, sizes


def test_imagenet_quick_teacher_streams(imagenet_run):
  root, data_dir, summary, sizes = imagenet_run
  # 6 train batches of 4 (RandomResizedCrop views), 2 x 2 eval batches of 4 + 2 (val/:
  # 6 images at Resize 18 + CenterCrop 16): no call ever decodes a whole split.
  assert sorted(sizes) == sorted([4] * 6 + [4, 2] * 2), sizes
  assert summary['dataset'] == 'imagenet' and [h['epoch'] for h in summary['history']] == [1, 2]
  rows = [r for r in _rows(root / 'full') if 'train/lr' in r]
  assert [r['step'] for r in rows] == list(range(1, 7))
  np.testing.assert_allclose([r['train/lr'] for r in rows], [0.1] * 3 + [0.01] * 3, rtol=1e-5)
  module, variables, info = teacher_io.load_teacher(root / 'full' / 'teacher')
  assert (info['num_classes'], tuple(info['input_shape'])) == (3, (16, 16, 3))
  test = data.load('imagenet', 'test', data_dir, num_classes=3, image_size=16)
  x = (np.asarray(test.images) / 255.0 - np.array((0.485, 0.456, 0.406))) / \
      np.array((0.229, 0.224, 0.225))
  acc = 100.0 * np.mean(np.argmax(jax.jit(module.apply)(variables, x), -1) == test.labels)
  assert acc == pytest.approx(summary['test_accuracy'])


@pytest.mark.slow  # two more runs (~15 s warm); the in-memory resume test runs by default
def test_imagenet_quick_teacher_resume_is_exact(imagenet_run):
  """Killed at step 5 (last checkpoint: step 4, mid-epoch 2), then resumed: the same
  batches, crops and flips, so the same teacher bit for bit."""
  root, data_dir, summary, _ = imagenet_run
  resumed = train_interrupted_then_resumed(_imagenet_config(data_dir), root / 'resumed', 5)
  assert resumed['history'] == summary['history']
  assert [r['step'] for r in _rows(root / 'resumed') if 'train/lr' in r] == list(range(1, 7))
  _assert_same_teacher(root)

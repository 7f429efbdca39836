"""Config files (configs/*.py): the paper's Table 1 rows at the published
hyperparameters, the quick variants, the command line (absl config_flags with
lock_config), and CIFAR-10/100 runs on CIFAR-format files written here.
"""

import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cmi_jax import data, distill, models, report
from configs import cifar10, cifar100, common, fashion_mnist
from experiments import runner
from tests.helpers import ROOT, subprocess_env

ROWS = {
    'resnet34-resnet18': ('resnet34', 'resnet18'),
    'vgg11-resnet18': ('vgg11', 'resnet18'),
    'wrn40_2-wrn16_1': ('wrn_40_2', 'wrn_16_1'),
    'wrn40_2-wrn40_1': ('wrn_40_2', 'wrn_40_1'),
    'wrn40_2-wrn16_2': ('wrn_40_2', 'wrn_16_2'),
}
CIFAR = {'cifar10': (cifar10, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
         'cifar100': (cifar100, 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}

pytestmark = pytest.mark.usefixtures('compilation_cache')


# ---------------------------------------------------------------- Table 1 rows

@pytest.mark.parametrize('dataset', sorted(CIFAR))
@pytest.mark.parametrize('row', sorted(ROWS))
def test_paper_rows(dataset, row):
  module, num_classes, mean, std = CIFAR[dataset]
  cfg = module.get_config(row)
  teacher, student = ROWS[row]
  assert (cfg.teacher.arch, cfg.student.arch) == (teacher, student)
  assert cfg.data.name == dataset and cfg.method == 'cmi'
  assert cfg.teacher.checkpoint == f'checkpoints/pretrained/{dataset}_{teacher}.pth'
  s, k, w = cfg.synthesis, cfg.kd, cfg.synthesis.weights
  # reference-facts section 3, 'from scratch' column.
  assert (s.batch_size, k.batch_size) == (256, 128)
  assert (s.g_steps, k.kd_steps, k.ep_steps, k.epochs) == (200, 400, 400, 200)
  assert (s.lr_g, tuple(s.betas), s.lr_head) == (1e-3, (0.5, 0.999), 1e-3)
  assert (w.adv, w.bn, w.oh, w.cr) == (0.5, 1.0, 1.0, 0.8)
  assert (w.balance, w.act, w.tv) == (0.0, 0.0, 0.0)
  assert (s.cr_temperature, k.temperature) == (0.1, 20.0)
  assert (s.nz, s.ngf, s.bank_size, s.n_neg, s.head_dim) == (256, 64, 40960, 4096, 256)
  assert (s.adv_kind, s.head_kind, tuple(s.local_scale)) == ('masked_kl', 'mlp', (0.25, 1.0))
  assert (k.lr, k.momentum, k.weight_decay, k.loss, k.mode) == (0.1, 0.9, 1e-4, 'kl', 'pool')
  assert s.pool_size >= k.epochs * (k.ep_steps // k.kd_steps) * s.batch_size  # keeps all
  synth = runner.synthesis_config(cfg, data.get_info(dataset), w.to_dict())
  assert synth.num_classes == num_classes and synth.image_shape == (32, 32, 3)
  assert (synth.mean, synth.std, synth.global_padding) == (mean, std, 4)


def test_default_row_and_arguments():
  assert cifar10.get_config().to_dict() == cifar10.get_config('wrn40_2-wrn16_1').to_dict()
  cfg = cifar100.get_config('vgg11-resnet18,method=dfq,quick')
  assert (cfg.teacher.arch, cfg.student.arch, cfg.method) == ('vgg11', 'resnet18', 'dfq')
  assert (cfg.kd.mode, cfg.synthesis.generator, cfg.synthesis.weights.balance) == \
      ('fresh', 'large', 20.0)
  assert (cfg.synthesis.batch_size, cfg.synthesis.g_steps, cfg.kd.kd_steps) == (8, 2, 2)
  with pytest.raises(ValueError, match='wrn40_2-wrn16_2'):
    cifar10.get_config('wrn40_2-wrn28_10')
  with pytest.raises(ValueError, match="Unknown config argument 'steps'"):
    cifar10.get_config('wrn40_2-wrn16_1,steps=3')
  assert cifar10.get_config('wrn40_2-wrn16_1,epochs=3').kd.epochs == 3  # a KD-epoch budget
  assert common.parse_arg('a=3,b', _positional='x', a=1, b=False, x='') == \
      {'a': 3, 'b': True, 'x': ''}


def test_quick_variants_are_small():
  for cfg in (cifar10.get_config('resnet34-resnet18,quick'), fashion_mnist.get_config('quick'),
              cifar100.get_config('wrn40_2-wrn40_1,method=cmi_two_stage,quick')):
    s, k = cfg.synthesis, cfg.kd
    assert (s.batch_size, s.g_steps, k.batch_size, k.kd_steps, k.epochs) == (8, 2, 8, 2, 2)
    assert s.pool_size <= 64 and s.bank_size <= 64 and s.nz <= 16 and k.pre_rounds <= 1
    assert k.ep_steps // k.kd_steps <= 2 and cfg.data.eval_limit == 64
    runner.validate(_random_teacher(cfg))


def test_fashion_mnist_config():
  cfg = fashion_mnist.get_config()
  assert (cfg.data.name, cfg.teacher.arch, cfg.student.arch) == \
      ('fashion_mnist', 'wrn_16_2', 'wrn_16_1')
  assert cfg.teacher.checkpoint == 'teachers/fashion_mnist_wrn_16_2'
  w = cfg.synthesis.weights
  assert (w.adv, w.bn, w.oh, w.cr) == (0.5, 1.0, 1.0, 0.8)  # the paper's weights
  synth = runner.synthesis_config(cfg, data.get_info('fashion_mnist'), w.to_dict())
  assert synth.image_shape == (28, 28, 1) and synth.global_padding == 2
  assert fashion_mnist.get_config('dafl').method == 'dafl'  # positional method


def _random_teacher(cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.teacher.checkpoint = 'random'
  return cfg


@pytest.mark.parametrize('module,arg', [(fashion_mnist, 'quick'), (cifar10, None),
                                        (cifar100, 'resnet34-resnet18')])
def test_locked_config_rejects_unknown_fields(module, arg):
  """What config_flags(lock_config=True) hands the runner: a typo fails with a hint,
  and the runner reads (never adds) fields, so validation works on it."""
  cfg = module.get_config(arg)
  cfg.lock()
  with pytest.raises(AttributeError, match='Did you mean "epochs"'):
    cfg.kd.epoch = 1
  with pytest.raises(AttributeError):
    cfg.synthesis.weights.contrast = 1.0
  cfg.teacher.checkpoint = 'random'
  runner.validate(cfg)


# ---------------------------------------------------------------- command line

def test_command_line_typo_fails_before_running(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config=configs/fashion_mnist.py:quick',
       '--config.kd.epoch=1', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode != 0
  assert 'Did you mean "epochs"' in proc.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_command_line_overrides(tmp_path, cache_dir):
  """`python -m experiments.run` with --config.field=value overrides, once. Pool and
  bank sizes match tests/test_run.py so its CMI round is compiled once per session."""
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config=configs/fashion_mnist.py:quick',
       '--config.teacher.checkpoint=random', '--config.kd.epochs=1',
       '--config.synthesis.pool_size=24', '--config.synthesis.bank_size=24',
       f'--workdir={workdir}'],
      cwd=ROOT, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Done in' in proc.stdout
  with open(workdir / 'config.json') as f:
    cfg = json.load(f)
  assert cfg['kd']['epochs'] == 1 and cfg['teacher']['checkpoint'] == 'random'
  assert (cfg['synthesis']['pool_size'], cfg['synthesis']['bank_size']) == (24, 24)
  assert cfg['synthesis']['batch_size'] == 8  # the :quick argument, not overridden
  rows = report.read_metrics(workdir / 'metrics.jsonl')
  assert [r['round'] for r in rows] == [1] and rows[0]['epoch'] == 1
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['epochs'] == 1 and summary['rounds'] == 1


# ---------------------------------------------------------------- CIFAR-format files

def _write_cifar(directory, dataset, n=12):
  """A few random images per CIFAR python-pickle batch, labels covering classes."""
  rng = np.random.default_rng(0)
  if dataset == 'cifar10':
    folder, names, key, classes = 'cifar-10-batches-py', [
        f'data_batch_{i}' for i in range(1, 6)] + ['test_batch'], 'labels', 10
  else:
    folder, names, key, classes = 'cifar-100-python', ['train', 'test'], 'fine_labels', 100
  root = os.path.join(directory, folder)
  os.makedirs(root)
  out = {}
  for name in names:
    batch = {'data': rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
             key: [int(v) for v in rng.permutation(np.arange(n) % classes)],
             'batch_label': name}
    if dataset == 'cifar100':
      batch['coarse_labels'] = [v // 5 for v in batch[key]]
    with open(os.path.join(root, name), 'wb') as f:
      pickle.dump(batch, f)
    out[name] = batch
  return out


def _accuracy(cfg, variables, module, images, labels):
  info = data.get_info(cfg.data.name)
  ev = distill.make_eval_fn(module.apply, info.mean, info.std)
  return distill.evaluate(ev, variables, images, labels, cfg.data.eval_batch_size)['accuracy']


@pytest.mark.slow
def test_cifar10_row_end_to_end(tmp_path):
  """configs/cifar10.py:wrn40_2-wrn16_1,quick, random teacher, one epoch, on CIFAR-10
  files written here: it trains, checkpoints, and evaluates on the written test batch."""
  batches = _write_cifar(tmp_path / 'data', 'cifar10')
  cfg = cifar10.get_config('wrn40_2-wrn16_1,quick')
  cfg.teacher.checkpoint = 'random'
  cfg.data.dir = str(tmp_path / 'data')
  cfg.kd.epochs, cfg.mesh.num_devices = 1, 1
  summary = runner.run(cfg, str(tmp_path / 'run'))
  assert summary['evaluation'] == 'on' and summary['rounds'] == 1
  rows = report.read_metrics(tmp_path / 'run' / 'metrics.jsonl')
  assert len(rows) == 1 and rows[0]['student_accuracy'] == summary['student_accuracy']
  assert {'l_bn', 'l_oh', 'l_adv', 'l_cr'} == {k for k in rows[0] if k.startswith('l_')}
  # Both accuracies are over the 12 written test images (multiples of 100/12)...
  for acc in (summary['student_accuracy'], summary['teacher_accuracy']):
    assert 0 <= acc <= 100 and acc * 12 / 100 == pytest.approx(round(acc * 12 / 100))
  # ...and match the checkpointed student / the seeded teacher on them.
  test = batches['test_batch']
  images = test['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = np.asarray(test['labels'], np.int32)
  mngr = ocp.CheckpointManager(str(tmp_path / 'run' / 'checkpoints'))
  state = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  mngr.close()
  student = {'params': state['student']['params'], 'batch_stats': state['student']['batch_stats']}
  assert summary['student_accuracy'] == pytest.approx(
      _accuracy(cfg, student, models.get('wrn_16_1', 10), images, labels))
  teacher = runner.load_teacher(cfg, data.get_info('cifar10'), jnp.float32)
  assert summary['teacher_accuracy'] == pytest.approx(
      _accuracy(cfg, teacher.variables, teacher.module, images, labels))
  assert state['synth']['pool']['data']['images'].shape[1:] == (32, 32, 3)


def test_cifar100_validates_and_evaluates(tmp_path):
  """configs/cifar100.py on CIFAR-100 files written here: 100 classes from
  'fine_labels', and the teacher evaluates on the written test file."""
  batches = _write_cifar(tmp_path, 'cifar100')
  cfg = cifar100.get_config('wrn40_2-wrn16_1,quick')
  cfg.teacher.checkpoint = 'random'
  cfg.data.dir = str(tmp_path)
  runner.validate(cfg)
  test = runner.load_test_split(cfg)
  np.testing.assert_array_equal(test.labels, batches['test']['fine_labels'])
  assert test.images.shape == (12, 32, 32, 3)
  info = data.get_info(cfg.data.name)
  assert info.num_classes == 100
  teacher = runner.load_teacher(cfg, info, jnp.float32)
  logits = jax.eval_shape(lambda x: teacher(x, taps=False).logits,
                          jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert logits.shape == (2, 100)
  acc = _accuracy(cfg, teacher.variables, teacher.module, test.images, test.labels)
  assert 0 <= acc <= 100 and acc * 12 / 100 == pytest.approx(round(acc * 12 / 100))


def test_cifar_batch_with_missing_labels_is_a_data_error(tmp_path):
  batches = _write_cifar(tmp_path, 'cifar10')
  test = dict(batches['test_batch'], labels=batches['test_batch']['labels'][:10])
  with open(tmp_path / 'cifar-10-batches-py' / 'test_batch', 'wb') as f:
    pickle.dump(test, f)
  with pytest.raises(data.DataNotFoundError, match='test_batch'):
    data.load('cifar10', 'test', str(tmp_path))


@pytest.mark.slow
def test_cifar100_row_end_to_end(tmp_path):
  _write_cifar(tmp_path, 'cifar100')
  cfg = cifar100.get_config('wrn40_2-wrn16_1,quick')
  cfg.teacher.checkpoint = 'random'
  cfg.data.dir = str(tmp_path)
  cfg.kd.epochs, cfg.mesh.num_devices = 1, 1
  summary = runner.run(cfg, str(tmp_path / 'run'))
  assert summary['evaluation'] == 'on' and summary['rounds'] == 1
  acc = summary['student_accuracy']
  assert 0 <= acc <= 100 and acc * 12 / 100 == pytest.approx(round(acc * 12 / 100))

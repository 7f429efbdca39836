"""Issue 11, item 1: the main command's result on a fresh machine. The Fashion-MNIST
test split ships inside the package and is found without apt; the run ends with one
summary line whose numbers are summary.json's."""

import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cmi_jax import data
from experiments import runner
from tests.helpers import ROOT, subprocess_env

SHIPPED = os.path.join(ROOT, 'cmi_jax', 'datasets', 'fashion_mnist')


@pytest.fixture
def no_apt_dir(monkeypatch, tmp_path):
  """Fashion-MNIST's default (apt) folder points at a folder that does not exist."""
  info = data.DATASETS['fashion_mnist']
  monkeypatch.setitem(data.DATASETS, 'fashion_mnist', dataclasses.replace(
      info, default_dirs=(str(tmp_path / 'no_apt'),)))


def _raw_idx(path, offset):
  with gzip.open(path, 'rb') as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


def test_shipped_test_split_found_without_apt(no_apt_dir):
  split = data.load('fashion_mnist', 'test')
  assert split.images.shape == (10000, 28, 28, 1) and split.images.dtype == np.uint8
  assert split.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(split.labels, minlength=10), [1000] * 10)
  # The same bytes as the files, decoded here without the IDX reader (16/8-byte headers).
  np.testing.assert_array_equal(
      split.images.reshape(-1), _raw_idx(os.path.join(SHIPPED, 't10k-images-idx3-ubyte.gz'), 16))
  np.testing.assert_array_equal(
      split.labels, _raw_idx(os.path.join(SHIPPED, 't10k-labels-idx1-ubyte.gz'), 8))
  assert split.images.mean() / 255 == pytest.approx(0.2860, abs=2e-3)  # DatasetInfo.mean


def test_shipped_copy_comes_after_apt_and_data_dir(no_apt_dir, tmp_path):
  info = data.get_info('fashion_mnist')
  assert data.shipped_dirs(info, 'test') == (data.SHIPPED_DIR + '/fashion_mnist',)
  assert data.shipped_dirs(info, 'train') == ()  # the train split is not shipped
  # An explicit data.dir is the only folder tried (no silent fallback to the shipped copy).
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(data.DataNotFoundError, match='data.dir'):
    data.load('fashion_mnist', 'test', str(empty))
  # The train split still says how to get it.
  with pytest.raises(data.DataNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
    data.load('fashion_mnist', 'train')


def test_shipped_files_are_package_data():
  with open(os.path.join(ROOT, 'setup.cfg')) as f:
    cfg = f.read()
  for name in ('datasets/fashion_mnist/*.gz', 'datasets/fashion_mnist/LICENSE'):
    assert name in cfg
  with open(os.path.join(SHIPPED, 'README.md')) as f:
    assert 'MIT' in f.read()
  assert sorted(os.listdir(SHIPPED)) == ['LICENSE', 'README.md', 't10k-images-idx3-ubyte.gz',
                                         't10k-labels-idx1-ubyte.gz']


def test_summary_line_format():
  summary = {'method': 'cmi', 'student': 'wrn_16_1', 'teacher': 'wrn_16_2',
             'student_accuracy': 67.4123, 'teacher_accuracy': 93.77,
             'student_teacher_ratio': 67.4123 / 93.77, 'workdir': '/w', 'images_dir': 'images',
             'plots': ['accuracy.png', 'losses.png']}
  assert runner.summary_line(summary, 57.2) == (
      'Done in 57 s: cmi student wrn_16_1 67.41%, teacher wrn_16_2 93.77%, ratio 0.7189; '
      'image grids in /w/images, plots /w/accuracy.png, /w/losses.png')
  summary.update(student_accuracy=None, teacher_accuracy=None, student_teacher_ratio=None)
  assert 'student wrn_16_1 n/a (no test data), teacher wrn_16_2 n/a (no test data), ratio n/a' \
      in runner.summary_line(summary, 1)


def test_main_command_quick_prints_accuracies(tmp_path, cache_dir):
  """`python -m experiments.run --config=configs/fashion_mnist.py:quick` with the
  shipped teacher: teacher and student accuracy printed, and the last line holds
  summary.json's numbers and existing paths. (Pool and bank sizes as in
  tests/test_run.py, so the compiled round comes from the session cache.)"""
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config=configs/fashion_mnist.py:quick',
       '--config.kd.epochs=1', '--config.synthesis.pool_size=24',
       '--config.synthesis.bank_size=24', f'--workdir={workdir}'],
      cwd=ROOT, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  t_acc, s_acc = summary['teacher_accuracy'], summary['student_accuracy']
  assert f'Teacher accuracy on the fashion_mnist test split: {t_acc:.2f}%' in proc.stdout
  assert f'Student accuracy on the fashion_mnist test split: {s_acc:.2f}%' in proc.stdout
  m = re.fullmatch(r'Done in \d+ s: cmi student wrn_16_1 ([\d.]+)%, teacher wrn_16_2 '
                   r'([\d.]+)%, ratio ([\d.]+); image grids in (\S+), plots (\S+), (\S+)',
                   lines[-1])
  assert m, lines[-1]
  assert float(m[1]) == round(s_acc, 2) and float(m[2]) == round(t_acc, 2)
  assert float(m[3]) == round(s_acc / t_acc, 4) == round(summary['student_teacher_ratio'], 4)
  assert t_acc > 80  # the shipped teacher on the (first 64 of the) real test split
  # config.runtime's default reached the process (XLA:CPU without YNNPACK fusions).
  assert summary['xla_flags'].endswith('--xla_cpu_experimental_ynn_fusion_type=')
  assert summary['jax_version'] == __import__('jax').__version__
  assert summary['workdir'] == str(workdir)
  assert m[4] == os.path.join(summary['workdir'], summary['images_dir']) == str(workdir / 'images')
  assert os.listdir(m[4]) == ['round_00001.png']
  assert [m[5], m[6]] == [str(workdir / p) for p in summary['plots']]
  assert summary['plots'] == ['accuracy.png', 'losses.png']
  assert all(os.path.exists(p) for p in (m[5], m[6]))


def test_full_schedule_is_the_papers():
  """configs/fashion_mnist.py:full: the paper's CIFAR schedule on the shipped teacher."""
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  from experiments import runner  # pylint: disable=import-outside-toplevel
  c = fashion_mnist.get_config('full')
  s, k = c.synthesis, c.kd
  assert (c.teacher.arch, c.teacher.checkpoint, c.student.arch) == \
      ('wrn_16_2', 'teachers/fashion_mnist_wrn_16_2', 'wrn_16_1')
  assert (s.batch_size, s.ngf, s.n_neg, s.bank_size, s.pool_size, s.g_steps) == \
      (256, 64, 4096, 40960, 51200, 200)
  assert (k.kd_steps, k.ep_steps, k.batch_size, k.epochs) == (400, 400, 128, 60)
  w = s.weights
  assert (w.bn, w.oh, w.adv, w.cr, s.cr_temperature, k.temperature) == (1.0, 1.0, 0.5, 0.8, 0.1,
                                                                         20.0)
  assert c.log.checkpoint_every_rounds == 10
  runner.validate(c)
  plan = runner.Plan(k.pre_rounds, k.ep_steps // k.kd_steps, k.epochs, k.kd_steps)
  assert plan.total_rounds == 60  # one round of 200 generator + 400 KD steps per epoch
  # The CPU-sized main command is unchanged by the new argument.
  m = fashion_mnist.get_config()
  assert (m.synthesis.batch_size, m.synthesis.g_steps, m.kd.kd_steps, m.kd.epochs) == \
      (64, 40, 60, 12)
  # Another method keeps its preset's own schedule under :full too.
  d = fashion_mnist.get_config('full,method=dfq')
  assert d.kd.epochs == 60 and d.synthesis.batch_size == 256


_RUNTIME_PROBE = r'''
import json, sys
import jax, jax.numpy as jnp
from configs import fashion_mnist
from experiments import runner
cfg = fashion_mnist.get_config('quick')
cfg.runtime.xla_cpu_ynn_fusions = sys.argv[1] == 'on'
if sys.argv[2] == 'late':
  jnp.zeros(1).block_until_ready()  # a backend starts before the entry point's call
added = runner.apply_runtime(cfg)
def convs(x, w):  # conv -> relu -> conv -> sum: a pattern XLA:CPU gives to YNNPACK
  c = lambda a: jax.lax.conv_general_dilated(a, w, (1, 1), 'SAME',
                                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return c(jax.nn.relu(c(x))).sum()
hlo = jax.jit(convs).lower(jnp.ones((8, 16, 16, 16)), jnp.ones((3, 3, 16, 16))).compile().as_text()
import os
print(json.dumps({'added': added, 'ynn': 'ynn' in hlo.lower(),
                  'xla_flags': os.environ.get('XLA_FLAGS', '')}))
'''


@pytest.mark.parametrize('setting,when,user_flags,added,ynn', [
    ('off', 'early', '', '--xla_cpu_experimental_ynn_fusion_type=', False),  # the default
    ('on', 'early', '', None, True),
    # the user's own value wins (untouched; what XLA makes of it is XLA's)
    ('off', 'early', '--xla_cpu_experimental_ynn_fusion_type=dot', None, None),
    ('off', 'late', '', None, True),  # too late: a warning, nothing changed
])
def test_runtime_ynn_switch_reaches_xla(setting, when, user_flags, added, ynn, cache_dir):
  """config.runtime.xla_cpu_ynn_fusions: the entry point's XLA_FLAGS change takes effect
  in this process's compiled convolutions (YNNPACK fusions absent from the HLO), a flag
  the user set wins, and after a backend started nothing changes but a warning."""
  env = subprocess_env(cache_dir)
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_DISABLE_MOST_OPTIMIZATIONS')  # the tests' low opt level fuses nothing
  if user_flags:
    env['XLA_FLAGS'] = user_flags
  proc = subprocess.run([sys.executable, '-c', _RUNTIME_PROBE, setting, when], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.splitlines()[-1])
  assert out['added'] == added and ynn in (None, out['ynn']), out
  assert out['xla_flags'] == (added or user_flags)
  assert ('not applied' in proc.stdout) == (when == 'late')

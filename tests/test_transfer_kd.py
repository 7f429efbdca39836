"""Issue 21, items 4 and 6: `python -m experiments.distill` (the reference's
vanilla_kd.py) end to end on the shipped teacher: a small set synthesized by
experiments/synthesize.py, KD on it through the CLI, the student above chance on
the real Fashion-MNIST test split; a run stopped after some steps and resumed
ends bit for bit where the uninterrupted one ends; bad input is one clear error
before anything compiles (in-process) and one `error:` line (the CLI).

The margin: the student must reach chance + 15 points (> 25 % on 1000 test images;
the teacher has 94.9 %). The budget is one CMI round (64 images, 40 generator steps)
and 96 KD steps of batch 16; the generator's Adam runs at lr_g 0.03, not the preset's
1e-3, which over 40 steps from a fresh generator leaves noise-like blobs (the student
then stayed at 10.6-15.6 %). With 0.03 the images are silhouettes on a black ground.
Measured (Python 3.12, jax 0.12, 2-core CPU): this test 33.1 %; in-process runs of the
same recipe 35.9 %, and 29.1 % / 33.7 % with another synthesis / KD seed; lr_g 0.01 /
0.05 / 0.1 gave 25.6 / 30.4 / 21.7 %, and 48 epochs, T 20, batch 32 or 64, lr 0.05 or
a label term no more than 35.4 %. A platform's float rounding moves the result as a
seed does (the old recipe measured 15.3 % on one machine, 11.5 % on this one), so the
bound sits below the lowest seed seen, 29.1 %: 15 points over chance, not the 3 of
before."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cmi_jax import data, distill, errors, report
from configs import distill as distill_config
from experiments import synthesize, transfer_kd
from tests.helpers import ROOT, fails_fast, have_fmnist_test, load_checkpoint, subprocess_env

pytestmark = pytest.mark.usefixtures('compilation_cache')

TEACHER = os.path.join(ROOT, 'teachers', 'fashion_mnist_wrn_16_2')
N_IMAGES, SYNTH_BATCH, G_STEPS = 64, 64, 40   # one CMI round
EPOCHS, BATCH, MILESTONE = 24, 16, 18          # 4 steps per epoch, 96 steps
STEPS_PER_EPOCH = N_IMAGES // BATCH
MARGIN = 15.0  # percentage points over chance (10 %) the student must reach (measured: 33.1 %)
# Rows every 2 steps (chunks of 2), a checkpoint every 4 steps and each epoch; lr 0.02
# (0.1 from scratch is unstable in eval mode over so few steps), T 4.
OVERRIDES = {'kd.epochs': EPOCHS, 'kd.batch_size': BATCH, 'kd.temperature': 4.0,
             'kd.lr': 0.02, 'kd.milestones': (MILESTONE,), 'log.every_steps': 2,
             'log.checkpoint_every_steps': 4, 'mesh.num_devices': 1, 'data.eval_limit': 1000,
             'data.eval_batch_size': 500}




needs_data = pytest.mark.skipif(not have_fmnist_test(), reason='no Fashion-MNIST test split')


def _config(transfer, **extra):
  cfg = distill_config.get_config('quick')
  cfg.teacher.checkpoint, cfg.student.arch, cfg.data.transfer = TEACHER, 'wrn_16_1', transfer
  for field, value in {**OVERRIDES, **extra}.items():
    section, name = field.split('.')
    cfg[section][name] = value
  return cfg


def _cli(args, cache_dir, timeout=900):
  return subprocess.run([sys.executable, '-m', 'experiments.distill'] + args, cwd=ROOT,
                        env=subprocess_env(cache_dir), capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
  """experiments/synthesize.py's synthetic.npz from the shipped teacher (small settings)."""
  out = str(tmp_path_factory.mktemp('synthetic'))
  teacher, cfg, _ = synthesize.build(
      TEACHER, 'cmi', N_IMAGES, SYNTH_BATCH, G_STEPS,
      overrides={'n_neg': '64', 'bank_size': '256', 'ngf': '16', 'nz': '32', 'head_dim': '32',
                 'lr_g': '0.03'})  # formed images within 40 steps: see the module docstring
  synthesize.synthesize_dataset(teacher, cfg, N_IMAGES, out, progress=False)
  return os.path.join(out, synthesize.NPZ)


@pytest.fixture(scope='module')
def cli_run(synthetic, tmp_path_factory, cache_dir):
  """`python -m experiments.distill` on the synthetic set, the recipe above."""
  workdir = str(tmp_path_factory.mktemp('kd') / 'cli')
  flags = [f'--teacher={TEACHER}', '--student=wrn_16_1', f'--data={synthetic}',
           f'--workdir={workdir}', '--config=configs/distill.py:quick']
  flags += [f'--config.{k}={v}'.replace(' ', '') for k, v in OVERRIDES.items()]
  proc = _cli(flags, cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    return dict(workdir=workdir, stdout=proc.stdout, summary=json.load(f))


@pytest.fixture(scope='module')
def resume_runs(synthetic, tmp_path_factory):
  """3 epochs (12 steps) uninterrupted, and stopped after 5 steps (at step 6: mid-epoch,
  between the checkpoints of steps 4 and 8) then resumed, in-process."""
  root = tmp_path_factory.mktemp('resume')
  short = {'kd.epochs': 3, 'kd.milestones': (2,), 'data.eval_limit': 200}
  full = transfer_kd.run(_config(synthetic, **short), str(root / 'full'))
  stopped = transfer_kd.run(_config(synthetic, **short, **{'log.stop_after_steps': 5}),
                            str(root / 'resumed'))
  done = transfer_kd.run(_config(synthetic, **short), str(root / 'resumed'))
  return dict(full=full, stopped=stopped, done=done)


@pytest.mark.slow  # end-to-end runs, ~170 s / ~60 s of fixtures: -m slow
@needs_data
def test_student_beats_chance(cli_run):
  summary = cli_run['summary']
  assert summary['teacher_accuracy'] > 90.0  # the shipped teacher, on 1000 test images
  assert summary['student_accuracy'] > 10.0 + MARGIN, summary['history']
  assert len(summary['history']) == EPOCHS
  assert summary['steps'] == EPOCHS * STEPS_PER_EPOCH
  assert 'Student accuracy on the fashion_mnist test split' in cli_run['stdout']
  assert 'Done in' in cli_run['stdout'] and summary['transfer_images'] == N_IMAGES


@pytest.mark.slow  # end-to-end runs, ~170 s / ~60 s of fixtures: -m slow
def test_outputs(cli_run):
  workdir = cli_run['workdir']
  rows = report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  total = EPOCHS * STEPS_PER_EPOCH
  assert [r['step'] for r in rows] == list(range(2, total + 1, 2))
  assert all(np.isfinite(r['kd_loss']) and 'label_accuracy' in r for r in rows)
  assert [r['epoch'] for r in rows] == [(r['step'] - 1) // STEPS_PER_EPOCH + 1 for r in rows]
  assert [('student_accuracy' in r) for r in rows] == [r['step'] % STEPS_PER_EPOCH == 0
                                                      for r in rows]
  # Multistep per epoch: lr 0.02 for the first MILESTONE epochs, then 0.002.
  assert [r['lr'] for r in rows] == pytest.approx(
      [0.02 if (r['step'] - 1) // STEPS_PER_EPOCH < MILESTONE else 0.002 for r in rows])
  for name in ('accuracy.png', 'summary.json', 'config.json', 'fingerprint.json',
               os.path.join('images', 'transfer_set.png')):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['data']['name'] == 'fashion_mnist' and config['teacher']['arch'] == 'wrn_16_2'


@pytest.mark.slow  # end-to-end runs, ~170 s / ~60 s of fixtures: -m slow
def test_resume_is_exact(resume_runs):
  assert resume_runs['stopped']['stopped_at_step'] == 6
  a, meta_a = load_checkpoint(resume_runs['full']['workdir'])
  b, meta_b = load_checkpoint(resume_runs['done']['workdir'])
  assert meta_a == meta_b and meta_a['step'] == 3 * STEPS_PER_EPOCH
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(x, y)
  rows = [[report.without_wall_clock(r) for r in
           report.read_metrics(os.path.join(run['workdir'], 'metrics.jsonl'))]
          for run in (resume_runs['full'], resume_runs['done'])]
  assert rows[0] == rows[1] and len(rows[0]) == 6
  assert resume_runs['done']['student_accuracy'] == resume_runs['full']['student_accuracy']


# ---------------------------------------------------------------- bad input (item 6)

def _fails_fast(cfg, workdir, exc, *patterns):
  return fails_fast(transfer_kd.run, cfg, workdir, exc, *patterns)


def _pngs(folder, n, size, mode='L'):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    shape = (size, size) if mode == 'L' else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
        os.path.join(folder, f'0-{i}.png'))
  return str(folder)


def _npz(path, n=40, shape=(28, 28, 1), labels=None):
  images = np.random.default_rng(0).integers(0, 256, (n,) + shape, dtype=np.uint8)
  arrays = {'images': images} if labels is False else {
      'images': images, 'labels': np.arange(n) % 10 if labels is None else labels}
  np.savez(path, **arrays)
  return str(path)


def test_missing_split(tmp_path):
  empty = tmp_path / 'no_mnist'
  empty.mkdir()
  _fails_fast(_config('mnist', **{'data.transfer_dir': str(empty)}), tmp_path / 'run',
              data.DataNotFoundError, 'mnist train split not found', str(empty))


def test_folder_without_images(tmp_path):
  folder = tmp_path / 'pre' / 'sub'
  folder.mkdir(parents=True)
  (folder / 'README.txt').write_text('no images here')
  _fails_fast(_config(str(tmp_path / 'pre')), tmp_path / 'run', data.DataNotFoundError,
              'holds no image files', str(tmp_path / 'pre'))


@pytest.mark.parametrize('make,patterns', [
    (lambda p: _pngs(p / 'big', 3, 32), ['32x32', '28x28', '--config.data.resize=True']),
    (lambda p: _pngs(p / 'rgb', 3, 28, 'RGB'), ['3-channel', 'PIL mode RGB', '1-channel']),
    (lambda p: _npz(p / 'big.npz', shape=(32, 32, 1)), ['32x32', '--config.data.resize=True']),
    (lambda p: _npz(p / 'rgb.npz', shape=(28, 28, 3)), ['3-channel', '1-channel']),
    (lambda p: _npz(p / 'other.npz', labels=np.full(40, 12)), ['class 12', '10 classes']),
])
def test_transfer_set_that_does_not_fit_the_teacher(tmp_path, make, patterns):
  _fails_fast(_config(make(tmp_path)), tmp_path / 'run', data.DataMismatchError, *patterns)


def test_resize_on_request(tmp_path):
  cfg = _config(_pngs(tmp_path / 'big', 3, 32), **{'data.resize': True, 'kd.batch_size': 2})
  out = transfer_kd.load_transfer(cfg, data.get_info('fashion_mnist'))
  assert out.images.shape == (3, 28, 28, 1) and out.labels is None
  big = np.asarray(Image.open(os.path.join(cfg.data.transfer, '0-0.png')))
  # torchvision Resize(28) + CenterCrop(28) of a square image: a bilinear resize.
  np.testing.assert_array_equal(out.images[0, ..., 0], np.asarray(
      Image.fromarray(big).resize((28, 28), Image.BILINEAR)))


@pytest.mark.parametrize('field,value,exc,patterns', [
    ('teacher.checkpoint', '/nope', errors.ConfigError, ['teacher.checkpoint', '/nope']),
    ('student.arch', 'wrn_99_9', errors.ConfigError, ['student.arch', 'wrn_16_1']),
    ('data.transfer', '', errors.ConfigError, ['--data=<synthetic.npz']),
    ('data.transfer', 'stl10', errors.ConfigError, ['not a dataset name', 'cifar10']),
    ('kd.schedule', 'step', errors.ConfigError, ['kd.schedule', 'multistep']),
    ('kd.label_weight', 0.1, errors.ConfigError, ['needs labels', 'unlabeled']),
    ('kd.batch_size', 64, errors.ConfigError, ['holds 3 images', 'kd.batch_size=64']),
])
def test_bad_config(tmp_path, field, value, exc, patterns):
  cfg = _config(_pngs(tmp_path / 'pre', 3, 28), **{field: value})
  _fails_fast(cfg, tmp_path / 'run', exc, *patterns)


def test_pth_teacher_needs_arch_and_dataset(tmp_path):
  pth = tmp_path / 'teacher.pth'
  pth.write_bytes(b'not a zip')
  cfg = _config(_npz(tmp_path / 's.npz'), **{'teacher.checkpoint': str(pth)})
  _fails_fast(cfg, tmp_path / 'run', errors.ConfigError, 'config.teacher.arch',
              'config.data.name')


def test_cli_error_is_one_line(tmp_path, cache_dir):
  proc = _cli([f'--teacher={TEACHER}', '--student=wrn_16_1', f'--data={tmp_path / "nope"}',
               f'--workdir={tmp_path / "run"}'], cache_dir, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("error: config.data.transfer='"), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_kd_objective_with_labels():
  """alpha x KL x T^2 + beta x CE, against numpy (DF:vanilla_kd.py:320-329)."""
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  y = np.array([0, 2, 1, 1])
  cfg = distill.KDConfig(temperature=2.0, kd_weight=0.5, label_weight=0.3)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  pt = np.exp(log_softmax(t / 2.0))
  kl = np.mean(np.sum(pt * (log_softmax(t / 2.0) - log_softmax(s / 2.0)), -1)) * 4.0
  ce = -np.mean(log_softmax(s)[np.arange(4), y])
  got = float(cfg.objective(jax.numpy.asarray(s), jax.numpy.asarray(t), jax.numpy.asarray(y)))
  assert got == pytest.approx(0.5 * kl + 0.3 * ce, rel=1e-5)
  assert float(cfg.objective(jax.numpy.asarray(s), jax.numpy.asarray(t))) == \
      pytest.approx(0.5 * kl, rel=1e-5)

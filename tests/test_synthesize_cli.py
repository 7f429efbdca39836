"""Issue 11, item 5: `python -m experiments.synthesize` end to end on the shipped
teacher (tiny settings): the .npz, the contact sheet and the report; resume after
SIGTERM gives the same dataset as an uninterrupted run; bad input fails at once
with a message naming the fix."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from absl import app, flags
from PIL import Image

from cmi_jax import data, report, teacher_io
from cmi_jax.synthesis import api
from experiments import synthesize
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures('compilation_cache')  # whole runs: see conftest

TEACHER = os.path.join(ROOT, 'teachers', 'fashion_mnist_wrn_16_2')
TINY = ['--batch_size=8', '--g_steps=2', '--set=n_neg=16', '--set=bank_size=64',
        '--set=ngf=8', '--set=nz=16', '--set=head_dim=16']
N = 12  # 2 rounds of 8; the last round's surplus 4 images are dropped


def _cli(argv):
  """Runs the CLI's main in this process (shares the compiled round across runs)."""
  flags.FLAGS.unparse_flags()
  argv = flags.FLAGS(['synthesize'] + argv)
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      synthesize.main(argv)
  finally:
    flags.FLAGS.unparse_flags()
  return out.getvalue()


def _load(out):
  with np.load(os.path.join(out, 'synthetic.npz')) as z:
    return z['images'], z['labels']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('synth')
  full = str(root / 'full')
  args = [f'--teacher={TEACHER}', '--method=cmi', f'--num_images={N}', '--seed=3',
          '--save_every=1'] + TINY
  stdout_full = _cli(args + [f'--out={full}'])
  # The same, with SIGTERM arriving during round 1: stop after it, then continue.
  resumed = str(root / 'resumed')
  original = api.synthesize
  calls = []

  def signalling(*a, **k):
    out = original(*a, **k)
    calls.append(1)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return out
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(api, 'synthesize', signalling)
    stdout_stopped = _cli(args + [f'--out={resumed}'])
  progress_after_stop = sorted(os.listdir(os.path.join(resumed, 'progress')))
  stdout_resumed = _cli(args + [f'--out={resumed}'])
  stdout_again = _cli(args + [f'--out={resumed}'])
  return dict(full=full, resumed=resumed, args=args, stdout_full=stdout_full,
              stdout_stopped=stdout_stopped, stdout_resumed=stdout_resumed,
              stdout_again=stdout_again, progress_after_stop=progress_after_stop)


def test_dataset_files(runs):
  full = runs['full']
  images, labels = _load(full)
  assert images.shape == (N, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (N,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < 10
  assert images.std() > 0 and len({im.tobytes() for im in images}) == N  # N distinct images
  for r in range(2):  # CMI sorts each round's random targets
    assert np.all(np.diff(labels[8 * r:8 * r + 8]) >= 0)
  with open(os.path.join(full, 'synthesis.json')) as f:
    rep = json.load(f)
  assert rep['num_images'] == N and rep['rounds'] == 2
  assert rep['per_class'] == np.bincount(labels, minlength=10).tolist()
  assert rep['settings']['method'] == 'cmi' and rep['settings']['dataset'] == 'fashion_mnist'
  sheet = np.asarray(Image.open(os.path.join(full, 'contact_sheet.png')))
  expected = report.class_grid(images, labels, 10, per_row=10)[..., 0]
  np.testing.assert_array_equal(sheet, expected.repeat(2, 0).repeat(2, 1))
  assert not os.path.exists(os.path.join(full, 'progress'))  # removed once finished
  assert f'Wrote {N} images' in runs['stdout_full']
  # The teacher check, recomputed here with the unfolded network.
  module, variables, card = teacher_io.load_teacher(TEACHER)
  info = data.get_info(card['meta']['dataset'])
  x = (images.astype(np.float32) / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
  logits = np.asarray(module.apply(variables, x, train=False), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  assert rep['teacher_check']['agreement'] == pytest.approx(
      100.0 * np.mean(logits.argmax(-1) == labels), abs=1e-9)
  assert rep['teacher_check']['mean_ce'] == pytest.approx(
      -np.mean(logp[np.arange(N), labels]), rel=1e-5)
  assert f'assigns {rep["teacher_check"]["agreement"]:.2f}% of the images' in runs['stdout_full']


def test_resume_after_sigterm_is_exact(runs):
  assert 'Stopped by SIGTERM at 8/12 images' in runs['stdout_stopped']
  assert 'Resume with: python -m experiments.synthesize' in runs['stdout_stopped']
  assert runs['progress_after_stop'] == ['1']  # the state after round 1
  assert 'Resuming' in runs['stdout_resumed'] and '8/12 images after 1 round(s)' in \
      runs['stdout_resumed']
  for a, b in zip(_load(runs['full']), _load(runs['resumed'])):
    np.testing.assert_array_equal(a, b)
  assert 'already holds the finished dataset' in runs['stdout_again']


def test_other_settings_in_same_out_fail(runs):
  with pytest.raises(app.UsageError, match='seed differ'):
    _cli([a if not a.startswith('--seed') else '--seed=4' for a in runs['args']]
         + [f'--out={runs["resumed"]}'])


@pytest.mark.parametrize('argv,message', [
    (['--teacher=/nope', '--num_images=4'], 'no such file or directory'),
    ([f'--teacher={TEACHER}', '--num_images=0'], '--num_images=0'),
    ([f'--teacher={TEACHER}', '--num_images=4', '--method=dfq'], 'GAN baseline'),
    ([f'--teacher={TEACHER}', '--num_images=4', '--method=cmi_typo'], 'cmi_no_contrast'),
    ([f'--teacher={TEACHER}', '--num_images=4', '--set=ngff=3'], "'adv_kind', 'adv_start_round'"),
    ([f'--teacher={TEACHER}', '--num_images=4', '--set=ngf=big'], 'expected a int'),
    ([f'--teacher={TEACHER}', '--num_images=4', '--input_shape=28,28'], 'expected H,W,C'),
    ([f'--teacher={TEACHER}', '--num_images=4', '--dataset=cifar10'], 'input_shape=(32, 32, 3)'),
])
def test_bad_input(tmp_path, argv, message):
  with pytest.raises(app.UsageError) as e:
    _cli(argv + [f'--out={tmp_path / "o"}'])
  assert message in str(e.value), str(e.value)
  assert not (tmp_path / 'o').exists()


def test_pth_needs_arch(tmp_path):
  pth = tmp_path / 'teacher.pth'
  pth.write_bytes(b'not a zip')
  with pytest.raises(app.UsageError, match='pass --arch and --dataset'):
    _cli([f'--teacher={pth}', '--num_images=4', f'--out={tmp_path / "o"}'])


def test_command_line_error_exit(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.synthesize', '--teacher=/nope',
                         '--num_images=4', f'--out={tmp_path / "o"}'], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith('error: --teacher=/nope: no such file or directory'), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no flag help, no traceback

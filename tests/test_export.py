"""`experiments.export` (issue 20 item 6): a run's student as a reference-layout
.pth (loaded strictly into the PyTorch twin of the reference class; marked
`torch`) and as ONNX (run by onnxruntime; marked `onnx`), both against JAX's
eval-mode logits; the card beside the file; and the bad inputs that must end in
one `error:` line with exit status 2.

One tiny run (Fashion-MNIST 28x28x1, the random teacher, 1 round of 2 generator
and 2 KD steps, 4 fake devices) serves the module: ~1.5 min on a busy 2-core CPU,
~2.5 min for the file.
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cmi_jax import data, models
from cmi_jax.errors import UserError
from experiments import runner, student_export
from tests.helpers import ROOT, load_checkpoint, random_variables, subprocess_env
from tests.test_run import tiny_config

pytestmark = pytest.mark.usefixtures('compilation_cache')

LOGIT_ATOL = 1e-4        # fp32, eval-mode BN: the .pth in torch and the ONNX graph vs JAX
MIN_LOGIT_SPREAD = 1e-3  # logits must depend on the input for the comparison to mean anything
BATCH = 3


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A finished one-round run (checkpoint, config.json, summary.json) on all 4 fake
  devices, so the exporter reads back arrays that were saved from a mesh."""
  workdir = str(tmp_path_factory.mktemp('export_run') / 'run')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(runner.summary, 'plots', lambda *args: None)  # matplotlib: ~1 s a plot
    summary = runner.run(tiny_config(epochs=1, rounds_per_epoch=1), workdir)
  return workdir, summary


@pytest.fixture(scope='module')
def jax_student(run_dir):
  """(logits fn of NHWC float32 images, NHWC test inputs), from the checkpoint read
  independently of the exporter (tests/helpers.load_checkpoint)."""
  workdir, summary = run_dir
  state, _ = load_checkpoint(workdir)
  variables = {k: state['student'][k] for k in ('params', 'batch_stats')}
  info = data.get_info('fashion_mnist')
  module = models.get(summary['student'], info.num_classes)
  apply = jax.jit(functools.partial(module.apply, train=False))
  x = np.random.default_rng(0).normal(size=(BATCH, *info.image_shape)).astype(np.float32)
  return (lambda images: np.asarray(apply(variables, images))), x


def _nchw(x):
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _check_logits(fmt, got, expected):
  diff = float(np.max(np.abs(got - expected)))
  spread = float(np.mean(np.std(expected, axis=0)))
  print(f'export {fmt}: max |logit diff| vs JAX = {diff:.2e} (logit spread {spread:.3f})')
  assert spread > MIN_LOGIT_SPREAD, spread
  assert diff <= LOGIT_ATOL, diff
  return diff


def test_card(run_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(student_export._WRITERS, 'pth',  # pylint: disable=protected-access
                      lambda student, path: open(path, 'wb').close())  # no torch needed
  workdir, summary = run_dir
  out = tmp_path / 'student.pth'
  card = student_export.export_student(workdir, 'pth', str(out))
  on_disk = json.loads((tmp_path / 'student.pth.json').read_text())
  assert on_disk == card
  info = data.get_info('fashion_mnist')
  assert card['arch'] == summary['student'] == 'wrn_16_1'
  assert card['num_classes'] == info.num_classes
  assert card['input_shape'] == [1, 28, 28] and card['input_layout'] == 'NCHW'
  assert card['mean'] == list(info.mean) and card['std'] == list(info.std)
  assert card['student_accuracy'] == summary['student_accuracy']
  assert card['best_student_accuracy'] == summary['best_student_accuracy']
  assert (card['which'], card['round'], card['accuracy_round'], card['format'],
          card['file']) == ('final', 1, 1, 'pth', 'student.pth')


@pytest.mark.torch
def test_pth_loads_into_reference_class(run_dir, jax_student, tmp_path):
  torch = pytest.importorskip('torch')
  from benchmarks.torch_models import reference_nets  # pylint: disable=import-outside-toplevel
  workdir, _ = run_dir
  out = tmp_path / 'student.pth'
  card = student_export.export_student(workdir, 'pth', str(out))
  net = reference_nets()[0](card['arch'], card['num_classes'], card['input_shape'][0])
  net.load_state_dict(torch.load(out, weights_only=True)['state_dict'], strict=True)
  logits_fn, x = jax_student
  with torch.no_grad():
    got = net.eval()(torch.from_numpy(_nchw(x))).numpy()
  _check_logits('pth', got, logits_fn(x))


@pytest.mark.onnx
def test_onnx_runs_in_onnxruntime(run_dir, jax_student, tmp_path):
  ort = pytest.importorskip('onnxruntime')
  pytest.importorskip('jax2onnx')
  workdir, _ = run_dir
  out = tmp_path / 'student.onnx'
  card = student_export.export_student(workdir, 'onnx', str(out))
  assert card['format'] == 'onnx' and (tmp_path / 'student.onnx.json').is_file()
  session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
  (inp,), (outp,) = session.get_inputs(), session.get_outputs()
  assert (inp.name, outp.name) == ('images', 'logits')
  assert inp.shape[1:] == card['input_shape']
  logits_fn, x = jax_student
  _check_logits('onnx', session.run(None, {'images': _nchw(x)})[0], logits_fn(x))
  one = session.run(None, {'images': _nchw(x[:1])})[0]  # the batch axis is dynamic
  assert one.shape == (1, card['num_classes'])


@pytest.mark.torch
@pytest.mark.onnx
@pytest.mark.parametrize('arch', ['resnet18', 'vgg11'])
def test_other_families(tmp_path, arch):
  """The writers on the two families a tiny run does not train (random weights,
  16x16x3): vgg11's max-pools, resnet18's projection shortcuts."""
  torch = pytest.importorskip('torch')
  ort = pytest.importorskip('onnxruntime')
  pytest.importorskip('jax2onnx')
  from benchmarks.torch_models import reference_nets  # pylint: disable=import-outside-toplevel
  shape, num_classes = (16, 16, 3), 5
  module = models.get(arch, num_classes)
  variables = random_variables(module, (1, *shape))
  student = student_export.RunStudent(module, variables, {'arch': arch, 'input_shape': [3, 16, 16]})
  x = np.random.default_rng(1).normal(size=(BATCH, *shape)).astype(np.float32)
  expected = np.asarray(module.apply(variables, x, train=False))
  student_export.write_pth(student, tmp_path / 'a.pth')
  net = reference_nets()[0](arch, num_classes, 3)
  net.load_state_dict(torch.load(tmp_path / 'a.pth', weights_only=True)['state_dict'], strict=True)
  with torch.no_grad():
    _check_logits(f'pth {arch}', net.eval()(torch.from_numpy(_nchw(x))).numpy(), expected)
  student_export.write_onnx(student, tmp_path / 'a.onnx')
  session = ort.InferenceSession(str(tmp_path / 'a.onnx'), providers=['CPUExecutionProvider'])
  _check_logits(f'onnx {arch}', session.run(None, {'images': _nchw(x)})[0], expected)


def test_best_is_refused(run_dir, tmp_path):
  with pytest.raises(UserError, match='no best student'):
    student_export.export_student(run_dir[0], 'pth', str(tmp_path / 's.pth'), which='best')


def _bad_inputs(run, tmp_path):
  """{case: (workdir, format, out)} for each bad input."""
  no_ckpt = tmp_path / 'no_ckpt'
  no_ckpt.mkdir()
  shutil.copy(os.path.join(run, 'config.json'), no_ckpt / 'config.json')
  (no_ckpt / 'checkpoints').mkdir()
  (tmp_path / 'taken.pth').write_bytes(b'keep')
  return {
      'no run': (str(tmp_path / 'nosuch'), 'pth', str(tmp_path / 'a.pth')),
      'not a run': (str(tmp_path), 'pth', str(tmp_path / 'b.pth')),
      'no checkpoint': (str(no_ckpt), 'pth', str(tmp_path / 'c.pth')),
      'unknown format': (run, 'tflite', str(tmp_path / 'd.tflite')),
      'out folder missing': (run, 'pth', str(tmp_path / 'nodir' / 'e.pth')),
      'out is a folder': (run, 'pth', str(tmp_path)),
      'out exists': (run, 'pth', str(tmp_path / 'taken.pth')),
  }


_MESSAGES = {'no run': 'no such folder', 'not a run': 'no config.json',
             'no checkpoint': 'no checkpoint yet', 'unknown format': "'tflite' is unknown",
             'out folder missing': 'does not exist', 'out is a folder': 'is a folder',
             'out exists': 'pass --overwrite'}


@pytest.mark.parametrize('case', sorted(_MESSAGES))
def test_bad_input_raises(run_dir, tmp_path, case):
  workdir, fmt, out = _bad_inputs(run_dir[0], tmp_path)[case]
  with pytest.raises(UserError, match=_MESSAGES[case]):
    student_export.export_student(workdir, fmt, out)
  assert not os.path.exists(out + '.json') or os.path.isdir(out)
  if case == 'out exists':
    assert (tmp_path / 'taken.pth').read_bytes() == b'keep'


def test_write_failure_keeps_no_partial_file(run_dir, tmp_path, monkeypatch):
  def fail(student, path):
    with open(path, 'wb') as f:
      f.write(b'half')
    raise OSError(28, 'No space left on device')
  monkeypatch.setitem(student_export._WRITERS, 'pth', fail)  # pylint: disable=protected-access
  out = tmp_path / 's.pth'
  with pytest.raises(UserError, match='Cannot write.*No space left'):
    student_export.export_student(run_dir[0], 'pth', str(out))
  assert os.listdir(tmp_path) == []


def test_missing_extra_names_the_install(run_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # import jax2onnx -> ImportError
  with pytest.raises(UserError, match=r'needs jax2onnx: pip install .*--no-deps jax2onnx'):
    student_export.export_student(run_dir[0], 'onnx', str(tmp_path / 's.onnx'))
  assert os.listdir(tmp_path) == []


def _cli(cache_dir, *args):
  return subprocess.run([sys.executable, '-m', 'experiments.export', *args], cwd=ROOT,
                        env=subprocess_env(cache_dir), capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize('case', ['no checkpoint', 'unknown format'])
def test_cli_bad_input_one_error_line(run_dir, tmp_path, cache_dir, case):
  workdir, fmt, out = _bad_inputs(run_dir[0], tmp_path)[case]
  proc = _cli(cache_dir, f'--workdir={workdir}', f'--format={fmt}', f'--out={out}')
  assert proc.returncode == 2, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert _MESSAGES[case] in lines[0]


@pytest.mark.torch
def test_cli_writes_pth(run_dir, tmp_path, cache_dir):
  pytest.importorskip('torch')
  out = tmp_path / 'student.pth'
  proc = _cli(cache_dir, f'--workdir={run_dir[0]}', f'--out={out}')  # format from the suffix
  assert proc.returncode == 0, proc.stderr
  assert 'Wrote final student wrn_16_1' in proc.stdout
  assert out.is_file() and json.loads((tmp_path / 'student.pth.json').read_text())['format'] == 'pth'

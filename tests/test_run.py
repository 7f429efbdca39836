"""The data-free KD runner end to end (issue 5): outputs and their values, exact
resume (CMI and a GAN baseline), runs without test data, and the errors raised
before anything compiles.

Runs are tiny (Fashion-MNIST 28x28x1, random teachers, batch 8, 2 generator
steps, 2 KD steps per round). Every run builds new optimizer closures, so jit
retraces; a persistent compilation cache turns the repeated compilations of one
module into disk hits.
"""

import contextlib
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cmi_jax import data, models, report
from configs import fashion_mnist
from experiments import runner
from tests.helpers import fails_fast, have_fmnist_test, load_checkpoint

B = 8                    # synthesis batch of the quick config
CAPACITY = 24            # pool and bank: full after 3 rounds of B, wrapping at round 4
ROUNDS_PER_EPOCH, EPOCHS = 2, 2
ROUNDS = ROUNDS_PER_EPOCH * EPOCHS
EVAL_LIMIT = 64




HAVE_DATA = have_fmnist_test()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason='Fashion-MNIST test split not installed '
                                '(apt-get install dataset-fashion-mnist)')

pytestmark = pytest.mark.usefixtures('compilation_cache')


def tiny_config(method='cmi', epochs=EPOCHS, rounds_per_epoch=ROUNDS_PER_EPOCH,
                num_devices=0):
  """configs/fashion_mnist.py:quick with a random teacher, `rounds_per_epoch` rounds
  per epoch and a pool/bank that fills up (and wraps) within the run."""
  cfg = fashion_mnist.get_config(f'method={method},quick')
  cfg.teacher.checkpoint = 'random'
  cfg.kd.ep_steps = rounds_per_epoch * cfg.kd.kd_steps
  cfg.kd.epochs = epochs
  cfg.synthesis.pool_size = cfg.synthesis.bank_size = CAPACITY
  cfg.mesh.num_devices = num_devices
  cfg.data.eval_limit = EVAL_LIMIT
  return cfg


def _copy(cfg, **log):
  out = cfg.copy_and_resolve_references()
  for k, v in log.items():
    out.log[k] = v
  return out


def rows_of(workdir):
  return report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def assert_trees_equal(a, b):
  """Same structure and bit-identical leaves."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(x, y)


class _Crash(Exception):
  pass


def _crash_at_save(monkeypatch, step):
  original = runner.Checkpointer.save

  def save(self, s, state, meta):
    if s == step:
      raise _Crash(f'injected crash while saving round {s}')
    return original(self, s, state, meta)
  monkeypatch.setattr(runner.Checkpointer, 'save', save)


def _no_plots(monkeypatch):
  """Plots are checked on one run; the others skip matplotlib (~1 s a plot)."""
  monkeypatch.setattr(runner.summary, 'plots', lambda *args: None)


def check_lr(rows, epochs, rounds_per_epoch):
  """Cosine stepped per epoch: lr(e) = 0.1 (1 + cos(pi e / epochs)) / 2."""
  for r in rows:
    e = (r['round'] - 1) // rounds_per_epoch
    assert r['lr'] == pytest.approx(0.1 * (1 + math.cos(math.pi * e / epochs)) / 2, rel=1e-6)
  assert len({r['lr'] for r in rows}) == epochs


# ---------------------------------------------------------------- CMI, 4 devices

@pytest.fixture(scope='module')
def cmi_runs(tmp_path_factory):
  """The default CMI preset on all 4 fake devices: an uninterrupted run, and the
  same run crashed while saving round 2 (after writing its metrics row, so the
  resume starts mid-epoch from round 1's checkpoint), then resumed."""
  root = tmp_path_factory.mktemp('cmi_runs')
  cfg = tiny_config()
  full = str(root / 'full')
  summary = runner.run(cfg, full)
  resumed = str(root / 'resumed')
  with pytest.MonkeyPatch.context() as mp:
    _no_plots(mp)
    _crash_at_save(mp, 2)
    with pytest.raises(_Crash):
      runner.run(cfg, resumed)
    rows_after_crash, ckpts_after_crash = rows_of(resumed), checkpoint_steps(resumed)
    mp.undo()
    _no_plots(mp)
    summary_resumed = runner.run(cfg, resumed)
  return dict(cfg=cfg, full=full, summary=summary, resumed=resumed,
              rows_after_crash=rows_after_crash, ckpts_after_crash=ckpts_after_crash,
              summary_resumed=summary_resumed)


SYNTH_KEYS = {'loss', 'loss_first', 'best_loss', 'best_step', 'confidence', 'target_accuracy',
              'class_entropy', 'feature_diversity'}
KD_KEYS = {'kd_loss', 'kd_agreement', 'lr'}


def test_cmi_metrics_rows(cmi_runs):
  cfg, rows = cmi_runs['cfg'], rows_of(cmi_runs['full'])
  w = cfg.synthesis.weights
  assert [r['step'] for r in rows] == list(range(1, ROUNDS + 1))
  assert [r['round'] for r in rows] == list(range(1, ROUNDS + 1))
  for r in rows:
    n = r['round']
    terms = {k for k in r if k.startswith('l_')}
    assert terms == {'l_bn', 'l_oh', 'l_adv', 'l_cr'}, n  # exactly CMI's enabled terms
    assert SYNTH_KEYS | KD_KEYS | {'pool_size'} <= set(r), n
    for k, v in r.items():
      if isinstance(v, float):
        assert math.isfinite(v), (n, k, v)
    # The logged total is the weighted sum of the logged terms (last generator step).
    total = w.bn * r['l_bn'] + w.oh * r['l_oh'] + w.adv * r['l_adv'] + w.cr * r['l_cr']
    assert r['loss'] == pytest.approx(total, rel=1e-5)
    # best_loss is one of the logged losses, kept at the lowest (float32 sums: 1e-6 relative).
    low = min(r['loss'], r['loss_first'])
    assert r['best_loss'] <= low + 1e-6 * abs(low)
    assert 0 <= r['best_step'] < cfg.synthesis.g_steps
    assert r['l_bn'] > 0 and r['l_oh'] > 0 and r['l_cr'] > 0 and r['l_adv'] <= 0
    assert 1 / 10 - 1e-6 <= r['confidence'] <= 1 and 0 <= r['class_entropy'] <= math.log(10)
    assert 0 <= r['target_accuracy'] <= 100 and 0 <= r['kd_agreement'] <= 100
    assert 0 <= r['feature_diversity'] <= 2 and r['kd_loss'] >= 0
    # The pool grows by B per round until it is full.
    assert r['pool_size'] == min(B * n, CAPACITY)
    ends_epoch = n % ROUNDS_PER_EPOCH == 0
    assert ('epoch' in r) == ends_epoch
    if ends_epoch:
      assert r['epoch'] == n // ROUNDS_PER_EPOCH
    assert ('student_accuracy' in r) == (ends_epoch and HAVE_DATA)
    if 'student_accuracy' in r:
      acc = r['student_accuracy']
      assert 0 <= acc <= 100 and acc * EVAL_LIMIT / 100 == pytest.approx(round(acc * 0.64))
      assert math.isfinite(r['student_test_loss']) and r['student_test_loss'] > 0
  check_lr(rows, EPOCHS, ROUNDS_PER_EPOCH)


def test_cmi_checkpoints_and_state(cmi_runs):
  cfg, full = cmi_runs['cfg'], cmi_runs['full']
  assert checkpoint_steps(full) == [ROUNDS - 1, ROUNDS]  # max_checkpoints=2, one per round
  state, meta = load_checkpoint(full)
  assert meta['round'] == ROUNDS
  assert int(state['student']['step']) == ROUNDS * cfg.kd.kd_steps
  synth = state['synth']
  assert int(synth['round']) == ROUNDS
  assert int(synth['pool']['count']) == CAPACITY
  assert int(synth['pool']['index']) == (ROUNDS * B) % CAPACITY
  assert int(synth['bank']['count']) == CAPACITY
  # Every bank row written holds features (no zero rows left once full).
  assert np.all(np.abs(synth['bank']['data']).sum(-1) > 0)
  # Pool targets are sorted within each round's slots (random sorted class ids).
  for r in range(2, ROUNDS + 1):
    t = synth['pool']['data']['targets'][_slots(r)]
    assert np.all(np.diff(t) >= 0) and t.min() >= 0 and t.max() < 10


def _slots(r):
  start = ((r - 1) * B) % CAPACITY
  return slice(start, start + B)


def test_cmi_image_grids(cmi_runs):
  full = cmi_runs['full']
  state, _ = load_checkpoint(full)
  pool = state['synth']['pool']['data']
  side = 2 * (10 * (28 + 1) + 1)  # one row per class, 10 per row, scale 2 for <= 32 px
  for r in range(1, ROUNDS + 1):
    png = np.asarray(Image.open(os.path.join(full, 'images', f'round_{r:05d}.png')))
    assert png.shape == (side, side) and png.dtype == np.uint8
    small = png[::2, ::2]
    np.testing.assert_array_equal(png, small.repeat(2, 0).repeat(2, 1))
    assert small.std() > 0
    if r >= 2:  # round 1's pool slots were overwritten by the last round
      expected = report.class_grid(pool['images'][_slots(r)], pool['targets'][_slots(r)], 10)
      np.testing.assert_array_equal(small, expected[..., 0])
  for name in ('accuracy.png', 'losses.png'):
    with Image.open(os.path.join(full, name)) as im:
      assert im.size[0] > 100 and im.size[1] > 100


def test_cmi_summary(cmi_runs):
  cfg, full, summary = cmi_runs['cfg'], cmi_runs['full'], cmi_runs['summary']
  with open(os.path.join(full, 'summary.json')) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  assert summary['rounds'] == ROUNDS and summary['epochs'] == EPOCHS
  assert (summary['method'], summary['teacher'], summary['student']) == \
      ('cmi', 'wrn_16_2', 'wrn_16_1')
  epoch_rows = [r for r in rows_of(full) if 'epoch' in r]
  assert [h['round'] for h in summary['history']] == [r['round'] for r in epoch_rows]
  with open(os.path.join(full, 'config.json')) as f:
    assert json.load(f)['kd']['epochs'] == EPOCHS
  if not HAVE_DATA:
    assert summary['evaluation'] == 'off (no test data)'
    return
  assert summary['evaluation'] == 'on'
  assert summary['student_accuracy'] == epoch_rows[-1]['student_accuracy']
  assert summary['best_student_accuracy'] == max(r['student_accuracy'] for r in epoch_rows)
  # Both accuracies recomputed here from the test split and the saved / seeded weights.
  test = data.load('fashion_mnist', 'test')
  x = (test.images[:EVAL_LIMIT].astype(np.float32) / 255.0 - 0.2860) / 0.3530
  y = test.labels[:EVAL_LIMIT]
  state, _ = load_checkpoint(full)
  student = models.get('wrn_16_1', 10)
  logits = jax.jit(student.apply)({'params': state['student']['params'],
                                   'batch_stats': state['student']['batch_stats']}, x)
  assert summary['student_accuracy'] == pytest.approx(100 * np.mean(np.argmax(logits, -1) == y))
  teacher = runner.load_teacher(cfg, data.get_info('fashion_mnist'), jnp.float32)
  t_logits = jax.jit(teacher.module.apply)(teacher.variables, x)
  assert summary['teacher_accuracy'] == pytest.approx(100 * np.mean(np.argmax(t_logits, -1) == y))


def test_cmi_resume_is_exact(cmi_runs):
  full, resumed = cmi_runs['full'], cmi_runs['resumed']
  # The crash came after round 2's metrics row, before its checkpoint.
  assert [r['step'] for r in cmi_runs['rows_after_crash']] == [1, 2]
  assert cmi_runs['ckpts_after_crash'] == [1]
  rows_full, rows_resumed = rows_of(full), rows_of(resumed)
  assert [r['step'] for r in rows_resumed] == list(range(1, ROUNDS + 1))  # no duplicates
  for a, b in zip(rows_full, rows_resumed):
    assert report.without_wall_clock(a) == report.without_wall_clock(b)
  state_full, meta_full = load_checkpoint(full)
  state_resumed, meta_resumed = load_checkpoint(resumed)
  assert meta_full == meta_resumed
  # Student params, batch_stats, opt_state, step; head (+ Adam), bank, pool: bit-identical.
  assert set(state_full) == {'student', 'synth'}
  assert_trees_equal(state_full, state_resumed)
  drop = lambda s: {k: v for k, v in s.items() if k not in ('seconds_this_session', 'workdir')}
  assert drop(cmi_runs['summary_resumed']) == drop(cmi_runs['summary'])


# ---------------------------------------------------------------- a GAN baseline

DFQ_EPOCHS = 3


@pytest.fixture(scope='module')
def dfq_runs(tmp_path_factory):
  """DFQ (generator trained continuously, KD on fresh samples) on one device, 3
  epochs of one round, without test data: uninterrupted, and stopped after round
  1 by log.stop_after_rounds then resumed (twice: the second finds it finished)."""
  root = tmp_path_factory.mktemp('dfq_runs')
  empty = root / 'no_data'
  empty.mkdir()
  cfg = tiny_config('dfq', epochs=DFQ_EPOCHS, rounds_per_epoch=1, num_devices=1)
  cfg.data.dir = str(empty)
  full = str(root / 'full')
  out = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
    _no_plots(mp)
    summary = runner.run(cfg, full)
    resumed = str(root / 'resumed')
    stopped = runner.run(_copy(cfg, stop_after_rounds=1), resumed)
    rows_after_stop = rows_of(resumed)
    summary_resumed = runner.run(cfg, resumed)
    summary_again = runner.run(cfg, resumed)
  return dict(cfg=cfg, full=full, resumed=resumed, stopped=stopped, summary=summary,
              rows_after_stop=rows_after_stop, summary_resumed=summary_resumed,
              summary_again=summary_again, stdout=out.getvalue())


def test_dfq_rows(dfq_runs):
  cfg = dfq_runs['cfg']
  assert (cfg.kd.mode, cfg.kd.loss, cfg.kd.temperature) == ('fresh', 'kl', 1.0)
  rows = rows_of(dfq_runs['full'])
  assert [r['round'] for r in rows] == [1, 2, 3]
  assert [r['epoch'] for r in rows] == [1, 2, 3]
  w = cfg.synthesis.weights
  for r in rows:
    assert {k for k in r if k.startswith('l_')} == {'l_bn', 'l_oh', 'l_adv', 'l_balance'}
    assert 'pool_size' not in r and KD_KEYS <= set(r)
    assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    total = w.bn * r['l_bn'] + w.oh * r['l_oh'] + w.adv * r['l_adv'] + w.balance * r['l_balance']
    assert r['loss'] == pytest.approx(total, rel=1e-5)
    assert -math.log(10) - 1e-5 <= r['l_balance'] <= 0  # sum_c p_c log p_c
    assert r['l_adv'] <= 1e-6  # -KL(teacher || student)
  check_lr(rows, DFQ_EPOCHS, 1)
  state, _ = load_checkpoint(dfq_runs['full'])
  assert set(state) == {'student', 'generator'}
  assert int(state['student']['step']) == 3 * cfg.kd.kd_steps
  assert int(state['generator']['step']) == 3 * cfg.synthesis.g_steps  # never re-initialized


def test_runs_without_test_data(dfq_runs):
  """data.dir points at an empty folder: the run trains anyway and says evaluation is off."""
  assert 'Evaluation is off' in dfq_runs['stdout']
  summary = dfq_runs['summary']
  assert summary['evaluation'] == 'off (no test data)'
  assert summary['student_accuracy'] is None and summary['teacher_accuracy'] is None
  assert [h['epoch'] for h in summary['history']] == [1, 2, 3]
  assert not any('student_accuracy' in r for r in rows_of(dfq_runs['full']))
  with open(os.path.join(dfq_runs['full'], 'summary.json')) as f:
    assert json.load(f)['evaluation'] == 'off (no test data)'
  state, _ = load_checkpoint(dfq_runs['full'])  # trained anyway: every KD step taken
  assert int(state['student']['step']) == 3 * dfq_runs['cfg'].kd.kd_steps
  assert all(r['kd_loss'] > 0 for r in rows_of(dfq_runs['full']))


def test_dfq_resume_is_exact(dfq_runs):
  assert dfq_runs['stopped'] == {'stopped_at_round': 1,
                                 'workdir': os.path.abspath(dfq_runs['resumed'])}
  assert [r['step'] for r in dfq_runs['rows_after_stop']] == [1]
  assert 'Stopping after 1 round(s)' in dfq_runs['stdout']
  rows_full, rows_resumed = rows_of(dfq_runs['full']), rows_of(dfq_runs['resumed'])
  assert [r['step'] for r in rows_resumed] == [1, 2, 3]
  for a, b in zip(rows_full, rows_resumed):
    assert report.without_wall_clock(a) == report.without_wall_clock(b)
  state_full, _ = load_checkpoint(dfq_runs['full'])
  state_resumed, _ = load_checkpoint(dfq_runs['resumed'])
  assert_trees_equal(state_full, state_resumed)  # student and generator (+ their optimizers)
  drop = lambda s: {k: v for k, v in s.items() if k not in ('seconds_this_session', 'workdir')}
  assert drop(dfq_runs['summary_resumed']) == drop(dfq_runs['summary'])
  # Running a finished workdir again trains and logs nothing more.
  assert drop(dfq_runs['summary_again']) == drop(dfq_runs['summary'])
  assert len(rows_of(dfq_runs['resumed'])) == 3


# ---------------------------------------------------------------- errors before compiling

def _fails_fast(cfg, workdir, *patterns):
  return fails_fast(runner.run, cfg, workdir, ValueError, *patterns)


def test_missing_teacher_checkpoint(tmp_path):
  cfg = tiny_config()
  missing = str(tmp_path / 'teachers' / 'nope.pth')
  cfg.teacher.checkpoint = missing
  _fails_fast(cfg, tmp_path / 'run', 'teacher.checkpoint', missing)
  cfg.teacher.checkpoint = ''
  _fails_fast(cfg, tmp_path / 'run', 'teacher.checkpoint', '--config.teacher.checkpoint=')


@pytest.mark.parametrize('section,field,value,patterns', [
    ('student', 'arch', 'wrn_99_9', ['student.arch', 'wrn_99_9', 'wrn_16_1']),
    ('teacher', 'arch', 'resnet51', ['teacher.arch', 'resnet51']),
    ('kd', 'ep_steps', 1, ['kd.ep_steps=1', 'kd.kd_steps (2)']),
    ('kd', 'mode', 'online', ['kd.mode', 'online']),
    ('data', 'name', 'stl10', ['stl10', 'data.name']),
    ('synthesis', 'synthesizer', 'vae', ['synthesis.synthesizer', 'vae']),
    ('kd', 'pool_mode', 'host', ['kd.pool_mode', 'host', "('device', 'sharded')"]),
    ('log', 'pool_checkpoint', 'delta', ['log.pool_checkpoint', 'delta', 'incremental']),
    ('method', None, 'cmi_typo', ['cmi_typo', 'cmi_two_stage', 'dafl']),
])
def test_invalid_config(tmp_path, section, field, value, patterns):
  cfg = tiny_config()
  if field is None:
    cfg[section] = value
  else:
    cfg[section][field] = value
  _fails_fast(cfg, tmp_path / 'run', *patterns)


@pytest.mark.parametrize('field', ['synthesis', 'kd'])
def test_batch_not_divisible_by_devices(tmp_path, field):
  assert len(jax.devices()) == 4  # tests/conftest.py
  cfg = tiny_config(num_devices=4)
  cfg[field].batch_size = 6
  _fails_fast(cfg, tmp_path / 'run', f'{field}.batch_size=6', '4 devices')
  cfg.mesh.num_devices = 5
  _fails_fast(cfg, tmp_path / 'run', 'mesh.num_devices=5', '4 device(s)')


def test_unknown_method_in_config_file():
  with pytest.raises(ValueError) as e:
    fashion_mnist.get_config('method=cmi_typo,quick')
  for name in ('cmi', 'deepinv', 'dafl', 'zskt', 'dfq', 'dfad', 'cmi_no_contrast'):
    assert repr(name) in str(e.value)


def test_method_renamed_without_its_preset_warns(caplog):
  cfg = tiny_config()
  runner.validate(cfg)
  assert 'departs from that preset' not in caplog.text
  cfg.method = 'dafl'  # what --config.method=dafl does: the name, not the preset
  runner.validate(cfg)
  assert 'departs from that preset' in caplog.text
  assert "kd.mode='pool' (preset: 'fresh')" in caplog.text

"""Fault tolerance (issue 13): bad input refused before anything compiles, mixed-up
runs refused, non-finite rounds retried then skipped, NaN teachers refused,
torn metric logs, corrupt checkpoints, failed saves, and the kill -9 loop.

Runs are the tiny Fashion-MNIST config of tests/test_run.py (random teacher,
batch 8, 2 generator steps, 2 KD steps per round) with the persistent
compilation cache; most checks stop before compilation and take well under a second.
"""

import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import data, errors, models, report, teacher_io
from cmi_jax.synthesis import cmi
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.teacher import Teacher
from experiments import guard, runner
from tests.helpers import ROOT, fails_fast, random_variables, subprocess_env
from tests.test_run import tiny_config

pytestmark = pytest.mark.usefixtures('compilation_cache')


def _teacher_dir(root, name='t', arch='wrn_16_1', num_classes=10, input_shape=(28, 28, 1),
                 seed=0, poison=None):
  """A saved teacher directory with random weights (poison: (collection path, value))."""
  module = models.get(arch, num_classes)
  variables = random_variables(module, (1,) + tuple(input_shape), seed=seed)
  if poison is not None:
    (coll, *keys), value = poison
    leaf = variables[coll]
    for k in keys[:-1]:
      leaf = leaf[k]
    leaf[keys[-1]] = leaf[keys[-1]].at[0].set(value)
  return str(teacher_io.save_teacher(os.path.join(root, name), arch=arch,
                                     num_classes=num_classes, input_shape=input_shape,
                                     variables=variables))


def _fails_fast(cfg, workdir, exc, *patterns):
  return fails_fast(runner.run, cfg, workdir, exc, *patterns)


# ---------------------------------------------------------------- 6. bad input

def test_teacher_class_count_differs_from_dataset(tmp_path):
  cfg = tiny_config()
  cfg.teacher.arch, cfg.teacher.checkpoint = 'wrn_16_1', _teacher_dir(tmp_path, num_classes=100)
  _fails_fast(cfg, tmp_path / 'run', errors.TeacherError, 'num_classes=10 was requested',
              'num_classes=100', 'config.data.name')


def test_teacher_input_shape_differs_from_dataset(tmp_path):
  cfg = tiny_config()
  cfg.teacher.arch = 'wrn_16_1'
  cfg.teacher.checkpoint = _teacher_dir(tmp_path, input_shape=(32, 32, 3))
  _fails_fast(cfg, tmp_path / 'run', errors.TeacherError, 'input_shape=(28, 28, 1)',
              'input_shape=(32, 32, 3)')
  cfg.teacher.arch = 'wrn_16_2'  # the arch differs from the card's too
  cfg.teacher.checkpoint = _teacher_dir(tmp_path, name='t2')
  _fails_fast(cfg, tmp_path / 'run', errors.TeacherError, "arch='wrn_16_2'", "arch='wrn_16_1'")


def test_teacher_card_missing_or_edited(tmp_path):
  path = _teacher_dir(tmp_path)
  card = os.path.join(path, teacher_io.CARD_FILE)
  original = open(card).read()
  edits = {  # card text -> words the error must contain
      json.dumps(dict(json.loads(original), num_classes=100)):
          ['params/fc/kernel: card implies (64, 100), saved (64, 10)', 'edited'],
      json.dumps(dict(json.loads(original), arch='wrn_16_2')): ['card implies', 'wrn_16_2'],
      json.dumps(dict(json.loads(original), input_shape=[28, 28, 3])):
          ['params/conv1/kernel: card implies (3, 3, 3, 16), saved (3, 3, 1, 16)'],
      json.dumps(dict(json.loads(original), arch='wrn_99')): ["arch='wrn_99'", 'wrn_16_1'],
      json.dumps(dict(json.loads(original), num_classes='ten')): ["num_classes='ten'"],
      original[:30]: ['not valid JSON', 'convert_teacher.py'],
      json.dumps({'arch': 'wrn_16_1'}): ["lacks ['num_classes', 'input_shape']"],
  }
  for text, words in edits.items():
    with open(card, 'w') as f:
      f.write(text)
    with pytest.raises(errors.TeacherError) as e:
      teacher_io.load_teacher(path)
    for w in words:
      assert w in str(e.value), (w, str(e.value))
  os.remove(card)
  with pytest.raises(errors.TeacherNotFoundError, match='Incomplete teacher directory'):
    teacher_io.load_teacher(path)
  # Damaged weights (an array file cut short) are refused with the folder named.
  with open(card, 'w') as f:
    f.write(original)
  teacher_io.load_teacher(path)  # intact again
  data_dir = os.path.join(path, 'variables', 'd')
  for name in os.listdir(data_dir):
    with open(os.path.join(data_dir, name), 'r+b') as f:
      f.truncate(10)
  with pytest.raises(errors.TeacherError, match='damaged'):
    teacher_io.load_teacher(path)


def test_teacher_with_nonfinite_weights_is_refused(tmp_path):
  for value, word in ((np.nan, '1 NaN, 0 inf'), (np.inf, '0 NaN, 1 inf')):
    path = _teacher_dir(tmp_path, name=f't{word[0]}',
                        poison=(('batch_stats', 'block2', 'layer', '0', 'bn1', 'var'), value))
    with pytest.raises(errors.TeacherError) as e:
      teacher_io.load_teacher(path)
    assert 'batch_stats/block2/layer/0/bn1/var' in str(e.value) and word in str(e.value)
    cfg = tiny_config()
    cfg.teacher.arch, cfg.teacher.checkpoint = 'wrn_16_1', path
    _fails_fast(cfg, tmp_path / 'run', errors.TeacherError, 'non-finite weights')


def test_truncated_or_wrong_test_data_stops_the_run(tmp_path):
  """A damaged test split is an error naming the file (not 'evaluation off')."""
  cfg = tiny_config()
  src = data.shipped_dirs(data.get_info('fashion_mnist'), 'test')[0]
  d = tmp_path / 'fmnist'
  d.mkdir()
  raw = open(os.path.join(src, 't10k-images-idx3-ubyte.gz'), 'rb').read()
  (d / 't10k-images-idx3-ubyte.gz').write_bytes(raw[:len(raw) // 2])  # truncated gzip
  (d / 't10k-labels-idx1-ubyte.gz').write_bytes(
      open(os.path.join(src, 't10k-labels-idx1-ubyte.gz'), 'rb').read())
  cfg.data.dir = str(d)
  _fails_fast(cfg, tmp_path / 'run', data.DataCorruptError, 't10k-images-idx3-ubyte.gz',
              'truncated', 'data.dir')
  # Uncompressed IDX whose body is shorter than its header says.
  (d / 't10k-images-idx3-ubyte.gz').unlink()
  header = bytes([0, 0, 8, 3]) + np.array([10, 28, 28], '>u4').tobytes()
  (d / 't10k-images-idx3-ubyte').write_bytes(header + bytes(28 * 28 * 3))
  _fails_fast(cfg, tmp_path / 'run', data.DataCorruptError, 'header says (10, 28, 28)',
              'holds 2352')


def test_cifar_pickle_wrong_size_or_truncated(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  d = tmp_path / 'cifar-10-batches-py'
  d.mkdir()
  with open(d / 'test_batch', 'wb') as f:
    pickle.dump({'data': np.zeros((2, 3000), np.uint8), 'labels': [0, 1]}, f)
  with pytest.raises(data.DataCorruptError, match='6000 bytes, not a whole number'):
    data.load('cifar10', 'test', str(tmp_path))
  with open(d / 'test_batch', 'wb') as f:
    pickle.dump({'data': np.zeros((2, 3072), np.uint8), 'labels': [0, 1]}, f)
  good = (d / 'test_batch').read_bytes()
  assert data.load('cifar10', 'test', str(tmp_path)).images.shape == (2, 32, 32, 3)
  (d / 'test_batch').write_bytes(good[:len(good) // 2])
  with pytest.raises(data.DataCorruptError, match='truncated or damaged'):
    data.load('cifar10', 'test', str(tmp_path))
  with open(d / 'test_batch', 'wb') as f:
    pickle.dump({'data': np.zeros((2, 3072), np.uint8), 'labels': [0, 10]}, f)
  with pytest.raises(data.DataCorruptError, match=r'labels span 0\.\.10'):
    data.load('cifar10', 'test', str(tmp_path))


def test_unwritable_workdir(tmp_path):
  (tmp_path / 'file').write_text('x')
  cfg = tiny_config()
  workdir = tmp_path / 'file' / 'run'  # a folder under a file: not creatable, even as root
  _fails_fast(cfg, workdir, errors.WorkdirError, str(workdir), 'not writable', '--workdir')


def _cli(*args, cache_dir):
  return subprocess.run([sys.executable, '-m', 'experiments.run', *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env=subprocess_env(cache_dir))


QUICK = '--config=configs/fashion_mnist.py:quick'


@pytest.mark.parametrize('config, override, words', [
    (QUICK, '--config.kd.epochs=abc', ['--config.kd.epochs=abc', "'abc'"]),
    (QUICK, '--config.kd.epochs=1.5', ['--config.kd.epochs=1.5', "'1.5'"]),  # float for an int
    (QUICK, '--config.kd.foo=1', ['--config.kd.foo', 'does not have']),
    (QUICK, '--config.teacher.checkpoint=/nonexistent/t', ['teacher.checkpoint',
                                                          '/nonexistent/t']),
    (QUICK, '--config.synthesis.batch_size=0', ['batch_size']),
    # A bad value in the config file's own argument (raised while the file is read).
    ('--config=configs/fashion_mnist.py:method=nosuch', '--config.seed=0',
     ["--config=configs/fashion_mnist.py:method=nosuch", "Unknown method 'nosuch'", 'fast5']),
    ('--config=configs/fashion_mnist.py:nosuch=1', '--config.seed=0',
     ["Unknown config argument 'nosuch'"]),
])
def test_cli_prints_user_errors_as_one_line(tmp_path, cache_dir, config, override, words):
  t = time.perf_counter()
  p = _cli(config, override, f'--workdir={tmp_path}/run', cache_dir=cache_dir)
  assert time.perf_counter() - t < 60
  assert p.returncode == 2, p.stderr
  assert 'Traceback' not in p.stderr
  err = [line for line in p.stderr.splitlines() if line.startswith('error: ')]
  assert len(err) == 1, p.stderr
  for w in words:
    assert w in err[0], (w, err[0])


# ---------------------------------------------------------------- 2. mixed-up runs

def _fake_checkpoint(workdir):
  os.makedirs(os.path.join(workdir, 'checkpoints', '3'))


def test_config_changes_on_resume():
  saved = tiny_config().to_dict()
  new = tiny_config()
  new.kd.epochs += 3
  new.log.stop_after_rounds, new.log.grid_every_rounds = 1, 5
  new.data.eval_batch_size, new.mesh.num_devices = 16, 1
  new.teacher.checkpoint = 'elsewhere'
  assert guard.config_changes(saved, new.to_dict()) == []
  new.synthesis.g_steps += 1
  new.kd.lr = 0.5
  new.kd.epochs = 1  # fewer epochs than saved: refused
  new.synthesis.betas = (0.9, 0.999)
  assert guard.config_changes(saved, new.to_dict()) == [
      f'kd.epochs: {saved["kd"]["epochs"]!r} -> 1', "kd.lr: 0.1 -> 0.5",
      'synthesis.betas: [0.5, 0.999] -> [0.9, 0.999]',
      f'synthesis.g_steps: {saved["synthesis"]["g_steps"]} -> '
      f'{saved["synthesis"]["g_steps"] + 1}']
  # A field the saved config lacks (added by newer code) is not compared.
  del saved['faults']
  new2 = tiny_config()
  new2.faults.round_retries = 7
  assert guard.config_changes(saved, new2.to_dict()) == []


def test_resume_with_another_config_or_teacher_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  cfg = tiny_config()
  cfg.teacher.arch, cfg.teacher.checkpoint = 'wrn_16_1', _teacher_dir(tmp_path, 'a', seed=0)
  guard.check_resume(cfg, workdir, guard.teacher_hash(cfg.teacher.checkpoint))
  _fake_checkpoint(workdir)
  # The case: g_steps changed between two invocations.
  changed = cfg.copy_and_resolve_references()
  changed.synthesis.g_steps = 3
  msg = _fails_fast(changed, workdir, errors.WorkdirError, 'synthesis.g_steps: 2 -> 3',
                    'another --workdir', '--config.faults.allow_config_change=True')
  assert 'kd.epochs' in msg  # the list of fields that may change
  # Another teacher (same architecture, other weights): refused by its content hash,
  # though the path is the same.
  other = _teacher_dir(tmp_path, 'b', seed=1)
  assert teacher_io.content_hash(other) != teacher_io.content_hash(cfg.teacher.checkpoint)
  with pytest.raises(errors.WorkdirError, match='teacher content'):
    guard.check_resume(cfg, workdir, guard.teacher_hash(other))
  # Safe changes pass and update the fingerprint; the override passes with a warning.
  more = cfg.copy_and_resolve_references()
  more.kd.epochs, more.log.stop_after_rounds = cfg.kd.epochs + 2, 1
  guard.check_resume(more, workdir, guard.teacher_hash(cfg.teacher.checkpoint))
  saved = json.load(open(os.path.join(workdir, guard.FINGERPRINT)))
  assert saved['config']['kd']['epochs'] == cfg.kd.epochs + 2
  changed.faults.allow_config_change = True
  guard.check_resume(changed, workdir, guard.teacher_hash(cfg.teacher.checkpoint))
  saved = json.load(open(os.path.join(workdir, guard.FINGERPRINT)))
  assert saved['config']['synthesis']['g_steps'] == 3
  # A workdir without a checkpoint is a fresh start: nothing to compare.
  fresh = str(tmp_path / 'fresh')
  guard.check_resume(cfg, fresh, 'x')
  guard.check_resume(changed, fresh, 'y')


# ---------------------------------------------------------------- 5. non-finite rounds

class NaNWhere(nn.Module):
  """A classifier whose logits are NaN for inputs whose top-left pixel (first
  channel, normalized) exceeds its 'threshold' parameter: a teacher that fails on some
  inputs (a parameter, not a module field, so that two thresholds share one compile)."""
  inner: nn.Module

  @nn.compact
  def __call__(self, x, train=False):
    logits = self.inner(x, train=train)
    bad = x[:, 0, 0, 0] > self.param('threshold', nn.initializers.zeros, ())
    return jnp.where(bad[:, None], jnp.nan, logits)


def _tiny_round_setup(threshold):
  cfg = SynthesisConfig(
      image_shape=(8, 8, 1), num_classes=4, mean=(0.5,), std=(0.25,), batch_size=8,
      g_steps=6, lr_g=0.05, lr_head=0.01, n_neg=12, head_dim=8, bank_size=24, pool_size=32,
      nz=8, ngf=4).validate()
  inner = models.get('wrn_16_1', 4)
  v = random_variables(inner, (1, 8, 8, 1))
  module = NaNWhere(inner)
  teacher = Teacher(module, {'params': {'inner': v['params'], 'threshold': jnp.float32(threshold)},
                             'batch_stats': {'inner': v['batch_stats']}})
  return cfg, teacher


ROUND = jax.jit(cmi.synthesis_round, static_argnums=0)


def test_nan_for_some_inputs_never_reaches_the_pool():
  """Steps whose teacher output is NaN change nothing; the kept iterate is the best
  finite one; a round where every step is NaN writes nothing at all."""
  cfg, teacher = _tiny_round_setup(threshold=0.1)
  state = cmi.init_state(cfg, teacher, jax.random.key(1))
  new, out = ROUND(cfg, teacher, None, state, jax.random.key(2))
  loss = np.asarray(out.metrics['loss'])
  finite = np.isfinite(loss)
  assert finite.any() and not finite.all(), loss  # the injection hits some steps only
  assert float(out.metrics['best_loss']) == loss[finite].min()
  assert finite[int(out.metrics['best_step'])]
  assert int(new.pool.count) == cfg.batch_size and int(new.bank.count) == cfg.batch_size
  assert np.isfinite(np.asarray(new.bank.data)).all()
  assert np.isfinite(np.asarray(out.images)).all()
  # Every step NaN (threshold below any normalized pixel): nothing is written.
  cfg2, bad_teacher = _tiny_round_setup(threshold=-1e9)
  new2, out2 = ROUND(cfg2, bad_teacher, None, new, jax.random.key(3))
  assert not np.isfinite(np.asarray(out2.metrics['loss'])).any()
  assert not np.isfinite(float(out2.metrics['best_loss']))
  for a, b in zip(jax.tree_util.tree_leaves((new.pool, new.bank, new.head.params)),
                  jax.tree_util.tree_leaves((new2.pool, new2.bank, new2.head.params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _poisoned(teacher):
  """The same teacher with one BN's running variance at -1: sqrt of a negative
  number, NaN for every input."""
  vs = jax.tree_util.tree_map(lambda a: a, teacher.variables)
  bn = vs['batch_stats']['block1']['layer']['0']['bn1']
  bn['var'] = -jnp.ones_like(bn['var'])
  return Teacher(teacher.module, vs)


def _poison_rounds(monkeypatch, bad_calls):
  """The runner's synthesis round sees a NaN teacher on the calls (1-based) in
  `bad_calls`; returns the list of keys each call received."""
  calls = []
  original = runner.compile_plan

  def compile_plan(*args, **kwargs):
    steps = original(*args, **kwargs)
    real = steps.round

    def round_fn(teacher, student, state, key):
      calls.append(np.asarray(jax.random.key_data(key)))
      if len(calls) in bad_calls:
        teacher = _poisoned(teacher)
      return real(teacher, student, state, key)
    steps.round = round_fn
    return steps
  monkeypatch.setattr(runner, 'compile_plan', compile_plan)
  monkeypatch.setattr(runner.summary, 'plots', lambda *args: None)
  return calls


def _run_one_epoch(tmp_path, retries):
  cfg = tiny_config(epochs=1, rounds_per_epoch=2, num_devices=1)
  cfg.faults.round_retries = retries
  workdir = str(tmp_path / 'run')
  summary = runner.run(cfg, workdir)
  rows = report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return cfg, workdir, summary, rows


def test_nonfinite_rounds_are_retried_then_skipped(tmp_path, monkeypatch, capsys):
  """Round 1 sees a NaN teacher on all 3 attempts (skipped: nothing in the pool, so
  no KD either); round 2 on its first attempt only (retried with a fresh key)."""
  calls = _poison_rounds(monkeypatch, bad_calls={1, 2, 3, 4})
  _, workdir, summary, rows = _run_one_epoch(tmp_path, retries=2)
  assert len(calls) == 5
  assert len({c.tobytes() for c in calls[:3]}) == 3  # each retry draws a fresh key
  assert not np.array_equal(calls[3], calls[4])
  assert [r['synthesis_retries'] for r in rows] == [2, 1]
  assert [r['synthesis_skipped'] for r in rows] == [1, 0]
  assert [r['pool_size'] for r in rows] == [0, 8]  # nothing of round 1 reached the pool
  assert 'kd_loss' not in rows[0] and 'kd_loss' in rows[1]  # no KD on an empty pool
  assert summary['synthesis_retries'] == 3 and summary['skipped_rounds'] == [1]
  out = capsys.readouterr().out
  assert 'Round 1: synthesis stayed non-finite after 2 retries; the round is skipped' in out
  assert 'Round 2: non-finite synthesis, succeeded on retry 1' in out
  state, _ = _checkpoint(workdir)
  assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(state['student'])
             if np.issubdtype(a.dtype, np.floating))
  assert np.isfinite(state['synth']['bank']['data']).all()
  assert int(state['synth']['pool']['count']) == 8


def _checkpoint(workdir):
  from tests.helpers import load_checkpoint  # pylint: disable=g-import-not-at-top
  return load_checkpoint(workdir)


# ---------------------------------------------------------------- 3./4. checkpoints

def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
  w = report.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.write_scalars(step, {'round': step})
  w.close()
  with open(w.path, 'a') as f:
    f.write('{"step": 4, "rou')  # a kill while writing row 4
  assert [r['step'] for r in report.read_metrics(w.path)] == [1, 2, 3]
  w = report.MetricWriter(str(tmp_path))
  w.truncate_after(2)
  w.write_scalars(3, {'round': 3})
  w.close()
  assert [r['step'] for r in report.read_metrics(w.path)] == [1, 2, 3]
  with open(w.path, 'a') as f:
    f.write('garbage\n{"step": 9}\n')  # damage in the middle is an error, not silently dropped
  with pytest.raises(ValueError, match='line 4 is not JSON'):
    report.read_metrics(w.path)


STATE = {'a': np.arange(1000, dtype=np.float32), 'b': {'c': np.ones((3, 3), np.float32)}}


def _saved(directory, steps=(1, 2), async_save=False):
  from cmi_jax.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  ck = Checkpointer(str(directory), max_to_keep=3, async_save=async_save)
  for s in steps:
    ck.save(s, jax.tree_util.tree_map(lambda x, s=s: jnp.asarray(x * s), STATE), {'round': s})
  ck.close()
  return Checkpointer(str(directory), max_to_keep=3, async_save=async_save)


def _abstract():
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), STATE)


@pytest.mark.parametrize('damage', ['truncate_array', 'delete_array', 'truncate_meta',
                                    'delete_meta'])
def test_damaged_latest_checkpoint_falls_back(tmp_path, capsys, damage):
  d = tmp_path / 'checkpoints'
  ck = _saved(d)
  target = (d / '2' / 'meta' / 'metadata' if damage.endswith('meta') else
            max((p for p in (d / '2' / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'
                 and p.parent.parent.name == 'state'), key=lambda p: p.stat().st_size))
  if damage.startswith('truncate'):
    with open(target, 'r+b') as f:
      f.truncate(target.stat().st_size // 2)
  else:
    target.unlink()
  state, meta = ck.restore(_abstract())
  assert meta == {'round': 1}
  np.testing.assert_array_equal(state['a'], STATE['a'])
  out = capsys.readouterr().out
  assert f'{d}/2: ' in out and 'previous complete checkpoint, step 1' in out
  assert ck.all_steps() == [1]  # the damaged one is set aside, kept for inspection
  assert [p.name.split('.')[0] for p in d.iterdir() if 'corrupt' in p.name] == ['2']
  ck.close()


def test_no_usable_checkpoint_names_the_folder_and_the_choices(tmp_path):
  d = tmp_path / 'checkpoints'
  ck = _saved(d)
  for s in ('1', '2'):
    (d / s / 'meta' / 'metadata').unlink()
  with pytest.raises(errors.CheckpointError) as e:
    ck.restore(_abstract())
  msg = str(e.value)
  for words in (f'No usable checkpoint in {d}', f'{d}/2: FileNotFoundError', f'{d}/1: ',
                f'delete {d}', '--workdir'):
    assert words in msg, (words, msg)
  ck.close()


@pytest.mark.parametrize('async_save', [False, True])
def test_failed_save_is_a_clear_error_and_keeps_the_previous(tmp_path, monkeypatch, async_save):
  """An injected ENOSPC: at save (sync) or when the background write is awaited
  (async); the error names the step, the folder and the intact previous one."""
  import errno  # pylint: disable=g-import-not-at-top
  d = tmp_path / 'checkpoints'
  ck = _saved(d, steps=(1,), async_save=async_save)
  mngr = ck._mngr  # pylint: disable=protected-access
  if async_save:
    real_wait = mngr.wait_until_finished
    calls = []

    def wait():
      real_wait()
      calls.append(1)
      if len(calls) == 2:  # the wait after save(2): the background write failed
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(mngr, 'wait_until_finished', wait)
  else:
    def save(*args, **kwargs):
      raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(mngr, 'save', save)
  with pytest.raises(errors.CheckpointError) as e:
    ck.save(2, jax.tree_util.tree_map(jnp.asarray, STATE), {'round': 2})
    ck.wait()
  msg = str(e.value)
  for words in (f'Could not write checkpoint 2 to {d}', 'No space left on device',
                f'previous checkpoint ({d}/1) is intact', 'run the same command again'):
    assert words in msg, (words, msg)
  ck.close()  # does not raise the same failure again
  _, meta = _saved(d, steps=()).restore(_abstract())
  assert meta == {'round': 1}


def _tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  p = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                     capture_output=True, check=False)
  return p.returncode == 0


# ---------------------------------------------------------------- 1. kill -9 loop

@pytest.mark.parametrize('targets', [
    ('checkpoint_write',),
    pytest.param(('kd', 'checkpoint_write'), marks=pytest.mark.slow)])
def test_kill_loop_quick(tmp_path, cache_dir, targets):
  """benchmarks/fault_injection.py with SIGKILLs (inside the background checkpoint write;
  slow variant: during KD, then inside the write) on a 3-round run: identical to the
  uninterrupted run, no metric row lost or duplicated. (Kills during synthesis and the
  other phases: the benchmark's own 20-kill run, benchmarks/results/fault_injection.json.)"""
  from benchmarks import fault_injection  # pylint: disable=g-import-not-at-top
  r = fault_injection.main([f'--kills={len(targets)}', f'--targets={",".join(targets)}',
                            '--epochs=1', '--rounds_per_epoch=3',
                            f'--root={tmp_path}', f'--cache={cache_dir}', '--fast_compile',
                            '--out=', '--timeout_s=240'])
  assert r['kills'] == len(targets) and r['resumes'] == len(targets)
  assert [k['target'] for k in r['kill_log']] == list(targets)
  assert r['identical_at_end'] == 'yes', r
  assert r['state_identical'] and r['arrays_compared'] > 100
  assert r['metrics_identical'] and r['summary_identical']
  assert r['rows_lost'] == 0 and r['rows_duplicated'] == 0 and r['metric_rows'] == 3
  assert r['damaged_checkpoints_seen'] == 0


@pytest.mark.slow
def test_runner_survives_full_disk_then_corrupt_checkpoint(tmp_path, monkeypatch, capsys):
  """End to end on a real full disk (a 64 MB tmpfs, root only): the disk fills
  while round 3's checkpoint is written, so the run stops with CheckpointError;
  then round 2's checkpoint is damaged too. The re-run falls back to round 1's
  and ends bit-identical to an uninterrupted run."""
  from tests.test_run import assert_trees_equal  # pylint: disable=g-import-not-at-top
  mnt = tmp_path / 'disk'
  if not _tmpfs(mnt, '64m'):
    pytest.skip('mounting a tmpfs needs root')
  try:
    monkeypatch.setattr(runner.summary, 'plots', lambda *args: None)
    cfg = tiny_config(epochs=1, rounds_per_epoch=3, num_devices=1)
    cfg.log.checkpoint_every_rounds, cfg.log.max_checkpoints = 1, 3
    cfg.log.async_checkpoints = False  # the failure surfaces at the save itself (async: tested above)
    ref = str(tmp_path / 'ref')
    runner.run(cfg, ref)
    workdir = str(mnt / 'run')
    real_phase = guard.phase

    def phase(name, round_=0):
      real_phase(name, round_)
      if name == 'checkpoint' and round_ == 3:  # fill the disk under the save
        try:
          with open(mnt / 'fill', 'wb') as f:
            while True:
              f.write(b'\0' * (1 << 20))
        except OSError:
          pass
    monkeypatch.setattr(guard, 'phase', phase)
    with pytest.raises(errors.CheckpointError) as e:
      runner.run(cfg, workdir)
    assert 'Could not write checkpoint 3' in str(e.value)
    assert f'{workdir}/checkpoints/2) is intact' in str(e.value)
    monkeypatch.setattr(guard, 'phase', real_phase)
    os.remove(mnt / 'fill')
    os.remove(os.path.join(workdir, 'checkpoints', '2', 'meta', 'metadata'))
    capsys.readouterr()
    runner.run(cfg, workdir)
    out = capsys.readouterr().out
    assert 'previous complete checkpoint, step 1' in out and 'Resuming' in out
    assert_trees_equal(_checkpoint(ref)[0], _checkpoint(workdir)[0])
    strip = lambda rows: [report.without_wall_clock(r) for r in rows]
    assert strip(report.read_metrics(os.path.join(ref, 'metrics.jsonl'))) == \
        strip(report.read_metrics(os.path.join(workdir, 'metrics.jsonl')))
  finally:
    subprocess.run(['umount', '-l', str(mnt)], check=False)


def test_metric_writes_on_a_full_disk_are_clear_errors(tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  w = report.MetricWriter(str(tmp_path))
  w.write_scalars(1, {'round': 1})
  w.write_json('summary.json', {'a': 1})

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')
  class FullFile:
    write = flush = full

    def close(self):
      pass
  real = w._f  # pylint: disable=protected-access
  monkeypatch.setattr(w, '_f', FullFile())
  with pytest.raises(errors.WorkdirError, match='metrics.jsonl.*No space left on device.*'
                     'run the same command again'):
    w.write_scalars(2, {'round': 2})
  monkeypatch.setattr(json, 'dump', full)
  with pytest.raises(errors.WorkdirError, match='summary.json'):
    w.write_json('summary.json', {'a': 2})
  monkeypatch.undo()
  real.close()
  assert json.load(open(tmp_path / 'summary.json')) == {'a': 1}  # the old one stays whole

"""Classifier training: KD loss, evaluation, NaN guard, and the teacher-training script
end to end on a tiny IDX dataset (metrics, summary, exported teacher, exact resume)."""

import gzip
import json
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmi_jax import distill
from cmi_jax.models import layers
from cmi_jax.state import create_classifier_state
from configs import teacher_fashion_mnist
from experiments import train_teacher
from tests.helpers import train_interrupted_then_resumed

pytestmark = pytest.mark.usefixtures('compilation_cache')  # whole runs: see conftest


def _np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- distill.py

@pytest.mark.parametrize('temperature', [1.0, 20.0])
def test_kd_loss_equals_numpy_kl(temperature):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 7)) * 4
  log_pt, log_ps = _np_log_softmax(t / temperature), _np_log_softmax(s / temperature)
  expected = np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1)) * temperature ** 2
  got = distill.kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(distill.kd_loss(jnp.asarray(t), jnp.asarray(t), temperature), 0.0,
                             atol=1e-6)


def test_evaluate_exact_with_partial_batch():
  rng = np.random.default_rng(1)
  n, k = 10, 3
  images = rng.integers(0, 256, size=(n, 2, 2, 1), dtype=np.uint8)
  mean, std = (0.3,), (0.2,)
  w = rng.normal(size=(4, k)).astype(np.float32)
  # Make the zero-padded rows predict the pad label 0: only the mask keeps them out.
  z0 = np.full(4, -mean[0] / std[0]) @ w
  w[:, [0, int(np.argmax(z0))]] = w[:, [int(np.argmax(z0)), 0]]

  def apply_fn(variables, x, train):
    assert not train
    return x.reshape(x.shape[0], -1) @ variables['w']

  logits = ((images.reshape(n, -1) / 255.0 - mean[0]) / std[0]) @ w
  pred = logits.argmax(-1)
  labels = np.where(np.arange(n) % 3 == 0, (pred + 1) % k, pred).astype(np.int32)  # 4 wrong
  ce = -np.take_along_axis(_np_log_softmax(logits), labels[:, None], axis=1)[:, 0]
  eval_fn = distill.make_eval_fn(apply_fn, mean, std)
  out = distill.evaluate(eval_fn, {'w': jnp.asarray(w)}, images, labels, batch_size=4)
  assert out['accuracy'] == pytest.approx(60.0)
  assert out['loss'] == pytest.approx(ce.mean(), rel=1e-5)
  with pytest.raises(ValueError, match='empty'):
    distill.evaluate(eval_fn, {'w': w}, images[:0], labels[:0])


class _TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.Conv(3, 3, 1, 1)(x)
    x = layers.BatchNorm()(x, train)
    return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope='module')
def tiny_state():
  tx = optax.sgd(0.1, momentum=0.9)
  state = create_classifier_state(_TinyNet(), jax.random.key(0), (1, 4, 4, 2), tx)
  x = jax.random.normal(jax.random.key(1), (3, 4, 4, 2)) + 0.5
  return state, x, jnp.array([0, 1, 3])


def test_classifier_step_updates(tiny_state):
  state, x, y = tiny_state
  new, m = distill.classifier_step(state, x, distill.supervised_loss(y))
  assert bool(m['finite']) and int(new.step) == 1

  def loss(params):
    logits, v = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, x,
                               train=True, mutable=['batch_stats'])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), v

  (l, v), g = jax.value_and_grad(loss, has_aux=True)(state.params)
  np.testing.assert_allclose(m['loss'], l, rtol=1e-6)
  for a, p, gr in zip(*(jax.tree_util.tree_leaves(t) for t in (new.params, state.params, g))):
    np.testing.assert_allclose(a, p - 0.1 * gr, rtol=1e-5, atol=1e-7)  # first SGD step
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.batch_stats, v['batch_stats'])
  assert not np.allclose(new.batch_stats['BatchNorm_0']['mean'], 0.0)


def test_classifier_step_nan_leaves_state_unchanged(tiny_state):
  state, x, _ = tiny_state
  new, m = distill.classifier_step(state, x, lambda logits: jnp.mean(logits) * jnp.nan)
  assert not bool(m['finite']) and np.isnan(m['loss'])
  flat_new, tree_new = jax.tree_util.tree_flatten(new)
  flat_old, tree_old = jax.tree_util.tree_flatten(state)
  assert tree_new == tree_old
  for a, b in zip(flat_new, flat_old):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- train_teacher.py

def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack('>' + 'I' * array.ndim, *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def _tiny_fmnist(directory, n_train=64, n_test=64):
  """Class k = mean brightness level k (survives crops and flips), plus noise."""
  rng = np.random.default_rng(0)
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = 20 + 23 * labels[:, None, None] + rng.integers(-8, 9, size=(n, 28, 28))
    _write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), images.astype(np.uint8))
    _write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), labels.astype(np.uint8))


def _config(data_dir):
  cfg = teacher_fashion_mnist.get_config('wrn_16_1,quick')
  cfg.data.dir = str(data_dir)
  cfg.train.batch_size, cfg.train.eval_batch_size = 16, 48  # 4 steps per epoch
  cfg.train.epochs = 2
  cfg.log.every_steps, cfg.log.checkpoint_every_steps = 2, 5
  return cfg


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An uninterrupted run, and one killed after step 6 (checkpoint at 5) then resumed."""
  root = tmp_path_factory.mktemp('train_teacher')
  _tiny_fmnist(root)
  cfg = _config(root)
  full = root / 'full'
  summary = train_teacher.train(cfg, str(full))

  resumed = root / 'resumed'
  summary_resumed = train_interrupted_then_resumed(cfg, resumed, 6)
  return cfg, root, full, summary, resumed, summary_resumed


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_train_teacher_outputs(runs):
  cfg, root, full, summary, _, _ = runs
  rows = _rows(full)
  train_rows = [r for r in rows if 'train/loss' in r]
  test_rows = [r for r in rows if 'test/accuracy' in r]
  assert [r['step'] for r in train_rows] == [2, 4, 6, 8]
  assert [(r['step'], r['epoch']) for r in test_rows] == [(4, 1), (8, 2)]
  assert all(np.isfinite(r['train/loss']) for r in train_rows)
  np.testing.assert_allclose([r['train/lr'] for r in train_rows],
                             [0.1 * 0.5 * (1 + np.cos(np.pi * (s - 1) / 8)) for s in (2, 4, 6, 8)],
                             rtol=1e-5)
  with open(full / 'summary.json') as f:
    on_disk = json.load(f)
  assert on_disk['arch'] == 'wrn_16_1' and on_disk['dataset'] == 'fashion_mnist'
  assert on_disk['test_accuracy'] == pytest.approx(test_rows[-1]['test/accuracy'])
  assert summary['test_accuracy'] == on_disk['test_accuracy']
  assert [h['epoch'] for h in summary['history']] == [1, 2]
  # Learnable data: test loss falls and accuracy rises above chance within 8 steps.
  assert test_rows[1]['test/loss'] < test_rows[0]['test/loss']
  assert test_rows[1]['test/accuracy'] > max(test_rows[0]['test/accuracy'], 20.0)

  from cmi_jax import teacher_io  # pylint: disable=g-import-not-at-top
  module, variables, info = teacher_io.load_teacher(full / 'teacher')
  assert info['arch'] == 'wrn_16_1' and info['num_classes'] == 10
  assert tuple(info['input_shape']) == (28, 28, 1)
  # The exported teacher reproduces the logged test accuracy.
  from cmi_jax import data  # pylint: disable=g-import-not-at-top
  test = data.load('fashion_mnist', 'test', str(root))
  x = (test.images.astype(np.float32) / 255.0 - 0.2860) / 0.3530
  logits = jax.jit(module.apply)(variables, x)
  acc = 100.0 * np.mean(np.argmax(logits, -1) == test.labels)
  assert acc == pytest.approx(summary['test_accuracy'])


def test_train_teacher_resume_is_exact(runs):
  cfg, _, full, summary, resumed, summary_resumed = runs
  from cmi_jax import teacher_io  # pylint: disable=g-import-not-at-top
  _, v_full, _ = teacher_io.load_teacher(full / 'teacher')
  _, v_resumed, _ = teacher_io.load_teacher(resumed / 'teacher')
  leaves_full, tree_full = jax.tree_util.tree_flatten(v_full)
  leaves_resumed, tree_resumed = jax.tree_util.tree_flatten(v_resumed)
  assert tree_full == tree_resumed
  for a, b in zip(leaves_full, leaves_resumed):
    assert np.array_equal(a, b)
  assert summary_resumed['history'] == summary['history']
  # Rows before the crash, then the resumed run from step 5 on.
  steps = [r['step'] for r in _rows(resumed) if 'train/loss' in r]
  assert steps == [2, 4, 6, 8]
  # Re-running a finished workdir trains nothing and re-exports the same teacher.
  assert train_teacher.train(cfg, str(resumed)) == summary_resumed
  assert [r['step'] for r in _rows(resumed) if 'train/loss' in r] == steps
  _, v_again, _ = teacher_io.load_teacher(resumed / 'teacher')
  for a, b in zip(jax.tree_util.tree_leaves(v_again), leaves_full):
    assert np.array_equal(a, b)

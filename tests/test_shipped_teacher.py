"""The shipped Fashion-MNIST teacher: loads, reaches its recorded accuracy, and a
CMI round on it clearly lowers L_bn and L_oh (issue: synthesis engine)."""

import os

import jax
import numpy as np
import pytest

from cmi_jax import data, distill, teacher_io
from cmi_jax.synthesis import api
from cmi_jax.synthesis.cmi import init_state, synthesis_round
from cmi_jax.teacher import Teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_DIR = os.path.join(ROOT, 'teachers', 'fashion_mnist_wrn_16_2')
FMNIST = '/usr/share/datasets/fashion-mnist'


@pytest.fixture(scope='module')
def shipped():
  module, variables, info = teacher_io.load_teacher(TEACHER_DIR)
  return Teacher(module, variables), info


def test_card_describes_the_teacher(shipped):
  _, info = shipped
  assert info['arch'] == 'wrn_16_2'
  assert info['num_classes'] == 10 and tuple(info['input_shape']) == (28, 28, 1)
  assert info['meta']['dataset'] == 'fashion_mnist'
  assert info['meta']['test_accuracy'] >= 92.0  # the target


def _accuracy(teacher, limit=0):
  test = data.load('fashion_mnist', 'test', limit=limit)
  fmnist = data.get_info('fashion_mnist')
  return distill.evaluate(distill.make_eval_fn(teacher.module.apply, fmnist.mean, fmnist.std),
                          teacher.variables, test.images, test.labels, 1000)['accuracy']


@pytest.mark.slow  # the whole 10k split: ~25 s alone, minutes on a loaded machine
def test_accuracy_on_real_test_split_matches_card(shipped):
  teacher, info = shipped
  accuracy = _accuracy(teacher)
  assert accuracy == pytest.approx(info['meta']['test_accuracy'], abs=0.02)
  assert accuracy >= 92.0


def test_accuracy_on_first_test_images(shipped):
  """The shipped test split's first 2000 images (the default suite's share of the check
  above): within 2 points of the card's whole-split figure."""
  teacher, info = shipped
  assert _accuracy(teacher, limit=2000) == pytest.approx(info['meta']['test_accuracy'], abs=2.0)


@pytest.mark.slow
def test_round_lowers_bn_and_oh_on_shipped_teacher(shipped):
  """60 steps of one CMI round (no student, small batch) against the first step."""
  teacher, _ = shipped
  cfg = api.make_config(dataset='fashion_mnist', batch_size=32, g_steps=60, ngf=16, nz=64,
                        n_neg=64, bank_size=128, pool_size=64, head_dim=64)
  state = init_state(cfg, teacher, jax.random.key(0))
  _, out = jax.jit(synthesis_round, static_argnums=0)(cfg, teacher, None, state,
                                                      jax.random.key(1))
  bn, oh = np.asarray(out.metrics['l_bn']), np.asarray(out.metrics['l_oh'])
  # Last 5 steps on average vs the first: both terms must drop by a clear factor.
  assert bn[-5:].mean() < 0.6 * bn[0], (bn[0], bn[-5:])
  assert oh[-5:].mean() < 0.3 * oh[0], (oh[0], oh[-5:])
  # The teacher recognizes the kept images as their targets more often than chance.
  assert float(out.metrics['target_accuracy']) > 50.0

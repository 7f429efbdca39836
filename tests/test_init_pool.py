"""Issue 21, item 5: pre-inverted images beside the pool (`kd.init_pool`, the
reference's --cmi_init). KD batches are uniform over pool + init (checked exactly
and statistically against numpy); the init set's content is part of the run's
fingerprint; a tiny runner run with an init .npz; bad init sets fail before
anything compiles; the `preinverted` config argument is the published script."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cmi_jax import data, distill, errors
from cmi_jax.synthesis.bank import RingBuffer
from configs import cifar10, fashion_mnist
from experiments import guard, runner
from tests.helpers import fails_fast, load_checkpoint

pytestmark = pytest.mark.usefixtures('compilation_cache')

CAP, COUNT, M, H = 8, 5, 7, 4  # pool capacity / filled slots, init images, image side


def _source():
  """Pool slot i holds images of value i + 1 (slots >= COUNT: 250, never drawn);
  init image j holds 100 + j."""
  pool_vals = np.where(np.arange(CAP) < COUNT, np.arange(CAP) + 1, 250).astype(np.uint8)
  pool = RingBuffer({'images': jnp.asarray(np.broadcast_to(pool_vals[:, None, None, None],
                                                           (CAP, H, H, 1))),
                     'targets': jnp.zeros(CAP, jnp.int32)},
                    jnp.asarray(COUNT, jnp.int32), jnp.asarray(COUNT, jnp.int32))
  init = jnp.asarray(np.broadcast_to((100 + np.arange(M, dtype=np.uint8))[:, None, None, None],
                                     (M, H, H, 1)))
  return distill.PoolWithInit(pool, init)


def test_union_sample_is_uniform_over_pool_and_init():
  source = _source()
  key = jax.random.key(3)
  got = np.asarray(distill.union_sample(source, key, 64))
  assert got.shape == (64, H, H, 1) and got.dtype == np.uint8
  # Exact: numpy's concatenation [pool[:count], init] indexed by the same draw.
  union = np.concatenate([np.asarray(source.pool.data['images'])[:COUNT],
                          np.asarray(source.init)])
  idx = np.asarray(jax.random.randint(key, (64,), 0, COUNT + M))
  np.testing.assert_array_equal(got, union[idx])
  # Statistical, with fixed keys: 400 batches of 64 over the 12 images of the union.
  draws = jax.jit(jax.vmap(lambda k: distill.union_sample(source, k, 64)[:, 0, 0, 0]))(
      jax.random.split(jax.random.key(0), 400))
  values, counts = np.unique(np.asarray(draws), return_counts=True)
  expected_values = np.concatenate([np.arange(COUNT) + 1, 100 + np.arange(M)])
  np.testing.assert_array_equal(values, expected_values)  # never an unfilled slot
  n = 400 * 64
  chi2 = float(np.sum((counts - n / (COUNT + M)) ** 2 / (n / (COUNT + M))))
  assert chi2 < 31.3, (chi2, counts)  # chi-square, 11 degrees of freedom, p = 0.001
  # The pool's share is count / (count + M), as ConcatDataset([pool, init]) shuffled gives.
  assert np.mean(np.asarray(draws) < 100) == pytest.approx(COUNT / (COUNT + M), abs=0.01)


def test_empty_pool_draws_init_only():
  source = _source()
  empty = source.pool.replace(count=jnp.asarray(0, jnp.int32))
  got = np.asarray(distill.union_sample(distill.PoolWithInit(empty, source.init),
                                        jax.random.key(1), 256))[:, 0, 0, 0]
  assert set(got.tolist()) == set(range(100, 100 + M))


# ---------------------------------------------------------------- the runner

def _config(init_pool):
  """configs/fashion_mnist.py:quick with a random teacher (2 rounds of one epoch each)."""
  cfg = fashion_mnist.get_config('quick')
  cfg.teacher.checkpoint = 'random'
  cfg.mesh.num_devices = 1
  cfg.data.eval_limit = 64
  cfg.kd.init_pool = init_pool
  return cfg


def _write_npz(path, seed, n=40, shape=(28, 28, 1)):
  images = np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)
  np.savez(path, images=images, labels=np.zeros(n, np.int32))
  return str(path)


def _fails_fast(cfg, workdir, exc, *patterns):
  return fails_fast(runner.run, cfg, workdir, exc, *patterns)


@pytest.mark.slow  # ~80 s: a runner run
def test_runner_with_init_pool(tmp_path, monkeypatch):
  monkeypatch.setattr(runner.summary, 'plots', lambda *args: None)
  traced = []
  original = distill.union_sample
  monkeypatch.setattr(distill, 'union_sample',
                      lambda *a, **k: traced.append(1) or original(*a, **k))
  init = _write_npz(tmp_path / 'init.npz', seed=0)
  workdir = tmp_path / 'run'
  cfg = _config(init)
  cfg.log.stop_after_rounds = 1
  assert runner.run(cfg, str(workdir))['stopped_at_round'] == 1
  assert traced  # the KD chunk sampled pool + init
  saved = json.load(open(workdir / guard.FINGERPRINT))
  assert saved['input_sha256'] == {'kd.init_pool': guard.input_hash(init)}

  # Another init set under the same path: refused by its content hash, before compiling.
  shutil.copy(init, tmp_path / 'init_a.npz')
  _write_npz(init, seed=1)
  _fails_fast(cfg, workdir, errors.WorkdirError, 'kd.init_pool content', init)
  # Dropping the init set is a change too.
  _fails_fast(_config(''), workdir, errors.WorkdirError, 'kd.init_pool content')
  # The same images at another path: the run continues to its end.
  cfg.kd.init_pool, cfg.log.stop_after_rounds = str(tmp_path / 'init_a.npz'), 0
  out = runner.run(cfg, str(workdir))
  assert out['rounds'] == 2 and out['student_accuracy'] is not None
  state, meta = load_checkpoint(str(workdir))
  assert meta['round'] == 2
  # Init images never enter the pool or the bank: both hold the 2 rounds' 8 images.
  assert int(state['synth']['pool']['count']) == 16
  assert int(state['synth']['bank']['count']) == 16


@pytest.mark.parametrize('make,exc,patterns', [
    (lambda p: str(p / 'nope'), errors.ConfigError, ['kd.init_pool', 'no such file']),
    (lambda p: (p / 'empty' / 'sub').mkdir(parents=True) or str(p / 'empty'),
     data.DataNotFoundError, ['holds no image files']),
    (lambda p: _write_npz(p / 'big.npz', 0, shape=(32, 32, 1)), data.DataMismatchError,
     ['32x32', '28x28', '--config.kd.init_resize=True']),
    (lambda p: _write_npz(p / 'rgb.npz', 0, shape=(28, 28, 3)), data.DataMismatchError,
     ['3-channel', '1-channel']),
])
def test_bad_init_pool(tmp_path, make, exc, patterns):
  _fails_fast(_config(make(tmp_path)), tmp_path / 'run', exc, *patterns)


def test_init_pool_needs_the_pool(tmp_path):
  cfg = fashion_mnist.get_config('method=dfq,quick')
  cfg.teacher.checkpoint = 'random'
  cfg.kd.init_pool = _write_npz(tmp_path / 'init.npz', 0)
  _fails_fast(cfg, tmp_path / 'run', errors.ConfigError, "kd.mode='pool'")


def test_init_folder_resized_on_request(tmp_path):
  """A folder of PNGs (the published set's format) of another size: resized only
  when asked, then the teacher's shape."""
  folder = tmp_path / 'pre' / 'nested'
  folder.mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.full((32, 32), 10 * i, np.uint8)).save(folder / f'0-{i}.png')
  with pytest.raises(data.DataMismatchError, match='32x32'):
    data.load_transfer_set(str(tmp_path / 'pre'), (28, 28, 1), 10)
  out = data.load_transfer_set(str(tmp_path / 'pre'), (28, 28, 1), 10, resize=True)
  assert out.images.shape == (3, 28, 28, 1) and out.labels is None
  np.testing.assert_array_equal(out.images[:, 0, 0, 0], [0, 10, 20])


def test_preinverted_config_is_the_published_script():
  c = cifar10.get_config('wrn40_2-wrn16_1,preinverted')
  assert (c.kd.epochs, c.kd.kd_steps, c.kd.ep_steps) == (40, 2000, 2000)
  assert c.synthesis.weights.oh == 0.5 and c.synthesis.weights.adv == 0.5
  assert (c.synthesis.batch_size, c.synthesis.g_steps, c.kd.batch_size) == (256, 200, 128)
  assert c.kd.temperature == 20.0 and c.synthesis.weights.cr == 0.8
  assert c.kd.init_pool == 'run/cmi-preinverted-wrn402' and c.kd.pre_rounds == 0
  assert c.synthesis.pool_size == 40 * 256  # every synthesized image kept
  with pytest.raises(ValueError, match='method=cmi'):
    cifar10.get_config('wrn40_2-wrn16_1,preinverted,method=dfq')

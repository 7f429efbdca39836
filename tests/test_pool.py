"""The image pool beyond one device (issue 22 item 3): `kd.pool_mode='sharded'` on 4
fake CPU devices (tests/conftest.py) against the replicated 'device' pool, and the
incremental pool checkpoints (`log.pool_checkpoint='incremental'`).

Sampling: the sharded pool's KD batches are the device pool's bits (same key, same
indices), each device holds 1/4 of the slots, and the KD chunk compiled as the runner
compiles it gives the same student bit for bit. Checkpoints: save, add, save,
restore equals the pool in memory (wrapping ring, sharded target too), and a kill
between the files leaves the previous manifest and its pool intact.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import distill, models, parallel
from cmi_jax.errors import CheckpointError
from cmi_jax.pool_checkpoint import PoolCheckpointer, without_pool
from cmi_jax.state import create_classifier_state, sgd
from cmi_jax.synthesis import algorithms, bank
from cmi_jax.synthesis.bank import RingBuffer, ring_add, ring_init, ring_sample
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.teacher import Teacher
from experiments import plan
from tests.helpers import fails_fast

pytestmark = pytest.mark.usefixtures('compilation_cache')

CAP, SHAPE, B = 32, (16, 16, 1), 8
KD_CFG = distill.KDConfig(batch_size=B, temperature=4.0, crop_padding=2, mean=(0.5,),
                          std=(0.25,))


def _host_pool(n_filled, seed=0, cap=CAP):
  """A pool's host values: n_filled random slots (uint8 images, int32 targets)."""
  rng = np.random.default_rng(seed)
  images = np.zeros((cap,) + SHAPE, np.uint8)
  targets = np.zeros(cap, np.int32)
  images[:n_filled] = rng.integers(0, 256, (n_filled,) + SHAPE, dtype=np.uint8)
  targets[:n_filled] = rng.integers(0, 4, n_filled)
  return RingBuffer({'images': images, 'targets': targets}, np.int32(n_filled % cap),
                    np.int32(n_filled))


def _placed(host, mesh, mode):
  return jax.device_put(host, bank.ring_shardings(host, mesh, mode))


def test_ring_shardings():
  mesh = parallel.make_mesh(4)
  pool = _host_pool(0)
  dev, shd = (bank.ring_shardings(pool, mesh, m) for m in bank.POOL_MODES)
  assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree_util.tree_leaves(dev))
  assert shd.data['images'].spec == shd.data['targets'].spec == jax.sharding.PartitionSpec('data')
  assert shd.index.spec == shd.count.spec == jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match='pool_size=30 does not divide over 4 devices'):
    bank.ring_shardings(_host_pool(0, cap=30), mesh, 'sharded')
  with pytest.raises(ValueError, match="'host' is invalid"):
    bank.ring_shardings(pool, mesh, 'host')


def test_sharded_sampling_and_writes_equal_the_device_pool():
  """ring_sample / ring_add under mesh-jit: the same bits from a sharded as from a
  replicated pool, and both equal numpy's indexing of the host values; each device
  stores CAP / 4 slots and the compiled gather takes no whole copy of the pool."""
  mesh = parallel.make_mesh(4)
  host = _host_pool(20)
  key = jax.random.key(3)
  idx = np.asarray(jax.random.randint(key, (B,), 0, 20))  # ring_sample's draw
  sample = jax.jit(functools.partial(ring_sample, k=B),
                   out_shardings=parallel.batch_sharded(mesh))
  new = {'images': np.full((B,) + SHAPE, 7, np.uint8), 'targets': np.arange(B, dtype=np.int32)}
  out, added = {}, {}
  for mode in bank.POOL_MODES:
    pool = _placed(host, mesh, mode)
    out[mode] = jax.device_get(sample(pool, key))
    grown = jax.jit(ring_add, out_shardings=bank.ring_shardings(host, mesh, mode))(pool, new)
    added[mode] = jax.device_get(grown)
    if mode == 'sharded':
      shards = pool.data['images'].addressable_shards
      assert len(shards) == 4 and all(s.data.shape[0] == CAP // 4 for s in shards)
      assert grown.data['images'].sharding.spec == jax.sharding.PartitionSpec('data')
  for k in ('images', 'targets'):
    np.testing.assert_array_equal(out['sharded'][k], host.data[k][idx])
    np.testing.assert_array_equal(out['device'][k], out['sharded'][k])
    want = host.data[k].copy()
    want[(20 + np.arange(B)) % CAP] = new[k]
    np.testing.assert_array_equal(added['sharded'].data[k], want)
    np.testing.assert_array_equal(added['device'].data[k], want)
  assert int(added['sharded'].index) == 28 and int(added['sharded'].count) == 28
  # Per device, the compiled draw from a 1024-slot pool holds its quarter and batch-sized
  # temporaries, never a whole copy (an all-gather would need 256 kB).
  big = _host_pool(1024, cap=1024)
  mem = sample.lower(_placed(big, mesh, 'sharded'), key).compile().memory_analysis()
  pool_bytes = big.data['images'].nbytes + big.data['targets'].nbytes
  assert mem.argument_size_in_bytes < 0.26 * pool_bytes
  assert mem.temp_size_in_bytes < 0.05 * pool_bytes


class _TinyNet(nn.Module):
  """conv-BN-ReLU-mean-dense: a BN classifier that compiles in a second (testing only)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    return nn.Dense(4)(x.mean((1, 2)))


@pytest.fixture(scope='module')
def kd_setup():
  module = _TinyNet()
  teacher = Teacher(module, models.init(module, jax.random.key(4), (1,) + SHAPE))
  state = create_classifier_state(module, jax.random.key(5), (1,) + SHAPE,
                                  sgd(0.1, 0.9, 1e-4))
  return teacher, state, _host_pool(24)


def _kd_run(kd_setup, n, mode):
  """The runner's KD chunk (plan.compile_plan) on n devices, 2 steps from the pool placed
  as `mode` places it: (student state, metrics) on the host."""
  teacher, state, host = kd_setup
  cfg = SynthesisConfig(image_shape=SHAPE, num_classes=4, mean=(0.5,), std=(0.25,),
                        batch_size=B, pool_size=CAP).validate()
  mesh = parallel.make_mesh(n)
  kd = plan.compile_plan(mesh, cfg, cfg, KD_CFG, fresh=False).kd
  st, t = parallel.replicate(mesh, (state, teacher))
  return jax.device_get(kd(st, t, _placed(host, mesh, mode), jax.random.key(7), 2))


@pytest.fixture(scope='module')
def kd_runs(kd_setup):
  return {f'{mode}4': _kd_run(kd_setup, 4, mode) for mode in bank.POOL_MODES}


def test_kd_chunk_sharded_equals_device_bit_for_bit(kd_runs):
  (a, ma), (b, mb) = kd_runs['device4'], kd_runs['sharded4']
  assert int(a.step) == int(b.step) == 2
  assert float(ma['kd_loss']) > 0 and np.abs(a.params['Dense_0']['kernel']).max() > 0
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.batch_stats, a.opt_state, ma)),
                  jax.tree_util.tree_leaves((b.params, b.batch_stats, b.opt_state, mb))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_kd_chunk_sharded_4_devices_tracks_1_device(kd_setup, kd_runs):
  """Against one device only float32 reordering of the batch sums differs (as every
  1-vs-4 comparison, tests/test_parallel.py): params within 1e-5 of their scale."""
  (a, ma), (b, mb) = _kd_run(kd_setup, 1, 'device'), kd_runs['sharded4']
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_allclose(y, x, atol=1e-5 * max(np.abs(x).max(), 1e-3))
  np.testing.assert_allclose(mb['kd_loss'], ma['kd_loss'], rtol=1e-4)


@pytest.mark.parametrize('algorithm', ['cmi', 'fast'])
def test_sharded_init_equals_eager_init(kd_setup, algorithm):
  """The runner creates a sharded pool's state with jit (parallel.init_sharded): the same
  values as the eager init of the 'device' path, the pool split over 4 devices. FastDFKD's
  state holds optimizers (static fields) that differ between two builds: matched by leaf."""
  teacher = kd_setup[0]
  extra = dict(algorithm='fast', nz=8, ngf=4, g_steps=1, lr_z=0.01) if algorithm == 'fast' \
      else dict(n_neg=8, head_dim=8, bank_size=16)
  cfg = SynthesisConfig(image_shape=SHAPE, num_classes=4, mean=(0.5,), std=(0.25,),
                        batch_size=B, pool_size=CAP, **extra).validate()
  init = functools.partial(algorithms.get(algorithm).init_state, cfg)
  key = jax.random.key(1)
  mesh = parallel.make_mesh(4)
  shardings = plan.synth_shardings(mesh, jax.eval_shape(init, teacher, key), 'sharded')
  got = parallel.init_sharded(init, shardings, teacher, key)
  assert got.pool.data['images'].sharding.spec == jax.sharding.PartitionSpec('data')
  for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(got)),
                  jax.tree_util.tree_leaves(jax.device_get(init(teacher, key)))):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- incremental checkpoints

def _add(pool, n, seed):
  rng = np.random.default_rng(seed)
  items = {'images': rng.integers(0, 256, (n,) + SHAPE, dtype=np.uint8),
           'targets': rng.integers(0, 4, n).astype(np.int32)}
  return jax.jit(ring_add)(pool, items)


def _empty(mesh=None, mode='device'):
  pool = ring_init(CAP, {'images': jax.ShapeDtypeStruct(SHAPE, jnp.uint8),
                         'targets': jax.ShapeDtypeStruct((), jnp.int32)})
  return pool if mesh is None else jax.device_put(pool, bank.ring_shardings(pool, mesh, mode))


def _assert_pools_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a)),
                  jax.tree_util.tree_leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)


def test_incremental_save_add_save_restore(tmp_path):
  """Chunks hold only the new slots; the ring wraps (24 + 16 > 32), and restoring each
  step into a fresh pool (replicated or sharded) gives that step's pool exactly."""
  ck = PoolCheckpointer(str(tmp_path))
  pool, kept = _empty(), {}
  for step, n in ((1, 24), (2, 16), (3, 0)):
    pool = _add(pool, n, step) if n else pool
    m = ck.save(step, pool, max_new=n)
    kept[step] = jax.device_get(pool)
    if n:
      with np.load(tmp_path / f'chunk-{step:08d}.npz') as z:
        assert z['images'].shape[0] == n  # only what the step added
  assert [(c['start'], c['n']) for c in m['chunks']] == [(0, 24), (24, 16)]
  assert (m['index'], m['count']) == (8, 32)
  for step in (1, 2, 3):
    for mesh, mode in ((None, 'device'), (parallel.make_mesh(4), 'sharded')):
      got = PoolCheckpointer(str(tmp_path)).restore(step, _empty(mesh, mode))
      _assert_pools_equal(got, kept[step])
      if mode == 'sharded':
        assert got.data['images'].sharding.spec == jax.sharding.PartitionSpec('data')
  # A turn-over bound >= capacity rewrites every filled slot; older chunks drop out.
  pool = _add(pool, 40, 9)
  m = ck.save(4, pool, max_new=40)
  assert [(c['file'], c['start'], c['n']) for c in m['chunks']] == [('chunk-00000004.npz', 16, 32)]
  ck.prune(keep={3, 4})
  assert sorted(os.listdir(tmp_path)) == ['chunk-00000001.npz', 'chunk-00000002.npz',
                                          'chunk-00000004.npz', 'manifest-00000003.json',
                                          'manifest-00000004.json']
  _assert_pools_equal(PoolCheckpointer(str(tmp_path)).restore(4, _empty()), pool)
  assert without_pool(pool).data == {} and int(without_pool(pool).count) == 32


def test_kill_between_writes_keeps_the_previous_manifest(tmp_path, monkeypatch):
  """A save killed after its chunk and before its manifest (or mid-chunk) leaves the
  previous step restorable as it was; the next save from there is complete."""
  ck = PoolCheckpointer(str(tmp_path))
  pool = _add(_empty(), 8, 1)
  ck.save(1, pool, max_new=8)
  saved1 = jax.device_get(pool)
  pool = _add(pool, 8, 2)
  real = os.replace

  def killed(src, dst):
    if dst.endswith('.json'):
      raise KeyboardInterrupt('killed before the manifest')
    real(src, dst)
  monkeypatch.setattr(os, 'replace', killed)
  with pytest.raises(KeyboardInterrupt):
    ck.save(2, pool, max_new=8)
  monkeypatch.setattr(os, 'replace', real)
  assert ck.steps() == [1]
  fresh = PoolCheckpointer(str(tmp_path))
  _assert_pools_equal(fresh.restore(1, _empty()), saved1)
  with pytest.raises(CheckpointError, match='manifest-00000002.json'):
    fresh.restore(2, _empty())
  fresh.restore(1, _empty())
  fresh.save(2, pool, max_new=8)  # the resumed run's save of the same step
  _assert_pools_equal(PoolCheckpointer(str(tmp_path)).restore(2, _empty()), pool)


# ---------------------------------------------------------------- config checks

def test_sharded_pool_size_must_divide(tmp_path):
  from experiments import runner  # pylint: disable=import-outside-toplevel
  from tests.test_run import tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(num_devices=4)
  cfg.kd.pool_mode, cfg.synthesis.pool_size = 'sharded', 30
  fails_fast(runner.run, cfg, tmp_path / 'run', ValueError, 'synthesis.pool_size=30',
             "kd.pool_mode='sharded'", 'multiple of 4', '--config.synthesis.pool_size=28')


# ---------------------------------------------------------------- the runner end to end

@pytest.mark.slow
def test_runner_sharded_incremental_equals_device_full(tmp_path, monkeypatch):
  """The tiny CMI run on 4 devices: pool 'device' with full checkpoints, against the run
  with incremental ones, killed while saving round 2 and resumed with the pool
  'sharded' (kd.pool_mode may change on resume). Every logged value, the final student
  and the final pool are the same bits."""
  from experiments import runner  # pylint: disable=import-outside-toplevel
  from tests.helpers import load_checkpoint  # pylint: disable=import-outside-toplevel
  from tests.test_run import ROUNDS, _crash_at_save, _Crash, _no_plots, rows_of, tiny_config  # pylint: disable=import-outside-toplevel
  _no_plots(monkeypatch)
  cfg = tiny_config(num_devices=4)
  runner.run(cfg, str(tmp_path / 'device'))
  cfg.log.pool_checkpoint = 'incremental'
  work = str(tmp_path / 'sharded')
  with monkeypatch.context() as mp:
    _crash_at_save(mp, 2)
    with pytest.raises(_Crash):
      runner.run(cfg, work)
  assert PoolCheckpointer(os.path.join(work, 'pool')).steps() == [1, 2]  # 2 had no orbax save
  cfg.kd.pool_mode = 'sharded'
  runner.run(cfg, work)
  def values(workdir):  # every logged value but the clock's
    return [{k: v for k, v in r.items() if k != 'time' and not k.endswith('_s')}
            for r in rows_of(workdir)]
  want, got = values(tmp_path / 'device'), values(work)
  assert len(got) == ROUNDS
  for g, w in zip(got, want):
    assert {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)} == {}
  (dev, _), (shd, _) = load_checkpoint(tmp_path / 'device'), load_checkpoint(work)
  for x, y in zip(jax.tree_util.tree_leaves(dev['student']),
                  jax.tree_util.tree_leaves(shd['student'])):
    np.testing.assert_array_equal(x, y)
  # The orbax checkpoint kept only the pool's write position and count.
  assert [np.asarray(x).size for x in jax.tree_util.tree_leaves(shd['synth']['pool'])] == [1, 1]
  pool = PoolCheckpointer(os.path.join(work, 'pool')).restore(ROUNDS, ring_init(
      cfg.synthesis.pool_size, {'images': jax.ShapeDtypeStruct((28, 28, 1), jnp.uint8),
                                'targets': jax.ShapeDtypeStruct((), jnp.int32)}))
  for k in ('images', 'targets'):
    np.testing.assert_array_equal(np.asarray(pool.data[k]), dev['synth']['pool']['data'][k])
  assert int(pool.count) == int(dev['synth']['pool']['count'])


def test_resume_may_change_the_pool_mode_not_the_checkpoint_kind():
  from experiments import guard  # pylint: disable=import-outside-toplevel
  saved = {'kd': {'pool_mode': 'device'}, 'log': {'pool_checkpoint': 'full', 'every_kd_steps': 1}}
  new = {'kd': {'pool_mode': 'sharded'}, 'log': {'pool_checkpoint': 'full', 'every_kd_steps': 5}}
  assert guard.config_changes(saved, new) == []
  new['log']['pool_checkpoint'] = 'incremental'
  assert guard.config_changes(saved, new) == ["log.pool_checkpoint: 'full' -> 'incremental'"]


def test_memory_check_counts_the_devices_share_of_a_sharded_pool():
  from cmi_jax.synthesis import footprint  # pylint: disable=import-outside-toplevel
  from experiments import run_config  # pylint: disable=import-outside-toplevel
  from tests.test_run import tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(num_devices=4)
  info = run_config.dataset_info(cfg)
  assert run_config.synthesis_config(cfg, info, cfg.synthesis.weights.to_dict()).pool_shards == 1
  cfg.kd.pool_mode = 'sharded'
  synth = run_config.synthesis_config(cfg, info, cfg.synthesis.weights.to_dict())
  assert synth.pool_shards == 4
  # 24 images of 28x28x1 uint8 + int32 targets: 18,912 bytes, a quarter per device.
  assert footprint.footprint(synth, 16).pool_bytes == 24 * (28 * 28 + 4) // 4 == 4728


_SAVER = '''
import sys
import jax, numpy as np
from cmi_jax.pool_checkpoint import PoolCheckpointer
from tests.test_pool import _add, _empty
ck, pool = PoolCheckpointer(sys.argv[1]), _empty()
for step in range(1, 10000):
  pool = _add(pool, 8, step)
  ck.save(step, pool, max_new=8)
  print(step, flush=True)
'''


@pytest.mark.slow
def test_kill_9_mid_save_loses_nothing(tmp_path):
  """A process saving a step after another is killed with SIGKILL at a random moment:
  every manifest left on disk restores to exactly the pool of its step."""
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tests.helpers import ROOT  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', _SAVER, str(tmp_path)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, text=True)
  done = 0
  while done < 6:
    done = int(proc.stdout.readline())
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  steps = PoolCheckpointer(str(tmp_path)).steps()
  assert steps[:done] == list(range(1, done + 1))
  pool = _empty()
  for step in range(1, steps[-1] + 1):
    pool = _add(pool, 8, step)
    if step in (1, 5, steps[-1]) or step == done:  # the oldest, a wrapped ring, the newest
      _assert_pools_equal(PoolCheckpointer(str(tmp_path)).restore(step, _empty()), pool)

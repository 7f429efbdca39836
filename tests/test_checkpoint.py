"""Issue 11, item 4: asynchronous checkpoints that stay exact. The async save copies
to host before returning (donated buffers may be overwritten at once), a new save
waits for the one in flight, the cadence is every N rounds (and epoch ends of long
epochs, the end), and SIGTERM stops a run cleanly: it saves, says how to resume,
and the resumed run equals an uninterrupted one bit for bit."""

import contextlib
import functools
import io
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax import report
from cmi_jax.checkpoint import Checkpointer, abstract
from experiments import runner
from tests.test_run import (_no_plots, assert_trees_equal, checkpoint_steps,
                            rows_of, tiny_config)
from tests.helpers import load_checkpoint


def _state(mesh):
  """A replicated and a batch-sharded array, an int counter and a PRNG key's data."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shd = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  return {'bank': jax.device_put(jnp.arange(64 * 300, dtype=jnp.float32).reshape(64, 300), shd),
          'head': {'w': jax.device_put(jnp.linspace(-1, 1, 50_000, dtype=jnp.float32), rep)},
          'step': jax.device_put(jnp.int32(7), rep),
          'key': jax.device_put(jax.random.key_data(jax.random.key(3)), rep)}


@functools.partial(jax.jit, donate_argnums=0)
def _overwrite(state):
  """What the next round does to a donated state: new values in (possibly) the same buffers."""
  return jax.tree_util.tree_map(lambda x: x * 3 + 1, state)


@pytest.mark.parametrize('async_save', [True, False])
def test_save_restore_survives_donation(tmp_path, async_save):
  mesh = jax.make_mesh((4,), ('data',))
  state = _state(mesh)
  expected = jax.tree_util.tree_map(np.array, state)  # an independent host copy
  ckpt = Checkpointer(str(tmp_path / 'ck'), max_to_keep=2, async_save=async_save)
  ckpt.save(1, state, {'round': 1})
  for _ in range(3):  # overwrite the donated buffers while the save may still be writing
    state = _overwrite(state)
  jax.block_until_ready(state)
  target = abstract(state)
  ckpt.wait()
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  restored, meta = ckpt.restore(target)
  assert meta == {'round': 1}
  for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
    want = functools.reduce(lambda t, k: t[k.key], path, expected)
    assert leaf.dtype == want.dtype and np.array_equal(np.asarray(leaf), want), path
    assert leaf.sharding == functools.reduce(lambda t, k: t[k.key], path, target).sharding
  # Next saves: at most max_to_keep kept, the same step overwritten, close idempotent.
  ckpt.save(2, state, {'round': 2})
  ckpt.save(3, state, {'round': 3})
  ckpt.save(3, _overwrite(state), {'round': 33})
  ckpt.close()
  ckpt.close()
  again = Checkpointer(str(tmp_path / 'ck'))
  assert again.all_steps() == [2, 3]
  restored, meta = again.restore(target)
  assert meta == {'round': 33}
  np.testing.assert_array_equal(np.asarray(restored['bank']),
                                (expected['bank'] * 27 + 13) * 3 + 1)  # 4 overwrites
  assert again.restore(target, step=2)[1] == {'round': 2}
  again.close()
  assert Checkpointer(str(tmp_path / 'empty')).restore(target) is None


def test_checkpoint_cadence():
  # One round per epoch (the paper's schedule), every 10: rounds 10, 20, ... and the end.
  plan = runner.Plan(pre_rounds=0, rounds_per_epoch=1, epochs=25, kd_steps=400)
  assert [r + 1 for r in range(plan.total_rounds) if plan.checkpoint_due(r, 10)] == [10, 20, 25]
  # Epochs of 15 rounds, every 10: also at each epoch end (one extra save per epoch).
  plan = runner.Plan(pre_rounds=2, rounds_per_epoch=15, epochs=2, kd_steps=1)
  assert [r + 1 for r in range(plan.total_rounds) if plan.checkpoint_due(r, 10)] == \
      [10, 17, 20, 30, 32]
  plan = runner.Plan(pre_rounds=0, rounds_per_epoch=2, epochs=2, kd_steps=1)
  assert [r + 1 for r in range(4) if plan.checkpoint_due(r, 1)] == [1, 2, 3, 4]


def test_config_defaults():
  from configs import cifar10, fashion_mnist  # pylint: disable=g-import-not-at-top
  for cfg in (cifar10.get_config(), fashion_mnist.get_config('full')):
    assert cfg.log.checkpoint_every_rounds == 10 and cfg.log.async_checkpoints
  assert fashion_mnist.get_config().log.checkpoint_every_rounds == 1


def test_stop_signal_handler_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with runner.StopSignal() as stop:
    assert signal.getsignal(signal.SIGTERM) == stop.handle
    assert not stop.requested()
    with contextlib.redirect_stdout(io.StringIO()) as out:
      stop.handle(signal.SIGINT)
    assert stop.requested() and stop.received == 'SIGINT'
    assert 'stopping after the current round' in out.getvalue()
    assert signal.getsignal(signal.SIGTERM) == before  # a second signal acts as usual
  assert signal.getsignal(signal.SIGTERM) == before


pytestmark = pytest.mark.usefixtures('compilation_cache')


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_resumes_exactly(tmp_path, monkeypatch):
  """A real SIGTERM to this process during round 1 of 2 (from the metrics writer):
  the run finishes round 1, saves it (off the cadence of every 2 rounds), says how
  to resume and returns; running again completes it, equal (rows, state, meta) to a
  run never interrupted."""
  cfg = tiny_config(epochs=2, rounds_per_epoch=1, num_devices=1)
  cfg.log.checkpoint_every_rounds = 2
  _no_plots(monkeypatch)
  handler_before = signal.getsignal(signal.SIGTERM)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    full = str(tmp_path / 'full')
    runner.run(cfg, full)
    assert checkpoint_steps(full) == [2]
    stopped = str(tmp_path / 'stopped')
    original = runner.report.MetricWriter.write_scalars

    def write_scalars(self, step, row):
      original(self, step, row)
      if step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(runner.report.MetricWriter, 'write_scalars', write_scalars)
    result = runner.run(cfg, stopped)
    monkeypatch.setattr(runner.report.MetricWriter, 'write_scalars', original)
    assert result == {'stopped_at_round': 1, 'workdir': stopped, 'signal': 'SIGTERM'}
    assert checkpoint_steps(stopped) == [1]  # off-cadence: the stop's own save
    assert [r['step'] for r in rows_of(stopped)] == [1]
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handlers restored
    runner.run(cfg, stopped)
  text = out.getvalue()
  assert 'SIGTERM received: stopping after the current round' in text
  assert f'Stopped by SIGTERM after round 1/2; checkpoint saved in {stopped}/checkpoints' in text
  assert 'Run the same command again to resume.' in text
  assert 'Resuming' in text
  rows_full, rows_resumed = rows_of(full), rows_of(stopped)
  assert [r['step'] for r in rows_resumed] == [1, 2]
  for a, b in zip(rows_full, rows_resumed):
    assert report.without_wall_clock(a) == report.without_wall_clock(b)
  state_full, meta_full = load_checkpoint(full)
  state_resumed, meta_resumed = load_checkpoint(stopped)
  assert meta_full == meta_resumed
  assert_trees_equal(state_full, state_resumed)


def test_checkpoint_speed_benchmark_tiny(tmp_path):
  """benchmarks/checkpoint_speed.py at 1/512 of the CIFAR sizes: the state's layout and
  sizes, and sync vs async timings that are consistent (async blocks at most its total)."""
  from benchmarks import checkpoint_speed  # pylint: disable=g-import-not-at-top
  state = checkpoint_speed.cifar_state(512)
  assert state['synth']['bank']['data'].shape == (80, 5408)
  assert state['synth']['pool']['images'].shape == (100, 32, 32, 3)
  full = 40960 * 5408 * 4 + 51200 * (3072 + 4) + 3 * 8_000_000 * 4 + 2 * 11_200_000 * 4
  assert abs(checkpoint_speed.nbytes(state) * 512 - full) / full < 0.01  # 1.23 GB at scale 1
  for async_save in (False, True):
    r = checkpoint_speed.bench(state, async_save, 1, str(tmp_path / str(async_save)))
    assert 0 < r['blocking_s'] <= r['total_s'] and r['async'] == async_save
    assert not os.path.exists(tmp_path / str(async_save))  # cleaned up


def test_pending_save_keeps_its_buffer_from_donation(tmp_path):
  """The round right after an async save donates the saved arrays: the checkpoint
  still holds the values of the save (on CPU orbax's host copy is a view of the
  buffer, and JAX declines to donate a buffer a pending save references; without a
  save the same call donates it)."""
  x = jax.device_put(jnp.arange(1000, dtype=jnp.float32), jax.devices()[0])
  step = jax.jit(lambda a: a * 3 + 1, donate_argnums=0)
  x = step(x)
  y = step(x)
  assert x.is_deleted()  # donation works here
  ckpt = Checkpointer(str(tmp_path / 'ck'))
  ckpt.save(1, {'a': y}, {})
  z = step(y)
  ckpt.wait()
  restored, _ = ckpt.restore({'a': jax.ShapeDtypeStruct(z.shape, z.dtype, sharding=z.sharding)})
  np.testing.assert_array_equal(np.asarray(restored['a']), (np.arange(1000) * 3 + 1) * 3 + 1)
  ckpt.close()

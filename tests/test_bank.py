"""Device ring buffers: wrap-around writes, the NaN-guard switch, and sampling.

Items carry their own ids (slot contents are never 0 once written), so a
sampled row tells which slot it came from and an unfilled slot shows as 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmi_jax.synthesis.bank import ring_add, ring_init, ring_sample, ring_sample_distinct

SPEC = jax.ShapeDtypeStruct((2,), jnp.float32)


def _items(start, n):
  """[n, 2] rows (v, -v) with v = start, start + 1, ..."""
  v = np.arange(start, start + n, dtype=np.float32)
  return jnp.asarray(np.stack([v, -v], axis=1))


def _filled(cap, n):
  """A buffer of capacity `cap` holding ids 1..n (slot i holds id i + 1 while n <= cap)."""
  buf = ring_init(cap, SPEC)
  return ring_add(buf, _items(1, n)) if n else buf


def test_ring_add_wraps_around():
  buf = ring_init(5, SPEC)
  assert int(buf.index) == 0 and int(buf.count) == 0 and buf.capacity == 5
  buf = ring_add(buf, _items(1, 3))
  np.testing.assert_array_equal(buf.data[:, 0], [1, 2, 3, 0, 0])
  np.testing.assert_array_equal(buf.data[:, 1], [-1, -2, -3, 0, 0])
  assert (int(buf.index), int(buf.count)) == (3, 3)
  buf = ring_add(buf, _items(4, 4))  # slots 3, 4, 0, 1
  np.testing.assert_array_equal(buf.data[:, 0], [6, 7, 3, 4, 5])
  np.testing.assert_array_equal(buf.data[:, 1], [-6, -7, -3, -4, -5])
  assert (int(buf.index), int(buf.count)) == (2, 5)
  buf = ring_add(buf, _items(8, 2))  # slots 2, 3
  np.testing.assert_array_equal(buf.data[:, 0], [6, 7, 8, 9, 5])
  assert (int(buf.index), int(buf.count)) == (4, 5)


def test_ring_add_more_than_capacity_keeps_last():
  buf = ring_add(ring_init(5, SPEC), _items(1, 2))  # index 2
  buf = ring_add(buf, _items(10, 7))
  # As if written one by one from slot 2: 10->2, 11->3, 12->4, 13->0, 14->1, 15->2, 16->3.
  np.testing.assert_array_equal(buf.data[:, 0], [13, 14, 15, 16, 12])
  assert (int(buf.index), int(buf.count)) == (4, 5)
  fresh = ring_add(ring_init(3, SPEC), _items(1, 8))
  np.testing.assert_array_equal(np.sort(fresh.data[:, 0]), [6, 7, 8])
  assert (int(fresh.index), int(fresh.count)) == (2, 3)


def test_ring_add_matches_sequential_writes():
  """Random batch sizes against a one-item-at-a-time numpy ring."""
  rng = np.random.default_rng(0)
  cap = 7
  buf = ring_init(cap, SPEC)
  ref, idx, count, next_id = np.zeros(cap), 0, 0, 1
  for _ in range(12):
    n = int(rng.integers(1, 12))
    buf = ring_add(buf, _items(next_id, n))
    for v in range(next_id, next_id + n):
      ref[idx] = v
      idx = (idx + 1) % cap
      count = min(count + 1, cap)
    next_id += n
    np.testing.assert_array_equal(buf.data[:, 0], ref)
    assert (int(buf.index), int(buf.count)) == (idx, count)


def test_ring_add_disabled_changes_nothing():
  buf = ring_add(ring_init(5, SPEC), _items(1, 4))
  add = jax.jit(ring_add)
  for n in (2, 9):
    same = add(buf, _items(50, n), jnp.asarray(False))
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, buf)
  moved = add(buf, _items(50, 2), jnp.asarray(True))
  np.testing.assert_array_equal(moved.data[:, 0], [51, 2, 3, 4, 50])


def test_ring_add_casts_and_keeps_pytrees_aligned():
  spec = {'images': jax.ShapeDtypeStruct((2, 2, 1), jnp.uint8),
          'targets': jax.ShapeDtypeStruct((), jnp.int32)}
  buf = ring_init(6, spec)
  for start, n in ((0, 4), (4, 5)):
    t = np.arange(start, start + n)
    imgs = np.broadcast_to(t[:, None, None, None], (n, 2, 2, 1)).astype(np.float32)
    buf = ring_add(buf, {'images': jnp.asarray(imgs), 'targets': jnp.asarray(t)})
  assert buf.data['images'].dtype == jnp.uint8 and buf.data['targets'].dtype == jnp.int32
  np.testing.assert_array_equal(buf.data['targets'], [6, 7, 8, 3, 4, 5])
  sample = ring_sample(buf, jax.random.key(0), 40)
  np.testing.assert_array_equal(sample['images'][:, 0, 0, 0], sample['targets'])
  assert np.all(sample['images'] == sample['images'][:, :1, :1])
  picked, valid = ring_sample_distinct(buf, jax.random.key(1), 4)
  assert np.all(valid)
  np.testing.assert_array_equal(picked['images'][:, 1, 1, 0], picked['targets'])


def _draws(buf, k, n_keys, seed=0):
  """ids [n_keys, k] and valid [n_keys, k] over many keys."""
  keys = jax.random.split(jax.random.key(seed), n_keys)
  items, valid = jax.jit(jax.vmap(functools.partial(ring_sample_distinct, buf, k=k)))(keys)
  return np.asarray(items[..., 0]).astype(np.int64), np.asarray(valid)


@pytest.mark.parametrize('cap, n, k', [(10, 6, 4), (10, 10, 10), (16, 9, 9)])
def test_ring_sample_distinct_filled_and_distinct(cap, n, k):
  ids, valid = _draws(_filled(cap, n), k, 500)
  assert valid.all()
  assert ids.min() >= 1 and ids.max() <= n  # never an unfilled slot
  assert all(len(set(row)) == k for row in ids)


@pytest.mark.parametrize('cap, n, k', [(10, 3, 4), (10, 0, 4), (4, 3, 6), (4, 4, 6)])
def test_ring_sample_distinct_returns_all_while_few(cap, n, k):
  ids, valid = _draws(_filled(cap, n), k, 50)
  assert ids.shape == valid.shape == (50, k)
  np.testing.assert_array_equal(valid.sum(1), n)
  for row, ok in zip(ids, valid):
    np.testing.assert_array_equal(np.sort(row[ok]), np.arange(1, n + 1))


def test_ring_sample_distinct_after_wrap_uses_all_slots():
  buf = ring_add(_filled(5, 4), _items(10, 3))  # ids [11, 12, 3, 4, 10]
  ids, valid = _draws(buf, 3, 300)
  assert valid.all()
  assert set(np.unique(ids)) == {3, 4, 10, 11, 12}


def test_ring_sample_distinct_roughly_uniform():
  n, k, n_keys = 6, 2, 3000
  ids, _ = _draws(_filled(12, n), k, n_keys, seed=3)
  counts = np.bincount(ids.ravel(), minlength=n + 1)[1:]
  expected = n_keys * k / n
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 30.0, (counts, chi2)  # 5 dof: P(chi2 > 30) ~ 1.5e-5


def test_ring_sample_filled_only():
  buf = _filled(8, 3)
  ids = np.asarray(ring_sample(buf, jax.random.key(5), 600)[:, 0]).astype(np.int64)
  assert set(np.unique(ids)) == {1, 2, 3}
  counts = np.bincount(ids, minlength=4)[1:]
  assert counts.min() > 150

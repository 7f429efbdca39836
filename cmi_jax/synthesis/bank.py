"""Device-resident ring buffers: the memory bank of features and the image pool.

A `RingBuffer` holds a pytree of arrays with a leading capacity axis, the next
write position and the number of filled slots. Slots fill in order 0, 1, ...
and wrap around once full, so slot i is filled iff i < count. Adding and
sampling are pure jittable functions; nothing leaves the device.
"""

from typing import Any, Tuple

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RingBuffer:
  data: Any          # pytree of [capacity, ...] arrays
  index: jax.Array   # int32 scalar: next slot to write
  count: jax.Array   # int32 scalar: filled slots (<= capacity)

  @property
  def capacity(self) -> int:
    return jax.tree_util.tree_leaves(self.data)[0].shape[0]


def ring_init(capacity: int, item_spec: Any) -> RingBuffer:
  """An empty buffer; item_spec is a pytree of jax.ShapeDtypeStruct (one item)."""
  if capacity < 1:
    raise ValueError(f'ring buffer capacity must be >= 1, got {capacity}.')
  data = jax.tree_util.tree_map(lambda s: jnp.zeros((capacity,) + tuple(s.shape), s.dtype),
                                item_spec)
  return RingBuffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def ring_add(buf: RingBuffer, items: Any, enabled: jax.Array = True) -> RingBuffer:
  """Writes a batch (pytree of [n, ...]) at the write position, wrapping around.

  With n > capacity only the last `capacity` items are kept. `enabled=False`
  (a traced bool) leaves the buffer unchanged, e.g. after a non-finite round;
  it rewrites the n old values rather than selecting between two whole
  buffers, so the buffer is never copied.
  """
  cap = buf.capacity
  n_in = jax.tree_util.tree_leaves(items)[0].shape[0]
  offset = max(n_in - cap, 0)
  n = n_in - offset
  pos = (buf.index + offset + jnp.arange(n)) % cap

  def write(store, new):
    new = new[offset:].astype(store.dtype)
    return store.at[pos].set(jnp.where(enabled, new, store[pos]))

  data = jax.tree_util.tree_map(write, buf.data, items)
  index = jnp.where(enabled, (buf.index + n_in) % cap, buf.index)
  count = jnp.where(enabled, jnp.minimum(buf.count + n_in, cap), buf.count)
  return RingBuffer(data, index.astype(jnp.int32), count.astype(jnp.int32))


def ring_sample_distinct(buf: RingBuffer, rng: jax.Array, k: int) -> Tuple[Any, jax.Array]:
  """k distinct filled slots, uniformly at random (random.sample semantics).

  While fewer than k slots are filled, every filled slot is returned and the
  rest of the k rows are padding marked invalid. Returns (items, valid [k]).
  """
  cap = buf.capacity
  k_eff = min(k, cap)
  filled = jnp.arange(cap) < buf.count
  u = jnp.where(filled, jax.random.uniform(rng, (cap,)), 2.0)  # unfilled sort last
  _, idx = jax.lax.top_k(-u, k_eff)
  valid = filled[idx]
  items = jax.tree_util.tree_map(lambda a: a[idx], buf.data)
  if k_eff < k:  # capacity below k: pad with invalid rows to keep the static shape
    pad = k - k_eff
    items = jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]), items)
    valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
  return items, valid


def ring_sample(buf: RingBuffer, rng: jax.Array, k: int) -> Any:
  """k filled slots drawn uniformly with replacement (KD batches from the pool).

  The caller must ensure count > 0 (an empty pool has nothing to train on).
  """
  idx = jax.random.randint(rng, (k,), 0, jnp.maximum(buf.count, 1))
  return jax.tree_util.tree_map(lambda a: a[idx], buf.data)

"""Device-resident ring buffers: the memory bank of features and the image pool.

A `RingBuffer` holds a pytree of arrays with a leading capacity axis, the next
write position and the number of filled slots. Slots fill in order 0, 1, ...
and wrap around once full, so slot i is filled iff i < count. Adding and
sampling are pure jittable functions; nothing leaves the device.

Where a buffer lives is its arrays' sharding, not its code (`POOL_MODES`,
`ring_shardings`): 'device' replicates it on every device (the default: reads
are local gathers); 'sharded' splits the capacity axis over the mesh's 'data'
axis, so each of n devices holds capacity / n slots (a pool too big for one
device). The same `ring_add` / `ring_sample` run on either: under jit XLA turns
the gather of a replicated index vector from a sharded store into per-device
masked gathers plus one all-reduce of the [k, ...] batch (and the write into a
masked local scatter), so the sampled indices, and so the batches, are the same
bits in both modes. tests/test_pool.py checks both claims.
"""

from typing import Any, Tuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from cmi_jax import parallel

# kd.pool_mode: where the image pool lives (module docstring).
POOL_MODES = ('device', 'sharded')


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


def ring_shardings(buf: Any, mesh: Mesh, mode: str) -> RingBuffer:
  """The shardings of a buffer (or of its `jax.eval_shape`) in pool mode `mode`:
  'device' every leaf replicated; 'sharded' the data leaves split along their
  capacity axis over the mesh's 'data' axis, the write position and count
  replicated. Raises ValueError for another mode or a capacity that does not
  divide over the devices."""
  if mode not in POOL_MODES:
    raise ValueError(f'pool mode {mode!r} is invalid: must be one of {POOL_MODES}.')
  rep = parallel.replicated(mesh)
  if mode == 'device':
    return jax.tree_util.tree_map(lambda _: rep, buf)
  parallel.check_divisible(mesh, pool_size=buf.capacity)
  split = parallel.batch_sharded(mesh)
  return RingBuffer(jax.tree_util.tree_map(lambda _: split, buf.data), rep, rep)


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

"""Incremental checkpoints of the image pool: only the slots written since the last save.

`log.pool_checkpoint='incremental'` (the runner): the orbax checkpoint holds the
state without the pool's arrays (its write position and count stay in it), and
this module keeps the pool under `<workdir>/pool/`:
  * `chunk-<step>.npz`: the pool slots written since the previous save, one
    contiguous run of ring slots (`start`, `n`, wrapping at the capacity) with
    one array per data leaf (`images`, `targets`);
  * `manifest-<step>.json`: the pool at that step: capacity, write position,
    count and the chunks, oldest first, whose writes rebuild it.
A save of a 60 GB ImageNet pool then writes what the last rounds added (10 rounds
x 100 images x 150 kB = 150 MB), not 60 GB. Each file is written to `<name>.tmp`,
flushed to disk (fsync) and renamed into place, chunk first, manifest last, so a
kill -9 at any point leaves every earlier manifest and the chunks it names intact;
the runner saves the pool before the orbax checkpoint of the same step, so each
checkpoint has its manifest. Restoring replays the chunks in order into the
fresh (replicated or sharded) pool on device, one chunk at a time; nothing holds
the whole pool on the host. Single host: the process that saves must address
every slot (a multi-host run keeps log.pool_checkpoint='full').

Which slots are new: the ring writes slot after slot, so (index - previous
index) mod capacity of them, provided fewer than `capacity` were written since
the previous save; the caller passes a bound (`max_new`) and at or above the
capacity the whole filled pool is written as one chunk. A chunk whose slots
were all overwritten by later chunks is dropped from the next manifest, and
`prune` deletes the files no kept manifest names.
"""

import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cmi_jax.errors import CheckpointError
from cmi_jax.synthesis.bank import RingBuffer

POOL_CHECKPOINTS = ('full', 'incremental')
_HOST_PIECE = 4096  # slots copied to the host per gather (bounds device temporaries)


def _leaf_names(data: Any) -> List[str]:
  """The data leaves' names in flattening order ('images', 'targets')."""
  paths, _ = zip(*jax.tree_util.tree_flatten_with_path(data)[0])
  return [re.sub(r'[^A-Za-z0-9_]', '', jax.tree_util.keystr(p)) for p in paths]


def _write_atomic(path: str, write) -> None:
  """write(file) into `path`.tmp, fsync, rename into place, fsync the folder."""
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fd = os.open(os.path.dirname(path), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _covered(chunks: List[Dict[str, Any]], capacity: int) -> List[Dict[str, Any]]:
  """The chunks, oldest first, that still own at least one slot (later chunks win)."""
  owner = np.full(capacity, -1, np.int64)
  for i, c in enumerate(chunks):
    owner[(c['start'] + np.arange(c['n'])) % capacity] = i
  live = set(np.unique(owner[owner >= 0]).tolist())
  return [c for i, c in enumerate(chunks) if i in live]


def without_pool(pool: RingBuffer) -> RingBuffer:
  """The part of the pool the orbax checkpoint keeps: write position and count."""
  return pool.replace(data={})


class PoolCheckpointer:
  """Saves / restores a RingBuffer pool at integer steps under `directory`."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    self._base: Optional[Dict[str, Any]] = None  # the manifest of the last save / restore

  def _manifest_path(self, step: int) -> str:
    return os.path.join(self.directory, f'manifest-{step:08d}.json')

  def steps(self) -> List[int]:
    """Steps with a complete manifest on disk."""
    return sorted(int(m.group(1)) for m in
                  (re.fullmatch(r'manifest-(\d+)\.json', n) for n in os.listdir(self.directory))
                  if m)

  def read_manifest(self, step: int) -> Dict[str, Any]:
    path = self._manifest_path(step)
    try:
      with open(path, encoding='utf-8') as f:
        return json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f'No readable pool manifest {path} ({type(e).__name__}: {e}); the '
                            f'checkpoint of step {step} was saved with log.pool_checkpoint='
                            "'incremental' and needs it. Delete the workdir to start over.") from e

  def save(self, step: int, pool: RingBuffer, max_new: int) -> Dict[str, Any]:
    """Writes the slots added since the last save (or restore) as chunk `step`, then
    manifest `step`; returns the manifest. max_new: an upper bound on the items
    written into the pool since then (the runner: the rounds' batch sizes)."""
    cap = pool.capacity
    index, count = int(pool.index), int(pool.count)
    base = self._base or {'index': 0, 'count': 0, 'chunks': []}
    if max_new >= cap:  # the whole ring may have turned over: every filled slot
      start, n = (index - count) % cap, count
    else:
      start, n = base['index'], (index - base['index']) % cap
    chunks = list(base['chunks'])
    if n:
      name = f'chunk-{step:08d}.npz'
      slots = (start + np.arange(n)) % cap
      leaves = jax.tree_util.tree_leaves(pool.data)
      host = {}
      for key, leaf in zip(_leaf_names(pool.data), leaves):
        out = np.empty((n,) + leaf.shape[1:], leaf.dtype)
        for i in range(0, n, _HOST_PIECE):  # device gather, then host copy, piece by piece
          out[i:i + _HOST_PIECE] = np.asarray(leaf[jnp.asarray(slots[i:i + _HOST_PIECE])])
        host[key] = out
      _write_atomic(os.path.join(self.directory, name), lambda f: np.savez(f, **host))
      chunks = _covered(chunks + [{'file': name, 'start': int(start), 'n': int(n)}], cap)
    manifest = {'step': step, 'capacity': cap, 'index': index, 'count': count,
                'leaves': _leaf_names(pool.data), 'chunks': chunks}
    _write_atomic(self._manifest_path(step),
                  lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    self._base = manifest
    return manifest

  def restore(self, step: int, fresh: RingBuffer) -> RingBuffer:
    """The pool of `step` written into `fresh` (an empty pool of the run's shape and
    sharding, donated); step 0 (a new run) returns `fresh` itself."""
    if step == 0:
      self._base = None
      return fresh
    manifest = self.read_manifest(step)
    names = _leaf_names(fresh.data)
    if manifest['capacity'] != fresh.capacity or manifest['leaves'] != names:
      raise CheckpointError(
          f'Pool manifest {self._manifest_path(step)} holds capacity {manifest["capacity"]} '
          f'and arrays {manifest["leaves"]}; this run has {fresh.capacity} and {names} '
          '(another synthesis.pool_size or image shape): resume with the config that saved it.')
    leaves, treedef = jax.tree_util.tree_flatten(fresh.data)
    writers = [jax.jit(lambda a, i, v: a.at[i].set(v), donate_argnums=(0,),
                       out_shardings=leaf.sharding) for leaf in leaves]
    for c in manifest['chunks']:
      path = os.path.join(self.directory, c['file'])
      try:
        with np.load(path) as z:
          values = [z[k] for k in names]
      except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f'Pool chunk {path}, named by {self._manifest_path(step)}, '
                              f'cannot be read ({type(e).__name__}: {e}).') from e
      slots = jnp.asarray((c['start'] + np.arange(c['n'])) % manifest['capacity'], jnp.int32)
      leaves = [w(a, slots, v.astype(a.dtype)) for w, a, v in zip(writers, leaves, values)]
    scalar = lambda x, like: jax.device_put(np.int32(x), like.sharding)
    self._base = manifest
    return RingBuffer(jax.tree_util.tree_unflatten(treedef, leaves),
                      scalar(manifest['index'], fresh.index), scalar(manifest['count'], fresh.count))

  def prune(self, keep: Iterable[int]) -> None:
    """Deletes manifests not in `keep` (the last save's is always kept), then the
    chunks and temporary files no remaining manifest names."""
    keep = set(keep) | ({self._base['step']} if self._base else set())
    for s in self.steps():
      if s not in keep:
        os.remove(self._manifest_path(s))
    named = {c['file'] for s in self.steps() for c in self.read_manifest(s)['chunks']}
    for n in os.listdir(self.directory):
      if (n.startswith('chunk-') and n not in named) or n.endswith('.tmp'):
        os.remove(os.path.join(self.directory, n))

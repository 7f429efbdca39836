"""Full-state checkpoints: an orbax CheckpointManager, whole tree in, whole tree out.

A checkpoint holds one pytree ('state': arrays only, PRNG keys as raw key
data) and a small JSON ('meta': round/step counters, config, versions).
Restoring needs an abstract target (from `jax.eval_shape`) so shapes, dtypes
and shardings come back exactly. Orbax writes to a temporary folder and renames
it when complete, so a crash mid-save never leaves a half checkpoint behind.

Saves are asynchronous by default: `save` blocks only while orbax copies the
arrays to host memory, then the files are written by a background thread while
the device runs the next round. The host copy is what makes this safe with
donated state (the next round may overwrite the device buffers at once);
tests/test_checkpoint.py checks it. A new `save` (and `restore`, `close`) first
waits for the save in flight, so at most one is pending; `wait` blocks until it
is on disk. benchmarks/checkpoint_speed.py measures the blocking time.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves/restores (state pytree, meta dict) at integer steps under `directory`.

  API: save / restore / latest_step / all_steps / wait / close.
  """

  def __init__(self, directory: str, max_to_keep: Optional[int] = 2,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    self._closed = False
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    """The newest step on disk or being written (None when there is none)."""
    return self._mngr.latest_step()

  def all_steps(self) -> List[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Starts writing checkpoint `step` (overwriting one of the same step).

    Returns once `state` is copied to host memory (async) or on disk (sync), so
    the caller may donate or overwrite `state`'s buffers right after.
    """
    self.wait()
    if step in self._mngr.all_steps():
      self._mngr.delete(step)
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
    if not self.async_save:
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is complete on disk."""
    self._mngr.wait_until_finished()

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """Restores checkpoint `step` (default: the latest) into `abstract_state`'s
    structure; None when there is none."""
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def close(self) -> None:
    """Finishes the save in flight and releases the manager's threads (idempotent)."""
    if not self._closed:
      self._closed = True
      self._mngr.close()  # waits for the save in flight


def abstract(tree: Any) -> Any:
  """ShapeDtypeStruct tree (with shardings) to restore into."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)

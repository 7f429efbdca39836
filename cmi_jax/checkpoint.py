"""Full-state checkpoints: an orbax CheckpointManager, whole tree in, whole tree out.

A checkpoint holds one pytree ('state': arrays only, PRNG keys as raw key
data) and a small JSON ('meta': round/step counters, config, versions).
Restoring needs an abstract target (from `jax.eval_shape`) so shapes, dtypes
and shardings come back exactly. Orbax writes to a temporary folder and renames
it when complete, so a crash mid-save never leaves a half checkpoint behind.
"""

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves/restores (state pytree, meta dict) at integer steps under `directory`."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 2):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Writes checkpoint `step` (overwriting one of the same step)."""
    if step in self._mngr.all_steps():
      self._mngr.delete(step)
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """Restores checkpoint `step` (default: the latest) into `abstract_state`'s
    structure; None when there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStruct tree (with shardings) to restore into."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)

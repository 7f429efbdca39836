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
tests/test_checkpoint.py checks it. On GPU/TPU it is a real device-to-host copy;
on the CPU backend it is a zero-copy view, and JAX then declines to donate a
buffer that the pending save still references (the round gets a fresh one), so
the saved values are never overwritten either way. A new `save` (and `restore`,
`close`) first waits for the save in flight, so at most one is pending; `wait`
blocks until it is on disk. benchmarks/checkpoint_speed.py measures the blocking time.

Faults (issue 13, tests/test_faults.py): `restore` of the latest
checkpoint falls back to the newest one that reads back (warning what was wrong,
and setting the damaged ones aside as `<step>.corrupt-<time>`), or raises a
`CheckpointError` naming the folder and the choices when none does. A save that
fails (disk full, permissions) raises a `CheckpointError` (at `save` when
synchronous; at the next `save`, `wait` or `close` when asynchronous); orbax
never renames an incomplete save into place, so the previous checkpoint stays
intact and resumable.
"""

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging

from cmi_jax.errors import CheckpointError

# Words of the I/O failures that orbax and tensorstore report as non-OSErrors.
_IO_WORDS = ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'os_error_code', 'No space left',
             'Permission denied', 'Read-only file system', 'Disk quota')


def _is_io_error(e: BaseException) -> bool:
  return isinstance(e, OSError) or any(w in str(e) for w in _IO_WORDS)


def _brief(e: BaseException, limit: int = 240) -> str:
  """'Type: first line of the message', cut to `limit` characters."""
  text = str(e).splitlines()[0] if str(e) else ''
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(e).__name__}: {text}'


class Checkpointer:
  """Saves/restores (state pytree, meta dict) at integer steps under `directory`.

  API: save / restore / latest_step / all_steps / wait / close.
  """

  def __init__(self, directory: str, max_to_keep: Optional[int] = 2,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    self._closed = False
    self._pending: Optional[int] = None  # step of the save in flight
    self._failed = False                 # a save failure was raised already
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
    self._pending = step
    try:
      if step in self._mngr.all_steps():
        self._mngr.delete(step)
      self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      if _is_io_error(e):
        raise self._save_failed(e) from e
      raise
    if not self.async_save:
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is complete on disk; a failed
    save raises CheckpointError."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if _is_io_error(e):
        raise self._save_failed(e) from e
      raise
    self._pending = None

  def _complete_steps(self) -> List[int]:
    """Steps whose folder was renamed into place (orbax renames only complete saves)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  def _save_failed(self, e: BaseException) -> CheckpointError:
    self._failed = True
    step, self._pending = self._pending, None
    previous = [s for s in self._complete_steps() if s != step]
    keep = (f'The previous checkpoint ({os.path.join(self.directory, str(previous[-1]))}) is '
            'intact: free disk space (or fix the permissions), then run the same command again '
            'to resume from it.' if previous else
            'No earlier checkpoint exists: free disk space (or fix the permissions) and run the '
            'same command again, or choose another --workdir.')
    return CheckpointError(f'Could not write checkpoint {step} to {self.directory} '
                           f'({_brief(e)}); the run stops. {keep}')

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """Restores checkpoint `step` (default: the latest) into `abstract_state`'s
    structure; None when there is none."""
    self.wait()
    if step is not None:
      return self._restore(step, abstract_state)
    failures = []
    for s in sorted(self.all_steps(), reverse=True):
      try:
        out = self._restore(s, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (damaged files fail in many ways)
        failures.append(f'{os.path.join(self.directory, str(s))}: {_brief(e)}')
        continue
      if failures:
        msg = (f'Checkpoint(s) unreadable, set aside: {"; ".join(failures)}. Resuming from the '
               f'previous complete checkpoint, step {s}.')
        logging.warning(msg)
        print(f'Warning: {msg}', flush=True)
        self._set_aside(failures)
      return out
    if failures:
      raise CheckpointError(
          f'No usable checkpoint in {self.directory}: {"; ".join(failures)}. Either delete '
          f'{self.directory} to start the run over from its beginning, or keep it for '
          'inspection and point --workdir at a new folder.')
    return None

  def _restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def _set_aside(self, failures: List[str]) -> None:
    """Renames damaged step folders to `<step>.corrupt-<time>` (kept for
    inspection, no longer a step), so the run's next saves and resumes skip them."""
    if jax.process_index() == 0:
      for f in failures:
        path = f.split(': ', 1)[0]
        if os.path.isdir(path):
          os.replace(path, f'{path}.corrupt-{int(time.time())}')
    self._mngr.reload()

  def close(self) -> None:
    """Finishes the save in flight and releases the manager's threads (idempotent)."""
    if not self._closed:
      self._closed = True
      try:
        self._mngr.close()  # waits for the save in flight
      except Exception as e:  # pylint: disable=broad-except
        if self._failed:  # already reported: do not mask that error with a repeat
          return
        if _is_io_error(e):
          raise self._save_failed(e) from e
        raise


def abstract(tree: Any) -> Any:
  """ShapeDtypeStruct tree (with shardings) to restore into."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def read_part(directory: str, select: Callable[[Any], Any], step: Optional[int] = None
              ) -> Tuple[Any, Dict[str, Any], int]:
  """Reads part of a saved state onto this process's first device, without the
  rest of it and without an abstract target from the code that saved it (e.g.
  the student of a run for export: experiments/student_export.py).

  Args:
    directory: a Checkpointer's folder (a run's `<workdir>/checkpoints`).
    select: maps the saved state's metadata tree (nested dicts of array
      metadata) to the sub-tree to read, e.g.
      `lambda t: {'student': {'params': t['student']['params']}}`.
    step: the checkpoint to read; default the newest.

  Returns:
    (the selected tree of arrays, the checkpoint's meta dict, its step).

  Raises:
    CheckpointError: no checkpoint in `directory`, or it cannot be read.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):  # a manager would create the folder
    raise CheckpointError(f'No checkpoint folder {directory}.')
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False), item_handlers={
      'state': ocp.PyTreeCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'No checkpoint in {directory}: the run saved none yet (it saves '
                            'at round boundaries; see log.checkpoint_every_rounds).')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      part = select(mngr.item_metadata(step)['state'])
      target = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), part)
      restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=device),
                                            part)
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                       partial_restore=True),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (damaged files fail in many ways)
      raise CheckpointError(f'Cannot read checkpoint {os.path.join(directory, str(step))} '
                            f'({_brief(e)}).') from e
  finally:
    mngr.close()
  # A selected path the checkpoint lacks comes back as its unfilled target.
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(out['state'])):
    raise CheckpointError(f'Checkpoint {os.path.join(directory, str(step))} lacks part of the '
                          'selected state.')
  return out['state'], out['meta'], step

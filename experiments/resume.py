"""Stopping and resuming a run: the clean stop on SIGTERM/SIGINT, and the
checkpoint bookkeeping (restore at start, when a round ends with a save, the stop
after log.stop_after_rounds or a signal)."""

import contextlib
import os
import signal
import threading
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from cmi_jax.checkpoint import Checkpointer, abstract


class StopSignal:
  """SIGTERM/SIGINT -> a clean stop: the first signal sets `requested` (the loop
  stops after the current round, saves and says how to resume); handlers are
  restored at the first signal (a second one acts as usual, e.g. Ctrl-C twice
  interrupts at once) and on exit. Installed only in the main thread."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[str] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self.handle)
    return self

  def handle(self, signum, frame=None) -> None:
    del frame
    self.received = signal.Signals(signum).name
    self._restore()
    print(f'\n{self.received} received: stopping after the current round (saving a '
          'checkpoint first); send it again to stop at once.', flush=True)

  def requested(self) -> bool:
    """Whether any process received a signal (all processes agree: a collective)."""
    flag = self.received is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
      self.received = self.received or 'a signal (on another process)' if flag else None
    return flag

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __exit__(self, *exc):
    self._restore()



def open_checkpoints(cfg, workdir: str, state: Any, total: int,
                     cleanup: contextlib.ExitStack, unit: str = 'round'
                     ) -> Tuple[Checkpointer, Any, Dict[str, Any]]:
  """The workdir's checkpointer (closed by `cleanup` on any exit, so the save in
  flight completes) and what to start from. Resume order: the workdir's latest
  readable checkpoint, else the fresh `state` (meta[unit] = 0; unit: 'round' for
  the data-free runner, 'step' for experiments/distill.py)."""
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.log.max_checkpoints,
                      async_save=cfg.log.async_checkpoints)
  cleanup.callback(ckpt.close)
  meta = {unit: 0, 'history': [], 'teacher_accuracy': None}
  restored = ckpt.restore(abstract(state))
  if restored is not None:
    state, meta = restored
    print(f'Resuming {workdir} after {unit} {meta[unit]}/{total}.')
  return ckpt, state, meta


def stop_reason(cfg, stop_signal: StopSignal, done_this_session: int,
                last: bool, unit: str = 'round') -> Optional[str]:
  """Why the run stops here ('signal', 'stop_after_<unit>s'), or None. The end
  of the run never 'stops': the run ends. The limit is config.log.stop_after_<unit>s."""
  signalled = stop_signal.requested()  # a collective: every process asks every time
  if last:
    return None
  if signalled:
    return 'signal'
  limit = cfg.log[f'stop_after_{unit}s']
  if limit and done_this_session >= limit:
    return f'stop_after_{unit}s'
  return None


def stopped(cfg, reason: str, stop_signal: StopSignal, ckpt: Checkpointer, workdir: str,
            done: int, total: int, unit: str = 'round') -> Dict[str, Any]:
  """The message and return value of a clean stop (the checkpoint is saved)."""
  if reason == 'signal':
    print(f'Stopped by {stop_signal.received} after {unit} {done}/{total}; '
          f'checkpoint saved in {ckpt.directory}. Run the same command again to resume.')
    return {f'stopped_at_{unit}': done, 'workdir': os.path.abspath(workdir),
            'signal': stop_signal.received}
  print(f'Stopping after {cfg.log[f"stop_after_{unit}s"]} {unit}(s) as '
        f'log.stop_after_{unit}s asks; run the same command again to continue.')
  return {f'stopped_at_{unit}': done, 'workdir': os.path.abspath(workdir)}

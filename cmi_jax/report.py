"""Metric writer (JSON lines, and TensorBoard), image grids and plots. Process 0
writes; others no-op.

A clu-like interface without clu (whose metric_writers import needs TensorFlow):
`write_scalars(step, mapping)`, `flush`, `close`. Scalars also go to TensorBoard
event files in `<workdir>/tensorboard/` when tensorboardX (the `[tensorboard]`
extra; no TensorFlow needed) is installed; without it a one-line note says so.
"""

import json
import math
import os
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np


# Metric-row fields that are wall-clock readings: everything else in a row is
# reproducible (a resumed run's rows equal an uninterrupted run's without these).
WALL_CLOCK_KEYS = ('time', 'elapsed_s', 'eval_s')


def without_wall_clock(row: Mapping[str, Any]) -> Dict[str, Any]:
  """A metrics row without its WALL_CLOCK_KEYS: what a resumed run must reproduce."""
  return {k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS}


def _to_py(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)):
    return v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
  if hasattr(v, 'shape') and hasattr(v, 'dtype'):  # jax array
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


_TENSORBOARD_NOTE_SHOWN = False


def _summary_writer_class():
  """tensorboardX.SummaryWriter, or None (with a one-line note, once per process)."""
  global _TENSORBOARD_NOTE_SHOWN
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    if not _TENSORBOARD_NOTE_SHOWN:
      _TENSORBOARD_NOTE_SHOWN = True
      print('TensorBoard logging is off: pip install "cmi_jax[tensorboard]" (tensorboardX) '
            'to also write metrics to <workdir>/tensorboard.')
    return None
  return SummaryWriter


def _write_failed(path: str, e: OSError):
  from cmi_jax.errors import WorkdirError  # pylint: disable=g-import-not-at-top
  return WorkdirError(f'Could not write {path} ({e.strerror or e}): free disk space or fix the '
                      'permissions, then run the same command again to resume from the last '
                      'checkpoint.')


class MetricWriter:
  """Appends one JSON object per `write_scalars` call to `workdir/metrics.jsonl`,
  and its finite numbers to TensorBoard (`workdir/tensorboard/`) when
  `tensorboard` and tensorboardX is installed."""

  def __init__(self, workdir: str, enabled: bool = True, filename: str = 'metrics.jsonl',
               tensorboard: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.path = os.path.join(workdir, filename)
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    self._f = None
    self._tb = None
    self._tb_class = None
    self._purge_step = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._f = open(self.path, 'a', encoding='utf-8')
      if tensorboard:
        self._tb_class = _summary_writer_class()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': round(time.time(), 3)}
    row.update({k: _to_py(v) for k, v in scalars.items()})
    try:
      self._f.write(json.dumps(row) + '\n')
      self._f.flush()
    except OSError as e:  # disk full, permissions: the user's to fix (a torn line is dropped)
      raise _write_failed(self.path, e) from e
    if self._tb_class is not None:
      if self._tb is None:  # lazily, so that a resume can purge the crashed run's steps
        # A unique suffix: two sessions within a second must not share one event file.
        self._tb = self._tb_class(self.tensorboard_dir, purge_step=self._purge_step,
                                  filename_suffix=f'.{time.time_ns()}')
      for k, v in row.items():
        if (k not in ('step', 'time') and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)):
          self._tb.add_scalar(k, v, global_step=int(step))

  def truncate_after(self, step: int) -> None:
    """Drops rows with step > `step` (written by a run that crashed after its
    last checkpoint), so a resumed run's log has each step once."""
    if not self.enabled:
      return
    self._purge_step = step + 1  # TensorBoard hides the crashed run's events from here on
    if not os.path.exists(self.path):
      return
    rows = read_metrics(self.path)
    keep = [r for r in rows if r.get('step', 0) <= step]
    with open(self.path, 'rb') as f:  # a line cut short by a kill: rewrite without it
      size = f.seek(0, os.SEEK_END)
      torn = size > 0 and f.seek(size - 1) >= 0 and f.read(1) != b'\n'
    if len(keep) != len(rows) or torn:
      self._f.close()
      tmp = self.path + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)
      os.replace(tmp, self.path)
      self._f = open(self.path, 'a', encoding='utf-8')

  def write_json(self, name: str, obj: Mapping[str, Any]) -> str:
    """Writes workdir/name (e.g. config.json, summary.json) atomically."""
    path = os.path.join(self.workdir, name)
    if self.enabled:
      tmp = path + '.tmp'
      try:
        with open(tmp, 'w', encoding='utf-8') as f:
          json.dump({k: _to_py(v) for k, v in obj.items()}, f, indent=2, sort_keys=True,
                    default=str)
        os.replace(tmp, path)
      except OSError as e:  # the previous file stays whole (written aside, then renamed)
        raise _write_failed(path, e) from e
    return path

  def flush(self) -> None:
    if self._f:
      self._f.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._f:
      self._f.close()
      self._f = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str) -> list:
  """Reads a metrics.jsonl file back as a list of dicts. A last line cut short
  (the process was killed while writing it) is dropped; damage elsewhere raises."""
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i + 1 < len(lines) or line.endswith('\n'):
        raise ValueError(f'{path}: line {i + 1} is not JSON ({line[:80]!r}); the file is '
                         'damaged: delete that line (or the file, to restart the log).') from None
  return rows


def class_grid(images: np.ndarray, targets: np.ndarray, num_classes: int,
               per_row: int = 10, pad: int = 1) -> np.ndarray:
  """A uint8 image grid with one row per class (first `per_row` images of each).

  images: [N, H, W, C] uint8 or float in [0, 1]; targets: [N] class ids.
  Rows of classes with fewer images are left black. Returns [rows*(H+pad)+pad,
  per_row*(W+pad)+pad, C] uint8.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
  _, h, w, c = images.shape
  grid = np.zeros((num_classes * (h + pad) + pad, per_row * (w + pad) + pad, c), np.uint8)
  targets = np.asarray(targets)
  for k in range(num_classes):
    for j, i in enumerate(np.flatnonzero(targets == k)[:per_row]):
      y, x = pad + k * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> str:
  """Writes an [H, W, C] uint8 array (C = 1 or 3) as PNG, optionally upscaled."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = np.asarray(image)
  if scale > 1:
    img = img.repeat(scale, axis=0).repeat(scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
  return path


def plot_metrics(rows: Sequence[Dict[str, Any]], path: str,
                 groups: Mapping[str, Sequence[str]], xlabel: str) -> Optional[str]:
  """One subplot per group of metric keys, against the row's 'step', labelled
  `xlabel` (what the step counts: the runner writes one row per synthesis round).
  Keys absent from every row are skipped; returns the path, or None if nothing to plot."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = []
  for title, keys in groups.items():
    series = []
    for key in keys:
      pts = [(r['step'], r[key]) for r in rows if key in r and r[key] is not None
             and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
      if pts:
        series.append((key, pts))
    if series:
      panels.append((title, series))
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
  for ax, (title, series) in zip(axes[0], panels):
    for key, pts in series:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, label=key, marker='.' if len(xs) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path

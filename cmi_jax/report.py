"""Metric writer (JSON lines), image grids and plots. Process 0 writes; others no-op.

A clu-like interface without clu (whose metric_writers import needs TensorFlow):
`write_scalars(step, mapping)`, `write_images(step, name, grid)`, `flush`, `close`.
"""

import json
import math
import os
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np


def _to_py(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)):
    return v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
  if hasattr(v, 'shape') and hasattr(v, 'dtype'):  # jax array
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


class MetricWriter:
  """Appends one JSON object per `write_scalars` call to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True, filename: str = 'metrics.jsonl'):
    self.workdir = workdir
    self.enabled = enabled
    self.path = os.path.join(workdir, filename)
    self._f = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._f = open(self.path, 'a', encoding='utf-8')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': round(time.time(), 3)}
    row.update({k: _to_py(v) for k, v in scalars.items()})
    self._f.write(json.dumps(row) + '\n')
    self._f.flush()

  def write_json(self, name: str, obj: Mapping[str, Any]) -> str:
    """Writes workdir/name (e.g. config.json, summary.json) atomically."""
    path = os.path.join(self.workdir, name)
    if self.enabled:
      tmp = path + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump({k: _to_py(v) for k, v in obj.items()}, f, indent=2, sort_keys=True,
                  default=str)
      os.replace(tmp, path)
    return path

  def flush(self) -> None:
    if self._f:
      self._f.flush()

  def close(self) -> None:
    if self._f:
      self._f.close()
      self._f = None


def read_metrics(path: str) -> list:
  """Reads a metrics.jsonl file back as a list of dicts."""
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]

"""What keeps a run from being lost or silently mixed up (issue 13): the checks
before anything compiles, the non-finite-round retries, and the phase hook that
the fault-injection benchmark watches.

* `check_workdir`: the workdir must be writable (probed with a real file).
* `check_resume`: a workdir holding a checkpoint is continued only by the same
  run: the config (except `SAFE_ON_RESUME`) and the teacher's content hash
  must match `fingerprint.json`, written beside the checkpoints. A mismatch is
  refused with the list of differing fields; `--config.faults.allow_config_change=True`
  continues anyway (with a warning listing them).
* `run_round`: calls a synthesis round and, while its `best_loss` is not finite,
  retries it with a fresh key (`faults.round_retries` times); the algorithms
  guarantee a non-finite round writes nothing to the bank, pool or head.
* `phase`: with CMI_JAX_PHASE_FILE set, the runner writes its current phase and
  round there (benchmarks/fault_injection.py aims and labels its kills with it).
"""

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
from absl import logging

from cmi_jax import teacher_io
from cmi_jax.errors import WorkdirError

FINGERPRINT = 'fingerprint.json'
PHASE_ENV = 'CMI_JAX_PHASE_FILE'

# Fields that may change when a run is resumed, and why that is safe. Everything
# else must match the saved run (fields the saved config lacks, added by a newer
# version of the code, are not compared).
SAFE_ON_RESUME = {
    'kd.epochs': 'may grow: the run goes on for more epochs (the cosine schedule is '
                 'recomputed for the new length); shrinking it is refused',
    'log.*': 'logging, grid and checkpoint cadence, log.stop_after_rounds',
    'faults.*': 'this section (retries of non-finite rounds, this override)',
    'data.dir': 'where the test split is read from',
    'data.backend': 'how the test split is read',
    'data.eval_batch_size': 'evaluation batch size (same examples, same accuracy)',
    'mesh.*': 'device count and multi-host switch (the checkpoint restores onto any mesh)',
    'runtime.*': "XLA settings (speed only; XLA's float order may differ)",
    'teacher.checkpoint': "the teacher's path (its content hash is compared instead)",
    'kd.init_pool': "the init set's path (its content hash is compared instead)",
    'kd.pool_mode': 'where the image pool lives (a checkpoint restores into either)',
    'data.transfer': "the transfer set's path (its content hash is compared instead)",
}
NO_INPUT = 'none'  # the content hash of an input a run does not use (an empty path)


def _safe(field: str, old: Any, new: Any) -> bool:
  if field == 'kd.epochs':
    return new >= old
  if field == 'log.pool_checkpoint':  # another checkpoint layout: not readable as the other
    return False
  return any(field == k or (k.endswith('.*') and field.startswith(k[:-1]))
             for k in SAFE_ON_RESUME)


def _flatten(d: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def config_changes(saved: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """'field: saved -> new' for every field of `saved` that `new` changes and
  `SAFE_ON_RESUME` does not allow."""
  a, b = _flatten(saved), _flatten(json.loads(json.dumps(new, default=str)))
  return [f'{k}: {a[k]!r} -> {b[k]!r}' for k in sorted(a)
          if k in b and a[k] != b[k] and not _safe(k, a[k], b[k])]


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and writes a probe file into it; a clear error otherwise."""
  probe = os.path.join(workdir, f'.write_probe_{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'The workdir {os.path.abspath(workdir)} is not writable '
                       f'({type(e).__name__}: {e.strerror or e}): choose another --workdir, or '
                       'fix its permissions / free space.') from None


def teacher_hash(checkpoint: str) -> str:
  """The teacher's content hash ('random' for the smoke-test teacher)."""
  return checkpoint if checkpoint == 'random' else teacher_io.content_hash(checkpoint)


def has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def input_hash(path: str) -> str:
  """The content hash of a data input given by path (`kd.init_pool`,
  `data.transfer`): NO_INPUT for '', 'dataset <name>' for a dataset name."""
  if not path:
    return NO_INPUT
  return teacher_io.content_hash(path) if os.path.exists(path) else f'dataset {path}'


def check_resume(cfg, workdir: str, teacher_sha: str, write: bool = True,
                 inputs: Optional[Dict[str, str]] = None) -> None:
  """Refuses to continue a workdir's checkpoint with another config, teacher or
  input data; then records this run's fingerprint (config + content hashes).

  inputs: config field -> content hash (`input_hash`) of the data it names, e.g.
  {'kd.init_pool': ...}; compared like the teacher's (a fingerprint without a
  field's hash counts as NO_INPUT)."""
  path = os.path.join(workdir, FINGERPRINT)
  new = cfg.to_dict()
  if has_checkpoint(workdir):
    saved = None
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        saved = json.load(f)
    elif os.path.exists(os.path.join(workdir, 'config.json')):  # a run from before fingerprints
      with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
        saved = {'config': json.load(f), 'teacher_sha256': None}
    if saved is not None:
      diffs = config_changes(saved['config'], new)
      old_sha = saved.get('teacher_sha256')
      if old_sha is not None and old_sha != teacher_sha:
        diffs.append(f'teacher content (SHA-256 of {cfg.teacher.checkpoint}): '
                     f'{old_sha[:12]}... -> {teacher_sha[:12]}...')
      saved_inputs = saved.get('input_sha256') or {}
      for field, sha in sorted((inputs or {}).items()):
        old = saved_inputs.get(field, NO_INPUT)
        if old != sha:
          diffs.append(f'{field} content (SHA-256 of {_field(cfg, field) or "nothing"}): '
                       f'{old[:16]}... -> {sha[:16]}...')
      if diffs:
        what = (f'The workdir {os.path.abspath(workdir)} holds a run with another setting: '
                + '; '.join(diffs) + '.')
        if not cfg.faults.allow_config_change:
          raise WorkdirError(
              f'{what} Continuing it would mix the two. Choose another --workdir for the new '
              'run, re-run with the saved setting, or continue anyway with '
              '--config.faults.allow_config_change=True. (Fields that may change on resume: '
              f'{", ".join(sorted(SAFE_ON_RESUME))}.)')
        logging.warning('%s Continuing as faults.allow_config_change=True asks.', what)
        print(f'Warning: {what} Continuing as faults.allow_config_change=True asks.')
  if write:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'config': new, 'teacher_sha256': teacher_sha,
                 'teacher_checkpoint': cfg.teacher.checkpoint,
                 'input_sha256': dict(inputs or {})}, f, indent=2, sort_keys=True,
                default=str)
    os.replace(tmp, path)


def _field(cfg, dotted: str) -> Any:
  for part in dotted.split('.'):
    cfg = cfg[part]
  return cfg


def is_finite_round(metrics: Dict[str, Any]) -> bool:
  """A round is good unless it reports a non-finite `best_loss` (rounds without
  that metric, e.g. the GAN baselines' generator steps, count as good)."""
  v = metrics.get('best_loss') if isinstance(metrics, dict) else None
  return v is None or bool(np.all(np.isfinite(np.asarray(v))))


def run_round(call: Callable[[Any, jax.Array], Tuple[Any, Any]], state: Any, key: jax.Array,
              retries: int, metrics_of: Callable[[Any], Dict[str, Any]], label: str
              ) -> Tuple[Any, Any, int, bool]:
  """`call(state, key)` -> (state, out); while `metrics_of(out)` is not finite,
  retries with key fold_in(key, attempt) up to `retries` times. The first
  attempt uses `key` itself, so a run without faults is unchanged.

  Returns (state, out, retries used, finite). A round that stays non-finite is
  skipped with a warning: its iterates never reached the bank or pool (the
  round functions write nothing when their best loss is non-finite).
  """
  for attempt in range(retries + 1):
    state, out = call(state, key if attempt == 0 else jax.random.fold_in(key, attempt))
    if is_finite_round(metrics_of(out)):
      if attempt:
        print(f'{label}: non-finite synthesis, succeeded on retry {attempt} with a fresh key.')
      return state, out, attempt, True
  msg = (f'{label}: synthesis stayed non-finite after {retries} retries; the round is skipped '
         '(nothing reached the bank, pool or student). A teacher that returns NaN/inf for '
         'some inputs causes this; faults.round_retries sets the retries.')
  logging.warning(msg)
  print(f'Warning: {msg}')
  return state, out, retries, False


def fault_counts(metrics_path: str) -> Dict[str, Any]:
  """Summary fields from metrics.jsonl: retried and skipped synthesis rounds."""
  if not os.path.exists(metrics_path):
    return {}
  from cmi_jax import report  # pylint: disable=g-import-not-at-top
  rows = report.read_metrics(metrics_path)
  return {'synthesis_retries': int(sum(r.get('synthesis_retries', 0) for r in rows)),
          'skipped_rounds': [r['round'] for r in rows if r.get('synthesis_skipped')]}


_phase_fd: Optional[int] = None


def phase(name: str, round_: int = 0) -> None:
  """Records the runner's phase for benchmarks/fault_injection.py (no-op unless
  CMI_JAX_PHASE_FILE is set): one line 'name round time', overwritten in place."""
  global _phase_fd
  path = os.environ.get(PHASE_ENV)
  if not path:
    return
  if _phase_fd is None:
    _phase_fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
  line = f'{name} {round_} {time.time():.6f}'.ljust(64) + '\n'
  os.pwrite(_phase_fd, line.encode(), 0)

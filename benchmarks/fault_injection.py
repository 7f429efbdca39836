"""kill -9 loop (issue 13): a small run killed with SIGKILL N times at chosen moments,
re-run with the same command after each kill, must end bit-identical to an
uninterrupted run of the same command.

  flock -x /tmp/cmi_cpu.lock python -m benchmarks.fault_injection            # 20 kills
  python -m benchmarks.fault_injection --kills=3 --epochs=2 --out=''         # quick look

Every launch runs a snapshot of the code taken at the start (the checkout may be
edited meanwhile). The run is configs/fashion_mnist.py:quick (the shipped teacher,
batch 8, 2 generator and 2 KD steps per round) with 3 rounds per epoch, a
checkpoint every 2 rounds and
asynchronous checkpoints (so kills land between checkpoints, inside the blocking
part of a save, and inside a background write). The runner writes its phase and
round to $CMI_JAX_PHASE_FILE (experiments/guard.py: phase); kill k aims at a phase
(cycling over synthesis, kd, eval, log, checkpoint, the background checkpoint
write, and setup: startup and restore) at a round that grows with k, so the kills
spread over the whole run. A kill counts as inside a checkpoint write when an
orbax temporary folder (`*.orbax-checkpoint-tmp*`) that this launch created is
still there after the process died: a write it interrupted.

At the end it compares, with the uninterrupted run: every array of the final
checkpoint (student, generator head, bank, pool), metrics.jsonl row by row, and
summary.json, excluding the wall-clock fields (metrics: time, elapsed_s, eval_s;
summary: seconds_this_session) and the workdir's own path. It prints and writes
benchmarks/results/fault_injection.json.
"""

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from cmi_jax.report import WALL_CLOCK_KEYS as WALL_CLOCK_ROW, without_wall_clock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALL_CLOCK_SUMMARY = ('seconds_this_session',)
TARGETS = ('synthesis', 'kd', 'checkpoint_write', 'eval', 'log', 'checkpoint', 'setup')
TMP_MARK = '.orbax-checkpoint-tmp'


def command(workdir: str, epochs: int, rounds_per_epoch: int, every: int) -> List[str]:
  kd_steps = 2  # the :quick value
  return [sys.executable, '-m', 'experiments.run', '--config=configs/fashion_mnist.py:quick',
          f'--config.kd.epochs={epochs}', f'--config.kd.ep_steps={rounds_per_epoch * kd_steps}',
          f'--config.log.checkpoint_every_rounds={every}', '--config.log.async_checkpoints=True',
          '--config.log.max_checkpoints=2', f'--workdir={workdir}']


SNAPSHOT = ('cmi_jax', 'experiments', 'configs', 'teachers')


def snapshot(dest: str) -> str:
  """Copies the code the runs import into `dest`: every launch runs the same code,
  even while the checkout is being edited (one edit between two launches makes
  them trace different programs, which is not what this benchmark measures)."""
  shutil.rmtree(dest, ignore_errors=True)
  for name in SNAPSHOT:
    shutil.copytree(os.path.join(ROOT, name), os.path.join(dest, name),
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  return dest


def environment(src: str, cache_dir: str, phase_file: str, fast_compile: bool
                ) -> Dict[str, str]:
  """Every launch shares a persistent compilation cache (a restart loads its
  programs instead of compiling them); fast_compile turns XLA's slow
  optimizations off (the test suite's setting; the same for every launch)."""
  env = dict(os.environ)
  env.update(PYTHONPATH=src, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', JAX_PLATFORMS='cpu',
             CMI_JAX_PHASE_FILE=phase_file)
  env.pop('XLA_FLAGS', None)  # one CPU device, whatever the caller set (tests: 4 fake ones)
  if fast_compile:
    env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
  return env


def read_phase(path: str):
  """(phase, round) the runner last wrote, or ('startup', 0) before it wrote any."""
  try:
    with open(path, encoding='utf-8') as f:
      parts = f.read().split()
    return parts[0], int(parts[1])
  except (OSError, IndexError, ValueError):
    return 'startup', 0


def tmp_entries(ckpt_dir: str) -> Dict[str, float]:
  """orbax temporary folders (a save in flight or interrupted) -> mtime."""
  if not os.path.isdir(ckpt_dir):
    return {}
  out = {}
  for n in os.listdir(ckpt_dir):
    if TMP_MARK in n:
      try:
        out[n] = os.path.getmtime(os.path.join(ckpt_dir, n))
      except OSError:
        pass
  return out


def _due(target: str, round_: int, phase: str, r: int, ckpt_dir: str) -> bool:
  if target == 'setup':
    return phase in ('setup', 'compile')
  if target == 'checkpoint_write':
    return r >= round_ and bool(tmp_entries(ckpt_dir))
  return phase == target and r >= round_


def launch(cmd, env, cwd, log_path, phase_file, target: Optional[str], round_: int, ckpt_dir: str,
           rng: random.Random, timeout_s: float) -> Dict[str, Any]:
  """Runs `cmd`; with a target, SIGKILLs it once the target phase (at or after
  `round_`) is reached, after a random delay. Returns what happened."""
  with open(phase_file, 'w', encoding='utf-8'):
    pass  # empty: 'startup' until the runner writes
  before = tmp_entries(ckpt_dir)
  t0 = time.time()
  with open(log_path, 'a', encoding='utf-8') as log:
    log.write(f'\n=== launch (target {target} round {round_})\n')
    log.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    killed = None
    while proc.poll() is None:
      if time.time() - t0 > timeout_s:
        proc.kill()
        raise RuntimeError(f'launch ran over {timeout_s} s; see {log_path}')
      if target is not None:
        phase, r = read_phase(phase_file)
        if _due(target, round_, phase, r, ckpt_dir):
          # A random moment inside the phase: writes are short, so kill them at once.
          delay = 0.0 if target == 'checkpoint_write' else rng.uniform(0.0, 0.3)
          time.sleep(delay)
          phase, r = read_phase(phase_file)
          if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed = {'phase': phase, 'round': r, 'delay_s': round(delay, 3)}
          break
      time.sleep(0.002)
    rc = proc.wait()
  if killed is not None:
    after = tmp_entries(ckpt_dir)
    # A temporary folder this launch created or wrote into, left behind by the kill.
    killed['in_checkpoint_write'] = any(n not in before or m > before[n] for n, m in
                                        after.items() if m >= t0 - 1)
  return {'rc': rc, 'killed': killed, 'seconds': time.time() - t0}


def _rows(workdir: str) -> List[Dict[str, Any]]:
  from cmi_jax import report  # pylint: disable=g-import-not-at-top
  return report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def _summary(workdir: str) -> Dict[str, Any]:
  with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
    text = f.read().replace(os.path.abspath(workdir), '<workdir>')
  return {k: v for k, v in json.loads(text).items() if k not in WALL_CLOCK_SUMMARY}


def compare(ref: str, run: str) -> Dict[str, Any]:
  """Bit-identity of the final checkpoint, metric rows and summary of two workdirs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_checkpoint  # pylint: disable=g-import-not-at-top
  (sa, ma), (sb, mb) = load_checkpoint(ref), load_checkpoint(run)
  la, ta = jax.tree_util.tree_flatten_with_path(sa)
  lb, tb = jax.tree_util.tree_flatten_with_path(sb)
  diff_arrays = [jax.tree_util.keystr(p) for (p, a), (_, b) in zip(la, lb)
                 if a.dtype != b.dtype or not np.array_equal(a, b)]
  state_same = ta == tb and not diff_arrays
  ra, rb = _rows(ref), _rows(run)
  counts = collections.Counter(r['step'] for r in rb)
  expected = {r['step'] for r in ra}
  lost = sorted(expected - set(counts))
  duplicated = sorted(s for s, c in counts.items() if c > 1)
  rows_same = [json.dumps(without_wall_clock(r), sort_keys=True) for r in ra] == \
      [json.dumps(without_wall_clock(r), sort_keys=True) for r in rb]
  summary_same = _summary(ref) == _summary(run)
  return {'state_identical': bool(state_same), 'arrays_compared': len(la),
          'arrays_differing': diff_arrays[:10], 'meta_identical': ma == mb,
          'metrics_identical': rows_same, 'metric_rows': len(rb), 'rows_lost': len(lost),
          'rows_duplicated': len(duplicated), 'lost_steps': lost,
          'duplicated_steps': duplicated, 'summary_identical': summary_same}


def _code_version() -> str:
  """The commit the snapshot was taken from (+ 'with local edits' when the tree differs)."""
  try:
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--', *SNAPSHOT], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    return head + (' with local edits' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main(argv=None) -> Dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--kills', type=int, default=20)
  p.add_argument('--targets', default=','.join(TARGETS),
                 help=f'comma list, cycled over the kills (default: all of {TARGETS})')
  p.add_argument('--epochs', type=int, default=6)
  p.add_argument('--rounds_per_epoch', type=int, default=3)
  p.add_argument('--checkpoint_every', type=int, default=2)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--root', default='/tmp/cmi_fault_injection', help='workdirs and cache')
  p.add_argument('--cache', default='', help='compilation cache folder (default <root>/jax_cache)')
  p.add_argument('--fast_compile', action='store_true', help="XLA's slow optimizations off")
  p.add_argument('--timeout_s', type=float, default=300.0, help='per launch')
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                               'fault_injection.json'),
                 help="result JSON ('' to skip writing)")
  a = p.parse_args(argv)
  rng = random.Random(a.seed)
  ref_dir, run_dir = os.path.join(a.root, 'reference'), os.path.join(a.root, 'killed')
  for d in (ref_dir, run_dir):
    shutil.rmtree(d, ignore_errors=True)
  os.makedirs(a.root, exist_ok=True)
  for name in ('reference.log', 'killed.log'):
    if os.path.exists(os.path.join(a.root, name)):
      os.remove(os.path.join(a.root, name))
  cache = a.cache or os.path.join(a.root, 'jax_cache')
  phase_file = os.path.join(a.root, 'phase')
  src = snapshot(os.path.join(a.root, 'src'))
  env = environment(src, cache, phase_file, a.fast_compile)
  total_rounds = a.epochs * a.rounds_per_epoch
  ckpt_dir = os.path.join(run_dir, 'checkpoints')
  t_start = time.time()

  ref = launch(command(ref_dir, a.epochs, a.rounds_per_epoch, a.checkpoint_every), env, src,
               os.path.join(a.root, 'reference.log'), phase_file, None, 0, '', rng, a.timeout_s)
  if ref['rc'] != 0:
    raise SystemExit(f'the uninterrupted run failed (rc {ref["rc"]}); see {a.root}/reference.log')
  print(f'uninterrupted run: {ref["seconds"]:.1f} s ({total_rounds} rounds)', flush=True)

  cmd = command(run_dir, a.epochs, a.rounds_per_epoch, a.checkpoint_every)
  log_path = os.path.join(a.root, 'killed.log')
  kills, launches, completed = [], 0, False
  targets = [t for t in a.targets.split(',') if t]
  unknown = sorted(set(targets) - set(TARGETS))
  if unknown or not targets:
    raise SystemExit(f'--targets: unknown {unknown or "(empty)"}; choose from {TARGETS}')
  for k in range(a.kills):
    target = targets[k % len(targets)]
    round_ = 1 + (k * total_rounds) // a.kills  # kills spread over the whole run
    out = launch(cmd, env, src, log_path, phase_file, target, round_, ckpt_dir, rng, a.timeout_s)
    launches += 1
    if out['killed'] is None:  # finished before its moment came
      if out['rc'] != 0:
        raise SystemExit(f'launch {launches} failed with rc {out["rc"]}; see {log_path}')
      completed = True
      print(f'launch {launches}: completed before its kill ({target} at round {round_})')
      break
    kills.append(dict(out['killed'], target=target, target_round=round_,
                      seconds=round(out['seconds'], 2)))
    kk = kills[-1]
    print(f'kill {len(kills)}: {target} (round >= {round_}) -> killed in {kk["phase"]} of '
          f'round {kk["round"]}{", inside a checkpoint write" if kk["in_checkpoint_write"] else ""}'
          f' after {kk["seconds"]:.1f} s', flush=True)
  if not completed:
    out = launch(cmd, env, src, log_path, phase_file, None, 0, ckpt_dir, rng, a.timeout_s)
    launches += 1
    if out['rc'] != 0:
      raise SystemExit(f'the final launch failed with rc {out["rc"]}; see {log_path}')
  result = compare(ref_dir, run_dir)
  identical = (result['state_identical'] and result['meta_identical'] and
               result['metrics_identical'] and result['summary_identical'])
  phases = collections.Counter(k['phase'] for k in kills)
  with open(log_path, encoding='utf-8') as f:
    log_text = f.read()
  from benchmarks.common import machine_info, write_result  # pylint: disable=g-import-not-at-top
  report = {
      'config': ' '.join(cmd[2:-1]), 'rounds': total_rounds,
      'checkpoint_every_rounds': a.checkpoint_every, 'async_checkpoints': True,
      'kills': len(kills), 'resumes': launches - 1 if kills else 0, 'launches': launches,
      # launches that found a checkpoint (the others were killed before the first one)
      'resumed_from_checkpoint': log_text.count('Resuming '),
      # complete checkpoints that did not read back (a kill must never cause one)
      'damaged_checkpoints_seen': log_text.count('unreadable, set aside'),
      'kills_per_phase': dict(sorted(phases.items())),
      'kills_inside_checkpoint_write': sum(k['in_checkpoint_write'] for k in kills),
      'identical_at_end': 'yes' if identical else 'no', **result,
      'excluded_wall_clock_fields': {'metrics.jsonl': list(WALL_CLOCK_ROW),
                                     'summary.json': list(WALL_CLOCK_SUMMARY) + ['workdir path']},
      'uninterrupted_seconds': round(ref['seconds'], 1),
      'seconds_total': round(time.time() - t_start, 1), 'kill_log': kills,
      'seed': a.seed, 'fast_compile': a.fast_compile, 'code': _code_version(),
      'machine': machine_info(),
  }
  print(json.dumps({k: v for k, v in report.items() if k not in ('kill_log', 'machine')},
                   indent=1))
  if a.out:
    write_result(a.out, report)
  return report


if __name__ == '__main__':
  main()

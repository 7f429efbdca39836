"""A real multi-process (multi-host) run on one machine (issue 7): two processes
joined by `jax.distributed` (gloo collectives on CPU), one CPU device each,
driven by the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
environment that `parallel.maybe_initialize_distributed` reads.

Against one process with 2 devices (the same global mesh), from the same seed:
the same losses and accuracies, the same final student, only one writer of the
shared workdir; and the two-process run resumes from its own checkpoint.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cmi_jax import report
from tests.helpers import ROOT, load_checkpoint, subprocess_env

TEACHER = os.path.join(ROOT, 'teachers', 'fashion_mnist_wrn_16_2')
ARGS = ['--config=configs/fashion_mnist.py:quick', f'--config.teacher.checkpoint={TEACHER}',
        '--config.synthesis.pool_size=24', '--config.synthesis.bank_size=24']
TIMEOUT = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(workdir, cache_dir, processes: int, devices_per_process: int, *extra):
  """Starts `processes` copies of experiments.run on one coordinator; returns
  their (returncode, stdout, stderr)."""
  port = _free_port()
  procs = []
  for pid in range(processes):
    env = subprocess_env(cache_dir, XLA_FLAGS=(
        f'--xla_force_host_platform_device_count={devices_per_process}'))
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
                 JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'experiments.run', *ARGS, *extra, f'--workdir={workdir}'],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((p.returncode, stdout, stderr))
  return out


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path, cache_dir):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  [(rc, out, err)] = _launch(one, cache_dir, 1, 2)
  assert rc == 0, err[-3000:]

  # Two processes, stopped after round 1, then the same command again.
  first = _launch(two, cache_dir, 2, 1, '--config.log.stop_after_rounds=1')
  for rc, out, err in first:
    assert rc == 0, err[-3000:]
    assert 'Stopping after 1 round' in out
  assert [r['round'] for r in _rows(two)] == [1]
  second = _launch(two, cache_dir, 2, 1)
  for rc, out, err in second:
    assert rc == 0, err[-3000:]
    assert 'Resuming' in out and 'Done in' in out

  ref, got = _rows(one), _rows(two)
  assert [r['round'] for r in got] == [r['round'] for r in ref] == [1, 2]  # one writer
  for r_ref, r_got in zip(ref, got):
    assert r_got.keys() == r_ref.keys()
    for key in r_ref.keys() - set(report.WALL_CLOCK_KEYS):  # every loss term, diagnostic, accuracy
      np.testing.assert_allclose(r_got[key], r_ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
  with open(os.path.join(two, 'summary.json'), encoding='utf-8') as f:
    summary = json.load(f)
  with open(os.path.join(one, 'summary.json'), encoding='utf-8') as f:
    assert summary['teacher_accuracy'] == json.load(f)['teacher_accuracy']
  (state1, meta1), (state2, meta2) = load_checkpoint(one), load_checkpoint(two)
  assert meta1['round'] == meta2['round'] == 2
  p1, p2 = state1['student']['params'], state2['student']['params']
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)

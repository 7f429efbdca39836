"""Issue 11, item 8: benchmarks/gpu_check.py. Its import check names missing packages
and the fix; its `--smoke` mode (tiny shapes, the :quick config) runs every stage on
the CPU, from the repository folder, and writes the JSON."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from tests.helpers import ROOT, subprocess_env


def test_missing_package_is_named(monkeypatch):
  monkeypatch.setattr(gpu_check, 'REQUIRED', {'numpy': 'numpy',
                                              'no_such_module_xyz': 'no-such-wheel'})
  with pytest.raises(SystemExit) as e:
    gpu_check.check_imports()
  msg = str(e.value)
  assert 'missing package(s)' in msg and 'no_such_module_xyz' in msg
  assert 'pip install no-such-wheel' in msg and 'numpy' not in msg.split('pip install')[1]


def test_required_imports_present():
  versions = gpu_check.check_imports()
  assert set(versions) == set(gpu_check.REQUIRED)


def test_run_command_outcome(tmp_path):
  """The stage runner reports a failing command's exit status and last lines (a config
  typo fails before anything compiles)."""
  res = gpu_check.run_command(['--config=configs/fashion_mnist.py:quick', '--config.kd.epoch=1'],
                              str(tmp_path / 'w'), budget_s=120)
  assert res['returncode'] != 0 and not res['stopped_at_budget']
  assert any('Did you mean "epochs"' in l for l in res['last_lines'])
  assert res['rounds_done'] == 0 and res['best_student_accuracy'] is None


@pytest.mark.slow
def test_smoke_runs_every_stage(tmp_path, cache_dir):
  """~1.5 min on an idle 2-core CPU (compiles the speed table's programs)."""
  out = tmp_path / 'gpu_check.json'
  # Started from another folder by path: the script imports the repository itself.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--smoke',
       '--budget_s=400', f'--out={out}', f'--workdir={tmp_path / "w"}'],
      cwd=str(tmp_path), env=subprocess_env(cache_dir), capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  assert result['device'] == 'cpu' and result['smoke']
  speed = result['stages']['speed']
  assert [(r['teacher'], r['dtype']) for r in speed] == [('wrn_16_2', 'float32'),
                                                         ('wrn_16_2', 'bfloat16')]
  for r in speed:
    assert r['synthesis_iteration_ms'] > 0 and r['kd_step_ms'] > 0
  main = result['stages']['main_command']
  assert main['returncode'] == 0 and main['epochs_done'] == 1
  assert main['last_lines'][-1].startswith('Done in')
  assert main['teacher_accuracy'] > 80  # the shipped teacher on the shipped test split
  full = result['stages']['full']
  # :quick is 2 epochs of 1 round; on a busy machine the budget's SIGTERM may stop it
  # cleanly after the first (exit status 0, a checkpoint, the resume command).
  assert full['returncode'] == 0 and full['rounds_done'] in (1, 2)
  if full['rounds_done'] == 1:
    assert full['stopped_at_budget']
    assert any(l.startswith('Stopped by SIGTERM after round 1/2') for l in full['last_lines'])
    assert any('Resume with the same command' in l for l in full['last_lines'])
  with open(tmp_path / 'w' / 'full' / 'metrics.jsonl') as f:
    rows = [json.loads(l) for l in f]
  assert full['best_student_accuracy'] == max(r['student_accuracy'] for r in rows)
  assert full['epochs_done'] == sum('epoch' in r for r in rows) == full['rounds_done']

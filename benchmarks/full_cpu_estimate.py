"""What `configs/fashion_mnist.py:full` would take on this CPU, from measured step times.

  python -m benchmarks.full_cpu_estimate

Times one synthesis iteration (wrn_16_2 -> wrn_16_1, 28x28x1, batch 256, ngf 64) and one
KD step (batch 128) with benchmarks/gpu_check.speed_row, and multiplies out the schedule:
60 rounds x (200 iterations + 400 KD steps); evaluation and checkpoints are negligible
beside that. When the machine is shared, the measured rates are also scaled to an idle
machine by the ratio of this run's iteration time to the idle one recorded in
benchmarks/results/synthesis_speed.json (28x28x1, B=256). Writes
benchmarks/results/full_cpu_estimate.json.
"""

import json
import os
import time

from benchmarks.common import RESULTS, machine_info, write_result
from benchmarks.gpu_check import speed_row

G_STEPS, KD_STEPS, ROUNDS = 200, 400, 60


def estimate(row: dict, idle_iteration_s=None) -> dict:
  """Hours of the :full schedule at the row's rates (and at idle rates, when given)."""
  it, kd = row['synthesis_iteration_ms'] / 1e3, row['kd_step_ms'] / 1e3
  out = {'seconds_per_round': G_STEPS * it + KD_STEPS * kd}
  out['hours'] = ROUNDS * out['seconds_per_round'] / 3600
  if idle_iteration_s:
    slowdown = it / idle_iteration_s
    idle_round = G_STEPS * idle_iteration_s + KD_STEPS * kd / slowdown
    out.update(idle_iteration_s=idle_iteration_s, slowdown_vs_idle=slowdown,
               idle_kd_step_s=kd / slowdown, idle_seconds_per_round=idle_round,
               idle_hours=ROUNDS * idle_round / 3600)
  return out


def idle_iteration_s():
  """The 28x28x1, B=256 iteration of benchmarks/results/synthesis_speed.json, if any."""
  try:
    with open(os.path.join(RESULTS, 'synthesis_speed.json'), encoding='utf-8') as f:
      rows = json.load(f)['rows']
  except (OSError, KeyError, ValueError):
    return None
  for r in rows:
    if r.get('image_shape') == [28, 28, 1] and r.get('batch_size') == 256:
      return r['iteration_s']
  return None


def main():
  t = time.time()
  row = speed_row('wrn_16_2', 'float32', batch=256, g_steps=3, kd_steps=5, shape=(28, 28, 1),
                  repeats=2, kd_batch=128)
  row.update(estimate(row, idle_iteration_s()), rounds=ROUNDS, machine=machine_info(),
             load_average_1_5_15min=list(os.getloadavg()), wall_s=time.time() - t)
  print(json.dumps(row, indent=1))
  write_result(os.path.join(RESULTS, 'full_cpu_estimate.json'), row)


if __name__ == '__main__':
  main()

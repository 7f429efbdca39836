"""CPU-scale method comparison: data-free KD on Fashion-MNIST, shipped teacher.

  python -m benchmarks.fmnist_methods                       # cmi + ablations (~9 min each)
  python -m benchmarks.fmnist_methods --methods=cmi,deepinv --equal_budget
  python -m benchmarks.fmnist_methods --methods=cmi,cmi_no_contrast,dfq:0,deepinv@40:0 --seeds=0,1,2

Runs `experiments.run` with configs/fashion_mnist.py for each method and seed
(same student, same number of rounds and KD steps) and writes the final / best
student accuracy and wall time of every run, and their mean and standard
deviation over seeds per method, to benchmarks/results/fmnist_methods.json.
A method spec is `method[@g_steps][:seed+seed...]`: `@N` sets that method's
synthesis g_steps, `:S` its seeds (default --seeds). With --equal_budget every
method gets the default CMI g_steps (of configs/fashion_mnist.py), so the
comparison is at equal synthesis compute. Workdirs go to
runs/bench_<method>_g<g_steps>_s<seed>; a finished run is not re-run (its
summary.json is read back), an interrupted one resumes.
"""

import argparse
import json
import os
import statistics

from benchmarks.common import RESULTS, write_result
from configs import fashion_mnist
from experiments import runner


def parse_spec(spec: str, seeds: list[int]) -> tuple[str, int | None, list[int]]:
  """'deepinv@40:0,1' -> ('deepinv', 40, [0, 1]); no '@' -> g_steps None."""
  head, _, seed_part = spec.partition(':')
  method, _, g_steps = head.partition('@')
  return (method, int(g_steps) if g_steps else None,
          [int(s) for s in seed_part.split('+')] if seed_part else seeds)


def _mean_std(values):
  return (round(statistics.fmean(values), 2),
          round(statistics.stdev(values), 2) if len(values) > 1 else None)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--methods', default='cmi,cmi_no_contrast,cmi_no_adv',
                  help='comma-separated specs method[@g_steps][:seed+seed...]')
  ap.add_argument('--seeds', default='0', help='comma-separated seeds, e.g. 0,1,2')
  ap.add_argument('--equal_budget', action='store_true')
  ap.add_argument('--out', default=os.path.join(RESULTS, 'fmnist_methods.json'))
  args = ap.parse_args()
  default_g_steps = fashion_mnist.get_config().synthesis.g_steps
  seeds = [int(s) for s in args.seeds.split(',')]
  rows, per_method = [], []
  for spec in args.methods.split(','):
    method, g_steps, method_seeds = parse_spec(spec, seeds)
    runs = []
    for seed in method_seeds:
      cfg = fashion_mnist.get_config(f'method={method}')
      cfg.seed = seed
      if args.equal_budget:
        cfg.synthesis.g_steps = default_g_steps
      if g_steps:
        cfg.synthesis.g_steps = g_steps
      workdir = os.path.join('runs', f'bench_{method}_g{cfg.synthesis.g_steps}_s{seed}')
      summary_path = os.path.join(workdir, 'summary.json')
      if os.path.exists(summary_path):
        with open(summary_path, encoding='utf-8') as f:
          summary = json.load(f)
      else:
        summary = runner.run(cfg, workdir)
      runs.append({'method': method, 'seed': seed, 'g_steps': cfg.synthesis.g_steps,
                   'rounds': summary['rounds'], 'kd_steps': cfg.kd.kd_steps,
                   'student_accuracy': summary['student_accuracy'],
                   'best_student_accuracy': summary['best_student_accuracy'],
                   'teacher_accuracy': summary['teacher_accuracy'],
                   # wall time of the run's last (possibly resumed) session
                   'seconds_last_session': round(summary['seconds_this_session'], 1),
                   'workdir': workdir})
      print(f"{method:>18} seed {seed}: final {summary['student_accuracy']:.2f}%  best "
            f"{summary['best_student_accuracy']:.2f}%", flush=True)
    final = _mean_std([r['student_accuracy'] for r in runs])
    best = _mean_std([r['best_student_accuracy'] for r in runs])
    per_method.append({'method': method, 'g_steps': runs[0]['g_steps'],
                       'seeds': method_seeds, 'final_mean': final[0], 'final_std': final[1],
                       'best_mean': best[0], 'best_std': best[1]})
    print(f"{method:>18}: final {final[0]:.2f} (std {final[1]}) over {len(runs)} seed(s)",
          flush=True)
    rows += runs
  write_result(args.out, {'benchmark': 'fmnist_methods', 'equal_budget': args.equal_budget,
                          'methods': per_method, 'rows': rows})


if __name__ == '__main__':
  main()

"""CPU-scale method comparison: data-free KD on Fashion-MNIST, shipped teacher.

  python -m benchmarks.fmnist_methods                       # cmi + ablations (~12 min each)
  python -m benchmarks.fmnist_methods --methods=cmi,deepinv --equal_budget
  python -m benchmarks.fmnist_methods --methods=cmi,dfq,deepinv@40   # per-method g_steps

Runs `experiments.run` with configs/fashion_mnist.py for each method (same seed,
same student, same number of rounds and KD steps) and writes the final / best
student accuracy and wall time to benchmarks/results/fmnist_methods.json. With
--equal_budget every method gets the default CMI synthesis budget per round
(g_steps of configs/fashion_mnist.py) instead of its preset's own, so the
comparison is at equal compute; `method@N` sets g_steps=N for that method only. Workdirs go to runs/bench_<method>; a finished
method is not re-run (its summary.json is read back).
"""

import argparse
import json
import os

from configs import fashion_mnist
from experiments import runner

RESULTS = os.path.join(os.path.dirname(__file__), 'results')


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--methods', default='cmi,cmi_no_contrast,cmi_no_adv')
  ap.add_argument('--equal_budget', action='store_true')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--out', default=os.path.join(RESULTS, 'fmnist_methods.json'))
  args = ap.parse_args()
  default_g_steps = fashion_mnist.get_config().synthesis.g_steps
  rows = []
  for spec in args.methods.split(','):
    method, _, g_steps = spec.partition('@')
    cfg = fashion_mnist.get_config(f'method={method}')
    cfg.seed = args.seed
    if args.equal_budget:
      cfg.synthesis.g_steps = default_g_steps
    if g_steps:
      cfg.synthesis.g_steps = int(g_steps)
    workdir = os.path.join('runs', f'bench_{method}_g{cfg.synthesis.g_steps}')
    summary_path = os.path.join(workdir, 'summary.json')
    if os.path.exists(summary_path):
      with open(summary_path, encoding='utf-8') as f:
        summary = json.load(f)
    else:
      summary = runner.run(cfg, workdir)
    rows.append({'method': method, 'g_steps': cfg.synthesis.g_steps,
                 'rounds': summary['rounds'], 'kd_steps': cfg.kd.kd_steps,
                 'student_accuracy': summary['student_accuracy'],
                 'best_student_accuracy': summary['best_student_accuracy'],
                 'teacher_accuracy': summary['teacher_accuracy'],
                 # wall time of the run's last (possibly resumed) session
                 'seconds_last_session': round(summary['seconds_this_session'], 1),
                 'workdir': workdir})
    print(f"{method:>18}: final {summary['student_accuracy']:.2f}%  best "
          f"{summary['best_student_accuracy']:.2f}%", flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump({'benchmark': 'fmnist_methods', 'seed': args.seed,
               'equal_budget': args.equal_budget, 'rows': rows}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()

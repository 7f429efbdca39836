"""NAYER's class vectors on Fashion-MNIST: which offline substitute for CLIP to default to.

  python -m benchmarks.nayer_embeddings                                  # 4 sources, seed 0
  python -m benchmarks.nayer_embeddings --sources=classifier,penultimate,random --epochs=4 \
      --g_steps=10                                                       # the README's figures

Runs `experiments.run` with configs/fashion_mnist.py:method=nayer (the shipped
teacher, CPU-sized NAYER schedule) once per `synthesis.label_embeddings` source
and seed, everything else equal, and writes the final / best student accuracy,
the teacher's agreement with the synthesis targets on the last kept batch, and
the wall time of every run to benchmarks/results/nayer_embeddings.json.
Workdirs go to /tmp/nayer_emb_<source>_e<epochs>_g<g_steps>_s<seed>; a finished run is read
back, an interrupted one resumes.
"""

import argparse
import json
import os
import statistics
import time

from benchmarks.common import RESULTS, machine_info, write_result
from cmi_jax import report
from configs import fashion_mnist
from experiments import runner


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--sources', default='classifier,penultimate,random,onehot')
  ap.add_argument('--seeds', default='0')
  ap.add_argument('--epochs', type=int, default=0, help='KD epochs (0: the config\'s)')
  ap.add_argument('--g_steps', type=int, default=0, help='steps per loop (0: the config\'s)')
  ap.add_argument('--out', default=os.path.join(RESULTS, 'nayer_embeddings.json'))
  args = ap.parse_args()
  runs = []
  for source in args.sources.split(','):
    for seed in (int(s) for s in args.seeds.split(',')):
      cfg = fashion_mnist.get_config('method=nayer')
      cfg.seed = seed
      cfg.synthesis.label_embeddings = source
      if args.epochs:
        cfg.kd.epochs = args.epochs
      if args.g_steps:
        cfg.synthesis.g_steps = args.g_steps
      workdir = (f'/tmp/nayer_emb_{source}_e{cfg.kd.epochs}_g{cfg.synthesis.g_steps}'
                 f'_s{seed}')
      done = os.path.join(workdir, 'summary.json')
      t0 = time.time()
      if os.path.exists(done):
        with open(done, encoding='utf-8') as f:
          summary = json.load(f)
      else:
        summary = runner.run(cfg, workdir)
      rows = report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
      synth = [r for r in rows if 'target_accuracy' in r]
      runs.append({
          'source': source, 'seed': seed, 'epochs': cfg.kd.epochs,
          'g_steps': cfg.synthesis.g_steps,
          'rounds': summary['rounds'],
          'student_accuracy': summary['student_accuracy'],
          'best_student_accuracy': summary['best_student_accuracy'],
          'teacher_accuracy': summary['teacher_accuracy'],
          'history': summary['history'],
          'last_target_accuracy': synth[-1]['target_accuracy'] if synth else None,
          'mean_target_accuracy': (statistics.fmean(r['target_accuracy'] for r in synth)
                                   if synth else None),
          'wall_s_this_call': round(time.time() - t0, 1),
          'run_elapsed_s': rows[-1].get('elapsed_s') if rows else None,
      })
      print(json.dumps({k: runs[-1][k] for k in ('source', 'seed', 'student_accuracy',
                                                  'best_student_accuracy',
                                                  'mean_target_accuracy')}))
  write_result(args.out, {
      'benchmark': 'nayer_embeddings', 'config': 'configs/fashion_mnist.py:method=nayer',
      'machine': machine_info(), 'runs': runs})


if __name__ == '__main__':
  main()

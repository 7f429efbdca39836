"""Time to accuracy on Fashion-MNIST: how fast each method turns the shipped teacher
(teachers/fashion_mnist_wrn_16_2, 93.77 %) into a wrn_16_1 student, data-free.

  flock -x /tmp/cmi_cpu.lock true  # (nothing: the script takes the lock per run itself)
  python -m benchmarks.time_to_accuracy                   # every method, its seeds
  python -m benchmarks.time_to_accuracy --methods=fast5,cmi --seeds=0   # a subset
  python -m benchmarks.time_to_accuracy --report          # JSON + plot from finished runs

Each run (method, seed) is a subprocess (its own compilations, counted in its time)
running `experiments.runner.run` with configs/fashion_mnist.py, the method's preset and
the CPU-sized schedule of METHODS below, evaluating on the 10k test split at every epoch,
under an exclusive `flock` on --lock (released between runs). A run is stopped cleanly
(SIGTERM, after the current round) at --max_seconds. Workdirs: <root>/<method>_s<seed>;
a finished run (result.json) is skipped, so the script resumes where it stopped, and the
results JSON and plot are rewritten after each run.

Time axis: training seconds = the runner's elapsed_s minus its evaluation seconds (eval_s),
compilation included. FLOPs axis: generator + teacher + student FLOPs spent, from XLA's cost
analysis of each network's compiled forward pass at the run's batch sizes, x3 for a forward
+ backward (XLA's cost analysis counts a lax.scan body once, whatever its trip count, so the
compiled round and KD chunk cannot be read directly: measured, a scan of 4 matmuls reports
the FLOPs of one).
"""

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

from benchmarks.common import RESULTS, machine_info, write_result

TEACHER_ACCURACY = 93.77
TARGETS = (80.0, 0.9 * TEACHER_ACCURACY)  # 84.4 % = 90 % of the teacher

# name -> (preset, seeds, synthesis overrides, kd overrides) of configs/fashion_mnist.py.
# CPU-sized schedules, each run ~8 minutes or less on 2 cores (~35 TFLOPs in this script's
# count). CMI family: the README's Fashion-MNIST command (batch 64, 40 generator steps and
# 60 KD steps per round), 8 epochs instead of 12. Fast-K: the config's CPU setting (10
# synthesis-only warm-up rounds, then epochs of 5 rounds x 30 KD steps at batch 64, the
# preset's loss, lrs and KD recipe: lr 0.2 cosine to 2e-4, T 20), fewer epochs for larger K
# (a Fast-10 round costs ~1.6 Fast-2 rounds). One line per method.
_CMI_SCHEDULE = ({'g_steps': 40}, {'kd_steps': 60, 'ep_steps': 60, 'epochs': 8})
METHODS = {
    'cmi': ('cmi', (0, 1, 2)) + _CMI_SCHEDULE,
    'cmi_no_contrast': ('cmi_no_contrast', (0,)) + _CMI_SCHEDULE,
    'fast2': ('fast2', (0, 1, 2), {}, {'epochs': 12}),
    'fast5': ('fast5', (0, 1, 2), {}, {'epochs': 10}),
    'fast10': ('fast10', (0, 1, 2), {}, {'epochs': 8}),
    'deepinv': ('deepinv', (0,)) + _CMI_SCHEDULE,  # 40 pixel steps per round, not 1000
    # NAYER: the config's CPU setting (batch 60 = 6 noisy layers x 10 classes, 20 steps
    # per loop, 2 warm-up rounds of 5 loops, then 12 epochs of 2 loops + 60 KD steps).
    'nayer': ('nayer', (0, 1, 2), {}, {}),
}


def make_config(method: str, seed: int):
  """configs/fashion_mnist.py for the method's preset, with the table's schedule."""
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  preset, _, synth, kd = METHODS[method]
  c = fashion_mnist.get_config(f'method={preset}')
  c.seed = seed
  for sec, values in (('synthesis', synth), ('kd', kd)):
    for k, v in values.items():
      c[sec][k] = v
  c.log.grid_every_rounds = 10 ** 6   # no image grids: not part of the method's time
  c.log.checkpoint_every_rounds = 10 ** 6  # checkpoints at epoch ends only
  c.log.every_kd_steps = c.kd.kd_steps
  return c


def forward_flops(cfg) -> dict:
  """FLOPs of one forward pass of the generator, teacher and student at the run's
  batch sizes (XLA cost analysis of each compiled forward)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cmi_jax import data, models  # pylint: disable=import-outside-toplevel
  from experiments import runner  # pylint: disable=import-outside-toplevel
  info = data.get_info(cfg.data.name)
  synth = runner.synthesis_config(cfg, info, cfg.synthesis.weights.to_dict())

  def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0))

  teacher = runner.load_teacher(cfg, info, jnp.float32)
  student = models.get(cfg.student.arch, info.num_classes)
  s_vars = models.init(student, jax.random.key(0), (1,) + info.image_shape)
  views = 2 if synth.views == 'cmi' else 1
  out = {'views': views}
  for name, module, variables in (('teacher', teacher.module, teacher.variables),
                                  ('student', student, s_vars)):
    for what, n in (('synthesis', synth.batch_size * (views if name == 'teacher' else 1)),
                    ('kd', cfg.kd.batch_size)):
      x = jnp.zeros((n,) + info.image_shape)
      out[f'{name}_{what}'] = flops(lambda v, x, m=module: m.apply(v, x, train=False),
                                    variables, x)
  if synth.algorithm == 'nayer':  # NLGenerator on the [B, E] class vectors
    from cmi_jax.synthesis import embeddings, nayer  # pylint: disable=import-outside-toplevel
    gen = nayer.make_generator(synth)
    z = jnp.zeros((synth.batch_size,
                   embeddings.label_embeddings(synth, teacher, jax.random.key(0)).shape[1]))
    g_vars = gen.init(jax.random.key(0), z)
    out['generator'] = flops(lambda v, z: gen.apply(v, z, train=True, mutable=['batch_stats'])[0],
                             g_vars, z)
  elif synth.synthesizer == 'generator':
    gen = synth.make_generator()
    z = jnp.zeros((synth.batch_size, synth.nz))
    g_vars = gen.init(jax.random.key(0), z)
    out['generator'] = flops(lambda v, z: gen.apply(v, z, train=True, mutable=['batch_stats'])[0],
                             g_vars, z)
  else:
    out['generator'] = 0.0
  use_adv = synth.weights.adv > 0
  # Forward + backward ~ 3 forwards (gradients reach the generator through teacher/student).
  out['synthesis_step'] = 3 * (out['generator'] + out['teacher_synthesis'] +
                               (out['student_synthesis'] if use_adv else 0.0))
  out['kd_step'] = out['teacher_kd'] + 3 * out['student_kd']
  out['g_steps'] = synth.g_steps
  return out


def run_one(method: str, seed: int, workdir: str, max_seconds: float) -> None:
  """Child process: one run (stopped by SIGTERM after max_seconds), then result.json."""
  from experiments import runner  # pylint: disable=import-outside-toplevel
  cfg = make_config(method, seed)
  timer = threading.Timer(max_seconds, lambda: os.kill(os.getpid(), signal.SIGTERM))
  timer.daemon = True
  timer.start()
  t0 = time.time()
  summary = runner.run(cfg, workdir)
  wall = time.time() - t0
  timer.cancel()
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'),
                                            encoding='utf-8')]
  ff = forward_flops(cfg)
  curve, eval_s, kd_done, synth_steps = [], 0.0, 0, 0
  pre = cfg.kd.pre_rounds
  # Synthesis steps per round: g_steps, times the loops of a NAYER round (pre_loops in
  # its warm-up rounds, g_loops after).
  loops = ((cfg.kd.pre_loops or cfg.synthesis.g_loops, cfg.synthesis.g_loops)
           if cfg.synthesis.algorithm == 'nayer' else (1, 1))
  for r in rows:
    if r['round'] > pre:
      kd_done += cfg.kd.kd_steps
    synth_steps += ff['g_steps'] * loops[r['round'] > pre]
    eval_s += r.get('eval_s', 0.0)
    if 'student_accuracy' in r:
      synth_flops = synth_steps * ff['synthesis_step']
      kd_flops = kd_done * ff['kd_step']
      curve.append({'epoch': r['epoch'], 'round': r['round'], 'kd_steps': kd_done,
                    'elapsed_s': r['elapsed_s'], 'train_s': r['elapsed_s'] - eval_s,
                    'accuracy': r['student_accuracy'], 'synthesis_flops': synth_flops,
                    'kd_flops': kd_flops, 'flops': synth_flops + kd_flops})
  result = {'method': method, 'preset': METHODS[method][0], 'seed': seed,
            'complete': 'stopped_at_round' not in summary, 'wall_s': wall,
            'schedule': {'synthesis': dict(METHODS[method][2]), 'kd': dict(METHODS[method][3])},
            'forward_flops': ff, 'curve': curve}
  with open(os.path.join(workdir, 'result.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)


def _first_time(curve, target, key='train_s'):
  for p in curve:
    if p['accuracy'] >= target:
      return round(p[key], 1)
  return None


def summarize(results: list) -> list:
  """Per method: mean over seeds of final/best accuracy and time to each target."""
  import statistics  # pylint: disable=import-outside-toplevel
  out = []
  for method in METHODS:
    runs = [r for r in results if r['method'] == method and r['curve']]
    if not runs:
      continue
    row = {'method': method, 'seeds': [r['seed'] for r in runs]}
    for name, vals in (('final', [r['curve'][-1]['accuracy'] for r in runs]),
                       ('best', [max(p['accuracy'] for p in r['curve']) for r in runs]),
                       ('train_s', [r['curve'][-1]['train_s'] for r in runs])):
      row[f'{name}_mean'] = round(statistics.fmean(vals), 2)
      row[f'{name}_std'] = round(statistics.stdev(vals), 2) if len(vals) > 1 else None
    for t in TARGETS:
      times = [_first_time(r['curve'], t) for r in runs]
      row[f'time_to_{t:.1f}_s'] = times  # per seed; None: not reached
    out.append(row)
  return out


def plot(results: list, path: str) -> None:
  """Accuracy vs training seconds and vs FLOPs; mean over seeds, min-max band."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for method in METHODS:
    runs = [r for r in results if r['method'] == method and r['curve']]
    if not runs:
      continue
    for ax, key, scale in ((axes[0], 'train_s', 1.0), (axes[1], 'flops', 1e-12)):
      hi = min(r['curve'][-1][key] for r in runs) * scale
      lo = max(r['curve'][0][key] for r in runs) * scale
      grid = np.linspace(lo, hi, 50) if hi > lo else np.array([lo])
      ys = np.array([np.interp(grid, [p[key] * scale for p in r['curve']],
                               [p['accuracy'] for p in r['curve']]) for r in runs])
      line, = ax.plot(grid, ys.mean(0), label=f'{method} ({len(runs)} seed'
                      f'{"s" if len(runs) > 1 else ""})')
      if len(runs) > 1:
        ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
      else:
        r = runs[0]
        ax.plot([p[key] * scale for p in r['curve']], [p['accuracy'] for p in r['curve']],
                '.', color=line.get_color())
  for ax, xl in ((axes[0], 'training seconds (2-core CPU, evaluation excluded)'),
                 (axes[1], 'generator + teacher + student TFLOPs spent')):
    ax.axhline(TARGETS[1], color='k', ls='--', lw=0.8)
    ax.axhline(TEACHER_ACCURACY, color='gray', ls=':', lw=0.8)
    ax.set_xlabel(xl)
    ax.set_ylabel('student test accuracy (%)')
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
  axes[0].legend(loc='lower right', fontsize=8)
  fig.suptitle('Fashion-MNIST, wrn_16_2 (93.77 %) -> wrn_16_1, data-free; dashed: 90 % of '
               'the teacher')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f'wrote {path}')


LABELS = {'cmi': 'CMI (`cmi`)', 'cmi_no_contrast': 'CMI without L_cr (`cmi_no_contrast`)',
          'fast2': 'FastDFKD Fast-2 (`fast2`)', 'fast5': 'FastDFKD Fast-5 (`fast5`)',
          'fast10': 'FastDFKD Fast-10 (`fast10`)', 'deepinv': 'DeepInversion (`deepinv`)',
          'nayer': 'NAYER (`nayer`)'}


def _pool_size(root: str, method: str, seed: int) -> Optional[int]:
  """Synthetic images in the pool at the end of a run (its last metrics row)."""
  path = os.path.join(root, f'{method}_s{seed}', 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  sizes = [r['pool_size'] for r in rows if 'pool_size' in r]
  return sizes[-1] if sizes else None


def markdown_table(result: dict, root: str) -> str:
  """The README's table: per method, mean (and min-max over seeds) of each figure;
  a time to a target counts the seeds that reached it."""
  def span(vals, fmt):
    vals = [v for v in vals if v is not None]
    if not vals:
      return 'n/a'
    mean = sum(vals) / len(vals)
    lo, hi = fmt(min(vals)), fmt(max(vals))
    return fmt(mean) if lo == hi else f'{fmt(mean)} ({lo}-{hi})'

  lines = ['| method | seeds | time to 80 % | time to 84.4 % | final % | best % | training s '
           '| TFLOPs | images |', '|---' * 9 + '|']
  for row in result['summary']:
    m = row['method']
    runs = [r for r in result['runs'] if r['method'] == m and r['curve']]
    cells = [LABELS.get(m, m), ', '.join(str(s) for s in row['seeds'])]
    for t in TARGETS:
      times = row[f'time_to_{t:.1f}_s']
      hit = [x for x in times if x is not None]
      cells.append('not reached' if not hit else
                   span(hit, lambda v: f'{v:.0f} s') +
                   ('' if len(hit) == len(times) else f' ({len(hit)} of {len(times)} seeds)'))
    cells.append(span([r['curve'][-1]['accuracy'] for r in runs], lambda v: f'{v:.2f}'))
    cells.append(span([max(p['accuracy'] for p in r['curve']) for r in runs],
                      lambda v: f'{v:.2f}'))
    cells.append(span([r['curve'][-1]['train_s'] for r in runs], lambda v: f'{v:.0f}'))
    cells.append(span([r['curve'][-1]['flops'] / 1e12 for r in runs], lambda v: f'{v:.1f}'))
    cells.append(span([_pool_size(root, m, r['seed']) for r in runs], lambda v: f'{v:.0f}'))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def report(root: str, out: str) -> None:
  results = []
  for method in METHODS:
    for seed in METHODS[method][1]:
      p = os.path.join(root, f'{method}_s{seed}', 'result.json')
      if os.path.exists(p):
        with open(p, encoding='utf-8') as f:
          results.append(json.load(f))
  write_result(out, {'benchmark': 'time_to_accuracy', 'teacher_accuracy': TEACHER_ACCURACY,
                     'targets': TARGETS, 'machine': machine_info(),
                     'summary': summarize(results), 'runs': results})
  if results:
    plot(results, os.path.splitext(out)[0] + '.png')


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--seeds', default='', help='comma-separated; default: each method\'s own')
  ap.add_argument('--first_seed_only', action='store_true',
                  help='one seed of every method (the first pass)')
  ap.add_argument('--root', default='/tmp/cmi_time_to_accuracy')
  ap.add_argument('--lock', default='/tmp/cmi_cpu.lock')
  ap.add_argument('--turnstile', default='/tmp/cmi_turnstile.lock',
                  help='held while waiting for and holding --lock (writer preference)')
  ap.add_argument('--max_seconds', type=float, default=540.0)
  ap.add_argument('--out', default=os.path.join(RESULTS, 'time_to_accuracy.json'))
  ap.add_argument('--report', action='store_true', help='only rewrite the JSON and plot')
  ap.add_argument('--table', action='store_true',
                  help="print --out as the README's markdown table (reads pool sizes from --root)")
  ap.add_argument('--one', default='', help=argparse.SUPPRESS)  # child: method:seed
  args = ap.parse_args()
  if args.table:
    with open(args.out, encoding='utf-8') as f:
      print(markdown_table(json.load(f), args.root))
    return
  if args.one:
    method, seed = args.one.split(':')
    run_one(method, int(seed), os.path.join(args.root, f'{method}_s{seed}'), args.max_seconds)
    return
  if not args.report:
    for method in args.methods.split(','):
      if method not in METHODS:
        raise SystemExit(f'unknown method {method!r}; choose from {sorted(METHODS)}')
      seeds = ([int(s) for s in args.seeds.split(',')] if args.seeds else
               list(METHODS[method][1]))
      for seed in seeds[:1] if args.first_seed_only else seeds:
        workdir = os.path.join(args.root, f'{method}_s{seed}')
        if os.path.exists(os.path.join(workdir, 'result.json')):
          print(f'{method} seed {seed}: done, skipped')
          continue
        shutil.rmtree(workdir, ignore_errors=True)  # an interrupted run restarts: its clock too
        os.makedirs(workdir, exist_ok=True)
        # Writer preference: hold the turnstile while waiting and running, so that new
        # shared (test) requests queue behind this run instead of starving it.
        with open(args.turnstile, 'a', encoding='utf-8') as gate, \
            open(args.lock, 'a', encoding='utf-8') as lock:
          print(f'{method} seed {seed}: waiting for the exclusive lock', flush=True)
          try:  # held by someone else (e.g. a helper keeping it for this run): go on
            fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
          except BlockingIOError:
            pass
          fcntl.flock(lock, fcntl.LOCK_EX)
          print(f'{method} seed {seed}: running', flush=True)
          subprocess.run([sys.executable, '-m', 'benchmarks.time_to_accuracy', '--one',
                          f'{method}:{seed}', '--root', args.root, '--max_seconds',
                          str(args.max_seconds)], check=True)
          fcntl.flock(lock, fcntl.LOCK_UN)
          fcntl.flock(gate, fcntl.LOCK_UN)
        report(args.root, args.out)
  report(args.root, args.out)


if __name__ == '__main__':
  main()

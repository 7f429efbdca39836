"""One prepared accelerator check, under 8 minutes: speed table, main command, `:full`.

  python benchmarks/gpu_check.py                 # from the repository root, nothing installed
  python benchmarks/gpu_check.py --budget_s=450  # total wall-clock budget (default 450 s)
  python benchmarks/gpu_check.py --smoke         # seconds-sized CPU rehearsal (tests)

Works where another JAX/CUDA build is preinstalled and only small wheels can be
added: the repository is imported from its folder (no `pip install -e .`), and
the imports are checked first; a missing package is named with the command that
adds it. Stages, in order:
  1. speed table: one synthesis iteration (a compiled CMI round / g_steps) and one
     KD step, fp32 and bf16, teacher wrn_16_2 and wrn_40_2 -> student wrn_16_1 at
     B=256 (32x32x3, random weights; median of repeats after compilation);
  2. the README's main command (configs/fashion_mnist.py), its summary line;
  3. configs/fashion_mnist.py:full for the time left: stopped by SIGTERM at the
     budget (a clean stop after the current round), reporting epochs done and the
     best student accuracy so far.
Writes benchmarks/results/gpu_check_<device>.json (stages so far after each).
"""

import argparse
import importlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # import cmi_jax, configs and experiments from the checkout
  sys.path.insert(0, ROOT)

# import name -> pip name of everything the check imports.
REQUIRED = {'jax': 'jax', 'jaxlib': 'jaxlib', 'flax': 'flax', 'optax': 'optax',
            'orbax.checkpoint': 'orbax-checkpoint', 'ml_collections': 'ml_collections',
            'chex': 'chex', 'numpy': 'numpy', 'absl': 'absl-py', 'tqdm': 'tqdm',
            'matplotlib': 'matplotlib', 'PIL': 'pillow'}


def check_imports() -> dict:
  """{name: version} of the required packages; exits with a clear message when any
  is missing (they are small pure-Python wheels except jax/jaxlib)."""
  versions, missing = {}, []
  for mod, pip_name in REQUIRED.items():
    try:
      m = importlib.import_module(mod)
      versions[mod] = getattr(m, '__version__', '?')
    except ImportError as e:
      missing.append((mod, pip_name, str(e)))
  if missing:
    names = ' '.join(p for _, p, _ in missing)
    lines = '\n'.join(f'  {mod}: {err}' for mod, _, err in missing)
    sys.exit(f'gpu_check: missing package(s):\n{lines}\nInstall them with: pip install {names}\n'
             f'(offline: pip download {names} --no-deps on a machine with internet, carry the '
             'wheels, then pip install --no-deps <wheel files>).')
  return versions


def _median_s(fn, *args, repeats: int) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def speed_row(teacher_arch: str, dtype: str, batch: int, g_steps: int, kd_steps: int,
              shape=(32, 32, 3), repeats: int = 3, kd_batch: int = 0) -> dict:
  """Milliseconds per synthesis iteration (batch `batch`) and per KD step (batch
  `kd_batch`, default `batch`), random weights."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cmi_jax import distill, models  # pylint: disable=import-outside-toplevel
  from cmi_jax.state import create_classifier_state, sgd  # pylint: disable=import-outside-toplevel
  from cmi_jax.synthesis import algorithms  # pylint: disable=import-outside-toplevel
  from cmi_jax.synthesis.bank import ring_add  # pylint: disable=import-outside-toplevel
  from cmi_jax.synthesis.config import SynthesisConfig  # pylint: disable=import-outside-toplevel
  from cmi_jax.teacher import Teacher  # pylint: disable=import-outside-toplevel

  cdt = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  key = jax.random.key(0)
  t_vars = models.init(models.get(teacher_arch, 10), key, (1,) + shape)
  s_vars = models.init(models.get('wrn_16_1', 10), jax.random.fold_in(key, 1), (1,) + shape)
  teacher = Teacher(models.get(teacher_arch, 10, dtype=cdt), t_vars)
  student = Teacher(models.get('wrn_16_1', 10, dtype=cdt), s_vars)
  cfg = SynthesisConfig(image_shape=shape, num_classes=10, mean=(0.5,) * shape[2],
                        std=(0.25,) * shape[2], batch_size=batch, g_steps=g_steps,
                        n_neg=min(4096, 4 * batch), bank_size=max(4 * batch, 1024),
                        pool_size=max(4 * batch, 1024), dtype=dtype).validate()
  algo = algorithms.get(cfg.algorithm)
  state = algo.init_state(cfg, teacher, key)
  # A full bank, so the contrastive term uses all its negatives.
  feats = jax.random.normal(key, (cfg.bank_size,) + state.bank.data.shape[1:])
  state = state.replace(bank=ring_add(state.bank, feats))
  round_fn = jax.jit(functools.partial(algo.round, cfg))
  iteration_s = _median_s(round_fn, teacher, student, state, key, repeats=repeats) / g_steps

  kd_batch = kd_batch or batch
  kd_cfg = distill.KDConfig(batch_size=kd_batch, mean=cfg.mean, std=cfg.std,
                            crop_padding=2 if shape[0] <= 28 else 4)
  s_state = create_classifier_state(student.module, key, (1,) + shape, sgd(0.1, 0.9, 5e-4),
                                    variables=s_vars)
  pool = ring_add(state.pool, {'images': jnp.zeros((cfg.pool_size,) + shape, jnp.uint8),
                               'targets': jnp.zeros((cfg.pool_size,), jnp.int32)})
  kd_fn = jax.jit(functools.partial(distill.kd_steps, kd_cfg, num_steps=kd_steps))
  kd_s = _median_s(kd_fn, s_state, teacher, pool, key, repeats=repeats) / kd_steps
  return {'teacher': teacher_arch, 'student': 'wrn_16_1', 'dtype': dtype, 'batch': batch,
          'kd_batch': kd_batch,
          'image_shape': list(shape), 'synthesis_iteration_ms': 1e3 * iteration_s,
          'kd_step_ms': 1e3 * kd_s, 'g_steps_timed': g_steps, 'kd_steps_timed': kd_steps}


def run_command(args, workdir: str, budget_s: float, env=None) -> dict:
  """`python -m experiments.run <args> --workdir=workdir`; SIGTERM at budget_s (a clean
  stop after the current round), SIGKILL 90 s later. Returns its outcome."""
  cmd = [sys.executable, '-m', 'experiments.run'] + args + [f'--workdir={workdir}']
  env = dict(os.environ if env is None else env)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  stopped = False
  try:
    out, _ = proc.communicate(timeout=max(budget_s, 1))
  except subprocess.TimeoutExpired:
    stopped = True
    proc.send_signal(signal.SIGTERM)
    try:
      out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, _ = proc.communicate()
  lines = [l for l in re.split(r'[\r\n]', out or '') if l.strip()]
  result = {'command': ' '.join(cmd[1:]), 'returncode': proc.returncode,
            'wall_s': time.time() - t0, 'stopped_at_budget': stopped,
            'last_lines': lines[-6:]}
  rows = []
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    with open(metrics, encoding='utf-8') as f:
      rows = [json.loads(l) for l in f if l.strip()]
  accs = [r['student_accuracy'] for r in rows if 'student_accuracy' in r]
  result.update(rounds_done=len(rows), epochs_done=sum('epoch' in r for r in rows),
                best_student_accuracy=max(accs) if accs else None,
                last_student_accuracy=accs[-1] if accs else None,
                seconds_per_round=(statistics.median(
                    b['elapsed_s'] - a['elapsed_s'] for a, b in zip(rows, rows[1:]))
                                   if len(rows) > 2 else None))
  summary = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary):
    with open(summary, encoding='utf-8') as f:
      s = json.load(f)
    result.update({k: s.get(k) for k in ('student_accuracy', 'teacher_accuracy',
                                         'best_student_accuracy', 'student_teacher_ratio')})
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--budget_s', type=float, default=450.0,
                      help='wall-clock budget of the whole check (stage 3 gets what is left)')
  parser.add_argument('--smoke', action='store_true',
                      help='tiny shapes and the :quick config (a CPU rehearsal for tests)')
  parser.add_argument('--out', default=None, help='JSON path (default: '
                      'benchmarks/results/gpu_check_<device>.json)')
  parser.add_argument('--workdir', default=None, help='run folders (default: a temp folder)')
  args = parser.parse_args()
  t_start = time.time()
  versions = check_imports()
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks.common import RESULTS, machine_info, write_result  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  device = getattr(dev, 'device_kind', str(dev))
  print(f'gpu_check: {len(jax.devices())} x {device} ({jax.default_backend()}), jax '
        f'{jax.__version__}', flush=True)
  if jax.default_backend() == 'cpu' and not args.smoke:
    print('gpu_check: no accelerator found: JAX runs on the CPU (is the CUDA plugin for this '
          'jax version installed? pip install "jax[cuda12]" or "jax[cuda13]").', flush=True)
  slug = re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_').lower()
  out_path = args.out or os.path.join(RESULTS, f'gpu_check_{slug}.json')
  result = {'device': device, 'machine': machine_info(), 'versions': versions,
            'smoke': args.smoke, 'budget_s': args.budget_s, 'stages': {}}

  # 1. Speed table.
  rows = []
  pairs = [('wrn_16_2', 'float32'), ('wrn_16_2', 'bfloat16'), ('wrn_40_2', 'float32'),
           ('wrn_40_2', 'bfloat16')]
  for teacher, dtype in (pairs[:2] if args.smoke else pairs):
    kw = (dict(batch=8, g_steps=2, kd_steps=2, shape=(16, 16, 3), repeats=1) if args.smoke
          else dict(batch=256, g_steps=20, kd_steps=50))
    row = speed_row(teacher, dtype, **kw)
    rows.append(row)
    print(f'  {teacher} -> wrn_16_1 {dtype:8s} B={row["batch"]}: synthesis iteration '
          f'{row["synthesis_iteration_ms"]:8.2f} ms, KD step {row["kd_step_ms"]:8.2f} ms',
          flush=True)
  result['stages']['speed'] = rows
  write_result(out_path, result)

  # 2. The main command; 3. :full for the time left.
  root = args.workdir or tempfile.mkdtemp(prefix='cmi_gpu_check_')
  # Smoke: the :quick config with the pool and bank of the tests' runs (their compiled
  # programs come from the persistent compilation cache when one is set).
  tiny = ['--config.synthesis.pool_size=24', '--config.synthesis.bank_size=24']
  main_args = ['--config=configs/fashion_mnist.py' + (':quick' if args.smoke else '')]
  if args.smoke:
    main_args += tiny + ['--config.kd.epochs=1']
  left = args.budget_s - (time.time() - t_start)
  result['stages']['main_command'] = run_command(main_args, os.path.join(root, 'main'),
                                                 max(left - 60, 30))
  print(f'  main command: {result["stages"]["main_command"]["last_lines"][-1:]}', flush=True)
  write_result(out_path, result)
  left = args.budget_s - (time.time() - t_start)
  full_args = ['--config=configs/fashion_mnist.py:' + ('quick' if args.smoke else 'full')]
  if args.smoke:
    full_args += tiny
  full = run_command(full_args, os.path.join(root, 'full'), max(left - 30, 5))
  result['stages']['full'] = full
  print(f'  :full: {full["epochs_done"]} epochs in {full["wall_s"]:.0f} s, best student '
        f'accuracy {full["best_student_accuracy"]}', flush=True)
  result['total_s'] = time.time() - t_start
  write_result(out_path, result)


if __name__ == '__main__':
  main()

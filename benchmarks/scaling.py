"""Data-parallel scaling: synthesis and KD throughput per device count.

  python -m benchmarks.scaling --quick              # ~2-3 min on 2 CPU cores
  python -m benchmarks.scaling                      # 32x32x3, wrn_16_2 -> wrn_16_1
  python -m benchmarks.scaling --devices=1,2,4,8    # e.g. on an 8-GPU host or a TPU slice
  python -m benchmarks.scaling --imagenet           # 224x224x3 fast_imagenet round, both pool
                                                    # modes (~20 min on 2 CPU cores)

Weak scaling: the batch per device is fixed (--per_device, default 16), so the
global synthesis and KD batches grow with the device count. For each count a
fresh subprocess starts JAX (the device count is fixed at start-up) with
XLA_FLAGS=--xla_force_host_platform_device_count=N, which makes N fake CPU
devices on a CPU host and is ignored on GPU/TPU, where the first N real
devices form the mesh. Each subprocess jits one CMI round and one KD chunk
exactly as experiments/runner.py does (parallel.compile_plan) and reports the
median time of a few calls after compilation:
  synthesis: round time, image-iterations/s = B * g_steps / round time;
  kd: steps/s and images/s = KD batch * steps/s;
  speedup = throughput(N) / throughput(1); efficiency = speedup / N (1.0 =
  perfect weak scaling).
Fake CPU devices all share the host's cores, so no speedup is expected there:
on CPU the numbers measure the overhead of partitioning (efficiency ~1/N means
no overhead beyond sharing the cores). Writes benchmarks/results/scaling.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from benchmarks.common import RESULTS, write_result

CPU_NOTE = ('fake CPU devices (--xla_force_host_platform_device_count) share the same {cores} '
            'CPU cores, so no speedup is expected: this measures partitioning overhead only.')

SETTINGS = {
    'quick': dict(image_shape=(16, 16, 3), teacher='wrn_16_1', student='wrn_16_1', nz=64, ngf=16,
                  g_steps=2, n_neg=256, bank_size=1024, kd_steps=4, repeats=3),
    'full': dict(image_shape=(32, 32, 3), teacher='wrn_16_2', student='wrn_16_1', nz=256, ngf=64,
                 g_steps=5, n_neg=4096, bank_size=40960, kd_steps=10, repeats=3),
    # FastDFKD's ImageNet round (DeepGenerator, Reptile, RandomResizedCrop views) at 224
    # pixels; resnet18 rather than the logged resnet50 so that a CPU compiles each device
    # count in minutes. Run once per pool mode (kd.pool_mode).
    'imagenet': dict(image_shape=(224, 224, 3), teacher='resnet18_imagenet',
                     student='resnet18_imagenet', method='fast_imagenet', g_steps=1,
                     kd_steps=2, repeats=2),
}


def _median_time(fn, repeats: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def time_round(steps, teacher, student, state, key, repeats: int):
  """(median seconds of one synthesis round, compile seconds, the state after the calls,
  the last round's images); the round donates its state, so each call gets the last's."""
  import jax  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  round_fn = steps.round.lower(teacher, student, state, key).compile()
  compile_s = time.perf_counter() - t
  holder = {'state': state}

  def one_round():
    holder['state'], out = round_fn(teacher, student, holder['state'], key)
    holder['images'] = out.images
    return out.images

  jax.block_until_ready(one_round())  # warm-up
  median = _median_time(one_round, repeats)
  return median, compile_s, holder['state'], holder['images']


def time_kd_chunk(mesh, steps, s_mod, shape, teacher, pool, key, s: dict):
  """(median seconds of one KD chunk of s['kd_steps'] steps on `pool`, compile seconds)
  for a fresh student state of `s_mod`, compiled as the runner does (steps.kd)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cmi_jax import parallel  # pylint: disable=g-import-not-at-top
  from cmi_jax.state import create_classifier_state, sgd  # pylint: disable=g-import-not-at-top
  kd_state = parallel.replicate(
      mesh, create_classifier_state(s_mod, key, (1,) + shape, sgd(0.1, 0.9, 1e-4)))
  t = time.perf_counter()
  kd_fn = steps.kd.lower(kd_state, teacher, pool, key, s['kd_steps']).compile()
  compile_s = time.perf_counter() - t
  holder = {'state': kd_state}

  def one_chunk():
    holder['state'], m = kd_fn(holder['state'], teacher, pool, key)
    return m

  jax.block_until_ready(one_chunk())  # warm-up
  return _median_time(one_chunk, s['repeats']), compile_s


def worker(n: int, per_device: int, s: dict) -> dict:
  """Times one round and one KD chunk on an n-device mesh (runs in a subprocess)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cmi_jax import distill, models, parallel  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis import cmi  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis.config import SynthesisConfig  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis.bank import ring_add  # pylint: disable=g-import-not-at-top
  from cmi_jax.teacher import Teacher  # pylint: disable=g-import-not-at-top
  from experiments import plan  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(n)
  shape, c = tuple(s['image_shape']), s['image_shape'][2]
  b = per_device * n
  key = jax.random.key(0)
  t_mod, s_mod = models.get(s['teacher'], 10), models.get(s['student'], 10)
  teacher = Teacher(t_mod, models.init(t_mod, key, (1,) + shape))
  student = Teacher(s_mod, models.init(s_mod, jax.random.fold_in(key, 1), (1,) + shape))
  cfg = SynthesisConfig(
      image_shape=shape, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c, batch_size=b,
      g_steps=s['g_steps'], n_neg=s['n_neg'], bank_size=s['bank_size'],
      pool_size=max(4 * b, 256), nz=s['nz'], ngf=s['ngf'], global_padding=shape[0] // 8).validate()
  kd_cfg = distill.KDConfig(batch_size=b, crop_padding=shape[0] // 8, mean=cfg.mean, std=cfg.std)
  steps = plan.compile_plan(mesh, cfg, cfg, kd_cfg, fresh=False)

  state = cmi.init_state(cfg, teacher, key)
  # A full bank (all n_neg negatives drawn) and pool, as in a long run.
  d2 = state.bank.data.shape[-1]
  state = state.replace(
      bank=ring_add(state.bank, jax.random.normal(key, (cfg.n_neg, d2))),
      pool=ring_add(state.pool, {
          'images': jax.random.randint(key, (cfg.pool_size,) + shape, 0, 256).astype(jnp.uint8),
          'targets': jnp.zeros((cfg.pool_size,), jnp.int32)}))
  teacher, student, state = parallel.replicate(mesh, (teacher, student, state))

  round_s, round_compile, state, images = time_round(steps, teacher, student, state, key,
                                                     s['repeats'])
  images_sharding = str(images.sharding.spec)   # P('data'): split over the devices

  chunk_s, kd_compile = time_kd_chunk(mesh, steps, s_mod, shape, teacher,
                                      state.pool, key, s)
  dev = jax.devices()[0]
  return {
      'devices': n, 'backend': jax.default_backend(), 'jax': jax.__version__,
      'device_kind': getattr(dev, 'device_kind', str(dev)),
      'synthesis': {'batch': b, 'g_steps': cfg.g_steps, 'round_s': round_s,
                    'iteration_s': round_s / cfg.g_steps,
                    'image_iterations_per_s': b * cfg.g_steps / round_s,
                    'compile_s': round_compile, 'images_sharding': images_sharding},
      'kd': {'batch': b, 'steps': s['kd_steps'], 'chunk_s': chunk_s,
             'steps_per_s': s['kd_steps'] / chunk_s,
             'images_per_s': b * s['kd_steps'] / chunk_s, 'compile_s': kd_compile},
  }


def worker_imagenet(n: int, per_device: int, s: dict, pool_mode: str) -> dict:
  """Times one fast_imagenet round and one KD chunk at 224 pixels on an n-device mesh,
  the pool replicated ('device') or split over the devices ('sharded')."""
  import jax  # pylint: disable=g-import-not-at-top
  from cmi_jax import distill, models, parallel  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis import fast  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis.api import make_config  # pylint: disable=g-import-not-at-top
  from cmi_jax.teacher import Teacher  # pylint: disable=g-import-not-at-top
  from experiments import plan  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(n)
  shape = tuple(s['image_shape'])
  b = per_device * n
  key = jax.random.key(0)
  t_mod, s_mod = models.get(s['teacher'], 1000), models.get(s['student'], 1000)
  teacher = Teacher(t_mod, models.init(t_mod, key, (1,) + shape))
  student = Teacher(s_mod, models.init(s_mod, jax.random.fold_in(key, 1), (1,) + shape))
  cfg = make_config(dataset='imagenet', method=s['method'], batch_size=b, g_steps=s['g_steps'],
                    pool_size=4 * b)
  kd_cfg = distill.KDConfig(batch_size=b, temperature=1.0, crop_scale=(0.08, 1.0),
                            mean=cfg.mean, std=cfg.std)
  teacher, student = parallel.replicate(mesh, (teacher, student))
  shardings = plan.synth_shardings(
      mesh, jax.eval_shape(lambda t: fast.init_state(cfg, t, key), teacher), pool_mode)
  state = parallel.init_sharded(lambda t: fast.init_state(cfg, t, key), shardings, teacher)
  shardings = plan.synth_shardings(mesh, state, pool_mode)  # this state's own static fields
  steps = plan.compile_plan(mesh, cfg, cfg, kd_cfg, fresh=False, state_shardings=shardings)
  round_s, round_compile, state, _ = time_round(steps, teacher, student, state, key,
                                                s['repeats'])
  pool = state.pool  # 1 + repeats rounds of B images
  pool_spec = str(jax.tree_util.tree_leaves(pool.data)[0].sharding.spec)
  chunk_s, kd_compile = time_kd_chunk(mesh, steps, s_mod, shape, teacher, pool, key, s)
  return {
      'devices': n, 'pool_mode': pool_mode, 'pool_spec': pool_spec,
      'backend': jax.default_backend(), 'jax': jax.__version__,
      'device_kind': getattr(jax.devices()[0], 'device_kind', ''),
      'synthesis': {'batch': b, 'g_steps': cfg.g_steps, 'round_s': round_s,
                    'image_iterations_per_s': b * cfg.g_steps / round_s,
                    'compile_s': round_compile},
      'kd': {'batch': b, 'steps': s['kd_steps'], 'chunk_s': chunk_s,
             'images_per_s': b * s['kd_steps'] / chunk_s, 'compile_s': kd_compile},
  }


def _spawn(n: int, args, pool_mode: str = '') -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])
  cmd = [sys.executable, '-m', 'benchmarks.scaling', '--worker', str(n),
         f'--per_device={args.per_device}'] + (['--quick'] if args.quick else []) + (
             [f'--imagenet={pool_mode}'] if pool_mode else [])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'worker for {n} device(s) failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='small nets and images (~2-3 min on CPU)')
  ap.add_argument('--devices', default='1,2,4', help='comma-separated device counts')
  ap.add_argument('--per_device', type=int, default=16, help='batch per device (weak scaling)')
  ap.add_argument('--out', default=os.path.join(RESULTS, 'scaling.json'))
  ap.add_argument('--worker', type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument('--imagenet', nargs='?', const='device,sharded', default='',
                  help='the 224-pixel fast_imagenet setting, for these pool modes '
                       '(default per device: 2; writes scaling_imagenet.json)')
  args = ap.parse_args()
  if args.imagenet:
    setting = SETTINGS['imagenet']
    if args.worker:
      print(json.dumps(worker_imagenet(args.worker, args.per_device, setting, args.imagenet)))
      return
    return main_imagenet(args, setting)
  setting = SETTINGS['quick' if args.quick else 'full']
  if args.worker:
    print(json.dumps(worker(args.worker, args.per_device, setting)))
    return

  rows = []
  t0 = time.time()
  load_before = os.getloadavg()
  for n in (int(v) for v in args.devices.split(',')):
    rows.append(_spawn(n, args))
    print(f'{n} device(s) done ({time.time() - t0:.0f} s)', flush=True)
  base_syn = rows[0]['synthesis']['image_iterations_per_s'] / rows[0]['devices']
  base_kd = rows[0]['kd']['images_per_s'] / rows[0]['devices']
  for r in rows:
    for part, key, base in (('synthesis', 'image_iterations_per_s', base_syn),
                            ('kd', 'images_per_s', base_kd)):
      r[part]['speedup'] = r[part][key] / (rows[0]['devices'] * base)
      r[part]['efficiency'] = r[part][key] / (r['devices'] * base)
  backend = rows[0]['backend']
  note = (CPU_NOTE.format(cores=os.cpu_count()) if backend == 'cpu' else
          f'{rows[0]["device_kind"]} devices, one per mesh position.')
  print(f'\n{"quick" if args.quick else "full"}: teacher {setting["teacher"]} -> student '
        f'{setting["student"]}, {"x".join(map(str, setting["image_shape"]))}, '
        f'{args.per_device} images per device; backend {backend}')
  print(f'{"devices":>7} | {"synth B":>7} {"round s":>8} {"img-it/s":>9} {"speedup":>7} {"eff":>5} '
        f'{"compile s":>9} | {"KD B":>5} {"steps/s":>8} {"img/s":>8} {"speedup":>7} {"eff":>5} '
        f'{"compile s":>9}')
  for r in rows:
    sy, kd = r['synthesis'], r['kd']
    print(f'{r["devices"]:>7} | {sy["batch"]:>7} {sy["round_s"]:>8.2f} '
          f'{sy["image_iterations_per_s"]:>9.1f} {sy["speedup"]:>7.2f} {sy["efficiency"]:>5.2f} '
          f'{sy["compile_s"]:>9.1f} | {kd["batch"]:>5} {kd["steps_per_s"]:>8.2f} '
          f'{kd["images_per_s"]:>8.1f} {kd["speedup"]:>7.2f} {kd["efficiency"]:>5.2f} '
          f'{kd["compile_s"]:>9.1f}')
  print(f'Note: {note}')
  result = {'benchmark': 'scaling', 'mode': 'quick' if args.quick else 'full', 'note': note,
            'per_device_batch': args.per_device, 'setting': setting, 'cpu_count': os.cpu_count(),
            'machine': platform.machine(), 'jax': rows[0]['jax'], 'rows': rows,
            'total_s': time.time() - t0,
            # Other work on the host skews CPU timings: the 1-minute load before/after.
            'load_average_1min': [load_before[0], os.getloadavg()[0]]}
  write_result(args.out, result)


def main_imagenet(args, setting):
  """Each device count and pool mode in its own subprocess; overhead ratios against the
  1-device, device-pool row (fake CPU devices share the cores: no speedup expected)."""
  per_device = 2 if args.per_device == 16 else args.per_device  # 224 px: a small batch
  args.per_device = per_device
  out = args.out if args.out != os.path.join(RESULTS, 'scaling.json') else \
      os.path.join(RESULTS, 'scaling_imagenet.json')
  rows, t0, load_before = [], time.time(), os.getloadavg()
  for n in (int(v) for v in args.devices.split(',')):
    for mode in args.imagenet.split(','):
      if mode == 'sharded' and n == 1:
        continue  # one device: the same placement as 'device'
      rows.append(_spawn(n, args, mode))
      r = rows[-1]
      # Weak scaling on shared cores: time per image relative to 1 device (1.0 = no
      # partitioning overhead beyond sharing the cores).
      for part, key in (('synthesis', 'image_iterations_per_s'), ('kd', 'images_per_s')):
        r[part]['time_per_image_vs_1'] = rows[0][part][key] / r[part][key]
      print(f"{n} device(s), pool {mode}: round {r['synthesis']['round_s']:.2f} s "
            f"(x{r['synthesis']['time_per_image_vs_1']:.2f} per image vs 1), KD chunk "
            f"{r['kd']['chunk_s']:.2f} s (x{r['kd']['time_per_image_vs_1']:.2f}); compile "
            f"{r['synthesis']['compile_s']:.0f} + {r['kd']['compile_s']:.0f} s; pool {r['pool_spec']}"
            f" ({time.time() - t0:.0f} s)", flush=True)
      write_result(out, {
          'benchmark': 'scaling_imagenet', 'setting': setting, 'per_device_batch': per_device,
          'note': CPU_NOTE.format(cores=os.cpu_count()), 'cpu_count': os.cpu_count(),
          'jax': rows[0]['jax'], 'rows': rows, 'total_s': time.time() - t0,
          'load_average_1min': [load_before[0], os.getloadavg()[0]]})


if __name__ == '__main__':
  main()

"""Synthesis speed: time per CMI iteration vs. the work it cannot avoid.

  python -m benchmarks.synthesis_speed            # full grid (a few minutes on 2 CPU cores)
  python -m benchmarks.synthesis_speed --quick    # one small setting

For teacher wrn_16_2 -> student wrn_16_1 at 32x32x3 and 28x28x1, batch 256 and
64, it times (median of repeats, after compilation):
  * one iteration of the compiled round (round time / g_steps);
  * the parts alone: generator forward+backward (params and z), teacher
    forward+input-gradient on both views (2B images, with the BN taps),
    student forward on the global view;
and reports ratio = iteration / sum(parts) (goal <= 1.3), the round's compile
time, XLA's memory analysis of the compiled round, and the process's peak RSS.
Writes benchmarks/results/synthesis_speed.json.
"""

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.common import RESULTS, machine_info, write_result
from cmi_jax import models
from cmi_jax.synthesis.bank import ring_add
from cmi_jax.synthesis.cmi import SynthesisConfig, init_state, synthesis_round
from cmi_jax.teacher import Teacher



def _median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench(shape, batch: int, g_steps: int, repeats: int) -> dict:
  h, w, c = shape
  key = jax.random.key(0)
  t_mod, s_mod = models.get('wrn_16_2', 10), models.get('wrn_16_1', 10)
  teacher = Teacher(t_mod, models.init(t_mod, key, (1,) + shape))
  student = Teacher(s_mod, models.init(s_mod, jax.random.fold_in(key, 1), (1,) + shape))
  cfg = SynthesisConfig(image_shape=shape, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c,
                        batch_size=batch, g_steps=g_steps, n_neg=4096, bank_size=40960,
                        pool_size=max(4 * batch, 1024), global_padding=4 if h == 32 else 2)
  state = init_state(cfg, teacher, key)
  round_fn = jax.jit(synthesis_round, static_argnums=(0,))

  t = time.perf_counter()
  compiled = round_fn.lower(cfg, teacher, student, state, key).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  # Fill the bank (random features) so the timed rounds use all n_neg negatives,
  # as a long run does.
  feats = jax.random.normal(key, (cfg.n_neg, state.bank.data.shape[-1]))
  state = state.replace(bank=ring_add(state.bank, feats))
  round_s = _median_time(lambda s: compiled(teacher, student, s, key)[1].images, state,
                         repeats=repeats)
  per_iter = round_s / g_steps

  gen = cfg.make_generator()
  z = jax.random.normal(key, (batch, cfg.nz))
  gvars = gen.init(key, z)

  @jax.jit
  def gen_fwd_bwd(params, z):
    def f(params, z):
      x, _ = gen.apply({'params': params, 'batch_stats': gvars['batch_stats']}, z, train=True,
                       mutable=['batch_stats'])
      return jnp.sum(x * x)
    return jax.grad(f, argnums=(0, 1))(params, z)

  x2 = jax.random.normal(key, (2 * batch,) + shape)

  @jax.jit
  def teacher_fwd_bwd(x):
    def f(x):
      out = teacher(x)
      return jnp.sum(out.logits) + sum(jnp.sum(t.mean) + jnp.sum(t.var) for t in out.bn)
    return jax.grad(f)(x)

  @jax.jit
  def student_fwd(x):
    return student(x, taps=False).logits

  parts = {
      'generator_fwd_bwd_s': _median_time(gen_fwd_bwd, gvars['params'], z, repeats=repeats),
      'teacher_fwd_inputgrad_2views_s': _median_time(teacher_fwd_bwd, x2, repeats=repeats),
      'student_fwd_s': _median_time(student_fwd, x2[:batch], repeats=repeats),
  }
  floor = sum(parts.values())
  return {
      'image_shape': list(shape), 'batch_size': batch, 'g_steps': g_steps,
      'iteration_s': per_iter, 'images_per_s': batch / per_iter, **parts,
      'parts_sum_s': floor, 'ratio_iteration_to_parts': per_iter / floor,
      'round_compile_s': compile_s,
      'round_temp_bytes': getattr(mem, 'temp_size_in_bytes', None),
      'round_argument_bytes': getattr(mem, 'argument_size_in_bytes', None),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='one small setting only')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--g_steps', type=int, default=5)
  ap.add_argument('--out', default=os.path.join(RESULTS, 'synthesis_speed.json'))
  args = ap.parse_args()
  settings = [((28, 28, 1), 64)] if args.quick else [
      ((32, 32, 3), 256), ((32, 32, 3), 64), ((28, 28, 1), 256), ((28, 28, 1), 64)]
  rows = []
  for shape, batch in settings:
    row = bench(shape, batch, args.g_steps, args.repeats)
    rows.append(row)
    print(f"{'x'.join(map(str, shape)):>8} B={batch:<4} iteration {row['iteration_s'] * 1e3:8.1f} ms "
          f"({row['images_per_s']:6.1f} img/s)  parts {row['parts_sum_s'] * 1e3:8.1f} ms  "
          f"ratio {row['ratio_iteration_to_parts']:.2f}  compile {row['round_compile_s']:.1f} s  "
          f"temp {row['round_temp_bytes'] / 2**20 if row['round_temp_bytes'] else float('nan'):.0f} MiB",
          flush=True)
  result = {
      'benchmark': 'synthesis_speed', **machine_info(),
      'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'teacher': 'wrn_16_2', 'student': 'wrn_16_1', 'rows': rows,
  }
  print(f'peak RSS {result["peak_rss_mib"]:.0f} MiB')
  write_result(args.out, result)


if __name__ == '__main__':
  main()

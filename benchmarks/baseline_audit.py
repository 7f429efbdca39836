"""Is the PyTorch baseline as fast as the reference code? Variants of its CMI iteration,
timed in one process (torch only, no JAX loaded unless --with-jax), interleaved.

Each variant changes one thing the authors' code might do differently from
`benchmarks/torch_baseline.py`: activations in place (the reference nets' and
generator's `inplace=True`), no weight gradients for the frozen teacher and student,
and a JAX computation resident in the same process (as in `synthesis_speed`, where
XLA's thread pool shares the cores). An iteration is the difference of a `long`-
and a `short`-iteration round over (long - short), median of `repeats`.

  python -m benchmarks.baseline_audit [--batch=64] [--with-jax]
"""

import argparse
import os
import platform
import statistics
import time
from typing import List, Optional

from benchmarks.common import RESULTS, write_result

VARIANTS = {  # name: CMISynthesizer / build_classifier options ('baseline': the old one)
    'baseline': dict(param_grads=True),
    'inplace_activations': dict(inplace=True, param_grads=True),
    'no_weight_grads': dict(param_grads=False),
    'inplace_no_weight_grads': dict(inplace=True, param_grads=False),
}


def _synthesizer(tb, shape, batch, opts):
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  c = shape[-1]
  inplace = opts.get('inplace', False)
  teacher = tb.build_classifier('wrn_16_2', 10, c, inplace)
  student = tb.build_classifier('wrn_16_1', 10, c, inplace)
  syn = tb.CMISynthesizer(teacher, student, shape, 10, (0.5,) * c, (0.25,) * c,
                          batch_size=batch, global_padding=4, **opts)
  syn.fill_bank(syn.n_neg)
  return syn


def main(argv: Optional[List[str]] = None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--long', type=int, default=6)
  ap.add_argument('--short', type=int, default=1)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--with-jax', action='store_true',
                  help='also time the baseline with a JAX matmul run between iterations')
  ap.add_argument('--out', default=os.path.join(RESULTS, 'baseline_audit.json'))
  args = ap.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_baseline as tb  # pylint: disable=import-outside-toplevel
  shape = (32, 32, 3)
  syns = {name: _synthesizer(tb, shape, args.batch, opts) for name, opts in VARIANTS.items()}
  between = lambda: None
  if args.with_jax:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    a = jnp.ones((1024, 1024))
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    between = lambda: mm(a).block_until_ready()
    syns['baseline_with_jax_resident'] = syns['baseline']
  times = {name: [] for name in syns}
  for syn in syns.values():
    syn.run_round(1)  # warm-up
  for r in range(args.repeats):
    for name, syn in syns.items():
      runs = []
      for n in (args.long, args.short):
        if name.endswith('with_jax_resident'):
          between()
        t = time.perf_counter()
        syn.run_round(n)
        runs.append(time.perf_counter() - t)
      times[name].append((runs[0] - runs[1]) / (args.long - args.short))
      print(f'repeat {r}: {name:28s} {times[name][-1]:.3f} s/iteration', flush=True)
  base = statistics.median(times['baseline'])
  rows = [{'variant': k, 's_per_iteration': statistics.median(v), 'all': v,
           'ratio_to_baseline': statistics.median(v) / base} for k, v in times.items()]
  for row in rows:
    print(f"{row['variant']:28s} {row['s_per_iteration']:.3f} s  x{row['ratio_to_baseline']:.3f}")
  write_result(args.out, {'setting': f'CMI iteration 32x32x3 B={args.batch}, wrn_16_2 -> wrn_16_1',
                          'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
                          'machine': {'cpu_count': os.cpu_count(), 'machine': platform.machine(),
                                      'load_average': os.getloadavg()},
                          'rows': rows})


if __name__ == '__main__':
  main()

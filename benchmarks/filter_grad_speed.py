"""Stride-1 conv filter gradients on the CPU: the three ways cmi_jax can compute them.

  python -m benchmarks.filter_grad_speed            # the KD step's and generator's shapes (~2 min)
  python -m benchmarks.filter_grad_speed --quick    # two small shapes, seconds (JSON in the temp folder)

dk[i, j] = sum over N, H, W of xp[n, h + i, w + j]^T g[n, h, w] for a 3x3, padding-1
conv, timed per call inside a `lax.fori_loop` (where synthesis and KD run), all
implementations in one process, interleaved, median of `--repeats`:
  taps      kh*kw matmuls over shifted windows of the padded input
            (`layers._filter_grad_windows`; every stride-1 kxk conv before 2026-12-06)
  shift_g   one matmul over kh*kw shifted copies of g (`layers._filter_grad_shift_g`,
            still chosen for a narrow output, C_out < C_in / 4)
  as_conv   one canonical forward conv over the batch (`layers._filter_grad_as_conv`,
            chosen for the other stride-1 kxk convs since 2026-12-06)
  xla       XLA's own filter-gradient conv (jax.vjp of the forward): slow inside loops
            on the CPU (jax-ml/jax#12868); timed once per shape with --xla
ratio = as_conv / taps. Also the largest difference from `taps`, relative to its
largest |value|. Writes benchmarks/results/filter_grad_speed.json.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.common import RESULTS, machine_info, write_result
from cmi_jax.models import layers

# name: (N, H, W, C_in, C_out): the KD step's student (wrn_16_1 at 32x32x3, B=128), the
# teacher-width layers (wrn_16_2), the CMI generator's convs (B=64), an ImageNet layer.
SHAPES = {
    'wrn16_1_block1_128x32x32x16': (128, 32, 32, 16, 16),
    'wrn16_1_block2_128x16x16x32': (128, 16, 16, 32, 32),
    'wrn16_1_block3_128x8x8x64': (128, 8, 8, 64, 64),
    'wrn16_2_block1_128x32x32x32': (128, 32, 32, 32, 32),
    'wrn16_2_block3_128x8x8x128': (128, 8, 8, 128, 128),
    'generator_64x32x32x64to32': (64, 32, 32, 64, 32),
    'generator_last_64x32x32x32to3': (64, 32, 32, 32, 3),
    'resnet_224_layer1_4x56x56x64': (4, 56, 56, 64, 64),
}
QUICK = {'quick_8x8x8x8': (8, 8, 8, 8, 8), 'quick_8x8x8x16to2': (8, 8, 8, 16, 2)}
LOOP = 4  # filter gradients per timed call (one fori_loop)


IMPLS = {
    'taps': lambda xp, g: layers._filter_grad_windows(xp, g, 3, 3, 1),
    'shift_g': lambda xp, g: layers._filter_grad_shift_g(xp, g, 3, 3),
    'as_conv': layers._filter_grad_as_conv,
}


def _xla(xp, g):
  x = xp[:, 1:-1, 1:-1]
  return jax.vjp(lambda k: layers._xla_conv(x, k, 1, 1),
                 jnp.zeros((3, 3, x.shape[-1], g.shape[-1])))[1](g)[0]


def _looped(fn):
  """LOOP filter gradients of slightly different inputs in one compiled fori_loop."""
  def run(xp, g):
    def body(i, acc):
      return acc + fn(xp + i.astype(xp.dtype) * 1e-3, g)
    return lax.fori_loop(0, LOOP, body, jnp.zeros((3, 3, xp.shape[-1], g.shape[-1])))
  return jax.jit(run)


def bench_shape(shape, repeats: int, with_xla: bool) -> dict:
  n, h, w, ci, co = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, ci)), jnp.float32)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g = jnp.asarray(rng.standard_normal((n, h, w, co)), jnp.float32)
  impls = dict(IMPLS, **({'xla': _xla} if with_xla else {}))
  fns = {k: _looped(f) for k, f in impls.items()}
  outs = {k: np.asarray(f(xp, g)) for k, f in fns.items()}  # compile + reference values
  scale = float(np.max(np.abs(outs['taps'])))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      if k == 'xla' and times[k]:
        continue  # seconds per call: once is enough
      t = time.perf_counter()
      jax.block_until_ready(f(xp, g))
      times[k].append((time.perf_counter() - t) / LOOP)
  flops = 2.0 * n * h * w * 9 * ci * co
  row = {'shape_nhw_cin_cout': list(shape), 'loop': LOOP, 'repeats': repeats,
         'ms': {k: 1e3 * statistics.median(v) for k, v in times.items()},
         'max_rel_diff_vs_taps': {k: float(np.max(np.abs(v - outs['taps']))) / scale
                                  for k, v in outs.items()}}
  row['gflops'] = {k: flops / (v * 1e-3) / 1e9 for k, v in row['ms'].items()}
  row['ratio_as_conv_to_taps'] = row['ms']['as_conv'] / row['ms']['taps']
  row['ratio_shift_g_to_taps'] = row['ms']['shift_g'] / row['ms']['taps']
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--xla', action='store_true', help="also XLA's own filter gradient (slow)")
  ap.add_argument('--out', default=None)
  args = ap.parse_args(argv)
  shapes = QUICK if args.quick else SHAPES
  result = dict(benchmark='filter_grad_speed', **machine_info(),
                xla_flags=os.environ.get('XLA_FLAGS', ''),
                date=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                loadavg_1min_start=os.getloadavg()[0], rows={})
  for name, shape in shapes.items():
    row = bench_shape(shape, args.repeats, args.xla)
    result['rows'][name] = row
    print(f'{name:>34}  ' + '  '.join(f'{k} {v:7.2f} ms' for k, v in row['ms'].items())
          + f"  as_conv/taps {row['ratio_as_conv_to_taps']:.2f}", flush=True)
  result['loadavg_1min_end'] = os.getloadavg()[0]
  out = args.out or (os.path.join(tempfile.gettempdir(), 'filter_grad_speed_quick.json')
                     if args.quick else os.path.join(RESULTS, 'filter_grad_speed.json'))
  write_result(out, result)
  return result


if __name__ == '__main__':
  main()

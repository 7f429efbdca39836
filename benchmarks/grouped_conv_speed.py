"""Depthwise and grouped convs on the CPU: cmi_jax's explicit-gradient path vs XLA's own.

  python -m benchmarks.grouped_conv_speed             # every shape (~15 min on 2 loaded cores: XLA is slow here)
  python -m benchmarks.grouped_conv_speed --quick     # two small shapes, seconds

For the depthwise shapes of MobileNetV2 (at 32x32 inputs and at 224x224) and
ShuffleNetV2 (32x32), and grouped 3x3 / 1x1 convs (groups 2, 4), times forward +
both gradients (x and kernel, one jitted `jax.vjp`), once per call ('jit') and
per step inside a `lax.scan` of `--scan` steps ('scan', where synthesis and KD
run), and the forward alone. Implementations, all in one process, interleaved,
median of `--repeats`:
  xla       lax.conv_general_dilated(feature_group_count=groups) and XLA's gradients
            (conv2d impl='xla')
  cmi_jax   conv2d impl='explicit_grad' (what 'auto' picks on the CPU): depthwise
            convs as shifted multiply-adds (cmi_jax.models.conv_taps), other grouped
            convs through the grouped explicit-gradient VJP
  grouped_vjp  (depthwise rows only) the grouped explicit-gradient VJP that depthwise
            convs took before conv_taps: the "before" of the speed log
ratio = cmi_jax / xla (< 1: cmi_jax faster). Also the largest difference of y, dx,
dk from XLA's, relative to XLA's largest |value|.
Writes benchmarks/results/grouped_conv_speed.json.
"""

import argparse
import os
import statistics
import time
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.common import RESULTS, machine_info, write_result
from cmi_jax.models import layers

# name: (N, H, W, C_in, C_out, kernel, stride, groups); groups == C: depthwise.
SHAPES = {
    'mbv2_32in_f1_dw16x16x32_s1': (16, 16, 16, 32, 32, 3, 1, 32),
    'mbv2_32in_f2_dw16x16x96_s2': (16, 16, 16, 96, 96, 3, 2, 96),
    'mbv2_32in_f3_dw8x8x144_s1': (16, 8, 8, 144, 144, 3, 1, 144),
    'shufv2_32in_l1down_dw32x32x24_s2': (16, 32, 32, 24, 24, 3, 2, 24),
    'shufv2_32in_l1_dw16x16x58_s1': (16, 16, 16, 58, 58, 3, 1, 58),
    'mbv2_224_f3_dw56x56x144_s1': (8, 56, 56, 144, 144, 3, 1, 144),
    'mbv2_224_f4_dw56x56x144_s2': (8, 56, 56, 144, 144, 3, 2, 144),
    'mbv2_224_f5_dw28x28x192_s1': (8, 28, 28, 192, 192, 3, 1, 192),
    'mbv2_224_f7_dw28x28x192_s2': (8, 28, 28, 192, 192, 3, 2, 192),
    'grouped_g2_16x16x64_3x3': (16, 16, 16, 64, 64, 3, 1, 2),
    'grouped_g4_16x16x64_3x3_s2': (16, 16, 16, 64, 64, 3, 2, 4),
    'grouped_g4_16x16x240_1x1': (16, 16, 16, 240, 240, 1, 1, 4),
}
QUICK = {'quick_dw8x8x16_s2': (4, 8, 8, 16, 16, 3, 2, 16),
         'quick_g2_8x8x8': (4, 8, 8, 8, 8, 3, 1, 2)}


def _impls(depthwise: bool):
  out = {'xla': lambda x, k, s, p, g: layers.conv2d(x, k, s, p, 'xla', g),
         'cmi_jax': lambda x, k, s, p, g: layers.conv2d(x, k, s, p, 'explicit_grad', g)}
  if depthwise:
    out['grouped_vjp'] = layers._conv_explicit_grad  # pylint: disable=protected-access
  return out


def _compiled(conv, stride, pad, groups, mode: str, scan: int):
  """A jitted f(x, k, ct) for mode 'fwd', 'jit' (fwd + both grads) or 'scan'."""
  def fwd_bwd(x, k, ct):
    y, vjp = jax.vjp(lambda a, b: conv(a, b, stride, pad, groups), x, k)
    return (y, *vjp(ct))
  if mode == 'fwd':
    return jax.jit(lambda x, k, ct: conv(x, k, stride, pad, groups))
  if mode == 'jit':
    return jax.jit(fwd_bwd)

  def looped(x, k, ct):
    def body(carry, _):  # each step's input depends on the last: no step can be hoisted
      y, dx, dk = fwd_bwd(x + carry, k, ct)
      return carry + 1e-9 * (jnp.mean(y) + jnp.mean(dx) + jnp.mean(dk)), None
    return lax.scan(body, jnp.zeros((), x.dtype), None, length=scan)[0]
  return jax.jit(looped)


def _rel_diff(got, want) -> float:
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def bench(name, shape, repeats: int, scan: int) -> dict:
  n, h, w, ci, co, ks, stride, groups = shape
  key = jax.random.key(0)
  x = jax.random.normal(key, (n, h, w, ci), jnp.float32)
  k = jax.random.normal(jax.random.fold_in(key, 1), (ks, ks, ci // groups, co), jnp.float32)
  pad = ks // 2
  impls = _impls(groups == ci == co)
  ct = jax.random.normal(jax.random.fold_in(key, 2),
                         jax.eval_shape(lambda: impls['xla'](x, k, stride, pad, groups)).shape)
  fns = {(im, mode): _compiled(f, stride, pad, groups, mode, scan)
         for im, f in impls.items() for mode in ('fwd', 'jit', 'scan')}
  outs = {im: jax.block_until_ready(fns[(im, 'jit')](x, k, ct)) for im in impls}
  diffs = {im: dict(zip(('y', 'dx', 'dk'), (_rel_diff(a, b) for a, b in zip(outs[im], outs['xla']))))
           for im in impls if im != 'xla'}
  for f in fns.values():  # compile + warm up
    jax.block_until_ready(f(x, k, ct))
  times = {key_: [] for key_ in fns}
  for _ in range(repeats):
    for key_, f in fns.items():  # interleaved: every implementation and mode in each repeat
      t = time.perf_counter()
      jax.block_until_ready(f(x, k, ct))
      times[key_].append(time.perf_counter() - t)
  med = {f'{im}_{mode}_ms': 1e3 * statistics.median(v) / (scan if mode == 'scan' else 1)
         for (im, mode), v in times.items()}
  row = {'shape': name, 'n_h_w_cin_cout_k_stride_groups': list(shape),
         'kind': 'depthwise' if groups == ci == co else f'grouped (groups={groups})', **med,
         'max_rel_diff_vs_xla': diffs}
  for im in impls:
    if im != 'xla':
      for mode in ('fwd', 'jit', 'scan'):
        row[f'ratio_{im}_to_xla_{mode}'] = med[f'{im}_{mode}_ms'] / med[f'xla_{mode}_ms']
  return row


def _fmt(row) -> str:
  s = f"{row['shape']:>34}"
  for mode in ('fwd', 'jit', 'scan'):
    s += (f"  {mode}: xla {row[f'xla_{mode}_ms']:7.2f} cmi_jax {row[f'cmi_jax_{mode}_ms']:7.2f} ms"
          f" ({row[f'ratio_cmi_jax_to_xla_{mode}']:.2f})")
  return s


def markdown_table(rows) -> str:
  lines = ['| shape | fwd+grads xla | cmi_jax | ratio | in a scan: xla | cmi_jax | ratio | '
           'before (grouped VJP), scan | fwd only: ratio | max rel. diff (y/dx/dk) |',
           '|---' * 10 + '|']
  for r in rows:
    before = f"{r['grouped_vjp_scan_ms']:.2f} ms" if 'grouped_vjp_scan_ms' in r else '-'
    d = r['max_rel_diff_vs_xla']['cmi_jax']
    lines.append(f"| {r['shape']} | {r['xla_jit_ms']:.2f} ms | {r['cmi_jax_jit_ms']:.2f} ms | "
                 f"{r['ratio_cmi_jax_to_xla_jit']:.2f} | {r['xla_scan_ms']:.2f} ms | "
                 f"{r['cmi_jax_scan_ms']:.2f} ms | {r['ratio_cmi_jax_to_xla_scan']:.2f} | {before} | "
                 f"{r['ratio_cmi_jax_to_xla_fwd']:.2f} | "
                 f"{d['y']:.0e} / {d['dx']:.0e} / {d['dk']:.0e} |")
  return '\n'.join(lines)


def main(argv: Optional[List[str]] = None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='two small shapes (smoke test)')
  ap.add_argument('--shapes', default='', help=f'comma list of {sorted(SHAPES)}')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--scan', type=int, default=2, help='steps of the scan timing')
  ap.add_argument('--out', default=os.path.join(RESULTS, 'grouped_conv_speed.json'))
  args = ap.parse_args(argv)
  table = QUICK if args.quick else SHAPES
  names = [s for s in args.shapes.split(',') if s] or list(table)
  for s in names:
    if s not in table:
      raise ValueError(f'--shapes: unknown shape {s!r}; choose from {sorted(table)}.')
  if args.quick:
    args.repeats, args.scan = 1, 2
  load = [os.getloadavg()[0]]
  rows = []
  for s in names:
    rows.append(bench(s, table[s], args.repeats, args.scan))
    print(_fmt(rows[-1]), flush=True)
  load.append(os.getloadavg()[0])
  result = {'benchmark': 'grouped_conv_speed', **machine_info(), 'repeats': args.repeats,
            'scan_steps': args.scan, 'dtype': 'float32', 'loadavg_1min': load,
            'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'xla_flags': os.environ.get('XLA_FLAGS', ''), 'numpy': np.__version__,
            'rows': rows}
  write_result(args.out, result)
  print(markdown_table(rows))
  return result


if __name__ == '__main__':
  main()

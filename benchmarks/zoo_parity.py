"""Parity of every model-zoo entry with its torch twin: the figures of the README zoo table.

  python -m benchmarks.zoo_parity            # all nets at 32, ImageNet ones also at 224 (~3 min)
  python -m benchmarks.zoo_parity --only resnet8 resnet18_imagenet
  python -m benchmarks.zoo_parity --table    # the README table from the last results

For each architecture a randomized torch twin (tests/torch_zoo.py: random weights,
BN running statistics measured on a random batch and jittered, eval mode) is saved
as a file of the kind users have -- the reference's `{'state_dict': ...}` zip for
the CIFAR zoo, torchvision's raw state_dict in the legacy (pre-1.6) format for the
ImageNet nets at 224, a raw zip state_dict for them at 32 -- read by
`cmi_jax.convert.load_pth`, and both forwards are compared on a batch of 2:
max |logit difference| (and relative: over the largest |logit|), how far each float32
forward is from torch in float64 (the floor of any float32 comparison), and how far
cmi_jax's forward in float64 is from torch's (tests/torch_zoo.py jax_fp64_logits):
within 2^-23 of the largest |logit| (the logits' final float32 cast) both compute the
same function, and every float32 difference is rounding (`verdict`). Also the parameter
count. Needs torch. Writes benchmarks/results/zoo_parity.json.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import RESULTS, machine_info, write_result
from cmi_jax import models

CIFAR = ('resnet8', 'resnet20', 'resnet32', 'resnet56', 'resnet110', 'resnet8x4', 'resnet32x4',
         'vgg8', 'vgg13', 'shufflenetv2', 'mobilenetv2', 'resnet50')
IMAGENET = ('resnet18_imagenet', 'resnet34_imagenet', 'resnet50_imagenet', 'mobilenetv2_imagenet')
OUT = os.path.join(RESULTS, 'zoo_parity.json')
TARGET = 1e-4  # issue 20's max |logit difference|
FP64_TOL = 2.0 ** -23  # cmi_jax float64 vs torch float64, per unit of the largest |logit|


def verdict(r) -> str:
  """'within 1e-4', 'float32 rounding' (over it, but the float64 forwards agree), or a
  mismatch (the two differ in float64 too: a real difference, not rounding)."""
  if r['jax_fp64_vs_torch_fp64'] > FP64_TOL * r['max_abs_logit']:
    return 'MISMATCH: differs from torch in float64 too'
  return f'within {TARGET:.0e}' if r['max_abs_diff'] <= TARGET else 'float32 rounding'


def cases(only=None):
  """(arch, side, layout, num_classes) rows in table order."""
  rows = [(a, 32, 'reference', 10) for a in CIFAR]
  rows += [(a, s, layout, k) for a in IMAGENET
           for s, layout, k in ((32, 'torchvision', 10), (224, 'legacy', 1000))]
  return [r for r in rows if not only or r[0] in only]


def param_count(arch, num_classes):
  module = models.get(arch, num_classes)
  variables = jax.eval_shape(lambda: models.init(module, jax.random.key(0), (1, 32, 32, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))


# Reference spellings that differ from the name, and input sizes (models.FIXED_INPUT_SIZE: 32 only).
SPELLINGS = {'vgg8': '`vgg8` (`vgg8_bn`)', 'vgg13': '`vgg13` (`vgg13_bn`)',
             'resnet18_imagenet': '`resnet18_imagenet`; torchvision `resnet18`',
             'resnet34_imagenet': 'torchvision `resnet34` (not in the DF registry)',
             'resnet50_imagenet': '`resnet50_imagenet`; torchvision `resnet50`',
             'mobilenetv2_imagenet': '`mobilenetv2_imagenet`; torchvision `mobilenet_v2`'}
SIZES = {'vgg8': 'any (32, 64)', 'vgg13': 'any (32, 64)', 'mobilenetv2': 'any (32, 64, 224)',
         'resnet50': 'any (32, 64)', **{a: '224 (any)' for a in IMAGENET}}
LAYOUTS = {'reference': "`{'state_dict'}` zip", 'torchvision': 'raw zip', 'legacy': 'raw legacy'}


def table(rows):
  """The README's model-zoo table (markdown) from result rows."""
  by_arch = {}
  for r in rows:
    by_arch.setdefault(r['arch'], []).append(r)
  lines = ['| cmi_jax name | reference spelling(s) | params | inputs | file tested | '
           'max \\|logit diff\\| (max \\|logit\\|) | relative | float32 vs torch float64: '
           'cmi_jax / torch | cmi_jax float64 vs torch float64 (relative) |', '|---' * 9 + '|']
  for arch, rs in by_arch.items():
    rs = sorted(rs, key=lambda r: -r['input'])  # 224 first
    at = lambda r: f" at {r['input']}" if len(rs) > 1 else ''
    params = f"{rs[0]['params'] / 1e6:.4f}M"
    params += ' (1000 cls)' if rs[0]['num_classes'] == 1000 else ''
    size = SIZES.get(arch, f"{models.FIXED_INPUT_SIZE.get(arch, 'any')} only")
    files = '; '.join(f"{LAYOUTS[r['layout']]}{at(r)}" for r in rs)
    diffs = '; '.join(f"{r['max_abs_diff']:.1e} ({r['max_abs_logit']:.0f}){at(r)}" for r in rs)
    rel = '; '.join(f"{r['max_abs_diff'] / r['max_abs_logit']:.1e}" for r in rs)
    floor = '; '.join(f"{r['jax_vs_torch_fp64']:.1e} / {r['torch_fp32_vs_fp64']:.1e}" for r in rs)
    exact = '; '.join(f"{r['jax_fp64_vs_torch_fp64']:.0e} "
                      f"({r['jax_fp64_vs_torch_fp64'] / r['max_abs_logit']:.0e})" for r in rs)
    lines.append(f"| `{arch}` | {SPELLINGS.get(arch, f'`{arch}`')} | {params} | {size} | {files} | "
                 f'{diffs} | {rel} | {floor} | {exact} |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='*', help='architectures to measure (default: all)')
  parser.add_argument('--out', default=OUT)
  parser.add_argument('--table', action='store_true', help='print the README table of --out')
  args = parser.parse_args(argv)
  if args.table:
    with open(args.out, encoding='utf-8') as f:
      print(table(json.load(f)['rows']))
    return None
  from tests.torch_zoo import parity  # pylint: disable=import-outside-toplevel  (needs torch)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for arch, side, layout, k in cases(args.only):
      start = time.perf_counter()
      r = parity(arch, pathlib.Path(tmp) / f'{arch}_{side}.pth', (side, side, 3), k, batch=2,
                 layout=layout, fp64=True)
      row = {'arch': arch, 'input': side, 'layout': layout, 'num_classes': k,
             'params': param_count(arch, k), **r,
             'rel_diff': r['max_abs_diff'] / r['max_abs_logit'],
             'jax_fp64_rel': r['jax_fp64_vs_torch_fp64'] / r['max_abs_logit'], 'verdict': verdict(r),
             'seconds': round(time.perf_counter() - start, 1)}
      rows.append(row)
      print(f"{arch:22s} {side:3d} {layout:11s} params {row['params'] / 1e6:8.4f}M  "
            f"max|diff| {r['max_abs_diff']:.1e} (rel {row['rel_diff']:.1e})  "
            f"max|logit| {r['max_abs_logit']:7.2f}  jax32-fp64 {r['jax_vs_torch_fp64']:.1e}  "
            f"torch32-fp64 {r['torch_fp32_vs_fp64']:.1e}  jax64-fp64 {row['jax_fp64_rel']:.0e} rel  "
            f"{row['verdict']}", flush=True)
  import torch  # pylint: disable=import-outside-toplevel  (already loaded by torch_zoo)
  result = {'machine': machine_info(), 'torch': torch.__version__,
            'torch_threads': torch.get_num_threads(), 'python': sys.version.split()[0],
            'batch': 2, 'target_max_abs_diff': TARGET, 'fp64_tolerance_rel': FP64_TOL,
            'method': __doc__.split('\n\n', 2)[2].strip(),
            'summary': {v: sum(r['verdict'] == v for r in rows)
                        for v in sorted({r['verdict'] for r in rows})},
            'rows': rows}
  write_result(args.out, result)
  return result


if __name__ == '__main__':
  main(sys.argv[1:])

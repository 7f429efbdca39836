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
max |logit difference|, and how far each float32 forward is from torch in float64
(the floor of any float32 comparison). Also the parameter count. Needs torch.
Writes benchmarks/results/zoo_parity.json.
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
           'max \\|logit diff\\| (max \\|logit\\|) | torch fp32 vs fp64 |', '|---' * 7 + '|']
  for arch, rs in by_arch.items():
    rs = sorted(rs, key=lambda r: -r['input'])  # 224 first
    at = lambda r: f" at {r['input']}" if len(rs) > 1 else ''
    params = f"{rs[0]['params'] / 1e6:.4f}M"
    params += ' (1000 cls)' if rs[0]['num_classes'] == 1000 else ''
    size = SIZES.get(arch, f"{models.FIXED_INPUT_SIZE.get(arch, 'any')} only")
    files = '; '.join(f"{LAYOUTS[r['layout']]}{at(r)}" for r in rs)
    diffs = '; '.join(f"{r['max_abs_diff']:.1e} ({r['max_abs_logit']:.0f}){at(r)}" for r in rs)
    floor = '; '.join(f"{r['torch_fp32_vs_fp64']:.1e}" for r in rs)
    lines.append(f"| `{arch}` | {SPELLINGS.get(arch, f'`{arch}`')} | {params} | {size} | {files} | "
                 f'{diffs} | {floor} |')
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
             'seconds': round(time.perf_counter() - start, 1)}
      rows.append(row)
      print(f"{arch:22s} {side:3d} {layout:11s} params {row['params'] / 1e6:8.4f}M  "
            f"max|diff| {r['max_abs_diff']:.1e}  max|logit| {r['max_abs_logit']:7.2f}  "
            f"jax-fp64 {r['jax_vs_torch_fp64']:.1e}  torch32-fp64 {r['torch_fp32_vs_fp64']:.1e}",
            flush=True)
  result = {'machine': machine_info(), 'batch': 2, 'rows': rows}
  write_result(args.out, result)
  return result


if __name__ == '__main__':
  main(sys.argv[1:])

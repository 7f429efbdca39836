"""Parity of every model-zoo entry with its torch twin: the figures of the README zoo table.

  python -m benchmarks.zoo_parity            # every net at 32x32, ImageNet nets also at 224 (~3 min CPU)
  python -m benchmarks.zoo_parity --only resnet8 resnet18_imagenet

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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='*', help='architectures to measure (default: all)')
  parser.add_argument('--out', default=OUT)
  args = parser.parse_args(argv)
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

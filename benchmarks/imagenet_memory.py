"""Peak memory of a 224-pixel Fast-50 round and KD step, from XLA's CPU memory analysis.

  python -m benchmarks.imagenet_memory [--batches=2,4] [--out=benchmarks/results/imagenet_memory.json]

Lowers and compiles (nothing runs) the fast_imagenet round (ResNet-50 teacher, ResNet-50
student in L_adv, the DeepGenerator, one inner step: the scan's peak does not grow with
K) and the KD step (ResNet-50 student, ResNet-50 teacher) at two synthesis / KD batch
sizes, for each setting: float32 or bfloat16 (`synthesis.dtype`), with or without
rematerialization of the blocks (`synthesis.remat`). Peak = argument + output + temp
bytes of `compiled.memory_analysis()` minus aliased (donated) bytes; the pool is left
out (pool_size = batch: it is its own line in the README). Per image = the slope
between the two batches; the largest batch per device = (capacity - intercept) / slope.
These are XLA's CPU figures: a GPU compilation fuses and schedules differently.
"""

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from cmi_jax import distill, models
from cmi_jax.state import create_classifier_state, sgd
from cmi_jax.synthesis import fast
from cmi_jax.synthesis.api import make_config
from cmi_jax.teacher import Teacher

ARCH = 'resnet50_imagenet'
DEVICES_GB = {'80 GB': 80e9, '141 GB': 141e9}
SETTINGS = [('float32', False), ('float32', True), ('bfloat16', False), ('bfloat16', True)]


def _abstract_teacher(dtype, remat):
  module = models.get(ARCH, 1000, dtype=dtype, remat=remat)
  variables = jax.eval_shape(lambda: models.init(module, jax.random.key(0), (1, 224, 224, 3)))
  return Teacher(module, variables)


def _peak(compiled):
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def round_bytes(batch, dtype, remat):
  cfg = make_config(image_shape=(224, 224, 3), num_classes=1000, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), method='fast_imagenet', batch_size=batch,
                    g_steps=1, pool_size=batch, dtype=dtype, remat=remat)
  t = _abstract_teacher(cfg.compute_dtype, remat)
  state = jax.eval_shape(lambda: fast.init_state(cfg, t, jax.random.key(0)))
  fn = jax.jit(fast.fast_round, static_argnums=(0,), donate_argnums=(3,))
  return _peak(fn.lower(cfg, t, t, state, jax.random.key(1)).compile())


def kd_bytes(batch, dtype, remat):
  dt = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  t = _abstract_teacher(dt, remat)
  student = models.get(ARCH, 1000, dtype=dt, remat=remat)
  state = jax.eval_shape(lambda: create_classifier_state(
      student, jax.random.key(0), (1, 224, 224, 3), sgd(0.1, 0.9, 1e-4)))
  kd = distill.KDConfig(batch_size=batch, temperature=5.0, crop_scale=(0.08, 1.0),
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  images = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.uint8)
  fn = jax.jit(functools.partial(distill.kd_step, kd), donate_argnums=(0,))
  return _peak(fn.lower(state, t, images, jax.random.key(1)).compile())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--batches', default='2,4')
  ap.add_argument('--out', default='benchmarks/results/imagenet_memory.json')
  ap.add_argument('--resume', action='store_true',
                  help='keep the rows already in --out and measure only the missing ones '
                       '(each compile pair takes minutes on a CPU)')
  args = ap.parse_args()
  b0, b1 = (int(x) for x in args.batches.split(','))
  rows = []
  if args.resume and os.path.exists(args.out):
    with open(args.out) as f:
      rows = [r for r in json.load(f)['rows'] if r['batches'] == [b0, b1]]
  done = {(r['call'], r['dtype'], r['remat']) for r in rows}
  for what, fn in (('round', round_bytes), ('kd_step', kd_bytes)):
    for dtype, remat in SETTINGS:
      if (what, dtype, remat) in done:
        continue
      t0 = time.time()
      p0, p1 = fn(b0, dtype, remat), fn(b1, dtype, remat)
      slope = (p1 - p0) / (b1 - b0)
      intercept = p0 - slope * b0
      row = {'call': what, 'dtype': dtype, 'remat': remat, 'batches': [b0, b1],
             'peak_bytes': [p0, p1], 'bytes_per_image': slope, 'fixed_bytes': intercept,
             'max_batch': {k: int((v - intercept) // slope) for k, v in DEVICES_GB.items()},
             'compile_s': round(time.time() - t0, 1)}
      print(json.dumps(row), flush=True)
      rows.append(row)
      _write(args.out, rows)  # after each row: a run cut short keeps what it measured


def _write(path, rows):
  out = {'what': 'XLA CPU memory_analysis of the compiled fast_imagenet round (1 inner step, '
                 'resnet50_imagenet teacher and student, DeepGenerator) and KD step '
                 '(resnet50_imagenet -> resnet50_imagenet) at 224x224; pool excluded',
         'jax': jax.__version__, 'backend': jax.default_backend(), 'rows': rows}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()

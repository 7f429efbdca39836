"""How large a pool each `kd.pool_mode` holds, what sharding costs a KD chunk, and what
incremental pool checkpoints save (issue 22 item 3).

  python -m benchmarks.pool_memory [--devices=8] [--quick] [--out=benchmarks/results/pool_memory.json]

Runs on `--devices` fake CPU devices (XLA_FLAGS, set before JAX starts), in one process:
  1. Memory: the runner's KD chunk (experiments.plan.compile_plan, 2 steps, KD batch 64, a
     conv-BN-dense student and teacher: the pool's share does not depend on the nets) is
     lowered from abstract arrays and compiled, nothing allocated, with pools of two
     capacities (the ImageNet row's 400k and half of it) at 224x224x3 and 32x32x3 uint8,
     'device' on the mesh of all devices and 'sharded' over it. Per device, peak =
     argument + output + temp - aliased bytes of `compiled.memory_analysis()`; the slope
     between the two capacities is the pool's bytes per image per device (the arrays'
     own bytes per image: H x W x C uint8 + an int32 target), and the temp bytes show
     whether XLA gathers the whole pool anywhere. The capacity a device of 80 GB / 141 GB
     holds = (device bytes - what the nets need) / slope, for the pool alone and beside
     the measured Fast-50 round at 224 (benchmarks/results/imagenet_memory.json: float32
     at synthesis batch 100, without and with remat; extrapolated linearly in the batch
     there). Linear in n for other device counts: the sharded slope is the device one / n.
  2. Speed: the KD chunk (10 steps, batch 64, 32x32x3, pool 4096) from a replicated and a
     sharded pool, timed interleaved, median of repeats: the ratio sharded / device. Fake
     CPU devices share the cores, so this is partitioning overhead, not a GPU figure.
  3. Checkpoints: a synchronous save of a 32x32x3 pool of 51200 images (157 MB) with the
     orbax Checkpointer ('full'), against the incremental save of the same state (the
     10 new rounds of 256 images as a chunk + manifest, the orbax state without the
     pool's arrays), interleaved, median: the ratio incremental / full. A full save
     grows with the pool, an incremental one with the rounds since the last save; the
     60 GB figure is that linear extrapolation.
These are XLA CPU figures: a GPU compilation fuses and schedules differently.
"""

import argparse
import os
import sys


def _devices_from_argv(argv) -> int:
  for i, a in enumerate(argv):
    if a.startswith('--devices='):
      return int(a.split('=', 1)[1])
    if a == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


if 'jax' not in sys.modules:  # fake devices must be set before JAX starts
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                             f'device_count={_devices_from_argv(sys.argv)}').strip()

# pylint: disable=wrong-import-position
import json
import shutil
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, machine_info, write_result
from cmi_jax import distill, parallel
from cmi_jax.checkpoint import Checkpointer
from cmi_jax.pool_checkpoint import PoolCheckpointer, without_pool
from cmi_jax.state import create_classifier_state, sgd
from cmi_jax.synthesis import bank
from cmi_jax.synthesis.bank import ring_add, ring_init
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.teacher import Teacher
from experiments import plan

DEVICES_GB = {'80 GB': 80e9, '141 GB': 141e9}
IMAGENET_POOL = 400_000          # 400 epochs x 10 rounds x 100 (zoo-and-datasets.md section 5)
SHAPES = {'224x224x3': (224, 224, 3), '32x32x3': (32, 32, 3)}
KD_BATCH = 64
ROUND_BATCH = 100                # the Fast-50 synthesis batch


class TinyNet(nn.Module):
  """conv-BN-ReLU-mean-dense, 10 classes: stands in for student and teacher."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3), (4, 4))(x)))
    return nn.Dense(10)(x.mean((1, 2)))


def peak_bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  return {'peak': int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                      - m.alias_size_in_bytes),
          'argument': int(m.argument_size_in_bytes), 'temp': int(m.temp_size_in_bytes)}


def _pool_abstract(capacity, shape):
  return jax.eval_shape(lambda: ring_init(capacity, {
      'images': jax.ShapeDtypeStruct(shape, jnp.uint8),
      'targets': jax.ShapeDtypeStruct((), jnp.int32)}))


def _with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _kd_fn(mesh, shape, capacity):
  cfg = SynthesisConfig(image_shape=shape, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                        batch_size=KD_BATCH, pool_size=capacity).validate()
  kd_cfg = distill.KDConfig(batch_size=KD_BATCH, temperature=4.0, crop_padding=4,
                            mean=(0.5,) * 3, std=(0.25,) * 3)
  return plan.compile_plan(mesh, cfg, cfg, kd_cfg, fresh=False).kd


def _nets(shape):
  module = TinyNet()
  state = create_classifier_state(module, jax.random.key(0), (1,) + shape, sgd(0.1, 0.9, 1e-4))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return state, Teacher(module, variables)


def kd_memory(mesh, shape, capacity, mode) -> dict:
  """Per-device memory analysis of the KD chunk with an abstract pool (nothing allocated)."""
  rep = parallel.replicated(mesh)
  state, teacher = jax.eval_shape(lambda: _nets(shape))
  state = _with_shardings(state, jax.tree_util.tree_map(lambda _: rep, state))
  teacher = _with_shardings(teacher, jax.tree_util.tree_map(lambda _: rep, teacher))
  pool = _pool_abstract(capacity, shape)
  pool = _with_shardings(pool, bank.ring_shardings(pool, mesh, mode))
  fn = _kd_fn(mesh, shape, capacity)
  return peak_bytes(fn.lower(state, teacher, pool, jax.random.key(1), 2).compile())


def round_bytes_at_224():
  """The nets' peak beside the pool at 224: the measured fast_imagenet round (float32)
  extrapolated linearly to synthesis batch ROUND_BATCH; None when not measured."""
  path = os.path.join(RESULTS, 'imagenet_memory.json')
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    rows = json.load(f)['rows']
  return {f"round float32 remat={'on' if r['remat'] else 'off'}":
          r['fixed_bytes'] + ROUND_BATCH * r['bytes_per_image']
          for r in rows if r['call'] == 'round' and r['dtype'] == 'float32'}


def memory_rows(mesh, capacities) -> list:
  n = mesh.devices.size
  nets = round_bytes_at_224()
  rows = []
  for name, shape in SHAPES.items():
    item = int(np.prod(shape)) + 4  # uint8 image + int32 target
    for mode in bank.POOL_MODES:
      t0 = time.time()
      m = [kd_memory(mesh, shape, c, mode) for c in capacities]
      slope = (m[1]['peak'] - m[0]['peak']) / (capacities[1] - capacities[0])
      fixed = m[0]['peak'] - slope * capacities[0]
      # The KD chunk reads only the images (jit drops the unused targets); the pool's
      # targets are resident all the same: the capacity counts both.
      resident = max(slope, item / (n if mode == 'sharded' else 1))
      row = {'shape': name, 'mode': mode, 'devices': n, 'capacities': list(capacities),
             'per_device': m, 'kd_chunk_bytes_per_image_per_device': slope,
             'array_bytes_per_image': item, 'resident_bytes_per_image_per_device': resident,
             'kd_chunk_fixed_bytes': fixed,
             'compile_s': round(time.time() - t0, 1)}
      besides = {'pool alone': 0.0}
      if name == '224x224x3':
        besides.update(nets)
      row['capacity'] = {
          what: {dev: int((cap_b - max(other, fixed)) // resident)
                 for dev, cap_b in DEVICES_GB.items()}
          for what, other in besides.items()}
      row['nets_bytes'] = besides
      rows.append(row)
      print(json.dumps({k: row[k] for k in ('shape', 'mode', 'kd_chunk_bytes_per_image_per_device',
                                           'capacity', 'compile_s')}), flush=True)
  return rows


def kd_speed(mesh, repeats) -> dict:
  shape, capacity, steps = (32, 32, 3), 4096, 10
  state, teacher = _nets(shape)
  host = jax.device_get(ring_init(capacity, {'images': jax.ShapeDtypeStruct(shape, jnp.uint8),
                                             'targets': jax.ShapeDtypeStruct((), jnp.int32)}))
  rng = np.random.default_rng(0)
  host = host.replace(data={'images': rng.integers(0, 256, (capacity,) + shape, dtype=np.uint8),
                            'targets': np.zeros(capacity, np.int32)},
                      index=np.int32(0), count=np.int32(capacity))
  fn = _kd_fn(mesh, shape, capacity)
  pools = {m: jax.device_put(host, bank.ring_shardings(host, mesh, m)) for m in bank.POOL_MODES}
  times = {m: [] for m in bank.POOL_MODES}
  t = parallel.replicate(mesh, teacher)
  for m in bank.POOL_MODES:  # compile + warm up
    jax.block_until_ready(fn(parallel.replicate(mesh, state), t, pools[m], jax.random.key(1), steps))
  for _ in range(repeats):
    for m in bank.POOL_MODES:
      s = parallel.replicate(mesh, state)
      t0 = time.perf_counter()
      jax.block_until_ready(fn(s, t, pools[m], jax.random.key(1), steps))
      times[m].append(time.perf_counter() - t0)
  med = {m: statistics.median(v) for m, v in times.items()}
  return {'what': f'KD chunk, {steps} steps, batch {KD_BATCH}, 32x32x3, pool {capacity}, '
                  f'{mesh.devices.size} fake CPU devices', 'repeats': repeats,
          'median_s': med, 'ratio_sharded_to_device': med['sharded'] / med['device']}


def checkpoint_speed(repeats, capacity, new) -> dict:
  """Synchronous save of the state with a pool of `capacity` 32x32x3 images: full orbax
  vs incremental (chunk of `new` images + orbax without the pool)."""
  shape = (32, 32, 3)
  rng = np.random.default_rng(0)
  pool = ring_init(capacity, {'images': jax.ShapeDtypeStruct(shape, jnp.uint8),
                              'targets': jax.ShapeDtypeStruct((), jnp.int32)})
  pool = ring_add(pool, {'images': rng.integers(0, 256, (capacity - new,) + shape, dtype=np.uint8),
                         'targets': np.zeros(capacity - new, np.int32)})
  student = {'params': jnp.asarray(rng.standard_normal(2_800_000, dtype=np.float32))}
  before = pool
  pool = ring_add(pool, {'images': rng.integers(0, 256, (new,) + shape, dtype=np.uint8),
                         'targets': np.zeros(new, np.int32)})
  times = {'full': [], 'incremental': []}
  root = tempfile.mkdtemp(prefix='pool_ckpt_')
  try:
    for i in range(repeats):
      for kind in times:
        d = os.path.join(root, f'{kind}{i}')
        ck = Checkpointer(os.path.join(d, 'checkpoints'), async_save=False)
        pc = PoolCheckpointer(os.path.join(d, 'pool'))
        if kind == 'incremental':  # the previous save: everything up to the new rounds
          pc.save(1, before, capacity)
        t0 = time.perf_counter()
        if kind == 'full':
          ck.save(2, {'student': student, 'pool': pool}, {'round': 2})
        else:
          pc.save(2, pool, new)
          ck.save(2, {'student': student, 'pool': without_pool(pool)}, {'round': 2})
        times[kind].append(time.perf_counter() - t0)
        ck.close()
        shutil.rmtree(d)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  pool_bytes = capacity * (int(np.prod(shape)) + 4)
  full_60gb = med['full'] * IMAGENET_POOL * (224 * 224 * 3 + 4) / pool_bytes
  return {'what': f'synchronous save: state with a pool of {capacity} x 32x32x3 '
                  f'({pool_bytes / 1e6:.0f} MB) + an 11 MB student; incremental: the {new} '
                  'images added since the last save', 'repeats': repeats, 'median_s': med,
          'ratio_incremental_to_full': med['incremental'] / med['full'],
          'full_save_60gb_pool_s_extrapolated': full_60gb}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--devices', type=int, default=8)
  ap.add_argument('--quick', action='store_true', help='fewer repeats, smaller checkpoint')
  ap.add_argument('--out', default=os.path.join(RESULTS, 'pool_memory.json'))
  args = ap.parse_args(argv)
  n = len(jax.devices())
  mesh = parallel.make_mesh(0)
  capacities = (IMAGENET_POOL // 2, IMAGENET_POOL)
  result = {'machine': machine_info(), 'load_average': os.getloadavg(),
            'memory': memory_rows(mesh, capacities)}
  result['kd_speed'] = kd_speed(parallel.make_mesh(min(n, 4)), 3 if args.quick else 7)
  print(json.dumps(result['kd_speed']), flush=True)
  result['checkpoint'] = checkpoint_speed(2 if args.quick else 5,
                                          5120 if args.quick else 51200, 256 if args.quick else 2560)
  print(json.dumps(result['checkpoint']), flush=True)
  result['load_average_end'] = os.getloadavg()
  write_result(args.out, result)
  return result


if __name__ == '__main__':
  main()

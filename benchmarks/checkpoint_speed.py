"""Checkpoint cost at CIFAR sizes: what a save blocks, synchronous vs. asynchronous.

  python -m benchmarks.checkpoint_speed            # CIFAR sizes (~1.2 GB a checkpoint)
  python -m benchmarks.checkpoint_speed --quick    # 1/16 of the sizes (tests)

The state the runner checkpoints for CMI at the CIFAR defaults, as arrays of its
sizes filled with random bits (incompressible; the worst case for the writer):
  * bank: 40960 x 5408 float32 (886 MB; wrn_40_2's contrastive features);
  * pool: 51200 x 32 x 32 x 3 uint8 images + int32 targets (157 MB);
  * head: an MLP head sized like wrn_40_2's (8M float32) + Adam mu, nu (96 MB);
  * student: resnet18-sized (11.2M float32) + SGD momentum (90 MB).
For `cmi_jax.checkpoint.Checkpointer` with async_save False and True it times
(median of repeats) the blocking part of `save` (what the device waits for) and
the time until the files are on disk (`wait`), and reports the blocking share
of a 3.9 s GPU round (issue 11's H200 figure at CIFAR sizes; target < 5 % =
195 ms) for one save per round and per log.checkpoint_every_rounds (default 10).
It also times a plain host copy of the whole state (np.array, a memcpy), the
floor of any copy-then-write scheme. Writes benchmarks/results/checkpoint_speed.json.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, machine_info, write_result
from cmi_jax.checkpoint import Checkpointer

GPU_ROUND_S = 3.9      # one CMI round at CIFAR sizes on one H200 (issue 11)
TARGET_SHARE = 0.05    # what stays blocking: under 5 % of a round


def cifar_state(scale: int = 1) -> dict:
  """Device arrays of the CIFAR-default CMI state's sizes (divided by `scale`)."""
  rng = np.random.default_rng(0)

  def f32(*shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
  n_bank, n_pool = 40960 // scale, 51200 // scale
  head, student = 8_000_000 // scale, 11_200_000 // scale
  return {
      'synth': {'bank': {'data': f32(n_bank, 5408), 'index': jnp.int32(0),
                         'count': jnp.int32(n_bank)},
                'pool': {'images': jnp.asarray(rng.integers(0, 256, (n_pool, 32, 32, 3),
                                                            dtype=np.uint8)),
                         'targets': jnp.asarray(rng.integers(0, 10, n_pool, dtype=np.int32))},
                'head': {'params': f32(head), 'mu': f32(head), 'nu': f32(head)}},
      'student': {'params': f32(student), 'momentum': f32(student), 'step': jnp.int32(0)},
  }


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def bench(state, async_save: bool, repeats: int, directory: str) -> dict:
  """Median blocking and total seconds of `repeats` saves (after one warm-up save)."""
  shutil.rmtree(directory, ignore_errors=True)
  ckpt = Checkpointer(directory, max_to_keep=1, async_save=async_save)
  meta = {'round': 0, 'history': []}
  blocking, total = [], []
  for step in range(repeats + 1):
    jax.block_until_ready(state)
    t = time.perf_counter()
    ckpt.save(step, state, meta)
    b = time.perf_counter() - t
    ckpt.wait()
    if step:  # the first save creates the folders and warms orbax up
      blocking.append(b)
      total.append(time.perf_counter() - t)
  ckpt.close()
  shutil.rmtree(directory, ignore_errors=True)
  return {'async': async_save, 'blocking_s': statistics.median(blocking),
          'blocking_s_all': blocking, 'total_s': statistics.median(total), 'total_s_all': total}


def host_copy_s(state, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.tree_util.tree_map(np.array, state)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='1/16 of the sizes (tests)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default=None, help='where to write (default: a temp folder)')
  parser.add_argument('--out', default=os.path.join(RESULTS, 'checkpoint_speed.json'))
  args = parser.parse_args()
  scale = 16 if args.quick else 1
  state = cifar_state(scale)
  size = nbytes(state)
  print(f'checkpointed state: {size / 1e6:.0f} MB '
        f'(bank {nbytes(state["synth"]["bank"]) / 1e6:.0f} MB)')
  root = args.dir or tempfile.mkdtemp(prefix='cmi_ckpt_bench_')
  rows = []
  for async_save in (False, True):
    r = bench(state, async_save, args.repeats, os.path.join(root, f'async_{async_save}'))
    for every in (1, 10):
      r[f'share_of_gpu_round_every_{every}'] = r['blocking_s'] / (every * GPU_ROUND_S)
    rows.append(r)
    print(f'{"async" if async_save else "sync ":5s}: blocking {1e3 * r["blocking_s"]:8.1f} ms '
          f'({100 * r["share_of_gpu_round_every_1"]:5.1f} % of a {GPU_ROUND_S} s round if saved '
          f'every round, {100 * r["share_of_gpu_round_every_10"]:5.2f} % every 10), on disk '
          f'after {r["total_s"]:.2f} s')
  copy_s = host_copy_s(state, args.repeats)
  print(f'plain host copy of the state (np.array): {1e3 * copy_s:.1f} ms')
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)
  async_row = rows[1]
  result = {
      'machine': machine_info(), 'quick': args.quick, 'state_bytes': size,
      'gpu_round_s': GPU_ROUND_S, 'target_blocking_s': TARGET_SHARE * GPU_ROUND_S,
      'results': rows, 'host_copy_s': copy_s,
      'load_average_1_5_15min': list(os.getloadavg()),  # other jobs on the machine
      'async_meets_target_every_round': async_row['blocking_s'] < TARGET_SHARE * GPU_ROUND_S,
      'note': 'Times on this machine\'s CPU backend (the "device" is host memory, so the '
              'device-to-host copy inside an async save is a memcpy or none); the blocking '
              'share is taken of the H200 round time that issue 11 measured.',
  }
  write_result(args.out, result)


if __name__ == '__main__':
  main()

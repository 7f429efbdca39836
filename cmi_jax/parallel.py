"""Devices: the mesh, shardings, `constrain`, multi-host helpers, and the batch
split of the pmap path.

This is the bottom layer: it imports nothing of cmi_jax and knows no method. Every method and the KD
steps call `constrain` on their batch-sized arrays; the run's compiled step
plan (which method's round to jit, with which shardings) lives with the runner
(`experiments/plan.py`).

Main path: mesh-jit. One `jax.sharding.Mesh` over all devices with a single
'data' axis. Params, optimizer states, the teacher, the memory bank and the
image pool are replicated (P()); every batch-sized array inside a step (the
latent z, the rendered images and both views, the teacher/student activations,
the KD batch) is constrained to P('data') (`constrain`), so XLA splits the
work by samples while every reduction (BN statistics, generator BN in train
mode, losses, contrastive logits against all positives and negatives, the
lowest-loss choice) stays over the global batch: the math does not depend on
the device count (1 vs 4 devices agree to float rounding, tests/test_parallel.py).
Random draws are sharding-invariant (partitionable threefry, the default), so
the same key gives the same batch on any mesh.

Why the bank and pool are replicated: each step reads n_neg random bank rows
and a random pool batch; replicated, those gathers are local. At the default
sizes the bank is 40960 x 2D float32 (wrn_40_2: D = 2704 -> 886 MB per
device) and the pool 51200 x 32x32x3 uint8 (157 MB per device), which fit any
accelerator used for CIFAR; sharding them would turn each gather into
cross-device traffic every step. A pool too big for one device (ImageNet's
400k x 224x224x3 uint8, 60 GB) is split instead: the runner's
`kd.pool_mode='sharded'` places its capacity axis on P('data')
(`synthesis.bank.ring_shardings`), created in place by `init_sharded`, and
XLA inserts the collectives of its gathers. The rest is small next to them: the wrn_40_2
head (D x D + D x 256, 8.0M params) with Adam is 96 MB, the CMI generator
(2.3M params) with Adam 28 MB, resnet34 teacher 85 MB, resnet18 student with
SGD momentum 89 MB. What does scale with the batch (activations of 2B views
through the teacher, B through generator and student) is split over devices.

Synthesis is mesh-only: under pmap the contrastive logits would need explicit
all-gathers of every device's projections and the bank draw would have to agree
across devices; mesh-jit gets both for free. `distill.pmap_kd_step` is the only pmap
path (legacy API since JAX 0.8, implemented on shard_map; kept as a shim beside
`distill.kd_step`, which it reuses unchanged apart from its `axis_name`).

Multi-host: `maybe_initialize_distributed` (called once by experiments/run.py),
`host_shard`/`host_sum` for per-host evaluation (`distill.evaluate_on_hosts`),
`fetch` for reading a sharded array on every host, and `is_main_process` for
who writes.
"""

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'
PMAP_AXIS = 'batch'


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0: all), axis 'data'."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f'mesh.num_devices={num_devices} but {len(devices)} device(s) are '
                     f'visible; use 0 (all) or a number in 1..{len(devices)}.')
  devices = devices[:num_devices or len(devices)]
  return Mesh(np.asarray(devices), (DATA,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places every array of `tree` on all devices of the mesh.

  Goes through host values, so arrays committed to one local device (a restored
  teacher, another mesh's outputs) are accepted; on a multi-host mesh every
  process must pass identical values.
  """
  return jax.device_put(jax.device_get(tree), replicated(mesh))


def init_sharded(fn: Any, shardings: Any, *args: Any) -> Any:
  """`fn(*args)` computed straight into `shardings` (a tree like its output): jit
  with out_shardings, so an array split over the devices is never whole on one
  device or on the host first (the state of a sharded pool). Matched leaf by leaf:
  a state built twice (here and for `shardings`) holds different optimizer objects
  in its static fields, which a whole-tree match refuses."""
  tree = []

  def flat(*a):
    leaves, treedef = jax.tree_util.tree_flatten(fn(*a))
    tree.append(treedef)
    return leaves

  leaves = jax.jit(flat, out_shardings=jax.tree_util.tree_leaves(shardings))(*args)
  return jax.tree_util.tree_unflatten(tree[-1], leaves)


def shard_batch(mesh: Mesh, tree: Any) -> Any:
  """Splits host batches (leading axis) over the mesh's 'data' axis."""
  for x in jax.tree_util.tree_leaves(tree):
    check_divisible(mesh, batch=x.shape[0])
  return jax.device_put(tree, batch_sharded(mesh))


def check_divisible(mesh: Mesh, **batches: int) -> None:
  """Each named batch size must split evenly over the mesh's devices."""
  n = mesh.devices.size
  for name, size in batches.items():
    if size % n:
      raise ValueError(f'{name}={size} does not divide over {n} devices; use a multiple of '
                       f'{n} (e.g. {max(n, size - size % n)}) or set mesh.num_devices.')


def constrain(x: jax.Array, sharding: Optional[Any]) -> jax.Array:
  """Splits a batch-sized array along the mesh's data axis (no-op without a mesh).

  Raises ValueError when the leading axis does not divide over the devices
  (XLA would otherwise pad it or silently replicate the array).
  """
  if sharding is None:
    return x
  spec = getattr(sharding, 'spec', None)
  if spec and spec[0] is not None:
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    n = 1
    for a in axes:
      n *= sharding.mesh.shape[a]
    if x.shape[0] % n:
      raise ValueError(f'a batch of {x.shape[0]} (array {tuple(x.shape)}) does not divide over '
                       f'the {n} devices of mesh axis {spec[0]!r}; use a batch size that is a '
                       f'multiple of {n} (parallel.check_divisible) or fewer devices.')
  return jax.lax.with_sharding_constraint(x, sharding)


# ---------------------------------------------------------------- multi-host

def is_main_process() -> bool:
  """Only process 0 writes checkpoints' side files, metrics and images."""
  return jax.process_index() == 0


def maybe_initialize_distributed(enabled: Optional[bool] = None) -> bool:
  """Starts `jax.distributed` for a multi-host run; returns whether it did.

  Call once, before any JAX computation (experiments/run.py does).
  enabled=None (default) follows the environment: it initializes when
  JAX_COORDINATOR_ADDRESS is set (manual launch: every process also sets
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, process 0 hosts the coordinator at that
  address) or CMI_JAX_DISTRIBUTED=1 (SLURM, Open MPI, Cloud TPU: JAX detects
  the rest). enabled=True always initializes, False never.
  """
  env = os.environ
  if enabled is None:
    enabled = bool(env.get('JAX_COORDINATOR_ADDRESS')) or \
        env.get('CMI_JAX_DISTRIBUTED', '0') not in ('', '0')
  if not enabled or jax.distributed.is_initialized():
    return False
  kwargs = {}
  if env.get('JAX_COORDINATOR_ADDRESS'):
    kwargs['coordinator_address'] = env['JAX_COORDINATOR_ADDRESS']
    for key, arg in (('JAX_NUM_PROCESSES', 'num_processes'), ('JAX_PROCESS_ID', 'process_id')):
      if env.get(key):
        kwargs[arg] = int(env[key])
  jax.distributed.initialize(**kwargs)
  return True


def host_shard(n_examples: int, process_index: Optional[int] = None,
               process_count: Optional[int] = None) -> slice:
  """This host's contiguous share of `n_examples` (e.g. the test split).

  The shares of processes 0..P-1 cover every example exactly once and differ
  in size by at most one.
  """
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= p < count:
    raise ValueError(f'process_index={p} is outside 0..{count - 1}.')
  return slice(n_examples * p // count, n_examples * (p + 1) // count)


def host_sum(tree: Any) -> Any:
  """Sums host-local numpy values over all processes (identity on one host)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(tree)
  return jax.tree_util.tree_map(lambda a: np.sum(np.asarray(a), axis=0), gathered)


def fetch(tree: Any) -> Any:
  """Numpy values of (possibly sharded, multi-host) arrays, on every process.

  Collective when an array spans other hosts: call it on all processes, then
  let process 0 write.
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)


# ---------------------------------------------------------------- pmap batches

def split_for_pmap(x: Any, num_devices: int) -> Any:
  """[B, ...] -> [num_devices, B / num_devices, ...] for every leaf."""
  def split(a):
    if a.shape[0] % num_devices:
      raise ValueError(f'batch={a.shape[0]} does not divide over {num_devices} devices.')
    return a.reshape((num_devices, a.shape[0] // num_devices) + a.shape[1:])
  return jax.tree_util.tree_map(split, x)

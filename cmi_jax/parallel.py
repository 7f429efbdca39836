"""Devices: the mesh, shardings, and the jitted steps of a run.

One `jax.sharding.Mesh` over all devices with a single 'data' axis. Params,
optimizer states, the teacher, the memory bank and the image pool are
replicated (P()); every batch-sized array inside a step is constrained to
P('data'), so XLA splits the work by samples while every reduction (BN
statistics, losses, contrastive logits, the lowest-loss choice) stays over the
global batch: the math does not depend on the device count.

Why the bank and pool are replicated: each step reads n_neg random bank rows
and a random pool batch; replicated, those gathers are local. At the default
sizes the bank is 40960 x 2D float32 (wrn_40_2: D = 2704 -> 886 MB per
device) and the pool 51200 x 32x32x3 uint8 (157 MB per device), which fit any
accelerator used for CIFAR; sharding them would turn each gather into
cross-device traffic every step.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'


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
  """Places every array of `tree` on all devices of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def check_divisible(mesh: Mesh, **batches: int) -> None:
  """Each named batch size must split evenly over the mesh's devices."""
  n = mesh.devices.size
  for name, size in batches.items():
    if size % n:
      raise ValueError(f'{name}={size} does not divide over {n} devices; use a multiple of '
                       f'{n} (e.g. {max(n, size - size % n)}) or set mesh.num_devices.')


def is_main_process() -> bool:
  """Only process 0 writes checkpoints' side files, metrics and images."""
  return jax.process_index() == 0


def maybe_initialize_distributed() -> None:
  """Multi-host: `jax.distributed.initialize()` when the environment asks for it
  (JAX_COORDINATOR_ADDRESS, or a cluster JAX auto-detects: SLURM, TPU pods)."""
  import os  # pylint: disable=g-import-not-at-top
  if os.environ.get('JAX_COORDINATOR_ADDRESS') or os.environ.get('CMI_JAX_DISTRIBUTED'):
    jax.distributed.initialize()


@dataclasses.dataclass
class Steps:
  """The run's jitted steps, bound to a mesh and static configs."""
  round: Optional[Callable] = None
  pre_round: Optional[Callable] = None
  gan_round: Optional[Callable] = None
  kd: Optional[Callable] = None


def compile_plan(mesh: Mesh, synth, pre_synth, kd_cfg, fresh: bool) -> Steps:
  """jit-wraps the synthesis round (or GAN generator steps) and the KD chunk for
  `mesh`: inputs replicated, state donated, batch arrays split along 'data'."""
  from cmi_jax import distill  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis import cmi, gan  # pylint: disable=g-import-not-at-top
  rep, shard = replicated(mesh), batch_sharded(mesh)
  steps = Steps()
  if fresh:
    steps.gan_round = jax.jit(functools.partial(gan.gan_round, synth, data_sharding=shard),
                              donate_argnums=(2,), out_shardings=rep)
  else:
    for name, cfg in (('round', synth), ('pre_round', pre_synth)):
      fn = functools.partial(cmi.synthesis_round, cfg, data_sharding=shard)
      setattr(steps, name, jax.jit(fn, donate_argnums=(2,),
                                   out_shardings=(rep, cmi.RoundOutput(shard, shard, rep))))
  steps.kd = jax.jit(functools.partial(distill.kd_steps, kd_cfg, data_sharding=shard),
                     static_argnums=(4,), donate_argnums=(0,), out_shardings=rep)
  return steps

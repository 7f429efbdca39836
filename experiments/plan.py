"""The run's compiled step plan: which algorithm's round to jit, with which shardings.

Lives with the runner (not in cmi_jax.parallel, which knows no method): the
round function comes from one table, `cmi_jax.synthesis.algorithms.ALGORITHMS`,
keyed by `SynthesisConfig.algorithm`.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
from jax.sharding import Mesh

from cmi_jax import distill, parallel
from cmi_jax.synthesis import algorithms, bank, gan
from cmi_jax.synthesis.round_kit import RoundOutput


@dataclasses.dataclass
class Steps:
  """The run's jitted steps, bound to a mesh and static configs."""
  round: Optional[Callable] = None
  pre_round: Optional[Callable] = None
  gan_round: Optional[Callable] = None
  kd: Optional[Callable] = None


def synth_shardings(mesh: Mesh, synth_state: Any, pool_mode: str = 'device') -> Any:
  """The shardings of a pool method's synthesis state (or of its `jax.eval_shape`):
  everything replicated, the image pool as `kd.pool_mode` places it
  (`bank.ring_shardings`: 'sharded' splits its capacity axis over 'data')."""
  rep = parallel.replicated(mesh)
  shardings = jax.tree_util.tree_map(lambda _: rep, synth_state)
  return shardings.replace(pool=bank.ring_shardings(synth_state.pool, mesh, pool_mode))


def compile_plan(mesh: Mesh, synth, pre_synth, kd_cfg, fresh: bool,
                 state_shardings: Optional[Any] = None) -> Steps:
  """jit-wraps the synthesis round (or GAN generator steps) and the KD chunk for
  `mesh`: inputs replicated, state donated, batch arrays split along 'data'.
  state_shardings: the synthesis state's (`synth_shardings`; None: replicated, the
  'device' pool). The KD chunk takes its pool where it lies.

  Raises ValueError when a batch size does not divide over the devices (the
  steps also check it when traced: `parallel.constrain`).
  """
  parallel.check_divisible(mesh, synthesis_batch=synth.batch_size, kd_batch=kd_cfg.batch_size)
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  steps = Steps()
  if fresh:
    steps.gan_round = jax.jit(functools.partial(gan.gan_round, synth, data_sharding=shard),
                              donate_argnums=(2,), out_shardings=rep)
  else:
    for name, cfg in (('round', synth), ('pre_round', pre_synth)):
      if name == 'pre_round' and cfg == synth:  # same program: compile it once
        steps.pre_round = steps.round
        continue
      fn = functools.partial(algorithms.get(cfg.algorithm).round, cfg, data_sharding=shard)
      setattr(steps, name, jax.jit(fn, donate_argnums=(2,), out_shardings=(
          rep if state_shardings is None else state_shardings, RoundOutput(shard, shard, rep))))
  steps.kd = jax.jit(functools.partial(distill.kd_steps, kd_cfg, data_sharding=shard),
                     static_argnums=(4,), donate_argnums=(0,), out_shardings=rep)
  return steps

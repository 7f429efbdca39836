"""The run's compiled step plan: which algorithm's round to jit, with which shardings.

Lives with the runner (not in cmi_jax.parallel, which knows no method): the
round function comes from one table, `cmi_jax.synthesis.algorithms.ALGORITHMS`,
keyed by `SynthesisConfig.algorithm`.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
from jax.sharding import Mesh

from cmi_jax import distill, parallel
from cmi_jax.synthesis import algorithms, gan
from cmi_jax.synthesis.round_kit import RoundOutput


@dataclasses.dataclass
class Steps:
  """The run's jitted steps, bound to a mesh and static configs."""
  round: Optional[Callable] = None
  pre_round: Optional[Callable] = None
  gan_round: Optional[Callable] = None
  kd: Optional[Callable] = None


def compile_plan(mesh: Mesh, synth, pre_synth, kd_cfg, fresh: bool) -> Steps:
  """jit-wraps the synthesis round (or GAN generator steps) and the KD chunk for
  `mesh`: inputs replicated, state donated, batch arrays split along 'data'.

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
      setattr(steps, name, jax.jit(fn, donate_argnums=(2,),
                                   out_shardings=(rep, RoundOutput(shard, shard, rep))))
  steps.kd = jax.jit(functools.partial(distill.kd_steps, kd_cfg, data_sharding=shard),
                     static_argnums=(4,), donate_argnums=(0,), out_shardings=rep)
  return steps

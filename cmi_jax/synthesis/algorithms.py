"""The synthesis algorithms by name: what a runner or `cmi_jax.synthesize` calls.

Every algorithm has the same two entry points:
  init_state(cfg, teacher, rng) -> state     (what persists across rounds)
  round(cfg, teacher, student, state, rng, targets=None, data_sharding=None)
      -> (state, RoundOutput)                (one compiled call per round)
`SynthesisConfig.algorithm` selects the row. The GAN baselines (kd.mode
'fresh') are not rounds of an image pool and keep their own entry
(`cmi_jax.synthesis.gan`).
"""

from typing import Callable, Dict, NamedTuple

from cmi_jax.synthesis import cmi, fast, nayer


class Algorithm(NamedTuple):
  init_state: Callable
  round: Callable


ALGORITHMS: Dict[str, Algorithm] = {
    'cmi': Algorithm(cmi.init_state, cmi.synthesis_round),
    'nayer': Algorithm(nayer.init_state, nayer.nayer_round),
    'fast': Algorithm(fast.init_state, fast.fast_round),  # FastDFKD (meta-generator)
}


def get(name: str) -> Algorithm:
  if name not in ALGORITHMS:
    raise ValueError(f'synthesis.algorithm={name!r} is unknown; choose one of '
                     f'{sorted(ALGORITHMS)}.')
  return ALGORITHMS[name]

"""cmi_jax: Contrastive Model Inversion (CMI, IJCAI 2021) for data-free KD in JAX/Flax.

Public API:
  cmi_jax.synthesize(teacher, rounds=..., ...)  -> images, labels, state (CMI and presets)
  cmi_jax.make_config(dataset=..., method=...)  -> SynthesisConfig
  cmi_jax.models.get(name, num_classes)         -> Flax classifier
  cmi_jax.presets.PRESETS                       -> methods as loss-weight presets
  cmi_jax.distill.kd_steps / kd_step            -> student distillation steps
"""

from cmi_jax import distill, models
from cmi_jax.synthesis import presets
from cmi_jax.synthesis.api import SynthesisResult, make_config, synthesize
from cmi_jax.synthesis.cmi import SynthState, synthesis_round
from cmi_jax.synthesis.config import LossWeights, SynthesisConfig
from cmi_jax.teacher import Teacher

__version__ = '0.1.0'

__all__ = ['synthesize', 'make_config', 'SynthesisResult', 'SynthesisConfig', 'LossWeights',
           'SynthState', 'synthesis_round', 'Teacher', 'models', 'presets', 'distill']

"""`cmi_jax.synthesize`: CMI synthesis from user code, without ml_collections.

  import cmi_jax
  out = cmi_jax.synthesize('teachers/fashion_mnist_wrn_16_2', rounds=2,
                           batch_size=64, g_steps=50, rng=0)
  out.images  # [128, 28, 28, 1] uint8;  out.labels  # [128] int32
  out = cmi_jax.synthesize(teacher, rounds=1, state=out.state, rng=1)  # continue

Each round is one compiled call (`synthesis_round` under jit, the state
donated so the bank and pool are updated in place).
"""

import dataclasses
import functools
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import jax
import numpy as np

from cmi_jax import data
from cmi_jax.synthesis import presets
from cmi_jax.state import rng_stream
from cmi_jax.synthesis import algorithms
from cmi_jax.synthesis.cmi import SynthState
from cmi_jax.synthesis.config import LossWeights, SynthesisConfig
from cmi_jax.synthesis.round_kit import to_uint8
from cmi_jax.teacher import Teacher


class SynthesisResult(NamedTuple):
  images: np.ndarray          # [rounds * B, H, W, C] uint8 (what the pool stores)
  labels: np.ndarray          # [rounds * B] int32 target classes
  state: SynthState           # pass back in to continue (head, bank, pool)
  metrics: List[Dict[str, Any]]  # one dict of host numpy values per round
  config: SynthesisConfig


@functools.lru_cache(maxsize=None)
def jitted_round(algorithm: str = 'cmi'):
  """`algorithm`'s round, jitted once per process (cfg static, state donated)."""
  return jax.jit(algorithms.get(algorithm).round, static_argnums=(0,), donate_argnums=(3,))


def as_teacher(teacher: Any) -> Tuple[Teacher, Dict[str, Any]]:
  """Accepts a Teacher, a (module, variables) pair, or a teacher directory / .pth path."""
  if isinstance(teacher, Teacher):
    return teacher, {}
  if isinstance(teacher, tuple) and len(teacher) == 2:
    return Teacher(teacher[0], teacher[1]), {}
  if isinstance(teacher, str):
    from cmi_jax import teacher_io  # pylint: disable=g-import-not-at-top
    module, variables, info = teacher_io.load_teacher(teacher)
    return Teacher(module, variables), info
  raise TypeError(f'teacher must be a Teacher, a (module, variables) pair or a path; got '
                  f'{type(teacher).__name__}.')


def make_config(*, dataset: Optional[str] = None, image_shape=None, num_classes=None,
                mean=None, std=None, method: str = 'cmi', weights: Optional[Dict] = None,
                **overrides) -> SynthesisConfig:
  """A SynthesisConfig from a dataset name (shape, classes, normalization) or
  explicit values, with method preset `method` and field overrides applied."""
  if dataset is not None:
    info = data.get_info(dataset)
    image_shape = image_shape or info.image_shape
    num_classes = num_classes or info.num_classes
    mean, std = mean or info.mean, std or info.std
    overrides.setdefault('global_padding', info.crop_padding)
  missing = [n for n, v in (('image_shape', image_shape), ('num_classes', num_classes),
                            ('mean', mean), ('std', std)) if v is None]
  if missing:
    raise ValueError(f'synthesize needs {missing}: pass dataset= (one of {sorted(data.DATASETS)}) '
                     'or the values themselves.')
  cfg = SynthesisConfig(image_shape=tuple(image_shape), num_classes=int(num_classes),
                        mean=tuple(mean), std=tuple(std))
  cfg = presets.apply_to_synthesis_config(cfg, method)
  fields = {f.name for f in dataclasses.fields(SynthesisConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f'unknown synthesis option(s) {unknown}; known: {sorted(fields)}.')
  if weights:
    overrides['weights'] = dataclasses.replace(cfg.weights, **weights)
  return dataclasses.replace(cfg, **overrides).validate()


def synthesize(teacher: Any, *, student: Any = None, rounds: int = 1,
               config: Optional[SynthesisConfig] = None, state: Optional[SynthState] = None,
               rng: Union[int, jax.Array] = 0, dataset: Optional[str] = None,
               method: str = 'cmi', **overrides) -> SynthesisResult:
  """Runs `rounds` synthesis rounds of `method` (default CMI) for `teacher`.

  Args:
    teacher: a Teacher, (module, variables), or a teacher directory / .pth.
    student: optional frozen student (same forms) for the adversarial term;
      without it L_adv is off.
    rounds: number of rounds (each adds batch_size images to the pool).
    config: a SynthesisConfig; default built by `make_config` from `dataset`
      (or the teacher card's dataset), `method` and `overrides` (e.g.
      batch_size=64, g_steps=50, weights={'adv': 0.0}).
    state: a previous result's state to continue from (head, bank, pool).
    rng: int seed or key; round r uses fold_in(synthesis stream of key, state.round + r).
  Returns:
    SynthesisResult with this call's images/labels (uint8 as stored in the pool).
  """
  if rounds < 1:
    raise ValueError(f'rounds must be >= 1, got {rounds}.')
  t, info = as_teacher(teacher)
  s = as_teacher(student)[0] if student is not None else None
  if config is None:
    dataset = dataset or info.get('meta', {}).get('dataset')
    # Explicit image_shape / num_classes / mean / std win over the teacher card's.
    card = {'image_shape': info.get('input_shape'), 'num_classes': info.get('num_classes')}
    for k, v in card.items():
      overrides.setdefault(k, v)
    config = make_config(dataset=dataset, method=method, **overrides)
  elif overrides:
    raise TypeError('pass either config= or keyword overrides, not both.')
  config.validate()
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  if state is None:
    state = algorithms.get(config.algorithm).init_state(config, t, rng_stream(key, 'head'))
  round_fn = jitted_round(config.algorithm)
  images, labels, metrics = [], [], []
  start = int(state.round)
  for r in range(rounds):
    state, out = round_fn(config, t, s, state,
                          jax.random.fold_in(rng_stream(key, 'synthesis'), start + r))
    images.append(np.asarray(to_uint8(out.images)))
    labels.append(np.asarray(out.targets))
    metrics.append(jax.tree_util.tree_map(np.asarray, out.metrics))
  return SynthesisResult(np.concatenate(images), np.concatenate(labels), state, metrics, config)


__all__ = ['synthesize', 'make_config', 'SynthesisResult', 'SynthesisConfig', 'LossWeights',
           'as_teacher']

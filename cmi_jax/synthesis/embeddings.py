"""Class vectors for NAYER's generator input: our offline substitute for CLIP.

NAYER feeds its generator a fixed, class-specific "label-text embedding" (LTE):
the raw, unnormalised CLIP ViT-B/32 text features of "a image of {class}"
(norms 8-13, mean pairwise cosine 0.87 on CIFAR-10), through a BatchNorm1d that
keeps only each dimension's deviation from the class mean. CLIP cannot run
here, and what the method needs is a fixed vector per class with meaningful
similarities between classes, so the default derives the vectors from the
teacher itself (`synthesis.label_embeddings`):

  'classifier'   rows of the teacher's final Linear layer ([C, F]), the
                 direction in feature space each logit reads; L2-normalised.
  'penultimate'  class means of the teacher's penultimate features on a first
                 synthesized batch (a fresh CMI generator, z ~ N(0, I)),
                 weighted by the teacher's softmax so every class has one;
                 centred over classes, L2-normalised.
  'random'       N(0, 1) codes, [C, 512]: class-specific, no semantics (ablation).
  'onehot'       the identity, [C, C] (ablation).
  path.npy       a user-supplied [C, E] array (e.g. the authors' CLIP features).
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cmi_jax import augment
from cmi_jax.teacher import Teacher

SOURCES = ('classifier', 'penultimate', 'random', 'onehot')
RANDOM_WIDTH = 512  # CLIP ViT-B/32's text width


def check_source(value: str) -> bool:
  """True if `value` names a source or looks like a .npy path (loaded later)."""
  return value in SOURCES or value.endswith('.npy')


def _l2_rows(a: jax.Array) -> jax.Array:
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def classifier_rows(teacher: Teacher, num_classes: int) -> jax.Array:
  """[C, F] rows of the teacher's classifier (the top-level Dense mapping the
  pooled penultimate features to the C logits), L2-normalised."""
  params = teacher.variables['params']
  found = [(name, p['kernel']) for name, p in params.items()
           if isinstance(p, dict) and 'kernel' in p and p['kernel'].ndim == 2
           and p['kernel'].shape[1] == num_classes]
  if len(found) != 1:
    raise ValueError(f'synthesis.label_embeddings=classifier needs exactly one top-level Dense '
                     f'layer with {num_classes} outputs in the teacher; found '
                     f'{[n for n, _ in found]}. Use penultimate or a .npy file instead.')
  return _l2_rows(jnp.asarray(found[0][1], jnp.float32).T)


def penultimate_means(teacher: Teacher, images: jax.Array, num_classes: int) -> jax.Array:
  """[C, F] softmax-weighted class means of the teacher's penultimate features
  on normalized `images`, centred over classes, L2-normalised.

  mean_c = sum_i p_ic f_i / sum_i p_ic with p = softmax(teacher logits).
  """
  out = teacher(images)
  if out.penultimate is None:
    raise ValueError('synthesis.label_embeddings=penultimate: the teacher exposes no '
                     'penultimate features; use classifier or a .npy file.')
  p = jax.nn.softmax(out.logits.astype(jnp.float32), -1)                # [N, C]
  f = out.penultimate.astype(jnp.float32)                               # [N, F]
  means = (p.T @ f) / jnp.maximum(jnp.sum(p, axis=0)[:, None], 1e-12)  # [C, F]
  return _l2_rows(means - jnp.mean(means, axis=0, keepdims=True))


def load_user(path: str, num_classes: int) -> np.ndarray:
  """A user's [C, E] class-vector array from a .npy file, checked."""
  field = f'synthesis.label_embeddings={path!r}'
  if not os.path.isfile(path):
    raise ValueError(f'{field}: no such file (looked in {os.getcwd()}); give a .npy file '
                     f'holding a [{num_classes}, E] float array, or one of {SOURCES}.')
  try:
    a = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f'{field}: not a readable .npy array ({e}); save it with numpy.save.') \
        from e
  if a.ndim != 2 or a.shape[0] != num_classes or a.shape[1] < 1:
    raise ValueError(f'{field}: shape {a.shape}, expected [{num_classes}, E] (one row per '
                     'class, in the dataset\'s class order).')
  if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
    raise ValueError(f'{field}: dtype {a.dtype}, expected a real float array.')
  a = a.astype(np.float32)
  if not np.all(np.isfinite(a)):
    raise ValueError(f'{field}: {int(np.sum(~np.isfinite(a)))} non-finite value(s); every '
                     'entry must be finite.')
  if np.unique(a, axis=0).shape[0] < num_classes:
    raise ValueError(f'{field}: some rows are identical; each class needs its own vector.')
  return a


def label_embeddings(cfg: Any, teacher: Teacher, rng: jax.Array) -> jax.Array:
  """The [C, E] table for `cfg.label_embeddings` (computed once, then frozen)."""
  c = cfg.num_classes
  src = cfg.label_embeddings
  if src == 'classifier':
    return classifier_rows(teacher, c)
  if src == 'penultimate':
    def first_batch_means(teacher, rng):
      k_g, k_z = jax.random.split(rng)
      gen = cfg.make_generator()
      z = jax.random.normal(k_z, (cfg.batch_size,) + cfg.latent_shape, jnp.float32)
      x, _ = gen.apply(gen.init(k_g, z), z, train=True, mutable=['batch_stats'])
      x = augment.normalize(x.astype(jnp.float32), cfg.mean, cfg.std)
      return penultimate_means(teacher, x, c)
    return jax.jit(first_batch_means)(teacher, rng)
  if src == 'random':
    return jax.random.normal(rng, (c, RANDOM_WIDTH), jnp.float32)
  if src == 'onehot':
    return jnp.eye(c, dtype=jnp.float32)
  if src.endswith('.npy'):
    return jnp.asarray(load_user(src, c))
  raise ValueError(f'synthesis.label_embeddings={src!r} is invalid: must be one of {SOURCES} '
                   'or a path ending in .npy.')

"""What every synthesis round shares: the augmented views of a generated batch,
the weighted inversion terms, finite checks, lowest-loss tracking, the round's
diagnostics, the image pool, `to_uint8` and `RoundOutput`.

The methods (cmi.py, fast.py, nayer.py, gan.py) build their rounds from these;
none of them imports another method.
"""

from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from cmi_jax import augment
from cmi_jax.errors import TeacherError
from cmi_jax.state import select
from cmi_jax.synthesis import losses, presets
from cmi_jax.synthesis.bank import RingBuffer, ring_init
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.teacher import Teacher


class RoundOutput(NamedTuple):
  images: jax.Array            # [B, H, W, C] float32 in [0, 1], the lowest-loss iterate
  targets: jax.Array           # [B] int32
  metrics: Dict[str, jax.Array]


def _teacher_spec(teacher: Teacher, image_shape, feature_layers: str):
  """The teacher's output as shapes (eval_shape: nothing runs)."""
  return jax.eval_shape(lambda t: t(jnp.zeros((2,) + tuple(image_shape)),
                                    feature_layers=feature_layers), teacher)


def feature_dim(teacher: Teacher, image_shape, feature_layers: str = 'auto') -> int:
  """D: the width of the teacher's contrastive features (0 when it has none)."""
  out = _teacher_spec(teacher, image_shape, feature_layers)
  return 0 if out.features is None else out.features.shape[-1]


def check_teacher(cfg: SynthesisConfig, teacher: Teacher) -> int:
  """Whether the teacher has what cfg's loss terms read (nothing runs: eval_shape);
  returns D, the width of its contrastive features under cfg.feature_layers.

  L_bn and CMI's contrastive features are read from BatchNorm layers; DAFL's
  activation term from the penultimate features. A teacher without them is a
  TeacherError naming the terms and the presets that need none.
  """
  out = _teacher_spec(teacher, cfg.image_shape, cfg.feature_layers)
  w = cfg.weights
  needs = [f'L_bn (synthesis.weights.bn={w.bn})'] if w.bn else []
  if w.cr and cfg.views == 'cmi':
    needs.append(f'the contrastive features (synthesis.weights.cr={w.cr})')
  if needs and not out.bn:
    free = [n for n in presets.PRESETS
            if not presets.get(n)['synthesis'].get('weights', {}).get('bn', 1.0)
            and not presets.get(n)['synthesis'].get('weights', {}).get('cr', 0.8)]
    raise TeacherError(
        f'The teacher ({type(teacher.module).__name__}) has no BatchNorm layer (flax '
        f'nn.BatchNorm or cmi_jax.models.BatchNorm), but {" and ".join(needs)} read the '
        f'inputs of BN layers. Methods without them: {", ".join(free)} (bn and cr weights '
        '0; through experiments.run, method=...), or set synthesis.weights.bn=0 and '
        'weights.cr=0 yourself.')
  if w.act and out.penultimate is None:
    raise TeacherError(
        f'synthesis.weights.act={w.act} (DAFL\'s activation term) needs the penultimate '
        'features: sow them (self.sow("taps", "penultimate", feat)) or end the model with '
        'an nn.Dense classifier, whose input stands in for them.')
  return 0 if out.features is None else out.features.shape[-1]


def init_pool(cfg: SynthesisConfig) -> RingBuffer:
  """An empty image pool: {'images': [pool_size, H, W, C] uint8, 'targets': [pool_size] int32}."""
  return ring_init(cfg.pool_size, {
      'images': jax.ShapeDtypeStruct(tuple(cfg.image_shape), jnp.uint8),
      'targets': jax.ShapeDtypeStruct((), jnp.int32)})


def to_uint8(x: jax.Array) -> jax.Array:
  """[0, 1] float -> uint8, rounding to nearest (as saving a PNG does)."""
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def views(cfg: SynthesisConfig, rng: jax.Array, x: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
  """Normalized (global, local) views of x in [0, 1]; local is None for 'jitter', 'crop'
  and 'resized' (one RandomResizedCrop(cfg.local_scale) + flip view)."""
  b, h, w, _ = x.shape
  k_g, k_l = jax.random.split(rng)
  if cfg.views == 'crop':
    xg = augment.apply_warp(x, augment.crop_flip(k_g, b, (h, w), cfg.global_padding))
    return augment.normalize(xg, cfg.mean, cfg.std), None
  if cfg.views == 'resized':
    xg = augment.apply_warp(x, augment.resized_crop_flip(k_g, b, (h, w), cfg.local_scale))
    return augment.normalize(xg, cfg.mean, cfg.std), None
  if cfg.views == 'jitter':
    jy, jx = (cfg.jitter, cfg.jitter) if cfg.jitter >= 0 else (h // 8, w // 8)
    warp = augment.roll_flip(k_g, b, (h, w), (jy, jx))
    return augment.normalize(augment.apply_warp(x, warp), cfg.mean, cfg.std), None
  xg = augment.apply_warp(x, augment.crop_flip(k_g, b, (h, w), cfg.global_padding))
  xl = augment.apply_warp(x, augment.resized_crop_flip(k_l, b, (h, w), cfg.local_scale))
  return augment.normalize(xg, cfg.mean, cfg.std), augment.normalize(xl, cfg.mean, cfg.std)


def inversion_terms(cfg: SynthesisConfig, *, teacher_out, rows: int, targets: jax.Array,
                    student_logits: Optional[jax.Array], x: jax.Array) -> Dict[str, jax.Array]:
  """The weighted L_inv terms on the first `rows` rows of a teacher call (the global view).

  Only terms with a non-zero weight are computed (static). Returns a dict of
  unweighted terms; `weighted_sum` combines them.
  """
  w = cfg.weights
  logits = teacher_out.logits[:rows]
  terms = {}
  if w.bn:
    terms['bn'] = losses.bn_loss(teacher_out.bn, rows)
  if w.oh:
    oh_targets = targets if cfg.oh_kind == 'targets' else jnp.argmax(logits, -1)
    terms['oh'] = losses.oh_loss(logits, jax.lax.stop_gradient(oh_targets))
  if w.adv and student_logits is not None:
    terms['adv'] = losses.adv_loss(teacher_logits=logits, student_logits=student_logits,
                                   kind=cfg.adv_kind, temperature=cfg.adv_temperature)
  if w.balance:
    terms['balance'] = losses.balance_loss(logits)
  if w.act:
    terms['act'] = losses.activation_loss(teacher_out.penultimate[:rows])
  if w.tv:  # on normalized pixels, as the reference DeepInversion computes it
    terms['tv'] = losses.tv_loss(augment.normalize(x, cfg.mean, cfg.std))
  return terms


def weighted_sum(cfg: SynthesisConfig, terms: Dict[str, jax.Array]) -> jax.Array:
  return sum(getattr(cfg.weights, k) * v for k, v in terms.items())


def track_best(best: Dict[str, Any], cand: Dict[str, Any]) -> Dict[str, Any]:
  """The lowest-loss iterate so far: `cand` replaces `best` when its 'loss' is
  lower (a NaN loss never compares lower, so it is never kept)."""
  return select(cand['loss'] < best['loss'], cand, best)


def all_finite(tree) -> jax.Array:
  """True when every leaf of `tree` is finite (a step's gradients, a meta-gradient)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def diagnostics(logits, features, targets, num_classes) -> Dict[str, jax.Array]:
  """Synthesis quality signals for the round's kept images (teacher's view).

  confidence: mean max softmax; target_accuracy: % argmax == target;
  class_entropy: entropy (nats) of the argmax histogram (log K = balanced);
  feature_diversity: 1 - mean pairwise cosine similarity of global features.
  """
  p = jax.nn.softmax(logits, -1)
  pred = jnp.argmax(logits, -1)
  hist = jnp.bincount(pred, length=num_classes) / pred.shape[0]
  entropy = -jnp.sum(jnp.where(hist > 0, hist * jnp.log(jnp.where(hist > 0, hist, 1.0)), 0.0))
  f = features[:, features.shape[1] // 2:]
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  n = f.shape[0]
  sim = (jnp.sum(f @ f.T) - n) / jnp.maximum(n * (n - 1), 1)
  return {'confidence': jnp.mean(jnp.max(p, -1)),
          'target_accuracy': 100.0 * jnp.mean(pred == targets),
          'class_entropy': entropy, 'feature_diversity': 1.0 - sim}

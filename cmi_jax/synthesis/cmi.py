"""The CMI synthesis round (Algorithm 1, CMI), as one pure jittable function.

A round: re-initialize the generator, draw a trainable latent z, and for
g_steps iterations render x = G(z), make a global view (crop + flip) and a
local view (random resized crop + flip), run the frozen teacher once on both,
compute L_inv = bn*L_bn + oh*L_oh + adv*L_adv on the global view and
L_cr on [local, bank_local] vs [global, bank_global] through the head,
and take one Adam step on (generator, z) and one on the head. The iterate of
lowest total loss is tracked on device; at the end its images enter the image
pool and its raw [local | global] features the memory bank.

The whole round is one `lax.scan`: no host sync, no Python-side state. The
same function runs the pixel-space variants (DeepInversion, the "w/o
generator" ablation) through `SynthesisConfig.synthesizer='pixels'`.
"""

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from cmi_jax import augment
from cmi_jax.parallel import constrain
from cmi_jax.state import select
from cmi_jax.models import Generator, Head
from cmi_jax.synthesis import losses
from cmi_jax.synthesis.bank import RingBuffer, ring_add, ring_init, ring_sample_distinct
from cmi_jax.teacher import Teacher, TeacherOutput

SYNTHESIZERS = ('generator', 'pixels')
GENERATORS = ('cmi', 'large')
VIEWS = ('cmi', 'jitter', 'crop')  # 'crop': the global view only (FastDFKD, NAYER)
OH_KINDS = ('targets', 'argmax')


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the unified inversion loss (Eq. 4 + Eq. 9, CMI; section 5 baselines)."""
  bn: float = 1.0
  oh: float = 1.0
  adv: float = 0.5
  cr: float = 0.8
  balance: float = 0.0
  act: float = 0.0
  tv: float = 0.0


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
  """Every synthesis hyperparameter (hashable: a static jit argument)."""
  image_shape: Tuple[int, int, int]
  num_classes: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  batch_size: int = 256
  g_steps: int = 200
  lr_g: float = 1e-3
  betas: Tuple[float, float] = (0.5, 0.999)
  lr_head: float = 1e-3
  weights: LossWeights = LossWeights()
  adv_kind: str = 'masked_kl'
  adv_temperature: float = 1.0
  oh_kind: str = 'targets'
  cr_temperature: float = 0.1
  n_neg: int = 4096
  head_kind: str = 'mlp'
  head_dim: int = 256
  bank_size: int = 40960
  pool_size: int = 51200      # 200 rounds x 256 (the reference keeps every image)
  synthesizer: str = 'generator'
  generator: str = 'cmi'       # 'cmi' (2*ngf) or 'large' (4*ngf, GAN baselines)
  reinit: bool = True          # re-initialize the generator every round (CMI)
  nz: int = 256
  ngf: int = 64
  views: str = 'cmi'
  global_padding: int = 4
  local_scale: Tuple[float, float] = (0.25, 1.0)
  jitter: int = -1            # max roll (px) of the 'jitter' views; -1: image size // 8
  dtype: str = 'float32'
  # Which round function runs this config (cmi_jax.synthesis.algorithms.ALGORITHMS):
  # 'cmi' (CMI and the presets of the unified loss), further methods by name.
  algorithm: str = 'cmi'
  # --- FastDFKD (algorithm 'fast', cmi_jax/synthesis/fast.py); ignored by the others.
  # The meta-generator and its Adam persist across rounds; each round trains a fast
  # copy g_steps (K) inner steps with a fresh z at lr_z; the meta-Adam runs at
  # lr_meta (<= 0: K * lr_g, the reference's). bn_mmt: momentum of the BN-statistics
  # EMA in L_bn (losses.momentum_bn_loss). L_adv is on from 0-based round
  # adv_start_round (counted on device, pre-rounds included). reset_l0_round: the
  # 0-based round at which the meta-generator's first Linear and BN are re-drawn
  # (reference's reset_l0 at 120 + warmup); -1 never.
  lr_z: float = 0.01
  lr_meta: float = 0.0
  bn_mmt: float = 0.9
  adv_start_round: int = 0
  reset_l0_round: int = -1
  # GAN baselines (kd.mode 'fresh') only: True reproduces the reference scripts' early
  # bug (DataFree's first commit, Fast-Datafree `datafree_kd.py:270`; issue #11 there):
  # the teacher stands in for the student in L_adv, so the adversarial term is zero.
  adv_against_teacher: bool = False
  # --- NAYER (algorithm 'nayer', cmi_jax/synthesis/nayer.py); ignored by the others.
  # Also reads bn_mmt and adv_start_round above, views 'crop'. A round is one epoch:
  # g_loops loops, each with fresh noisy layers and a fresh Adam (the warm-up's
  # gwp_loops is the runner's kd.pre_loops, its pre-rounds' g_loops). The generator
  # persists and is replaced every g_life rounds (reinit is unused).
  # le_emb_size: the noisy layers' width. label_embeddings: the class vectors fed to
  # the generator: 'classifier', 'penultimate', 'random', 'onehot' (derived offline,
  # cmi_jax/synthesis/embeddings.py) or the path of a user's [C, E] .npy file.
  g_loops: int = 2
  g_life: int = 10
  le_emb_size: int = 1000
  label_embeddings: str = 'classifier'

  def validate(self) -> 'SynthesisConfig':
    """Raises ValueError naming the first bad field and its allowed values."""
    checks = [
        ('algorithm', self.algorithm in _algorithm_names(), f'one of {_algorithm_names()}'),
        ('synthesizer', self.synthesizer in SYNTHESIZERS, f'one of {SYNTHESIZERS}'),
        ('generator', self.generator in GENERATORS, f'one of {GENERATORS}'),
        ('views', self.views in VIEWS, f'one of {VIEWS}'),
        ('oh_kind', self.oh_kind in OH_KINDS, f'one of {OH_KINDS}'),
        ('adv_kind', self.adv_kind in losses.ADV_KINDS, f'one of {losses.ADV_KINDS}'),
        ('batch_size', self.batch_size >= 2, '>= 2'),
        ('g_steps', self.g_steps >= 1, '>= 1'),
        ('n_neg', self.n_neg >= 0, '>= 0'),
        ('bank_size', self.bank_size >= 1, '>= 1'),
        ('pool_size', self.pool_size >= self.batch_size, f'>= batch_size ({self.batch_size})'),
        ('cr_temperature', self.cr_temperature > 0, '> 0'),
        ('lr_g', self.lr_g > 0, '> 0'),
        ('lr_z', self.lr_z > 0, '> 0'),
        ('bn_mmt', 0.0 <= self.bn_mmt < 1.0, 'in [0, 1)'),
        ('g_loops', self.g_loops >= 1, '>= 1'),
        ('g_life', self.g_life >= 1, '>= 1'),
        ('le_emb_size', self.le_emb_size >= 1, '>= 1'),
        ('label_embeddings', _embedding_source_ok(self.label_embeddings),
         "'classifier', 'penultimate', 'random', 'onehot' or a path ending in .npy"),
        ('dtype', self.dtype in ('float32', 'bfloat16'), "'float32' or 'bfloat16'"),
        ('image_shape', len(self.image_shape) == 3 and
         (self.synthesizer == 'pixels' or self.image_shape[0] % 4 == 0 and
          self.image_shape[1] % 4 == 0), 'H, W, C with H and W multiples of 4 for the generator'),
        ('mean/std', len(self.mean) == len(self.std) == self.image_shape[2],
         f'one value per channel ({self.image_shape[2]})'),
    ]
    for name, ok, allowed in checks:
      if not ok:
        raise ValueError(f'synthesis.{name}={getattr(self, name, None)!r} is invalid: '
                         f'must be {allowed}.')
    return self

  @property
  def compute_dtype(self):
    return jnp.bfloat16 if self.dtype == 'bfloat16' else jnp.float32

  def make_generator(self) -> Generator:
    h, _, c = self.image_shape
    return Generator(nz=self.nz, ngf=self.ngf, img_size=h, nc=c,
                     large=self.generator == 'large', dtype=self.compute_dtype)

  def make_head(self) -> Head:
    return Head(kind=self.head_kind, head_dim=self.head_dim)


def _embedding_source_ok(value: str) -> bool:
  from cmi_jax.synthesis.embeddings import check_source  # pylint: disable=g-import-not-at-top
  return check_source(value)


def _algorithm_names() -> Tuple[str, ...]:
  from cmi_jax.synthesis.algorithms import ALGORITHMS  # pylint: disable=g-import-not-at-top
  return tuple(sorted(ALGORITHMS))


class SynthState(struct.PyTreeNode):
  """What persists across rounds: the head and its Adam, the bank, the pool."""
  head: train_state.TrainState
  bank: RingBuffer   # [bank_size, 2D] float32 raw [local | global] teacher features
  pool: RingBuffer   # {'images': [pool_size, H, W, C] uint8, 'targets': [pool_size] int32}
  round: jax.Array   # int32 rounds done


class RoundOutput(NamedTuple):
  images: jax.Array            # [B, H, W, C] float32 in [0, 1], the lowest-loss iterate
  targets: jax.Array           # [B] int32
  metrics: Dict[str, jax.Array]


def feature_dim(teacher: Teacher, image_shape) -> int:
  """D: the width of the teacher's contrastive features."""
  out = jax.eval_shape(lambda t: t(jnp.zeros((2,) + tuple(image_shape))), teacher)
  return out.features.shape[-1]


def init_state(cfg: SynthesisConfig, teacher: Teacher, rng: jax.Array) -> SynthState:
  """Fresh head (+ Adam), empty bank and pool."""
  d = feature_dim(teacher, cfg.image_shape)
  head = cfg.make_head()
  params = head.init(rng, jnp.zeros((1, d), jnp.float32))['params'] if cfg.head_kind != 'none' \
      else {}
  head_state = train_state.TrainState.create(apply_fn=head.apply, params=params,
                                             tx=optax.adam(cfg.lr_head))
  bank = ring_init(cfg.bank_size, jax.ShapeDtypeStruct((2 * d,), jnp.float32))
  pool = ring_init(cfg.pool_size, {
      'images': jax.ShapeDtypeStruct(tuple(cfg.image_shape), jnp.uint8),
      'targets': jax.ShapeDtypeStruct((), jnp.int32)})
  return SynthState(head_state, bank, pool, jnp.zeros((), jnp.int32))


def to_uint8(x: jax.Array) -> jax.Array:
  """[0, 1] float -> uint8, rounding to nearest (as saving a PNG does)."""
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def _views(cfg: SynthesisConfig, rng: jax.Array, x: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
  """Normalized (global, local) views of x in [0, 1]; local is None for 'jitter'."""
  b, h, w, _ = x.shape
  k_g, k_l = jax.random.split(rng)
  if cfg.views == 'crop':
    xg = augment.apply_warp(x, augment.crop_flip(k_g, b, (h, w), cfg.global_padding))
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


def _contrastive(cfg, head_state, head_params, feat_l, feat_g, bank_feats, bank_valid):
  """L_cr through the head on [local, bank_local] vs [global, bank_global].

  The head is row-wise, so it runs as three calls instead of one on the
  concatenation (same values): the global rows are stop-gradient (no backward
  at all), the bank's local rows are constants (weight gradient only), and only
  the B current local rows need an input gradient. One call would run the whole
  backward over all 2(B + n_neg) rows, most of them with a zero cotangent.
  """
  b = feat_l.shape[0]
  head = lambda x: head_state.apply_fn({'params': head_params}, x)
  if bank_feats is not None:
    bank_l, bank_g = jnp.split(bank_feats, 2, axis=1)
    p_l = jnp.concatenate([head(feat_l), head(bank_l)], axis=0)
    p_g = head(jnp.concatenate([feat_g, bank_g], axis=0))
  else:
    p_l, p_g = head(feat_l), head(feat_g)
  # contrastive_loss stops p_g's gradient: its (separate) head call gets no backward.
  return losses.contrastive_loss(p_l, p_g, b, bank_valid, cfg.cr_temperature)


def _view_rows(out: TeacherOutput, j: int) -> TeacherOutput:
  """Rows j, j+2, ... of a teacher call on interleaved [global, local] views
  (per-sample fields only; the running statistics are shared)."""
  pick = lambda a: None if a is None else a.reshape((-1, 2) + a.shape[1:])[:, j]
  bn = tuple(t._replace(mean=pick(t.mean), var=pick(t.var)) for t in out.bn)
  return out._replace(logits=pick(out.logits), bn=bn, features=pick(out.features),
                      penultimate=pick(out.penultimate))


def _init_trainables(cfg: SynthesisConfig, rng: jax.Array):
  """Round start: a freshly initialized generator + latent z, or raw pixels."""
  k_g, k_z = jax.random.split(rng)
  b = cfg.batch_size
  if cfg.synthesizer == 'pixels':
    # DeepInversion: pixels ~ N(0, 1) in normalized space.
    return {'pixels': jax.random.normal(k_z, (b,) + tuple(cfg.image_shape), jnp.float32)}, None
  z = jax.random.normal(k_z, (b, cfg.nz), jnp.float32)
  variables = cfg.make_generator().init(k_g, z)
  return {'generator': variables['params'], 'z': z}, variables['batch_stats']


def _render(cfg: SynthesisConfig, trainables, gen_stats) -> jax.Array:
  """Images in [0, 1], [B, H, W, C] float32."""
  if cfg.synthesizer == 'pixels':
    mean = jnp.asarray(cfg.mean, jnp.float32)
    std = jnp.asarray(cfg.std, jnp.float32)
    return trainables['pixels'] * std + mean
  x, _ = cfg.make_generator().apply({'params': trainables['generator'], 'batch_stats': gen_stats},
                               trainables['z'], train=True, mutable=['batch_stats'])
  return x.astype(jnp.float32)


def _clip_pixels(cfg: SynthesisConfig, trainables):
  """Keeps pixel iterates inside the valid image range (DeepInversion's clip)."""
  if cfg.synthesizer != 'pixels':
    return trainables
  mean = jnp.asarray(cfg.mean, jnp.float32)
  std = jnp.asarray(cfg.std, jnp.float32)
  return {'pixels': jnp.clip(trainables['pixels'], -mean / std, (1.0 - mean) / std)}


def synthesis_round(cfg: SynthesisConfig, teacher: Teacher, student: Optional[Teacher],
                    state: SynthState, rng: jax.Array, targets: Optional[jax.Array] = None,
                    data_sharding: Optional[Any] = None) -> Tuple[SynthState, RoundOutput]:
  """One CMI round (g_steps iterations); pure, jit it with `cfg` static.

  Args:
    cfg: synthesis hyperparameters.
    teacher: frozen teacher.
    student: frozen student for the adversarial term (None disables L_adv).
    state: head, bank and pool from the previous rounds.
    rng: this round's key (e.g. fold_in(synthesis_key, round_index)).
    targets: [B] class ids; default random, sorted (as the reference).
    data_sharding: NamedSharding splitting batch arrays over devices (see
      cmi_jax.parallel); the math is the same with or without it.
  Returns:
    (new state with the round's best images in the pool and features in the
    bank, RoundOutput with the images, targets and per-step metrics).
  """
  b = cfg.batch_size
  k_init, k_t, k_steps = jax.random.split(rng, 3)
  if targets is None:
    targets = jnp.sort(jax.random.randint(k_t, (b,), 0, cfg.num_classes))
  targets = constrain(targets, data_sharding)
  trainables, gen_stats = _init_trainables(cfg, k_init)
  # z / pixels are per-sample: split them, XLA propagates the split downstream.
  trainables = {k: constrain(v, data_sharding) if k in ('z', 'pixels') else v
                for k, v in trainables.items()}
  opt = optax.adam(cfg.lr_g, b1=cfg.betas[0], b2=cfg.betas[1])
  use_cr = cfg.weights.cr > 0 and cfg.views == 'cmi'
  use_adv = cfg.weights.adv > 0 and student is not None
  use_bank = use_cr and cfg.n_neg > 0

  def loss_fn(trainables, head_params, key, bank_feats, bank_valid):
    k_views, _ = jax.random.split(key)
    x = constrain(_render(cfg, trainables, gen_stats), data_sharding)
    xg, xl = _views(cfg, k_views, x)
    if xl is None:
      out = out_l = teacher(constrain(xg, data_sharding).astype(cfg.compute_dtype))
    else:
      # One teacher call on interleaved rows [g0, l0, g1, l1, ...]: each device
      # holds both views of its own samples, so neither the call nor the split
      # below moves data between devices (a [xg; xl] concatenation would).
      views = jnp.stack([xg, xl], axis=1).reshape((2 * b,) + xg.shape[1:])
      both = teacher(constrain(views, data_sharding).astype(cfg.compute_dtype))
      out, out_l = _view_rows(both, 0), _view_rows(both, 1)
    s_logits = student(xg.astype(cfg.compute_dtype), taps=False).logits if use_adv else None
    terms = inversion_terms(cfg, teacher_out=out, rows=b, targets=targets,
                            student_logits=s_logits, x=x)
    no_feats = jnp.zeros((b, 0), jnp.float32)
    feat_g = out.features if out.features is not None else no_feats
    feat_l = out_l.features if out_l.features is not None else no_feats
    if use_cr:
      terms['cr'] = _contrastive(cfg, state.head, head_params, feat_l, feat_g, bank_feats,
                                 bank_valid)
    loss = weighted_sum(cfg, terms)
    aux = {'x': x, 'features': jnp.concatenate([feat_l, feat_g], axis=1),
           'logits': out.logits[:b], 'terms': terms}
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def step(carry, key):
    trainables, opt_state, head, best, i = carry
    k_loss, k_bank = jax.random.split(key)
    bank_feats, bank_valid = (ring_sample_distinct(state.bank, k_bank, cfg.n_neg)
                              if use_bank else (None, None))
    (loss, aux), (g_t, g_h) = grad_fn(trainables, head.params, k_loss, bank_feats, bank_valid)
    updates, new_opt_state = opt.update(g_t, opt_state, trainables)
    new_trainables = _clip_pixels(cfg, optax.apply_updates(trainables, updates))
    new_head = head.apply_gradients(grads=g_h) if use_cr else head
    # A non-finite step changes nothing; a NaN loss never compares lower, so it
    # is never kept either, while the first finite iterate always is.
    ok = jnp.isfinite(loss) & _all_finite((g_t, g_h))
    keep = lambda new, old: select(ok, new, old)
    best = track_best(best, {'loss': loss, 'x': aux['x'], 'features': aux['features'],
                             'logits': aux['logits'], 'step': i})
    row = {'loss': loss, **{f'l_{k}': v for k, v in aux['terms'].items()}}
    return (keep(new_trainables, trainables), keep(new_opt_state, opt_state),
            keep(new_head, head), best, i + 1), row

  d2 = state.bank.data.shape[-1]
  best0 = {'loss': jnp.array(jnp.inf, jnp.float32),
           'x': jnp.zeros((b,) + tuple(cfg.image_shape), jnp.float32),
           'features': jnp.zeros((b, d2), jnp.float32),
           'logits': jnp.zeros((b, cfg.num_classes), jnp.float32),
           'step': jnp.zeros((), jnp.int32)}
  carry0 = (trainables, opt.init(trainables), state.head, best0, jnp.zeros((), jnp.int32))
  (_, _, head, best, _), rows = jax.lax.scan(step, carry0,
                                             jax.random.split(k_steps, cfg.g_steps))

  ok = jnp.isfinite(best['loss'])
  bank = ring_add(state.bank, best['features'], ok) if use_cr else state.bank
  pool = ring_add(state.pool, {'images': to_uint8(best['x']), 'targets': targets}, ok)
  new_state = SynthState(head, bank, pool, state.round + 1)
  metrics = dict(rows)
  metrics.update(_diagnostics(best['logits'], best['features'], targets, cfg.num_classes))
  metrics['best_loss'] = best['loss']
  metrics['best_step'] = best['step']
  return new_state, RoundOutput(best['x'], targets, metrics)


def track_best(best: Dict[str, Any], cand: Dict[str, Any]) -> Dict[str, Any]:
  """The lowest-loss iterate so far: `cand` replaces `best` when its 'loss' is
  lower (a NaN loss never compares lower, so it is never kept)."""
  return select(cand['loss'] < best['loss'], cand, best)


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _diagnostics(logits, features, targets, num_classes) -> Dict[str, jax.Array]:
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

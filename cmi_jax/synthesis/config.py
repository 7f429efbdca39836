"""Every synthesis hyperparameter: `SynthesisConfig`, `LossWeights` and the choice tuples.

Every method's round reads the same frozen (hashable, jit-static) config; the
fields a method ignores are documented where they are declared. This module
imports no method: the name table of round functions is `algorithms.py`.
"""

import dataclasses
from typing import Tuple

import jax.numpy as jnp

from cmi_jax.models import DeepGenerator, Generator, Head
from cmi_jax.synthesis import embeddings, losses
from cmi_jax.teacher import FEATURE_LAYERS

SYNTHESIZERS = ('generator', 'pixels')
GENERATORS = ('cmi', 'large', 'deep')  # 'deep': FastDFKD's ImageNet DeepGenerator
# 'crop': the global view only (FastDFKD, NAYER); 'resized': one RandomResizedCrop(local_scale)
# + flip view (FastDFKD on ImageNet).
VIEWS = ('cmi', 'jitter', 'crop', 'resized')
OH_KINDS = ('targets', 'argmax')
META_RULES = ('fomaml', 'reptile')
POOL_ITERATES = ('best', 'last')
# The round functions by name (the table is cmi_jax/synthesis/algorithms.py, which
# imports every method; a test keeps the two equal, so this module imports none).
ALGORITHM_NAMES = ('cmi', 'fast', 'nayer')


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
  # Which BN inputs form CMI's contrastive features (D wide; the head is D x D and the
  # bank bank_size x 2D): 'auto', 'all' or 'stages' (cmi_jax.teacher.FEATURE_LAYERS).
  feature_layers: str = 'auto'
  # The memory the head, its Adam, the bank and the pool may take per device, in GB;
  # 0: what jax reports for the device (bytes_limit), else host RAM / local devices
  # (cmi_jax/synthesis/footprint.py). Too much: an error before anything compiles.
  memory_budget_gb: float = 0.0
  pool_size: int = 51200      # 200 rounds x 256 (the reference keeps every image)
  # Devices the pool's slots are split over (the runner's kd.pool_mode='sharded'; 1:
  # replicated). Only the memory check reads it: the round is the same program.
  pool_shards: int = 1
  synthesizer: str = 'generator'
  # 'cmi' (2*ngf), 'large' (4*ngf, GAN baselines) or 'deep' (FastDFKD ImageNet: a spatial
  # latent [S/16, S/16, nz] into five conv blocks, cmi_jax.models.DeepGenerator)
  generator: str = 'cmi'
  reinit: bool = True          # re-initialize the generator every round (CMI)
  nz: int = 256
  ngf: int = 64
  views: str = 'cmi'
  global_padding: int = 4
  local_scale: Tuple[float, float] = (0.25, 1.0)
  jitter: int = -1            # max roll (px) of the 'jitter' views; -1: image size // 8
  dtype: str = 'float32'
  # Rematerialization (jax.checkpoint via nn.remat) of the teacher's, the student's and the
  # generator's blocks: activations recomputed in the backward pass (ImageNet nets and
  # the DeepGenerator; benchmarks/imagenet_memory.py measures what it saves).
  remat: bool = False
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
  # The ImageNet recipe's choices (zoo-and-datasets.md section 5), CIFAR's by default:
  # meta_rule 'fomaml' (g = sum of the K inner gradients) or 'reptile' (g = theta - theta'_K);
  # z_life: rounds a latent lives: 1 draws z afresh every round (CIFAR); n > 1 keeps z in
  # the state, trained by the inner Adam, and redraws it at the start of every 0-based
  # round r with (r + 1) % n == 0 (the reference's `reinit`); meta_reset: a fresh meta-Adam
  # whenever z is redrawn (ImageNet); pool_iterate: the pool takes the lowest-loss ('best')
  # or the last inner iterate ('last', ImageNet).
  meta_rule: str = 'fomaml'
  z_life: int = 1
  meta_reset: bool = False
  pool_iterate: str = 'best'
  # The synthesis-only warm-up's length in rounds (the runner's kd.pre_rounds). NAYER
  # replaces its generator when (round - warmup_rounds) % g_life == 0 as well as when
  # round % g_life == 0 (the reference's rule); the runner derives adv_start_round and
  # reset_l0_round from it unless they are set (presets.warmup_rounds).
  warmup_rounds: int = 0
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
        ('algorithm', self.algorithm in ALGORITHM_NAMES, f'one of {ALGORITHM_NAMES}'),
        ('synthesizer', self.synthesizer in SYNTHESIZERS, f'one of {SYNTHESIZERS}'),
        ('generator', self.generator in GENERATORS, f'one of {GENERATORS}'),
        ('views', self.views in VIEWS, f'one of {VIEWS}'),
        ('oh_kind', self.oh_kind in OH_KINDS, f'one of {OH_KINDS}'),
        ('meta_rule', self.meta_rule in META_RULES, f'one of {META_RULES}'),
        ('pool_iterate', self.pool_iterate in POOL_ITERATES, f'one of {POOL_ITERATES}'),
        ('z_life', self.z_life >= 1, '>= 1 (1: a fresh latent every round)'),
        ('reset_l0_round', self.generator != 'deep' or self.reset_l0_round < 0,
         "-1 with generator='deep' (the DeepGenerator has no first Linear to reset)"),
        ('adv_kind', self.adv_kind in losses.ADV_KINDS, f'one of {losses.ADV_KINDS}'),
        ('batch_size', self.batch_size >= 2, '>= 2'),
        ('g_steps', self.g_steps >= 1, '>= 1'),
        ('n_neg', self.n_neg >= 0, '>= 0'),
        ('bank_size', self.bank_size >= 1, '>= 1'),
        ('feature_layers', self.feature_layers in FEATURE_LAYERS, f'one of {FEATURE_LAYERS}'),
        ('memory_budget_gb', self.memory_budget_gb >= 0, '>= 0 (0: the device\'s memory)'),
        ('pool_size', self.pool_size >= self.batch_size, f'>= batch_size ({self.batch_size})'),
        ('cr_temperature', self.cr_temperature > 0, '> 0'),
        ('lr_g', self.lr_g > 0, '> 0'),
        ('lr_z', self.lr_z > 0, '> 0'),
        ('bn_mmt', 0.0 <= self.bn_mmt < 1.0, 'in [0, 1)'),
        ('g_loops', self.g_loops >= 1, '>= 1'),
        ('g_life', self.g_life >= 1, '>= 1'),
        ('warmup_rounds', self.warmup_rounds >= 0, '>= 0'),
        ('le_emb_size', self.le_emb_size >= 1, '>= 1'),
        ('label_embeddings', embeddings.check_source(self.label_embeddings),
         "'classifier', 'penultimate', 'random', 'onehot' or a path ending in .npy"),
        ('dtype', self.dtype in ('float32', 'bfloat16'), "'float32' or 'bfloat16'"),
        ('image_shape', len(self.image_shape) == 3 and
         (self.synthesizer == 'pixels' or self.image_shape[0] % self.upsampling == 0 and
          self.image_shape[1] % self.upsampling == 0),
         f'H, W, C with H and W multiples of {self.upsampling} for the generator'),
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

  @property
  def upsampling(self) -> int:
    """The generator's total upsampling: image side / latent side (4; 16 for 'deep')."""
    return 16 if self.generator == 'deep' else 4

  @property
  def latent_shape(self) -> Tuple[int, ...]:
    """One latent's shape: (nz,), or (H/16, W/16, nz) for the DeepGenerator."""
    if self.generator == 'deep':
      h, w, _ = self.image_shape
      return (h // 16, w // 16, self.nz)
    return (self.nz,)

  def make_generator(self):
    h, _, c = self.image_shape
    if self.generator == 'deep':
      return DeepGenerator(nz=self.nz, ngf=self.ngf, img_size=h, nc=c,
                           dtype=self.compute_dtype, remat=self.remat)
    return Generator(nz=self.nz, ngf=self.ngf, img_size=h, nc=c,
                     large=self.generator == 'large', dtype=self.compute_dtype)

  def make_head(self) -> Head:
    return Head(kind=self.head_kind, head_dim=self.head_dim)

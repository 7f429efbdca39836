"""Helpers shared by config files (big_vision's `parse_arg` pattern)."""

from typing import Dict, Optional


def parse_arg(arg: Optional[str], **defaults) -> Dict:
  """Parses the config's colon argument, e.g. 'wrn_16_1,quick' or 'arch=wrn_16_1,epochs=3'.

  `k=v` pairs set values (typed after the default); a bare word that names a
  boolean default sets it True; another bare word at place i fills the i-th key
  named by `_positional` (a key, e.g. the architecture or the paper row, or a
  tuple of keys: 'cifar10,resnet34' for ('dataset', 'arch')).
  """
  out = dict(defaults)
  positional = defaults.get('_positional', ())
  positional = (positional,) if isinstance(positional, str) else tuple(positional)
  if not arg:
    out.pop('_positional', None)
    return out
  for i, part in enumerate(p for p in arg.split(',') if p):
    if '=' in part:
      k, v = part.split('=', 1)
    elif part not in out and i < len(positional):
      k, v = positional[i], part
    else:
      k, v = part, 'True'
    if k not in out:
      raise ValueError(f'Unknown config argument {k!r}; known: {sorted(x for x in out if not x.startswith("_"))}.')
    d = out[k]
    if isinstance(d, bool):
      v = v.lower() in ('1', 'true', 'yes')
    elif isinstance(d, int):
      v = int(v)
    elif isinstance(d, float):
      v = float(v)
    out[k] = v
  out.pop('_positional', None)
  return out


def base_config(dataset: str, method: str = 'cmi'):
  """Every field the runner reads, at the published CIFAR-10 CMI values
  (reference-facts section 3, 'from scratch' column), then preset `method`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis import presets  # pylint: disable=g-import-not-at-top
  C = ml_collections.ConfigDict
  c = C()
  c.seed = 0
  c.method = method
  # image_size, mean, std, num_classes: 0 / () keep the dataset's own (cmi_jax.data.DATASETS);
  # data.name=image_folder needs the first three (MNIST at 32, as the reference: image_size=32).
  c.data = C(dict(name=dataset, dir='', backend='files', eval_batch_size=500,
                  eval_limit=0, image_size=0, mean=(), std=(), num_classes=0))
  # checkpoint: a teacher directory (experiments/train_teacher.py or convert_teacher.py),
  # a reference .pth (converted on the fly), or 'random' (smoke tests only).
  c.teacher = C(dict(arch='wrn_40_2', checkpoint=''))
  c.student = C(dict(arch='wrn_16_1'))
  c.synthesis = C(dict(
      batch_size=256, g_steps=200, lr_g=1e-3, betas=(0.5, 0.999), lr_head=1e-3,
      weights=C(dict(bn=1.0, oh=1.0, adv=0.5, cr=0.8, balance=0.0, act=0.0, tv=0.0)),
      adv_kind='masked_kl', adv_temperature=1.0, oh_kind='targets', cr_temperature=0.1,
      n_neg=4096, head_kind='mlp', head_dim=256, bank_size=40960, pool_size=51200,
      # CMI's contrastive features: 'auto' (the architecture's own taps, else every BN
      # input), 'all' (every BN input, the reference) or 'stages' (one BN input per
      # stage: for deep teachers, README "Teachers with large feature sizes");
      # memory_budget_gb 0: the device's memory (head + Adam + bank + pool must fit).
      feature_layers='auto', memory_budget_gb=0.0,
      synthesizer='generator', generator='cmi', reinit=True, nz=256, ngf=64, views='cmi',
      global_padding=-1,  # -1: the dataset's standard crop padding (4 for CIFAR)
      local_scale=(0.25, 1.0), jitter=-1, dtype='float32',  # jitter -1: size // 8
      remat=False,  # nn.remat of the teacher's, student's and generator's blocks (ImageNet nets)
      algorithm='cmi',  # the round function (cmi_jax/synthesis/algorithms.py)
      # FastDFKD (algorithm 'fast'; see SynthesisConfig): inner lr of z, meta-Adam lr
      # (0: g_steps * lr_g), BN-EMA momentum, first round of L_adv (0-based, on device;
      # NAYER's too), round of the one-off reset_l0 (-1 never).
      lr_z=0.01, lr_meta=0.0, bn_mmt=0.9,
      # FastDFKD's ImageNet choices (CIFAR's by default): 'fomaml' or 'reptile' meta step,
      # rounds a latent lives (1: fresh each round), a fresh meta-Adam with each new
      # latent, the 'best' or 'last' inner iterate into the pool.
      meta_rule='fomaml', z_life=1, meta_reset=False, pool_iterate='best',
      # None: derived from kd.pre_rounds as the reference does (presets.warmup_rounds:
      # FastDFKD pre_rounds - 1 and 119 + pre_rounds, NAYER pre_rounds); set to override.
      adv_start_round=ml_collections.config_dict.placeholder(int),
      reset_l0_round=ml_collections.config_dict.placeholder(int),
      # GAN baselines: True = the reference's early bug (teacher as the student in L_adv).
      adv_against_teacher=False,
      # NAYER (algorithm 'nayer'; see SynthesisConfig): loops per round (= epoch), rounds
      # between generator resets, noisy-layer width, the generator's class vectors
      # ('classifier', 'penultimate', 'random', 'onehot' or a [C, E] .npy path).
      g_loops=2, g_life=10, le_emb_size=1000, label_embeddings='classifier'))
  # Student: SGD, cosine stepped per epoch (down to lr_min); each epoch runs
  # ep_steps // kd_steps rounds of (one synthesis call, kd_steps student steps).
  # pre_rounds: synthesis-only rounds first (two-stage recipe, FastDFKD's warm-up) with
  # weights adv=pre_adv, oh=pre_oh. init_pool: a folder of images or a synthetic.npz
  # (the reference's --cmi_init, e.g. the authors' pre-inverted set): KD batches are drawn
  # uniformly from the pool plus these images (never the memory bank); init_resize:
  # resize + center-crop init images of another size to the teacher's (else an error).
  # pool_mode: 'device' (the image pool replicated on every device) or 'sharded' (its
  # slots split over the mesh's devices, 1/n each: a pool too big for one device, e.g.
  # ImageNet's 400k images; synthesis.pool_size must divide by the device count).
  c.kd = C(dict(pool_mode='device',
      batch_size=128, kd_steps=400, ep_steps=400, epochs=200, lr=0.1, lr_min=0.0, momentum=0.9,
      weight_decay=1e-4, temperature=20.0, loss='kl', mode='pool', augment=True,
      pre_rounds=0, pre_adv=0.0, pre_oh=1.0,
      pre_loops=0,  # synthesis.g_loops of the pre-rounds (NAYER's gwp_loops; 0: the same)
      init_pool='', init_resize=False))
  # num_devices 0: all devices, along one 'data' axis. distributed: 'auto' initializes
  # jax.distributed when the environment asks (JAX_COORDINATOR_ADDRESS, CMI_JAX_DISTRIBUTED=1).
  c.mesh = C(dict(num_devices=0, distributed='auto'))
  # Process-wide XLA settings, applied by the entry point (experiments.run) before JAX
  # starts its backends, never by the library. xla_cpu_ynn_fusions False: XLA:CPU's own
  # convolution thunks instead of YNNPACK fusions (--xla_cpu_experimental_ynn_fusion_type=),
  # x0.865 on the main command (README "Performance on the CPU"); a flag already in the
  # user's XLA_FLAGS wins. It changes only XLA's CPU compiler (GPU/TPU kernels are untouched).
  # configs/imagenet.py sets it True (at 224 pixels the fusions are faster).
  c.runtime = C(dict(xla_cpu_ynn_fusions=False))
  # Faults (experiments/guard.py): round_retries: fresh-key retries of a synthesis round
  # whose best loss is non-finite, before the round is skipped; allow_config_change:
  # continue a workdir's run although its config or teacher differs (refused by default).
  c.faults = C(dict(round_retries=2, allow_config_change=False))
  # Checkpoints are asynchronous (the round waits only for the host copy: under 5 % of a
  # 3.9 s GPU round at CIFAR sizes, benchmarks/checkpoint_speed.py) and written every
  # checkpoint_every_rounds rounds, at epoch ends when an epoch has at least that many
  # rounds, at the end, and on SIGTERM/SIGINT (a clean stop; the same command resumes).
  c.log = C(dict(every_kd_steps=50, grid_every_rounds=1, grid_per_class=10,
                 checkpoint_every_rounds=10, async_checkpoints=True, max_checkpoints=2,
                 stop_after_rounds=0,  # >0: checkpoint and exit after that many rounds
                 # 'full': the pool in every checkpoint; 'incremental': only the pool slots
                 # written since the last save, as chunks in workdir/pool/ (single host;
                 # cmi_jax/pool_checkpoint.py), so a 60 GB pool does not stall the run.
                 pool_checkpoint='full'))
  presets.apply_to_config(c, method)
  return c


# The paper's Table 1 rows: name -> (teacher arch, student arch).
PAPER_ROWS = {
    'resnet34-resnet18': ('resnet34', 'resnet18'),
    'vgg11-resnet18': ('vgg11', 'resnet18'),
    'wrn40_2-wrn16_1': ('wrn_40_2', 'wrn_16_1'),
    'wrn40_2-wrn40_1': ('wrn_40_2', 'wrn_40_1'),
    'wrn40_2-wrn16_2': ('wrn_40_2', 'wrn_16_2'),
}

# FastDFKD's per-row loss weights (adv, oh) from `scripts/fast_cifar.sh`; the presets
# carry the wrn40_2 rows' (successor-methods.md section 1.5).
FAST_ROW_WEIGHTS = {
    'resnet34-resnet18': (1.33, 0.5),
    'vgg11-resnet18': (1.0, 0.5),
    'wrn40_2-wrn16_1': (1.1, 0.4),
    'wrn40_2-wrn40_1': (1.1, 0.4),
    'wrn40_2-wrn16_2': (1.1, 0.4),
}


# NAYER's per-dataset settings (successor-methods.md section 2, zoo-and-datasets.md
# section 4: `scripts/nayer_*.sh`), over the preset (CIFAR-10's). Tiny-ImageNet: synthesis
# batch 200 (one noisy layer of 200 classes), 60 steps per loop, 4 loops per epoch, 20
# loops per warm-up epoch, KD batch 256 at lr 0.1, 1000 KD steps per epoch.
NAYER_DATASET = {
    'cifar10': {'synthesis': {'g_steps': 30}},
    'cifar100': {'synthesis': {'g_steps': 40}},
    'tiny_imagenet': {'synthesis': {'batch_size': 200, 'g_steps': 60, 'g_loops': 4},
                      'kd': {'batch_size': 256, 'lr': 0.1, 'kd_steps': 1000, 'ep_steps': 1000,
                             'pre_loops': 20}},
}


# The authors' adversarial CMI script on their pre-inverted folder (DF:scripts/cmi/
# adv_cmi_cifar10_wrn402_wrn161.sh; reference-facts.md section 3, zoo-and-datasets.md 3.3):
# 40 epochs of one round of 200 generator steps and 2000 KD steps, oh 0.5, KD batches
# uniform over the pool plus the ~50k images of --cmi_init (kd.init_pool: the reference's
# path; point it at your copy). The pool keeps all 40 x 256 synthesized images.
PREINVERTED = {'kd': {'kd_steps': 2000, 'ep_steps': 2000, 'epochs': 40,
                      'init_pool': 'run/cmi-preinverted-wrn402'},
               'synthesis': {'pool_size': 40 * 256}}
PREINVERTED_OH = 0.5


def make_dataset_config(dataset: str, arg=None, rows=None, default_row='wrn40_2-wrn16_1'):
  """A dataset's config for one paper row (`rows`: name -> (teacher, student), default
  PAPER_ROWS), preset and optional quick variant."""
  rows = PAPER_ROWS if rows is None else rows
  a = parse_arg(arg, _positional='row', row=default_row, method='cmi', quick=False,
                epochs=0,  # epochs: KD epochs, 0 = the method's (NAYER_100/200/300: 100/200/300)
                preinverted=False)  # PREINVERTED: adversarial CMI on a pre-inverted set
  if a['row'] not in rows:
    raise ValueError(f'Unknown row {a["row"]!r}; choose one of {sorted(rows)}.')
  teacher, student = rows[a['row']]
  c = base_config(dataset, a['method'])
  c.teacher.arch, c.student.arch = teacher, student
  # The reference repo's layout for its pretrained teachers.
  c.teacher.checkpoint = f'checkpoints/pretrained/{dataset}_{teacher}.pth'
  c.data.dir = f'data/{dataset}'
  if c.synthesis.algorithm == 'fast':  # the row's own FastDFKD weights, warm-up included
    c.synthesis.weights.adv, c.synthesis.weights.oh = FAST_ROW_WEIGHTS[a['row']]
    c.kd.pre_adv, c.kd.pre_oh = FAST_ROW_WEIGHTS[a['row']]
  if a['preinverted']:
    if a['method'] != 'cmi':
      raise ValueError(f'preinverted is the adversarial CMI script; it takes method=cmi, not '
                       f'{a["method"]!r}.')
    for sec, values in PREINVERTED.items():
      c[sec].update(values)
    c.synthesis.weights.oh = PREINVERTED_OH
  if a['epochs']:
    c.kd.epochs = a['epochs']
  if c.synthesis.algorithm == 'nayer':  # one setting for all of a dataset's rows
    for sec, values in NAYER_DATASET.get(dataset, {}).items():
      c[sec].update(values)
    c.synthesis.pool_size = keep_all_pool_size(c)
  if a['quick']:
    apply_quick(c)
  return c


def keep_all_pool_size(c) -> int:
  """Images a loop-based run (NAYER) synthesizes in all: batch x (warm-up rounds x
  pre_loops + KD rounds x g_loops), so the pool keeps every one, as the reference does."""
  s, k = c.synthesis, c.kd
  rounds = k.epochs * max(k.ep_steps // k.kd_steps, 1)
  return s.batch_size * (k.pre_rounds * (k.pre_loops or s.g_loops) + rounds * s.g_loops)


def apply_quick(c) -> None:
  """Shrinks a config to a seconds-long smoke run (tests, first try on a laptop)."""
  s, k = c.synthesis, c.kd
  s.batch_size, s.g_steps, s.n_neg, s.bank_size, s.pool_size = 8, 2, 16, 64, 64
  s.ngf, s.nz, s.head_dim = 8, 16, 16
  rounds_per_epoch = min(max(k.ep_steps // k.kd_steps, 1), 2)
  k.batch_size, k.kd_steps, k.epochs = 8, 2, 2
  k.ep_steps = k.kd_steps * rounds_per_epoch
  # An explicit L_adv start stays where it was relative to the end of the warm-up (one
  # derived from kd.pre_rounds follows it by itself).
  pre_rounds = min(k.pre_rounds, 1)
  if s.adv_start_round:
    s.adv_start_round = max(s.adv_start_round - k.pre_rounds + pre_rounds, 0)
  k.pre_rounds = pre_rounds
  k.pre_loops = min(k.pre_loops, 2)
  s.le_emb_size = min(s.le_emb_size, 16)
  c.data.eval_limit, c.data.eval_batch_size = 64, 32
  c.log.every_kd_steps = 1
  c.log.checkpoint_every_rounds = 1  # rounds of a second: a save each (tests resume anywhere)

"""Methods as presets of the one unified inversion loss (reference-facts section 5).

A preset is a set of overrides of the `synthesis` and `kd` config sections
(field names of `SynthesisConfig` / the runner's kd section). The same table
serves the ml_collections configs (`apply_to_config`) and the library API
(`apply_to_synthesis_config`), so a method is defined in exactly one place.

Baselines (reference scripts, CIFAR-10 wrn_40_2 -> wrn_16_1):
  cmi       bn 1, oh 1, adv 0.5 (decision-adversarial), cr 0.8; generator re-init per round.
  deepinv   pixels N(0,1) in normalized space, Adam lr 0.1 betas (0.5, 0.99), 1000
            steps/round, roll+flip jitter, bn 10, oh 1, adv 1 (-JS at T=3), TV 0.001.
  dafl/zskt/dfq/dfad  the large generator trained continuously (never re-initialized),
            1 generator step per round on a fresh z batch, then kd_steps student steps on
            fresh generator samples (no image pool); oh on the teacher's own argmax;
            adv = -KL at T=1 without mask (DFAD: -L1 of logits); KD loss = that same
            criterion (KL at T=1; DFAD L1), as the reference code does.
Ablations (Table 4 of the paper, CMI on top): no contrast (cr 0), no decision-adversarial
term (adv 0), no generator (pixel updates with CMI's views), head none / linear / mlp.
Two-stage (Table 1 "adversarial"): a non-adversarial pre-inversion of a fixed set, then
adversarial CMI with kd_steps 2000 (`kd.pre_rounds` rounds with adv 0 and no KD first).
FastDFKD (fast2 / fast5 / fast10): algorithm 'fast' (cmi_jax/synthesis/fast.py), its own
round function; loss, schedule and per-variant K / lr_g / lr_z from the authors' scripts.
fast_imagenet: the same round with the ImageNet recipe's choices (the logged Fast-50 runs).
"""

import dataclasses
from typing import Any, Dict

from cmi_jax.synthesis.config import LossWeights

GAN_COMMON = {
    'synthesis': {'algorithm': 'cmi', 'synthesizer': 'generator', 'generator': 'large',
                  'reinit': False,
                  'g_steps': 1, 'oh_kind': 'argmax', 'adv_kind': 'kl', 'adv_temperature': 1.0,
                  'lr_g': 1e-3, 'betas': (0.5, 0.999), 'nz': 256,
                  'weights': {'cr': 0.0, 'tv': 0.0}},
    'kd': {'mode': 'fresh', 'loss': 'kl', 'temperature': 1.0},
}


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
  out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
  for k, v in extra.items():
    out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


PRESETS: Dict[str, Dict[str, Any]] = {
    'cmi': {
        'synthesis': {'algorithm': 'cmi', 'synthesizer': 'generator', 'generator': 'cmi',
                      'reinit': True, 'views': 'cmi', 'adv_kind': 'masked_kl', 'adv_temperature': 1.0,
                      'oh_kind': 'targets', 'head_kind': 'mlp',
                      'weights': {'bn': 1.0, 'oh': 1.0, 'adv': 0.5, 'cr': 0.8,
                                  'balance': 0.0, 'act': 0.0, 'tv': 0.0}},
        'kd': {'mode': 'pool', 'loss': 'kl'},
    },
    'deepinv': {
        'synthesis': {'algorithm': 'cmi', 'synthesizer': 'pixels', 'views': 'jitter', 'g_steps': 1000, 'lr_g': 0.1,
                      'betas': (0.5, 0.99), 'adv_kind': 'js', 'adv_temperature': 3.0,
                      'oh_kind': 'targets',
                      'weights': {'bn': 10.0, 'oh': 1.0, 'adv': 1.0, 'cr': 0.0,
                                  'balance': 0.0, 'act': 0.0, 'tv': 0.001}},
        'kd': {'mode': 'pool', 'loss': 'kl'},
    },
    'dafl': _merge(GAN_COMMON, {
        'synthesis': {'nz': 512, 'weights': {'bn': 0.0, 'oh': 1.0, 'adv': 0.0, 'act': 0.001,
                                             'balance': 20.0}},
        'kd': {'kd_steps': 5}}),
    'zskt': _merge(GAN_COMMON, {
        'synthesis': {'weights': {'bn': 0.0, 'oh': 0.0, 'adv': 1.0, 'act': 0.0,
                                  'balance': 0.0}},
        'kd': {'kd_steps': 5}}),
    'dfq': _merge(GAN_COMMON, {
        'synthesis': {'weights': {'bn': 1.0, 'oh': 1.0, 'adv': 1.0, 'act': 0.0,
                                  'balance': 20.0}},
        'kd': {'kd_steps': 10}}),
    'dfad': _merge(GAN_COMMON, {
        'synthesis': {'adv_kind': 'l1',
                      'weights': {'bn': 0.0, 'oh': 0.0, 'adv': 1.0, 'act': 0.0,
                                  'balance': 0.0}},
        'kd': {'kd_steps': 5, 'loss': 'l1'}}),
}

# Ablations of the paper's Table 4, each CMI with one change.
PRESETS['cmi_no_contrast'] = _merge(PRESETS['cmi'], {'synthesis': {'weights': {'cr': 0.0}}})
PRESETS['cmi_no_adv'] = _merge(PRESETS['cmi'], {'synthesis': {'weights': {'adv': 0.0}}})
PRESETS['cmi_no_generator'] = _merge(PRESETS['cmi'], {
    'synthesis': {'synthesizer': 'pixels', 'lr_g': 0.1, 'betas': (0.5, 0.99)}})
PRESETS['cmi_head_none'] = _merge(PRESETS['cmi'], {'synthesis': {'head_kind': 'none'}})
PRESETS['cmi_head_linear'] = _merge(PRESETS['cmi'], {'synthesis': {'head_kind': 'linear'}})
PRESETS['cmi_head_mlp'] = PRESETS['cmi']
# Table 1 "adversarial": non-adversarial pre-inversion (stage 1) then adversarial CMI.
# The pool keeps every image of both stages, as the reference's on-disk pool does:
# (196 + 40) rounds x 256 = 60416 (196 x 256 = 50176, the ~50k pre-inverted set).
PRESETS['cmi_two_stage'] = _merge(PRESETS['cmi'], {
    'synthesis': {'weights': {'oh': 0.5}, 'pool_size': 60416},
    'kd': {'pre_rounds': 196, 'pre_adv': 0.0, 'pre_oh': 1.0, 'kd_steps': 2000, 'ep_steps': 2000,
           'epochs': 40}})

# FastDFKD (Fang et al., AAAI 2022; successor-methods.md section 1, `scripts/fast_cifar.sh`):
# a meta-learned generator, K inner steps per round (Fast-K), momentum L_bn, 20 synthesis-only
# warm-up rounds (L_adv on from the 20th, on device), then 400 KD steps per round for 200
# epochs at batch 256, T 20, SGD lr 0.2 cosine to 2e-4. Loss weights are the wrn40_2 rows'
# (adv 1.1, oh 0.4); configs/common.py sets the resnet34 / vgg11 rows' (FAST_ROW_WEIGHTS).
# reinit stays True: it is CMI's field; 'fast' always keeps its meta-generator.
FAST_COMMON = {
    'synthesis': {'algorithm': 'fast', 'synthesizer': 'generator', 'generator': 'cmi',
                  'reinit': True, 'views': 'crop', 'adv_kind': 'masked_kl',
                  'adv_temperature': 1.0, 'oh_kind': 'targets', 'betas': (0.5, 0.999),
                  'batch_size': 256, 'pool_size': 220 * 256, 'bn_mmt': 0.9, 'lr_meta': 0.0,
                  'weights': {'bn': 10.0, 'oh': 0.4, 'adv': 1.1, 'cr': 0.0,
                              'balance': 0.0, 'act': 0.0, 'tv': 0.0}},
    'kd': {'mode': 'pool', 'loss': 'kl', 'temperature': 20.0, 'batch_size': 256, 'lr': 0.2,
           'lr_min': 2e-4, 'epochs': 200, 'kd_steps': 400, 'ep_steps': 400,
           'pre_rounds': 20, 'pre_adv': 1.1, 'pre_oh': 0.4},
}
# Fast-K: (K = g_steps, lr_g, lr_z); the meta-Adam runs at K * lr_g.
FAST_VARIANTS = {'fast2': (2, 5e-3, 0.015), 'fast5': (5, 3e-3, 0.01), 'fast10': (10, 2e-3, 0.01)}
for _name, (_k, _lr_g, _lr_z) in FAST_VARIANTS.items():
  PRESETS[_name] = _merge(FAST_COMMON, {'synthesis': {'g_steps': _k, 'lr_g': _lr_g,
                                                      'lr_z': _lr_z}})

# FastDFKD on ImageNet, as the logged Fast-50 runs did it (zoo-and-datasets.md section 5;
# FD:logs/log-imagenet-resnet50_imagenet-*-FastDFKD_50.txt, the r50 -> r50 row): the same
# 'fast' round with the DeepGenerator (spatial latent 256 x 14 x 14), a persistent latent
# redrawn with a fresh meta-Adam every 50 rounds, the Reptile meta step at lr_g_meta 1e-4,
# RandomResizedCrop(224, scale (0.75, 1)) + flip, L_adv from the first round (no warm-up),
# the last iterate into the pool; bn / oh / adv 0.1, K = 50 at lr_g 2e-4, lr_z 0.01, batch
# 100; KD at T 5, SGD lr 0.1 cosine to 0 over 400 epochs of 10 rounds x 100 steps, on
# ImageNet's RandomResizedCrop(224) + flip. The pool keeps all 400 x 10 x 100 = 400,000
# images (60 GB of uint8 at 224: see the README on memory). The logs' init folder
# (`cmi_init`) is not published: nothing stands in for it.
PRESETS['fast_imagenet'] = {
    'synthesis': {'algorithm': 'fast', 'synthesizer': 'generator', 'generator': 'deep',
                  'reinit': True, 'views': 'resized', 'local_scale': (0.75, 1.0),
                  'adv_kind': 'masked_kl', 'adv_temperature': 1.0, 'oh_kind': 'targets',
                  'betas': (0.5, 0.999), 'nz': 256, 'ngf': 64, 'batch_size': 100,
                  'g_steps': 50, 'lr_g': 2e-4, 'lr_z': 0.01, 'lr_meta': 1e-4, 'bn_mmt': 0.9,
                  'meta_rule': 'reptile', 'z_life': 50, 'meta_reset': True,
                  'pool_iterate': 'last', 'pool_size': 400 * 10 * 100,
                  'adv_start_round': 0, 'reset_l0_round': -1,
                  'weights': {'bn': 0.1, 'oh': 0.1, 'adv': 0.1, 'cr': 0.0,
                              'balance': 0.0, 'act': 0.0, 'tv': 0.0}},
    'kd': {'mode': 'pool', 'loss': 'kl', 'temperature': 5.0, 'batch_size': 100, 'lr': 0.1,
           'lr_min': 0.0, 'epochs': 400, 'kd_steps': 100, 'ep_steps': 1000,
           'pre_rounds': 0, 'pre_adv': 0.1, 'pre_oh': 0.1},
}

# NAYER (Tran et al., CVPR 2024; successor-methods.md section 2, `scripts/nayer_200.sh`):
# a persistent NLGenerator fed class vectors through noisy layers re-drawn every loop,
# reset every g_life = 10 epochs; one round = one epoch of g_loops = 2 loops x g_steps;
# 20 synthesis-only warm-up rounds of 10 loops (kd.pre_loops = gwp_loops; L_adv off,
# and on device from round 20 for API use), then 400 KD steps per epoch at batch 512,
# T 20, SGD lr 0.2 cosine over the KD epochs to 2e-4. Every loop's best 400 images are
# kept: 20 x 10 x 400 + epochs x 2 x 400 (NAYER_200: 240,000). g_steps 30 is CIFAR-10's
# (configs/common.py sets CIFAR-100's 40); epochs 200 = NAYER_200 (`:epochs=` 100, 300).
PRESETS['nayer'] = {
    'synthesis': {'algorithm': 'nayer', 'synthesizer': 'generator', 'generator': 'cmi',
                  'reinit': True, 'views': 'crop', 'adv_kind': 'masked_kl',
                  'adv_temperature': 1.0, 'oh_kind': 'targets', 'betas': (0.5, 0.999),
                  'batch_size': 400, 'g_steps': 30, 'lr_g': 4e-3,
                  'pool_size': (20 * 10 + 200 * 2) * 400, 'bn_mmt': 0.9,
                  'g_loops': 2, 'g_life': 10, 'le_emb_size': 1000,
                  'weights': {'bn': 10.0, 'oh': 0.5, 'adv': 1.33, 'cr': 0.0,
                              'balance': 0.0, 'act': 0.0, 'tv': 0.0}},
    'kd': {'mode': 'pool', 'loss': 'kl', 'temperature': 20.0, 'batch_size': 512, 'lr': 0.2,
           'lr_min': 2e-4, 'epochs': 200, 'kd_steps': 400, 'ep_steps': 400,
           'pre_rounds': 20, 'pre_adv': 0.0, 'pre_oh': 0.5, 'pre_loops': 10},
}


def warmup_rounds(algorithm: str, pre_rounds: int) -> Dict[str, int]:
  """The rounds the reference derives from its warm-up length W (kd.pre_rounds), used
  unless a config sets them (0-based, the warm-up's rounds counted):
  FastDFKD: L_adv from the W-th round (W - 1, one round before KD, `fast_meta.py:144`),
  reset_l0 at the (120 + W)-th (119 + W); NAYER: L_adv from the first KD round (W)."""
  if algorithm == 'fast':
    return {'adv_start_round': max(pre_rounds - 1, 0), 'reset_l0_round': 119 + pre_rounds,
            'warmup_rounds': pre_rounds}
  if algorithm == 'nayer':
    return {'adv_start_round': pre_rounds, 'reset_l0_round': -1, 'warmup_rounds': pre_rounds}
  return {'adv_start_round': 0, 'reset_l0_round': -1, 'warmup_rounds': pre_rounds}


def get(name: str) -> Dict[str, Any]:
  if name not in PRESETS:
    raise ValueError(f'Unknown method {name!r}; choose one of {sorted(PRESETS)} '
                     '(config field `method`).')
  return PRESETS[name]


def apply_to_config(config, name: str) -> None:
  """Writes preset `name` into an ml_collections ConfigDict (sections synthesis, kd)."""
  def write(section, values, path):
    for k, v in values.items():
      if isinstance(v, dict):
        write(section[k], v, f'{path}.{k}')
      else:
        if k not in section:
          raise KeyError(f'preset {name!r} sets unknown config field {path}.{k}')
        section[k] = v
  for sec, values in get(name).items():
    write(config[sec], values, sec)
  config.method = name


def apply_to_synthesis_config(cfg, name: str):
  """Returns SynthesisConfig `cfg` with preset `name`'s synthesis overrides."""
  preset = get(name)
  values = dict(preset['synthesis'])
  # The library runs no warm-up, but keeps the preset's round numbers (as its schedule).
  for k, v in warmup_rounds(values.get('algorithm', 'cmi'),
                            preset.get('kd', {}).get('pre_rounds', 0)).items():
    values.setdefault(k, v)
  weights = dataclasses.replace(cfg.weights, **values.pop('weights', {}))
  fields = {f.name for f in dataclasses.fields(cfg)}
  values = {k: v for k, v in values.items() if k in fields}
  return dataclasses.replace(cfg, weights=LossWeights(**dataclasses.asdict(weights)), **values)

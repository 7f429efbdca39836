"""Synthesis and KD speed on the CPU, cmi_jax side by side with PyTorch.

  python -m benchmarks.synthesis_speed                      # every setting (~30 min, 2 cores)
  python -m benchmarks.synthesis_speed --settings=32x32x3_b64,kd_b128
  python -m benchmarks.synthesis_speed --quick              # seconds-long smoke run
  python -m benchmarks.synthesis_speed --rows=zoo           # the model-zoo rows (~35 min, loaded 2 cores)
  python -m benchmarks.synthesis_speed --rows=imagenet      # Fast-50 at 224 (~4 min, 2 cores, 5 GB)

Teacher wrn_16_2 -> student wrn_16_1, random weights, the memory bank holding
n_neg=4096 negatives. Both implementations run in ONE process, interleaved
(jax, torch, jax, torch ...), so a shared machine's drift hits both alike.
  * synthesis iteration: (round of `--long` iterations - round of `--short`
    iterations) / (long - short), from the medians over `--repeats`; the
    per-round costs (generator re-init, bank and pool writes) cancel.
    32x32x3 and 28x28x1, synthesis batch 256 and 64.
  * KD step at batch 128 (32x32x3) and at the main command's 28x28x1 batch 64:
    the same difference of a long and a short run of steps.
The PyTorch side is benchmarks/torch_baseline.py (eager, the reference's
algorithm); it is skipped when torch is not installed. ratio = cmi_jax / torch
(< 1: cmi_jax faster).

--rows=zoo: the same two measurements for the model zoo's resnet50 (CIFAR style)
teacher -> mobilenetv2 student at 32x32x3 (ZOO below; torch twins from
tests/torch_zoo.py), at small batches and --long=3 --short=1 by default. The
contrastive features are the input of each stage's first BN on both sides (cmi_jax's
synthesis.feature_layers='stages': bn1 and the first BN of layer1..layer4, D = 1024):
all 53 BN inputs (D = 26560, the reference's default) would make a 705M-parameter
head and an 8.7 GB bank, more than this machine's memory. Each row records its
teacher, student and versions (rows may come from different environments).

--rows=imagenet: FastDFKD's ImageNet recipe (configs/imagenet.py's resnet50-resnet50 row,
preset fast_imagenet, read by `imagenet_recipe`), random weights: one Fast-50 synthesis
iteration (resnet50_imagenet teacher and student, DeepGenerator, 224x224x3; the torch side
is benchmarks/torch_fast.py) and one KD step (the config's T, ImageNet's RandomResizedCrop
scale, a pool of 64 images), both at batch IMAGENET['batch'] instead of the config's 100
(a CPU), with --long=3 --short=1 by default. Each row records the `recipe` it used.
--imagenet_override=image_size=32,teacher=wrn_16_1,... shrinks it (tests).

Profile: one long cmi_jax round runs under the JAX profiler; every executed
HLO instruction's time (the CPU runtime records one event per instruction) is
summed per op family, from the compiled HLO: conv fwd, conv input-grad, conv
filter-grad (XLA's own backward convolutions, or the explicit-gradient
matmuls of cmi_jax.models.layers), matmul (every other dot), elementwise/other.
It needs jax.profiler.ProfileSession: where that is missing the row is written
without 'profile' (a warning); --no_profile skips it.
Rows are merged into benchmarks/results/synthesis_speed.json by setting name,
so the grid can be run in pieces. --quick writes to synthesis_speed_quick.json in
the temporary folder unless --out is given.
"""

import argparse
import collections
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, machine_info, write_result
from cmi_jax import models
from cmi_jax.distill import KDConfig, kd_steps
from cmi_jax.state import create_classifier_state, sgd
from cmi_jax.synthesis.bank import ring_add, ring_init
from cmi_jax.synthesis import fast
from cmi_jax.synthesis.cmi import init_state, synthesis_round
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.teacher import Teacher

TEACHER, STUDENT = 'wrn_16_2', 'wrn_16_1'
SETTINGS = {  # name: (image shape, batch); 'kd' rows time the KD step
    '32x32x3_b256': ((32, 32, 3), 256),
    '32x32x3_b64': ((32, 32, 3), 64),
    '28x28x1_b256': ((28, 28, 1), 256),
    '28x28x1_b64': ((28, 28, 1), 64),
    'kd_b128': ((32, 32, 3), 128),
    'kd_28x28x1_b64': ((28, 28, 1), 64),  # the main command's KD step
}
QUICK = {'quick_16x16x3_b8': ((16, 16, 3), 8), 'quick_kd_b8': ((16, 16, 3), 8)}
# name: (image shape, batch, teacher, student), run by --rows=zoo at ZOO_STEPS (long, short).
ZOO = {
    'zoo_resnet50_mobilenetv2_32x32x3_b8': ((32, 32, 3), 8, 'resnet50', 'mobilenetv2'),
    'zoo_kd_resnet50_mobilenetv2_b32': ((32, 32, 3), 32, 'resnet50', 'mobilenetv2'),
}
ZOO_STEPS = (3, 1)
# Contrastive features of the zoo teachers: cmi_jax's synthesis.feature_layers, and the
# torch teacher's modules whose inputs are the same features (checked: same width).
JAX_FEATURE_LAYERS = {'resnet50': 'stages'}
TORCH_FEATURE_LAYERS = {'resnet50': ('bn1', 'layer1.0.bn1', 'layer2.0.bn1', 'layer3.0.bn1',
                                     'layer4.0.bn1')}
# --rows=imagenet: the config row it reads and what a CPU changes (batch, pool sizes).
IMAGENET_ROW = 'resnet50-resnet50'
IMAGENET = {'batch': 4, 'synthesis_pool': 64, 'kd_pool': 64}
IMAGENET_STEPS = (3, 1)
IMAGENET_OVERRIDES = {'image_size': int, 'teacher': str, 'student': str, 'nz': int, 'ngf': int,
                      'num_classes': int, 'batch': int, 'pool': int}
FAMILIES = ('conv_fwd', 'conv_input_grad', 'conv_filter_grad', 'matmul', 'elementwise_other')


def _torch():
  """torch and the baseline module, or (None, None) without the [torch] extra."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from benchmarks import torch_baseline  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, None
  return torch, torch_baseline


# ----------------------------------------------------------------------------
# Profile: executed time per op family
# ----------------------------------------------------------------------------

_INSTR = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (\w[\w\-]*)\((.*)$')


def _parse_hlo(text: str):
  """{computation: [(name, opcode, rest-of-line)]} and {instruction: computation}."""
  comps, owner, current = {}, {}, None
  for line in text.splitlines():
    head = re.match(r'^(?:ENTRY )?%([\w.\-]+) .*\{$', line)
    if head:
      current = head.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      comps[current].append((m.group(1), m.group(3), m.group(4)))
      owner[m.group(1)] = current
  return comps, owner


def _op_name(rest: str) -> str:
  """The JAX-level name of an HLO instruction (its op_name metadata), shortened."""
  name = re.search(r'op_name="([^"]*)"', rest)
  return name.group(1).split('/', 1)[-1][-120:] if name else ''


def _conv_family(rest: str) -> str:
  """Family of one HLO convolution: by its name scope (cmi_jax's explicit
  gradients) or its layout (XLA's own: the filter gradient writes a kernel,
  the input gradient runs under transpose())."""
  name = re.search(r'op_name="([^"]*)"', rest)
  name = name.group(1) if name else ''
  if 'conv_filter_grad' in name:
    return 'conv_filter_grad'
  if 'conv_input_grad' in name:
    return 'conv_input_grad'
  labels = re.search(r'dim_labels=\w+_\w+->(\w+)', rest)
  if labels and not labels.group(1).startswith('b'):
    return 'conv_filter_grad'
  return 'conv_input_grad' if 'transpose(' in name else 'conv_fwd'


def _dot_family(rest: str) -> str:
  name = re.search(r'op_name="([^"]*)"', rest)
  return 'conv_filter_grad' if name and 'conv_filter_grad' in name.group(1) else 'matmul'


def _classify(comps, calls_of: Dict[str, List[str]], name: str, opcode: str, rest: str,
              seen=None) -> str:
  if opcode == 'convolution':
    return _conv_family(rest)
  if opcode == 'dot':
    return _dot_family(rest)
  if opcode in ('fusion', 'call', 'custom-call'):
    seen = seen or set()
    found = []
    for comp in calls_of.get(name, []):
      if comp in seen:
        continue
      seen.add(comp)
      for n, op, r in comps.get(comp, []):
        fam = _classify(comps, calls_of, n, op, r, seen)
        if fam != 'elementwise_other':
          found.append(fam)
    for fam in FAMILIES:  # a fused conv wins over a fused dot
      if fam in found:
        return fam
  return 'elementwise_other'


def profile_families(compiled, run: Callable[[], None], top_ops: int = 12) -> dict:
  """Runs `run` once under the profiler; sums executed HLO time per family."""
  from jax.profiler import ProfileSession  # pylint: disable=import-outside-toplevel
  comps, _ = _parse_hlo(compiled.as_text())
  info, calls_of = {}, {}
  for instrs in comps.values():
    for name, opcode, rest in instrs:
      info[name] = (opcode, rest)
      calls_of[name] = re.findall(r'(?:calls|to_apply)=%([\w.\-]+)', rest)
  session = ProfileSession()
  session.start()
  t = time.perf_counter()
  run()
  wall = time.perf_counter() - t
  data = session.stop()
  total, per_op = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        op = stats.get('hlo_op')
        if op is None or op not in info:
          continue
        opcode, rest = info[op]
        if opcode in ('while', 'conditional', 'call'):  # containers: their body ops count
          continue
        fam = _classify(comps, calls_of, op, opcode, rest)
        total[fam] += ev.duration_ns * 1e-9
        per_op[(op, fam)] += ev.duration_ns * 1e-9
  summed = sum(total.values())
  top = [{'op': op, 'family': fam, 's': t, 'name': _op_name(info[op][1])}
         for (op, fam), t in per_op.most_common(top_ops)]
  return {'source': 'JAX profiler (per executed HLO instruction), families from the compiled HLO',
          'wall_s': wall, 'op_time_s': summed,
          'seconds': {f: total.get(f, 0.0) for f in FAMILIES},
          'fraction': {f: (total.get(f, 0.0) / summed if summed else 0.0) for f in FAMILIES},
          'top_ops': top}


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------

def _nets(shape, key, nets=(TEACHER, STUDENT)):
  t_mod, s_mod = models.get(nets[0], 10), models.get(nets[1], 10)
  teacher = Teacher(t_mod, models.init(t_mod, key, (1,) + shape))
  student = Teacher(s_mod, models.init(s_mod, jax.random.fold_in(key, 1), (1,) + shape))
  return teacher, student


def _synthesis_cfg(shape, batch, g_steps, quick, feature_layers='auto'):
  c = shape[-1]
  kw = dict(n_neg=64, bank_size=256, ngf=8, nz=16) if quick else dict(n_neg=4096,
                                                                      bank_size=40960)
  return SynthesisConfig(image_shape=shape, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c,
                         batch_size=batch, g_steps=g_steps, pool_size=max(4 * batch, 1024),
                         global_padding=4 if shape[0] == 32 else 2,
                         feature_layers=feature_layers, **kw)


class _JaxSynthesis:
  """Compiled cmi_jax rounds of `long` and `short` iterations on a full bank."""

  def __init__(self, shape, batch, long, short, quick, nets=(TEACHER, STUDENT)):
    key = jax.random.key(0)
    self.teacher, self.student = _nets(shape, key, nets)
    self.cfgs = {n: _synthesis_cfg(shape, batch, n, quick, JAX_FEATURE_LAYERS.get(nets[0], 'auto'))
                 for n in (long, short)}
    state = init_state(self.cfgs[long], self.teacher, key)
    n_neg = self.cfgs[long].n_neg
    feats = jax.random.normal(key, (n_neg, state.bank.data.shape[-1]))
    self.state = state.replace(bank=ring_add(state.bank, feats))
    self.key = key
    round_fn = jax.jit(synthesis_round, static_argnums=(0,))
    self.compiled, self.compile_s = {}, {}
    for n, cfg in self.cfgs.items():
      t = time.perf_counter()
      self.compiled[n] = round_fn.lower(cfg, self.teacher, self.student, self.state,
                                        key).compile()
      self.compile_s[n] = time.perf_counter() - t

  def run(self, n):
    jax.block_until_ready(self.compiled[n](self.teacher, self.student, self.state, self.key))


class _JaxKD:
  """Compiled cmi_jax KD scans (kd_steps) of `long` and `short` steps."""

  def __init__(self, shape, batch, long, short, quick, nets=(TEACHER, STUDENT)):
    key = jax.random.key(0)
    self.teacher, _ = _nets(shape, key, nets)
    c = shape[-1]
    self.cfg = KDConfig(batch_size=batch, temperature=20.0, crop_padding=4,
                        mean=(0.5,) * c, std=(0.25,) * c)
    s_mod = models.get(nets[1], 10)
    self.state = create_classifier_state(s_mod, jax.random.fold_in(key, 2), (1,) + shape,
                                         sgd(0.1, 0.9, 1e-4))
    pool = ring_init(4 * batch if quick else 4096, {
        'images': jax.ShapeDtypeStruct(shape, jnp.uint8),
        'targets': jax.ShapeDtypeStruct((), jnp.int32)})
    n = pool.capacity
    imgs = jax.random.randint(key, (n,) + shape, 0, 256).astype(jnp.uint8)
    self.pool = ring_add(pool, {'images': imgs, 'targets': jnp.zeros((n,), jnp.int32)})
    self.key = key
    fn = jax.jit(kd_steps, static_argnums=(0, 5))
    self.compiled, self.compile_s = {}, {}
    for steps in (long, short):
      t = time.perf_counter()
      self.compiled[steps] = fn.lower(self.cfg, self.state, self.teacher, self.pool, key,
                                      steps).compile()
      self.compile_s[steps] = time.perf_counter() - t

  def run(self, n):
    jax.block_until_ready(self.compiled[n](self.state, self.teacher, self.pool, self.key))


class _TorchSynthesis:
  def __init__(self, tb, shape, batch, quick, nets=(TEACHER, STUDENT)):
    h, _, c = shape
    teacher = tb.build_classifier(nets[0], 10, c)
    student = tb.build_classifier(nets[1], 10, c)
    kw = dict(n_neg=64, bank_size=256, ngf=8, nz=16) if quick else {}
    self.syn = tb.CMISynthesizer(teacher, student, shape, 10, (0.5,) * c, (0.25,) * c,
                                 batch_size=batch, global_padding=4 if h == 32 else 2,
                                 feature_layers=TORCH_FEATURE_LAYERS.get(nets[0]), **kw)
    self.syn.fill_bank(self.syn.n_neg)

  def run(self, n):
    self.syn.run_round(n)


class _TorchKD:
  def __init__(self, tb, torch, shape, batch, quick, nets=(TEACHER, STUDENT)):
    h, w, c = shape
    teacher = tb.build_classifier(nets[0], 10, c)
    student = tb.build_classifier(nets[1], 10, c)
    n = 4 * batch if quick else 4096
    pool = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8)
    self.kd = tb.KDTrainer(teacher, student, pool, (0.5,) * c, (0.25,) * c, batch_size=batch)

  def run(self, n):
    self.kd.run(n)


# ----------------------------------------------------------------------------
# ImageNet rows (FastDFKD's recipe)
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImagenetRecipe:
  """What the ImageNet rows run: the config row's structs at the benchmark's sizes."""
  synthesis: SynthesisConfig
  kd: KDConfig
  teacher: str
  student: str
  kd_lr: float
  kd_momentum: float
  kd_weight_decay: float
  kd_pool: int
  record: Dict[str, Any]   # the row's 'recipe' block (JSON)


def parse_overrides(text: str) -> Dict[str, Any]:
  """'image_size=32,teacher=wrn_16_1' -> {'image_size': 32, 'teacher': 'wrn_16_1'}."""
  out = {}
  for item in filter(None, text.split(',')):
    k, _, v = item.partition('=')
    if k not in IMAGENET_OVERRIDES or not v:
      raise ValueError(f'--imagenet_override: {item!r}; use key=value with keys '
                       f'{sorted(IMAGENET_OVERRIDES)}.')
    out[k] = IMAGENET_OVERRIDES[k](v)
  return out


def imagenet_recipe(overrides: Optional[Dict[str, Any]] = None) -> ImagenetRecipe:
  """configs/imagenet.py's IMAGENET_ROW as experiments.run would build it (SynthesisConfig,
  KDConfig, student optimizer), at batch IMAGENET['batch'] and small pools; `overrides`
  (parse_overrides keys) shrink it further for tests."""
  from configs import imagenet as imagenet_config  # pylint: disable=import-outside-toplevel
  from experiments import run_config  # pylint: disable=import-outside-toplevel
  o = dict(overrides or {})
  c = imagenet_config.get_config(IMAGENET_ROW)
  info = run_config.dataset_info(c)
  synth = run_config.synthesis_config(c, info, c.synthesis.weights.to_dict())
  kd = run_config.kd_config(c, info)
  batch = o.get('batch', IMAGENET['batch'])
  size = o.get('image_size', synth.image_shape[0])
  fields = dict(batch_size=batch, pool_size=o.get('pool', IMAGENET['synthesis_pool']),
                image_shape=(size, size, synth.image_shape[2]),
                num_classes=o.get('num_classes', synth.num_classes))
  fields.update({k: o[k] for k in ('nz', 'ngf') if k in o})
  synth = dataclasses.replace(synth, **fields).validate()
  kd = dataclasses.replace(kd, batch_size=batch)
  teacher, student = o.get('teacher', c.teacher.arch), o.get('student', c.student.arch)
  kd_pool = o.get('pool', IMAGENET['kd_pool'])
  s = synth
  record = {
      'config': f'configs/imagenet.py:{IMAGENET_ROW}', 'method': c.method,
      'teacher': teacher, 'student': student, 'weights': 'random',
      'image_shape': list(s.image_shape), 'num_classes': s.num_classes,
      'batch_size': batch, 'config_batch_size': c.synthesis.batch_size,
      'synthesis': {'g_steps_config': s.g_steps, 'generator': s.generator, 'nz': s.nz,
                    'ngf': s.ngf, 'lr_g': s.lr_g, 'lr_z': s.lr_z, 'lr_meta': s.lr_meta,
                    'betas': list(s.betas), 'bn_mmt': s.bn_mmt, 'views': s.views,
                    'local_scale': list(s.local_scale), 'meta_rule': s.meta_rule,
                    'z_life': s.z_life, 'pool_iterate': s.pool_iterate,
                    'adv_start_round': s.adv_start_round,
                    'weights': {'bn': s.weights.bn, 'oh': s.weights.oh, 'adv': s.weights.adv},
                    'pool_size': s.pool_size},
      'kd': {'temperature': kd.temperature, 'crop_scale': list(kd.crop_scale), 'flip': kd.flip,
             'lr': c.kd.lr, 'momentum': c.kd.momentum, 'weight_decay': c.kd.weight_decay,
             'pool_images': kd_pool},
      'overrides': o}
  return ImagenetRecipe(synth, kd, teacher, student, c.kd.lr, c.kd.momentum,
                        c.kd.weight_decay, kd_pool, record)


def _short_arch(arch: str) -> str:
  return arch[:-len('_imagenet')] if arch.endswith('_imagenet') else arch


def imagenet_rows(r: ImagenetRecipe) -> Dict[str, tuple]:
  """Row name -> (image shape, batch, teacher, student) for --rows=imagenet."""
  s = r.synthesis
  tail = f'{_short_arch(r.teacher)}_{_short_arch(r.student)}_{s.image_shape[0]}_b{s.batch_size}'
  entry = (s.image_shape, s.batch_size, r.teacher, r.student)
  return {f'imagenet_fast{s.g_steps}_{tail}': entry, f'imagenet_kd_{tail}': entry}


def _classifier(arch: str, num_classes: int, shape, key) -> Teacher:
  module = models.get(arch, num_classes)
  return Teacher(module, models.init(module, key, (1,) + tuple(shape)))


class _JaxFast:
  """Compiled cmi_jax fast_imagenet rounds (fast.fast_round) of `long` and `short` inner steps."""

  def __init__(self, r: ImagenetRecipe, long, short):
    key = jax.random.key(0)
    s = r.synthesis
    self.teacher = _classifier(r.teacher, s.num_classes, s.image_shape, key)
    self.student = _classifier(r.student, s.num_classes, s.image_shape, jax.random.fold_in(key, 1))
    self.cfgs = {n: dataclasses.replace(s, g_steps=n) for n in (long, short)}
    self.state = jax.jit(fast.init_state, static_argnums=(0,))(self.cfgs[long], self.teacher, key)
    self.key = key
    round_fn = jax.jit(fast.fast_round, static_argnums=(0,))
    self.compiled, self.compile_s = {}, {}
    for n, cfg in self.cfgs.items():
      t = time.perf_counter()
      self.compiled[n] = round_fn.lower(cfg, self.teacher, self.student, self.state,
                                        key).compile()
      self.compile_s[n] = time.perf_counter() - t

  def run(self, n):
    jax.block_until_ready(self.compiled[n](self.teacher, self.student, self.state, self.key))


class _JaxImagenetKD(_JaxKD):
  """Compiled cmi_jax KD scans at the recipe's KDConfig (resized crop, T) and student SGD."""

  def __init__(self, r: ImagenetRecipe, long, short):  # pylint: disable=super-init-not-called
    key = jax.random.key(0)
    s = r.synthesis
    shape = s.image_shape
    self.teacher = _classifier(r.teacher, s.num_classes, shape, key)
    self.cfg = r.kd
    self.state = create_classifier_state(models.get(r.student, s.num_classes),
                                         jax.random.fold_in(key, 2), (1,) + shape,
                                         sgd(r.kd_lr, r.kd_momentum, r.kd_weight_decay))
    pool = ring_init(r.kd_pool, {'images': jax.ShapeDtypeStruct(shape, jnp.uint8),
                                 'targets': jax.ShapeDtypeStruct((), jnp.int32)})
    imgs = jax.random.randint(key, (r.kd_pool,) + shape, 0, 256).astype(jnp.uint8)
    self.pool = ring_add(pool, {'images': imgs, 'targets': jnp.zeros((r.kd_pool,), jnp.int32)})
    self.key = key
    fn = jax.jit(kd_steps, static_argnums=(0, 5))
    self.compiled, self.compile_s = {}, {}
    for steps in (long, short):
      t = time.perf_counter()
      self.compiled[steps] = fn.lower(self.cfg, self.state, self.teacher, self.pool, key,
                                      steps).compile()
      self.compile_s[steps] = time.perf_counter() - t


class _TorchFast:
  """benchmarks/torch_fast.FastImageNetSynthesizer on the recipe's SynthesisConfig."""

  def __init__(self, tb, r: ImagenetRecipe):
    from benchmarks import torch_fast  # pylint: disable=import-outside-toplevel
    s = r.synthesis
    teacher = tb.build_classifier(r.teacher, s.num_classes, s.image_shape[2])
    student = tb.build_classifier(r.student, s.num_classes, s.image_shape[2])
    self.syn = torch_fast.FastImageNetSynthesizer(teacher, student, s)

  def run(self, n):
    self.syn.run_round(n)


class _TorchImagenetKD:
  def __init__(self, tb, torch, r: ImagenetRecipe):
    s = r.synthesis
    h, w, c = s.image_shape
    teacher = tb.build_classifier(r.teacher, s.num_classes, c)
    student = tb.build_classifier(r.student, s.num_classes, c)
    pool = torch.randint(0, 256, (r.kd_pool, c, h, w), dtype=torch.uint8)
    k = r.kd
    self.kd = tb.KDTrainer(teacher, student, pool, k.mean, k.std, batch_size=k.batch_size,
                           temperature=k.temperature, lr=r.kd_lr, momentum=r.kd_momentum,
                           weight_decay=r.kd_weight_decay, crop_scale=k.crop_scale)

  def run(self, n):
    self.kd.run(n)


def imagenet_sides(r: ImagenetRecipe, is_kd: bool):
  """make(torch, tb, long, short) -> (jax side, torch side or None) for `bench`."""
  def make(torch, tb, long, short):
    jx = (_JaxImagenetKD if is_kd else _JaxFast)(r, long, short)
    if tb is None:
      return jx, None
    return jx, (_TorchImagenetKD(tb, torch, r) if is_kd else _TorchFast(tb, r))
  return make


def _timed(fn, n) -> float:
  t = time.perf_counter()
  fn(n)
  return time.perf_counter() - t


def bench(name: str, shape, batch: int, long: int, short: int, repeats: int, quick: bool,
          use_torch: bool, profile: bool, nets=(TEACHER, STUDENT),
          make: Optional[Callable] = None, recipe: Optional[dict] = None) -> dict:
  """One row. make(torch, tb, long, short) -> (jax side, torch side or None) replaces the
  wrn/zoo sides (the ImageNet rows); recipe: recorded as the row's 'recipe'."""
  is_kd = 'kd' in name
  load_start = os.getloadavg()[0]  # contention on a shared machine: recorded with the row
  torch, tb = _torch() if use_torch else (None, None)
  tr = None
  if make is not None:
    jx, tr = make(torch, tb, long, short)
  else:
    jx = (_JaxKD if is_kd else _JaxSynthesis)(shape, batch, long, short, quick, nets)
  if tb is not None and make is None:
    tr = (_TorchKD(tb, torch, shape, batch, quick, nets) if is_kd
          else _TorchSynthesis(tb, shape, batch, quick, nets))
    if not is_kd:  # both sides must build the same contrastive features
      d_jax = jx.state.bank.data.shape[-1] // 2
      if tr.syn.bank.shape[1] // 2 != d_jax:
        raise ValueError(f'{name}: feature width cmi_jax {d_jax} vs torch '
                         f'{tr.syn.bank.shape[1] // 2}; set TORCH_FEATURE_LAYERS[{nets[0]!r}].')
  sides = {'jax': jx} if tr is None else {'jax': jx, 'torch': tr}
  for side in sides.values():  # warm up (first calls allocate, torch builds its caches)
    side.run(short)
  times = {s: {long: [], short: []} for s in sides}
  for _ in range(repeats):
    for s, side in sides.items():  # interleaved: jax long, jax short, torch long, torch short
      for n in (long, short):
        times[s][n].append(_timed(side.run, n))
  row = {'setting': name, 'kind': 'kd_step' if is_kd else 'synthesis_iteration',
         'teacher': nets[0], 'student': nets[1], 'env': _env(torch),
         'image_shape': list(shape), 'batch_size': batch, 'long': long, 'short': short,
         'repeats': repeats, 'jax_compile_s': {str(k): v for k, v in jx.compile_s.items()},
         'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
         'loadavg_1min': [load_start, os.getloadavg()[0]]}
  for s in sides:
    med = {n: statistics.median(v) for n, v in times[s].items()}
    row[f'{s}_round_s'] = {str(n): v for n, v in times[s].items()}
    row[f'{s}_s'] = (med[long] - med[short]) / (long - short)
  if 'torch_s' in row:
    row['ratio_jax_to_torch'] = row['jax_s'] / row['torch_s']
  if recipe is not None:
    row['recipe'] = recipe
  if profile:
    try:
      row['profile'] = profile_families(jx.compiled[long], lambda: jx.run(long))
    except ImportError as e:  # no jax.profiler.ProfileSession in this environment
      warnings.warn(f'{name}: no op-family profile ({e}); the row is written without it '
                    '(--no_profile skips it).')
  return row


def _fmt(row) -> str:
  line = (f"{row['setting']:>16}  cmi_jax {row['jax_s'] * 1e3:8.1f} ms")
  if 'torch_s' in row:
    line += f"  torch {row['torch_s'] * 1e3:8.1f} ms  ratio {row['ratio_jax_to_torch']:.2f}"
  if 'profile' in row:
    frac = row['profile']['fraction']
    line += '  [' + ' '.join(f'{k} {100 * v:.0f}%' for k, v in frac.items()) + ']'
  return line


def _env(torch) -> dict:
  """Where one row ran: the interpreter and versions (rows are merged across runs)."""
  out = {'python': sys.executable, 'python_version': platform.python_version(),
         'jax': jax.__version__}
  if torch is not None:
    out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  return out


def versions(torch) -> dict:
  out = {'jax_cpu_threads': os.cpu_count(), 'xla_flags': os.environ.get('XLA_FLAGS', '')}
  if torch is not None:
    out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  return out


def markdown_table(result: dict) -> str:
  """The README's side-by-side table from a results dict (rows in SETTINGS order)."""
  lines = ['| setting | cmi_jax | PyTorch | ratio | cmi_jax time by op family '
           '(conv fwd / input-grad / filter-grad / matmul / other) | load avg |',
           '|---|---|---|---|---|---|']
  for row in result['rows']:
    torch_s = f"{row['torch_s']:.3f} s" if 'torch_s' in row else '-'
    ratio = f"{row['ratio_jax_to_torch']:.2f}" if 'ratio_jax_to_torch' in row else '-'
    frac = row.get('profile', {}).get('fraction', {})
    fam = ' / '.join(f'{100 * frac[f]:.0f}%' for f in FAMILIES) if frac else '-'
    load = '-'.join(f'{v:.1f}' for v in row.get('loadavg_1min', []))
    lines.append(f"| {row['setting']} | {row['jax_s']:.3f} s | {torch_s} | {ratio} | {fam} | "
                 f'{load} |')
  return '\n'.join(lines)


def main(argv: Optional[List[str]] = None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='tiny settings, seconds (smoke test)')
  ap.add_argument('--settings', default='', help=f'comma list of {sorted(SETTINGS)}')
  ap.add_argument('--rows', default='wrn', choices=('wrn', 'zoo', 'imagenet'),
                  help=f'wrn: the wrn_16_2 -> wrn_16_1 settings; zoo: {sorted(ZOO)}; imagenet: '
                       f'the Fast-50 recipe of configs/imagenet.py:{IMAGENET_ROW} at 224')
  ap.add_argument('--imagenet_override', default='',
                  help=f'--rows=imagenet at other sizes/nets, e.g. image_size=32,teacher=wrn_16_1 '
                       f'(keys {sorted(IMAGENET_OVERRIDES)}); the row name follows')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--long', type=int, default=None, help='12 (zoo and imagenet rows: 3)')
  ap.add_argument('--short', type=int, default=None, help='2 (zoo and imagenet rows: 1)')
  ap.add_argument('--torch_threads', type=int, default=2)
  ap.add_argument('--no_torch', action='store_true')
  ap.add_argument('--no_profile', action='store_true')
  ap.add_argument('--out', default=None,
                  help='results JSON (default benchmarks/results/synthesis_speed.json; with '
                       '--quick synthesis_speed_quick.json in the temporary folder)')
  ap.add_argument('--table', action='store_true', help='print --out as a markdown table, run nothing')
  args = ap.parse_args(argv)
  if args.out is None:  # a smoke run never replaces the recorded rows
    args.out = (os.path.join(tempfile.gettempdir(), 'synthesis_speed_quick.json') if args.quick
                and not args.table else os.path.join(RESULTS, 'synthesis_speed.json'))
  if args.table:
    with open(args.out, encoding='utf-8') as f:
      print(markdown_table(json.load(f)))
    return None
  recipe = None
  if args.rows == 'imagenet':
    recipe = imagenet_recipe(parse_overrides(args.imagenet_override))
    table = imagenet_rows(recipe)
  elif args.imagenet_override:
    raise ValueError('--imagenet_override needs --rows=imagenet.')
  else:
    table = QUICK if args.quick else (ZOO if args.rows == 'zoo' else SETTINGS)
  steps = {'zoo': ZOO_STEPS, 'imagenet': IMAGENET_STEPS}.get(args.rows, (12, 2))
  args.long = steps[0] if args.long is None else args.long
  args.short = steps[1] if args.short is None else args.short
  names = [s for s in args.settings.split(',') if s] or list(table)
  for n in names:
    if n not in table:
      raise ValueError(f'--settings: unknown setting {n!r}; choose from {sorted(table)}.')
  if args.long <= args.short:
    raise ValueError(f'--long ({args.long}) must exceed --short ({args.short}).')
  if args.quick:
    args.long, args.short, args.repeats = 2, 1, 1
  torch, _ = _torch() if not args.no_torch else (None, None)
  if torch is not None:
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads)
  rows = []
  for n in names:
    shape, batch, *nets = table[n]
    extra = {}
    if recipe is not None:
      extra = dict(make=imagenet_sides(recipe, 'kd' in n), recipe=recipe.record)
    rows.append(bench(n, shape, batch, args.long, args.short, args.repeats, args.quick,
                      torch is not None, not args.no_profile, tuple(nets) or (TEACHER, STUDENT),
                      **extra))
    print(_fmt(rows[-1]), flush=True)
  old = {}
  if os.path.exists(args.out) and not args.quick:
    with open(args.out, encoding='utf-8') as f:
      prev = json.load(f)
    old = {r['setting']: r for r in prev.get('rows', []) if 'setting' in r}
  merged = {**old, **{r['setting']: r for r in rows}}
  result = {'benchmark': 'synthesis_speed', **machine_info(), **versions(torch),
            'teacher': TEACHER, 'student': STUDENT,  # rows with their own 'teacher' override
            'note': "machine and versions above: the last run's; a row's 'env': where it ran",
            'rows': [merged[k] for k in sorted(merged, key=lambda k: (k not in SETTINGS,
                                                                   k not in ZOO, k))]}
  write_result(args.out, result)
  print(markdown_table(result))
  return result


if __name__ == '__main__':
  main()

"""From the run's config to the library's frozen structs, checked before anything
loads or compiles: validation, the dataset entry, the synthesis and KD configs
(the warm-up's too), the schedule counts and the student's optimizer.
"""

import dataclasses
import os
from typing import Dict

from absl import logging

from cmi_jax import classifiers, data, distill, models
from cmi_jax.errors import ConfigError
from cmi_jax.state import cosine_per_epoch, multistep_per_epoch, sgd
from cmi_jax.pool_checkpoint import POOL_CHECKPOINTS
from cmi_jax.synthesis import presets
from cmi_jax.synthesis.bank import POOL_MODES
from cmi_jax.synthesis.config import LossWeights, SynthesisConfig


def validate(cfg) -> None:
  """Checks the config before anything is loaded or compiled; each error names
  the field, its value and the fix (a ConfigError: the CLI prints it alone)."""
  try:
    _validate(cfg)
  except ConfigError:
    raise
  except ValueError as e:  # unknown dataset or method, SynthesisConfig.validate: config values
    raise ConfigError(str(e)) from e


def _validate(cfg) -> None:
  def bad(field, value, must):
    raise ValueError(f'config.{field}={value!r} is invalid: {must}.')

  dataset_info(cfg)
  _check_method(cfg)
  try:
    classifiers.check_arch(cfg.teacher.arch)  # a zoo name or 'package.module:factory'
  except ValueError as e:
    raise ConfigError(f'config.teacher.{e}') from None
  if cfg.student.arch not in models.CLASSIFIERS:
    bad('student.arch', cfg.student.arch, f'must be one of {sorted(models.CLASSIFIERS)}')
  ckpt = cfg.teacher.checkpoint
  if not ckpt:
    bad('teacher.checkpoint', ckpt, 'set it to a teacher directory (experiments/train_teacher.py '
        'or experiments/convert_teacher.py output) or a reference .pth file, e.g. '
        '--config.teacher.checkpoint=path/to/cifar10_wrn_40_2.pth')
  if ckpt != 'random' and not os.path.exists(ckpt):
    bad('teacher.checkpoint', ckpt, f'no such file or directory (looked in {os.getcwd()}); '
        'point --config.teacher.checkpoint at the teacher directory or .pth file')
  k, s = cfg.kd, cfg.synthesis
  for field, value, ok, must in [
      ('kd.kd_steps', k.kd_steps, k.kd_steps >= 1, 'must be >= 1'),
      ('kd.ep_steps', k.ep_steps, k.ep_steps >= k.kd_steps,
       f'must be >= kd.kd_steps ({k.kd_steps})'),
      ('kd.epochs', k.epochs, k.epochs >= 1, 'must be >= 1'),
      ('kd.batch_size', k.batch_size, k.batch_size >= 1, 'must be >= 1'),
      ('kd.temperature', k.temperature, k.temperature > 0, 'must be > 0'),
      ('kd.mode', k.mode, k.mode in ('pool', 'fresh'), "must be 'pool' or 'fresh'"),
      ('kd.loss', k.loss, k.loss in distill.KD_LOSSES, f'must be one of {distill.KD_LOSSES}'),
      ('kd.pre_rounds', k.pre_rounds, k.pre_rounds >= 0, 'must be >= 0'),
      ('kd.pre_loops', k.pre_loops, k.pre_loops >= 0, 'must be >= 0 (0: synthesis.g_loops)'),
      ('kd.mode', k.mode, k.mode == 'pool' or s.synthesizer == 'generator',
       "'fresh' needs synthesis.synthesizer='generator'"),
      ('synthesis.reinit', s.reinit, s.reinit or k.mode == 'fresh',
       'a persistent generator (reinit=False) is the GAN-baseline setting: use kd.mode=fresh'),
      ('synthesis.oh_kind', s.oh_kind, s.oh_kind == 'argmax' or k.mode == 'pool',
       "the GAN baselines have no class targets: use 'argmax'"),
      ('log.checkpoint_every_rounds', cfg.log.checkpoint_every_rounds,
       cfg.log.checkpoint_every_rounds >= 1, 'must be >= 1'),
      ('log.every_kd_steps', cfg.log.every_kd_steps, cfg.log.every_kd_steps >= 1, 'must be >= 1'),
      ('kd.init_pool', k.init_pool, not k.init_pool or os.path.exists(k.init_pool),
       f'no such file or directory (looked in {os.getcwd()}); give a folder of images (e.g. '
       'the extracted cmi-preinverted-wrn402/) or a synthetic.npz'),
      ('kd.init_pool', k.init_pool, not k.init_pool or k.mode == 'pool',
       "init images join the image pool: they need kd.mode='pool' (not a GAN baseline)"),
      ('kd.pool_mode', k.pool_mode, k.pool_mode in POOL_MODES, f'must be one of {POOL_MODES}'),
      ('log.pool_checkpoint', cfg.log.pool_checkpoint, cfg.log.pool_checkpoint in
       POOL_CHECKPOINTS, f'must be one of {POOL_CHECKPOINTS}'),
      ('log.pool_checkpoint', cfg.log.pool_checkpoint, cfg.log.pool_checkpoint == 'full' or
       _process_count() == 1, "'incremental' is single-host: a multi-host run uses 'full'"),
  ]:
    if not ok:
      bad(field, value, must)
  _check_pool_shards(cfg)
  synthesis_config(cfg, dataset_info(cfg), cfg.synthesis.weights.to_dict())


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def pool_shards(cfg) -> int:
  """Devices the pool's slots are split over: the mesh's with kd.pool_mode='sharded', else 1."""
  if cfg.kd.get('pool_mode', 'device') != 'sharded' or cfg.kd.mode != 'pool':
    return 1
  import jax  # pylint: disable=g-import-not-at-top
  visible = jax.device_count()
  return cfg.mesh.num_devices if 0 < cfg.mesh.num_devices <= visible else visible


def _check_pool_shards(cfg) -> None:
  """kd.pool_mode='sharded' splits the pool's slots over the mesh's devices: evenly."""
  n = pool_shards(cfg)
  size = cfg.synthesis.pool_size
  if n == 1:
    return
  if size % n:
    raise ConfigError(
        f"config.synthesis.pool_size={size} is invalid with kd.pool_mode='sharded': it must "
        f'divide over the mesh\'s {n} devices (each holds pool_size / {n} slots); use a '
        f'multiple of {n}, e.g. --config.synthesis.pool_size={size - size % n or n}, or '
        "kd.pool_mode='device'.")


def _check_method(cfg) -> None:
  """`method` must name a preset. A config whose structure departs from its preset
  (another synthesizer, loss kind, KD mode, or a loss term switched on/off: e.g.
  `--config.method=dafl`, which renames the run but does not apply the preset) is
  reported field by field; sizes and magnitudes (g_steps, weights > 0) may differ."""
  preset = presets.get(cfg.method)  # ValueError listing the presets
  diffs = []

  def same(have, want):
    if isinstance(want, bool) or not isinstance(want, (int, float)):
      return tuple(have) == tuple(want) if isinstance(want, tuple) else have == want
    return (have == 0) == (want == 0)

  def walk(section, values, path):
    for k, v in values.items():
      if isinstance(v, dict):
        walk(section[k], v, f'{path}.{k}')
      elif not same(section[k], v):
        diffs.append(f'{path}.{k}={section[k]!r} (preset: {v!r})')
  for sec, values in preset.items():
    walk(cfg[sec], values, sec)
  if diffs:
    logging.warning('config.method=%r, but the config departs from that preset: %s. Select '
                    "a method with the config file's argument (e.g. "
                    '--config=configs/cifar10.py:method=%s) so that its preset applies.',
                    cfg.method, ', '.join(diffs), cfg.method)


def synthesis_config(cfg, info: data.DatasetInfo, weights: Dict[str, float]) -> SynthesisConfig:
  """The frozen SynthesisConfig for the library, from config.synthesis."""
  s = cfg.synthesis.to_dict()
  s['weights'] = LossWeights(**weights)
  s['betas'], s['local_scale'] = tuple(s['betas']), tuple(s['local_scale'])
  s['pool_shards'] = pool_shards(cfg)
  if s['global_padding'] < 0:
    s['global_padding'] = info.crop_padding
  # adv_start_round / reset_l0_round None: derived from the warm-up, as the reference.
  for k, v in presets.warmup_rounds(s['algorithm'], cfg.kd.pre_rounds).items():
    if s.get(k) is None:
      s[k] = v
  try:
    return SynthesisConfig(image_shape=info.image_shape, num_classes=info.num_classes,
                           mean=info.mean, std=info.std, **s).validate()
  except TypeError as e:
    raise ValueError(f'config.synthesis has a field SynthesisConfig does not know: {e}') from e



def dataset_info(cfg) -> data.DatasetInfo:
  """The dataset's entry, refined by data.image_size/mean/std/num_classes where set."""
  return data.get_info(cfg.data.name, cfg.data.dir or None, **data.config_options(cfg.data))


@dataclasses.dataclass
class Plan:
  """Counts of the schedule, derived from config.kd."""
  pre_rounds: int
  rounds_per_epoch: int
  epochs: int
  kd_steps: int

  @property
  def total_rounds(self) -> int:
    return self.pre_rounds + self.epochs * self.rounds_per_epoch

  def epoch_of(self, r: int) -> int:
    return (r - self.pre_rounds) // self.rounds_per_epoch

  def ends_epoch(self, r: int) -> bool:
    return r >= self.pre_rounds and (r - self.pre_rounds + 1) % self.rounds_per_epoch == 0

  def checkpoint_due(self, r: int, every: int) -> bool:
    """Whether round r (0-based) ends with a checkpoint: every `every` rounds, at
    epoch ends when an epoch has at least `every` rounds (one extra save per epoch
    at most), and at the end."""
    return ((r + 1) % every == 0 or r + 1 == self.total_rounds
            or (self.ends_epoch(r) and self.rounds_per_epoch >= every))



def lr_schedule(cfg, plan: Plan):
  """The student's learning rate per step: cosine stepped per epoch down to kd.lr_min."""
  return cosine_per_epoch(cfg.kd.lr, plan.epochs, plan.rounds_per_epoch * plan.kd_steps,
                          cfg.kd.lr_min)


def student_tx(cfg, plan: Plan):
  """The student's optimizer: SGD with momentum and weight decay on `lr_schedule`."""
  return sgd(lr_schedule(cfg, plan), cfg.kd.momentum, cfg.kd.weight_decay)


def tx_lr(cfg, plan: Plan, step: int) -> float:
  """The student's learning rate at `step` (for logging)."""
  return float(lr_schedule(cfg, plan)(max(step - 1, 0)))


def pre_synthesis_config(cfg, synth: SynthesisConfig) -> SynthesisConfig:
  """The pre-rounds' (synthesis-only warm-up) config: weights adv=kd.pre_adv,
  oh=kd.pre_oh and kd.pre_loops loops per round (NAYER's gwp_loops; 0: g_loops)."""
  return dataclasses.replace(synth, g_loops=cfg.kd.pre_loops or synth.g_loops,
                             weights=dataclasses.replace(synth.weights, adv=cfg.kd.pre_adv,
                                                         oh=cfg.kd.pre_oh))


def kd_config(cfg, info: data.DatasetInfo) -> distill.KDConfig:
  """The KD step's config; the GAN baselines (kd.mode 'fresh') do not augment."""
  return distill.KDConfig(batch_size=cfg.kd.batch_size, loss=cfg.kd.loss,
                          temperature=cfg.kd.temperature, crop_padding=info.crop_padding,
                          flip=info.flip, crop_scale=info.crop_scale, mean=info.mean,
                          std=info.std,
                          augment=cfg.kd.augment and cfg.kd.mode != 'fresh')


def make_plan(cfg) -> Plan:
  """The schedule's counts from config.kd."""
  return Plan(cfg.kd.pre_rounds, cfg.kd.ep_steps // cfg.kd.kd_steps, cfg.kd.epochs,
              cfg.kd.kd_steps)


SCHEDULES = ('cosine', 'multistep')


def epoch_schedule(section, steps_per_epoch: int, total_steps: int, name: str):
  """The learning rate per step of a classifier trained in epochs over a fixed set
  (experiments/train_teacher.py's `train`, experiments/distill.py's `kd` section).

  section.schedule 'cosine' (the default): cosine decay over all steps, per step
  (configs/teacher_fashion_mnist.py). 'multistep' (the reference's train_scratch.py
  and vanilla_kd.py): lr x section.gamma at each epoch in section.milestones.
  `name` is the section's name in the error.
  """
  import optax  # pylint: disable=g-import-not-at-top
  kind = section.get('schedule', 'cosine')
  if kind == 'cosine':
    return optax.cosine_decay_schedule(section.lr, total_steps)
  if kind == 'multistep':
    return multistep_per_epoch(section.lr, tuple(section.milestones), section.gamma,
                               steps_per_epoch)
  raise ValueError(f'{name}.schedule={kind!r} is invalid: must be one of {SCHEDULES}.')


def checked_mesh(num_devices: int, **batch_sizes: int):
  """The run's mesh (`mesh.num_devices`, 0: all), with every named batch size checked to
  divide over it; the device layer's ValueErrors become ConfigErrors (one `error:` line)."""
  from cmi_jax import parallel  # pylint: disable=g-import-not-at-top
  try:
    mesh = parallel.make_mesh(num_devices)
    parallel.check_divisible(mesh, **batch_sizes)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return mesh

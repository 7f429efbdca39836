"""Transfer-set KD behind `experiments.distill` (the reference's vanilla_kd.py):
config -> inputs checked -> epochs of KD steps on a transfer set held on device.

Everything is checked and loaded before anything compiles (`_setup`): the
config, the workdir and a resumed run's fingerprint (config, teacher and
transfer-set content hashes: experiments/guard.py), the teacher, the transfer
set against the teacher's input shape and classes (cmi_jax.data.transfer) and
the test split. The loop shuffles each epoch as a function of (seed, epoch)
and draws each step's augmentation from fold_in(key, step), so a run stopped
anywhere and resumed ends bit for bit where an uninterrupted run ends.
"""

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Dict, List, Optional

import jax
import numpy as np
from tqdm import tqdm

from cmi_jax import data, distill, models, parallel, report, teacher_io
from cmi_jax.errors import ConfigError, TeacherError
from cmi_jax.state import create_classifier_state, rng_stream, sgd
from cmi_jax.teacher import Teacher
from experiments import evaluation, guard, resume, summary
from experiments.inputs import load_test_split
from experiments.resume import StopSignal
from experiments.run_config import SCHEDULES, checked_mesh, epoch_schedule

UNIT = 'step'  # checkpoints, resume and stops count student steps


@dataclasses.dataclass
class Session:
  """What the loop needs, built once by `_setup`."""
  cfg: Any
  workdir: str
  info: data.DatasetInfo
  teacher: Teacher
  transfer: data.TransferSet
  test: Optional[data.Split]
  steps_per_epoch: int
  total_steps: int
  schedule: Any
  kd_fn: Any
  eval_fn: Any
  writer: report.MetricWriter
  ckpt: Any
  key: jax.Array
  images: jax.Array                 # the transfer set on device, replicated
  labels: Optional[jax.Array]


def validate(cfg) -> None:
  """The config's values, before anything loads; a ConfigError names the field and fix."""
  def bad(field, value, must):
    raise ConfigError(f'config.{field}={value!r} is invalid: {must}.')
  ckpt = cfg.teacher.checkpoint
  if not ckpt:
    bad('teacher.checkpoint', ckpt, 'pass --teacher=<teacher directory or .pth>')
  if not os.path.exists(ckpt):
    bad('teacher.checkpoint', ckpt, f'no such file or directory (looked in {os.getcwd()}); '
        'pass --teacher=<teacher directory (experiments/train_teacher.py) or .pth>')
  if os.path.isfile(ckpt) and not (cfg.teacher.arch and cfg.data.name):
    bad('teacher.checkpoint', ckpt, 'a .pth file does not record its architecture or data: '
        'also pass --config.teacher.arch=<arch> and --config.data.name=<dataset>')
  if cfg.student.arch not in models.CLASSIFIERS:
    bad('student.arch', cfg.student.arch, f'pass --student=<one of {sorted(models.CLASSIFIERS)}>')
  if not cfg.data.transfer:
    bad('data.transfer', cfg.data.transfer, 'pass --data=<synthetic.npz | folder of images | '
        f'dataset name, one of {sorted(data.DATASETS)}>')
  t = cfg.data.transfer
  if not os.path.exists(t) and t not in data.DATASETS:
    bad('data.transfer', t, f'no such file or folder (looked in {os.getcwd()}) and not a dataset '
        f'name ({sorted(data.DATASETS)}); give a synthetic.npz, a folder of images or a name')
  k, log = cfg.kd, cfg.log
  for field, value, ok, must in [
      ('kd.batch_size', k.batch_size, k.batch_size >= 1, 'must be >= 1'),
      ('kd.epochs', k.epochs, k.epochs >= 1, 'must be >= 1'),
      ('kd.temperature', k.temperature, k.temperature > 0, 'must be > 0'),
      ('kd.kd_weight', k.kd_weight, k.kd_weight >= 0, 'must be >= 0'),
      ('kd.label_weight', k.label_weight, k.label_weight >= 0, 'must be >= 0'),
      ('kd.schedule', k.schedule, k.schedule in SCHEDULES, f'must be one of {SCHEDULES}'),
      ('log.every_steps', log.every_steps, log.every_steps >= 1, 'must be >= 1'),
      ('log.checkpoint_every_steps', log.checkpoint_every_steps,
       log.checkpoint_every_steps >= 1, 'must be >= 1'),
  ]:
    if not ok:
      bad(field, value, must)


def load_teacher(cfg) -> Teacher:
  """The frozen teacher; fills in data.name from a teacher directory's card and checks
  the card against that dataset (classes, input shape)."""
  path = cfg.teacher.checkpoint
  if os.path.isfile(path):  # a .pth: validate() made sure arch and data.name are given
    info = dataset_info(cfg)
    module, variables, _ = teacher_io.load_teacher(path, arch=cfg.teacher.arch,
                                                   num_classes=info.num_classes,
                                                   input_shape=info.image_shape)
    return Teacher(module, variables)
  module, variables, card = teacher_io.load_teacher(path, arch=cfg.teacher.arch or None)
  name = cfg.data.name or card.get('meta', {}).get('dataset')
  if not name:
    raise ConfigError(f'The teacher {path} does not name its dataset: pass '
                      f'--config.data.name=<one of {sorted(data.DATASETS)}>.')
  cfg.data.name, cfg.teacher.arch = name, card['arch']
  info = dataset_info(cfg)
  if (card['num_classes'], tuple(card['input_shape'])) != (info.num_classes, info.image_shape):
    raise TeacherError(f'The teacher {path} takes {tuple(card["input_shape"])} images and has '
                       f'{card["num_classes"]} classes, but {name} has {info.image_shape} and '
                       f'{info.num_classes}: set --config.data.name to the dataset it was '
                       'trained on.')
  return Teacher(module, variables)


def dataset_info(cfg) -> data.DatasetInfo:
  return data.get_info(cfg.data.name, cfg.data.dir or None, **data.config_options(cfg.data))


def load_transfer(cfg, info: data.DatasetInfo) -> data.TransferSet:
  """The transfer set, checked against the teacher (size, channels, classes, labels)."""
  d, flag = cfg.data, '--config.data.resize=True'
  if os.path.exists(d.transfer):
    out = data.load_transfer_set(d.transfer, info.image_shape, info.num_classes, d.resize, flag)
  else:  # a dataset's train split, at its own size (resized to the teacher's on request)
    options = data.config_options(d) if d.transfer == d.name else {}
    split = data.load(d.transfer, 'train', d.transfer_dir or d.dir or None, d.backend, **options)
    images = split.images
    if images.shape[3] != info.image_shape[2]:
      raise data.DataMismatchError(
          f'{d.transfer} images have {images.shape[3]} channel(s), but the teacher takes '
          f'{info.image_shape[2]}: choose a transfer set with {info.image_shape[2]}-channel '
          'images.')
    if images.shape[1:3] != info.image_shape[:2]:
      if not d.resize:
        raise data.DataMismatchError(
            f'{d.transfer} images are {images.shape[2]}x{images.shape[1]}, but the teacher takes '
            f'{info.image_shape[1]}x{info.image_shape[0]}: pass {flag} to resize them, or choose '
            'a transfer set of that size.')
      images = data.resize_arrays(images, info.image_shape[0])
    labels = split.labels
    if labels.max() >= info.num_classes:  # another dataset's classes: usable unlabeled only
      if cfg.kd.label_weight:
        raise data.DataMismatchError(
            f'{d.transfer} labels name class {int(labels.max())}, which the teacher\'s '
            f'{info.num_classes} classes do not include: its labels cannot be hard targets; '
            'set --config.kd.label_weight=0 to distill on its images alone.')
      labels = None
    out = data.TransferSet(images, labels)
  if d.transfer_limit:
    out = data.TransferSet(out.images[:d.transfer_limit],
                           None if out.labels is None else out.labels[:d.transfer_limit])
  if cfg.kd.label_weight and out.labels is None:
    raise ConfigError(f'config.kd.label_weight={cfg.kd.label_weight} needs labels, but the '
                      f'transfer set {d.transfer} is unlabeled: set --config.kd.label_weight=0.')
  if len(out.images) < cfg.kd.batch_size:
    raise ConfigError(f'The transfer set {d.transfer} holds {len(out.images)} images, fewer than '
                      f'one batch (config.kd.batch_size={cfg.kd.batch_size}): lower the batch '
                      'size or give more images.')
  return out


def _setup(cfg, workdir: str, cleanup: contextlib.ExitStack):
  """Checks, loads and restores everything before the first step: (session, state, meta)."""
  validate(cfg)
  guard.check_workdir(workdir)
  teacher = load_teacher(cfg)  # data.name from the card: part of the fingerprint
  guard.check_resume(cfg, workdir, guard.teacher_hash(cfg.teacher.checkpoint),
                     write=parallel.is_main_process(),
                     inputs={'data.transfer': guard.input_hash(cfg.data.transfer)})
  info = dataset_info(cfg)
  transfer = load_transfer(cfg, info)
  test = load_test_split(cfg)
  mesh = checked_mesh(cfg.mesh.num_devices, **{'kd.batch_size': cfg.kd.batch_size})
  steps_per_epoch = len(transfer.images) // cfg.kd.batch_size
  total = steps_per_epoch * cfg.kd.epochs
  schedule = epoch_schedule(cfg.kd, steps_per_epoch, total, 'kd')
  student = models.get(cfg.student.arch, info.num_classes)
  root = jax.random.key(cfg.seed)
  state = create_classifier_state(student, rng_stream(root, 'student_init'),
                                  (1,) + info.image_shape,
                                  sgd(schedule, cfg.kd.momentum, cfg.kd.weight_decay))
  state = parallel.replicate(mesh, state)
  teacher = parallel.replicate(mesh, teacher)
  ckpt, state, meta = resume.open_checkpoints(cfg, workdir, state, total, cleanup, UNIT)
  writer = report.MetricWriter(workdir, enabled=parallel.is_main_process())
  writer.truncate_after(meta[UNIT])
  writer.write_json('config.json', cfg.to_dict())
  kd_cfg = distill.KDConfig(
      batch_size=cfg.kd.batch_size, loss='kl', temperature=cfg.kd.temperature,
      crop_padding=info.crop_padding, flip=info.flip, mean=info.mean, std=info.std,
      augment=cfg.kd.augment, kd_weight=cfg.kd.kd_weight, label_weight=cfg.kd.label_weight)
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  kd_fn = jax.jit(functools.partial(distill.epoch_kd_steps, kd_cfg, data_sharding=shard),
                  donate_argnums=(0,), out_shardings=rep)
  if test is not None and meta['teacher_accuracy'] is None:
    meta['teacher_accuracy'] = evaluation.teacher_accuracy(cfg, teacher, info, test)
  labels = None if transfer.labels is None else parallel.replicate(mesh, transfer.labels)
  session = Session(cfg, workdir, info, teacher, transfer, test, steps_per_epoch, total,
                    schedule, kd_fn, distill.make_eval_fn(student, info.mean, info.std),
                    writer, ckpt, rng_stream(root, 'kd'),
                    parallel.replicate(mesh, transfer.images), labels)
  return session, state, meta


def chunk_end(step: int, s: Session) -> int:
  """The step the chunk starting at `step` runs to: the next multiple of
  log.every_steps, log.checkpoint_every_steps or the epoch length (absolute
  boundaries: a resumed run cuts the same chunks as an uninterrupted one)."""
  ends = [(step // n + 1) * n for n in (s.cfg.log.every_steps,
                                        s.cfg.log.checkpoint_every_steps, s.steps_per_epoch)]
  return min(ends + [s.total_steps])


def save_transfer_grid(s: Session) -> None:
  """images/transfer_set.png: the first images of each label (unlabeled: the first ones)."""
  n = min(s.cfg.log.grid_images, len(s.transfer.images))
  if not n or not s.writer.enabled:
    return
  if s.transfer.labels is not None:
    grid = report.class_grid(s.transfer.images, s.transfer.labels, s.info.num_classes)
  else:
    grid = report.class_grid(s.transfer.images[:n], np.arange(n) // 10, -(-n // 10))
  report.save_png(os.path.join(s.workdir, 'images', 'transfer_set.png'), grid,
                  scale=2 if s.info.image_shape[0] <= 32 else 1)


def run(cfg, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) KD on the transfer set of `cfg`; returns the summary. SIGTERM/SIGINT
  stop it cleanly at the end of the current chunk of steps, with a checkpoint."""
  cfg = cfg.copy_and_resolve_references()  # data.name / teacher.arch are filled in
  with contextlib.ExitStack() as cleanup, StopSignal() as stop_signal:
    s, state, meta = _setup(cfg, workdir, cleanup)
    return _loop(s, state, meta, stop_signal)


def _loop(s: Session, state, meta, stop_signal: StopSignal) -> Dict[str, Any]:
  cfg, bs = s.cfg, s.cfg.kd.batch_size
  history: List[Dict[str, Any]] = list(meta['history'])
  start = step = int(meta[UNIT])
  if start == 0:
    save_transfer_grid(s)
  bar = tqdm(total=s.total_steps, initial=start, unit='step', dynamic_ncols=True,
             desc=f'KD {cfg.teacher.arch} -> {cfg.student.arch}',
             disable=not parallel.is_main_process())
  t0 = time.time()
  order, order_epoch = None, -1
  while step < s.total_steps:
    epoch = step // s.steps_per_epoch
    if epoch != order_epoch:  # the epoch's shuffle, a function of (seed, epoch)
      order = np.random.default_rng([cfg.seed, epoch]).permutation(len(s.transfer.images))
      order_epoch = epoch
    n = chunk_end(step, s) - step
    first = step % s.steps_per_epoch
    idx = order[first * bs:(first + n) * bs].reshape(n, bs)  # [n, B] transfer-set indices
    state, m = s.kd_fn(state, s.teacher, s.images, s.labels, idx, s.key)
    step += n
    row = {'epoch': epoch + 1, 'lr': float(s.schedule(step - 1))}
    row.update({k: float(v) for k, v in m.items()})
    if step % s.steps_per_epoch == 0:  # epoch end: the real test split, when there
      if s.test is not None:
        row.update(evaluation.student_row(cfg, s.eval_fn, state, s.test))
        bar.write(f'epoch {epoch + 1}/{cfg.kd.epochs}: student accuracy '
                  f'{row["student_accuracy"]:.2f}%')
      history.append({'epoch': epoch + 1, 'step': step,
                      **{k: row[k] for k in ('student_accuracy',) if k in row}})
    row['elapsed_s'] = time.time() - t0
    s.writer.write_scalars(step, row)
    bar.update(n)
    bar.set_postfix({k: f'{row[k]:.3g}' for k in ('kd_loss', 'kd_agreement', 'student_accuracy')
                     if k in row})
    last = step == s.total_steps
    stop = resume.stop_reason(cfg, stop_signal, step - start, last, UNIT)
    if (step % cfg.log.checkpoint_every_steps == 0 or step % s.steps_per_epoch == 0 or last
        or stop):
      meta = {UNIT: step, 'history': history, 'teacher_accuracy': meta['teacher_accuracy']}
      s.ckpt.save(step, state, meta)
    if stop:
      bar.close()
      s.writer.close()
      s.ckpt.close()
      return resume.stopped(cfg, stop, stop_signal, s.ckpt, s.workdir, step, s.total_steps,
                            UNIT)
  bar.close()
  out = finish(s, history, meta, time.time() - t0)
  s.ckpt.close()
  return out


def finish(s: Session, history, meta, seconds: float) -> Dict[str, Any]:
  """summary.json, accuracy.png; returns the summary (summary.summary_line prints it)."""
  cfg = s.cfg
  accs = [h['student_accuracy'] for h in history if 'student_accuracy' in h]
  teacher_acc = meta.get('teacher_accuracy')
  result = {
      'method': 'transfer-set KD', 'dataset': cfg.data.name, 'transfer': cfg.data.transfer,
      'transfer_images': len(s.transfer.images), 'teacher': cfg.teacher.arch,
      'student': cfg.student.arch, 'teacher_accuracy': teacher_acc,
      'student_accuracy': accs[-1] if accs else None,
      'best_student_accuracy': max(accs) if accs else None,
      'epochs': cfg.kd.epochs, 'steps': s.total_steps, 'history': history,
      'seconds_this_session': seconds, 'workdir': os.path.abspath(s.workdir),
      'evaluation': 'on' if accs else 'off (no test data)',
      'student_teacher_ratio': accs[-1] / teacher_acc if accs and teacher_acc else None,
      'images_dir': 'images', 'plots': ['accuracy.png'],
  }
  s.writer.write_json('summary.json', result)
  if s.writer.enabled:
    report.plot_metrics(report.read_metrics(s.writer.path),
                        os.path.join(s.workdir, 'accuracy.png'),
                        {'student test accuracy (%)': ['student_accuracy'],
                         'KD loss': ['kd_loss'],
                         'agreement with the teacher (%)': ['kd_agreement', 'label_accuracy']},
                        xlabel='student step')
  s.writer.close()
  return result


summary_line = summary.summary_line

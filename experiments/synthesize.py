"""A synthetic dataset from a teacher: images + labels as .npz, and a contact sheet.

  python -m experiments.synthesize --teacher=teachers/fashion_mnist_wrn_16_2 \
      --method=cmi --num_images=1000 --out=synthetic/fmnist_cmi
  python -m experiments.synthesize --teacher=cifar10_resnet34.pth --arch=resnet34 \
      --dataset=cifar10 --num_images=50000 --out=synthetic/c10 --batch_size=256

For data-free quantization calibration, distillation in another framework, or a
look at what the teacher has learned. Any pool-based method of
cmi_jax/synthesis/presets.py (`--method`; its algorithm comes from
cmi_jax/synthesis/algorithms.py, so new methods work unchanged) runs rounds of
`cmi_jax.synthesize` until the pool holds `--num_images` images. There is no
student: the adversarial term is off. Writes into `--out`:
  * synthetic.npz: `images` [N, H, W, C] uint8 (pixel values, not normalized),
    `labels` [N] int32 (the class each image was synthesized for);
  * contact_sheet.png: one row per class;
  * synthesis.json: the settings, per-class counts, the teacher check (the share of
    images the teacher assigns their label, and its mean CE on them) and timing.
Resumable: the synthesis state (head, bank, and the pool, which holds every image
so far) is checkpointed in `--out`/progress every `--save_every` rounds and on
SIGTERM/SIGINT; running the same command again continues, and gives the same
result as a run never interrupted.
"""

import json
import math
import os
import shlex
import sys
import time
from typing import Any, Dict, Optional

from absl import app, flags, logging

from cmi_jax import errors

_TEACHER = flags.DEFINE_string('teacher', None, 'Teacher directory or reference .pth file.')
_METHOD = flags.DEFINE_string('method', 'cmi', 'Method preset (cmi_jax/synthesis/presets.py).')
_NUM = flags.DEFINE_integer('num_images', None, 'Images to synthesize.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Images per round (default: the method\'s).')
_G_STEPS = flags.DEFINE_integer('g_steps', None, 'Generator steps per round (default: '
                                'the method\'s).')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_SAVE_EVERY = flags.DEFINE_integer('save_every', 5, 'Checkpoint every this many rounds.')
_DATASET = flags.DEFINE_string('dataset', None, 'Dataset the teacher was trained on (shape, '
                               'classes, normalization); default: the teacher card\'s.')
_ARCH = flags.DEFINE_string('arch', None, 'Architecture of a .pth teacher.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'Classes of a .pth teacher.')
_INPUT_SHAPE = flags.DEFINE_list('input_shape', None, 'H,W,C of a .pth teacher.')
_MEAN = flags.DEFINE_list('mean', None, 'Per-channel normalization mean (without --dataset).')
_STD = flags.DEFINE_list('std', None, 'Per-channel normalization std (without --dataset).')
_SET = flags.DEFINE_multi_string('set', [], 'Further SynthesisConfig field=value, e.g. '
                                 '--set=ngf=32 --set=n_neg=1024 (repeatable).')

NPZ, SHEET, REPORT, PROGRESS = 'synthetic.npz', 'contact_sheet.png', 'synthesis.json', 'progress'


class CommandLineError(errors.UserError, app.UsageError):
  """A bad flag value: printed as one `error:` line, exit status 2 (no flag help)."""


def _fail(msg: str):
  raise CommandLineError(msg)


def _parse_value(field: str, text: str, default: Any) -> Any:
  """`text` typed after the SynthesisConfig default of `field`."""
  try:
    if isinstance(default, bool):
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(text)
      return text.lower() in ('true', '1')
    if isinstance(default, tuple):
      return tuple(type(default[0])(v) for v in text.split(','))
    return type(default)(text)
  except ValueError:
    _fail(f'--set={field}={text}: expected a {type(default).__name__} like {default!r}.')


def build(teacher_path: str, method: str, num_images: int, batch_size: Optional[int] = None,
          g_steps: Optional[int] = None, dataset: Optional[str] = None,
          arch: Optional[str] = None, num_classes: Optional[int] = None,
          input_shape=None, mean=None, std=None, overrides: Optional[Dict[str, str]] = None):
  """(Teacher, SynthesisConfig) for the request, or a UsageError naming the fix."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from cmi_jax import data, teacher_io  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis import api, presets  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis.config import SynthesisConfig  # pylint: disable=g-import-not-at-top
  from cmi_jax.teacher import Teacher  # pylint: disable=g-import-not-at-top

  if not os.path.exists(teacher_path):
    _fail(f'--teacher={teacher_path}: no such file or directory (looked in {os.getcwd()}); pass '
          'a teacher directory (experiments/train_teacher.py or convert_teacher.py) or a .pth.')
  if num_images is None or num_images < 1:
    _fail(f'--num_images={num_images}: give the number of images to synthesize (>= 1).')
  try:
    preset = presets.get(method)
  except ValueError as e:
    _fail(f'--method={method}: {e}')
  if preset.get('kd', {}).get('mode') == 'fresh':
    pool_methods = sorted(m for m in presets.PRESETS
                          if presets.get(m).get('kd', {}).get('mode') != 'fresh')
    _fail(f'--method={method} is a GAN baseline (a generator trained against a student, no '
          f'image pool to export); choose one of {pool_methods}.')
  if dataset is not None and dataset not in data.DATASETS:
    _fail(f'--dataset={dataset}: unknown; choose one of {sorted(data.DATASETS)}.')
  if dataset is not None and not data.DATASETS[dataset].num_classes:  # image_folder
    _fail(f'--dataset={dataset} has no fixed classes, shape or normalisation: pass '
          '--num_classes, --input_shape, --mean and --std instead.')
  shape = None
  if input_shape:
    try:
      shape = tuple(int(v) for v in input_shape)
    except ValueError:
      shape = ()
    if len(shape) != 3:
      _fail(f'--input_shape={",".join(input_shape)}: expected H,W,C, e.g. 32,32,3.')
  if os.path.isfile(teacher_path):
    info = data.get_info(dataset) if dataset else None
    arch_, classes = arch, num_classes or (info.num_classes if info else None)
    shape = shape or (info.image_shape if info else None)
    if arch_ is None or classes is None or shape is None:
      _fail(f'--teacher={teacher_path} is a checkpoint file, which does not record its '
            'architecture or data: pass --arch and --dataset (or --num_classes and '
            '--input_shape with --mean and --std).')
    try:
      module, variables, card = teacher_io.load_teacher(teacher_path, arch=arch_,
                                                        num_classes=classes, input_shape=shape)
    except (ValueError, OSError) as e:
      _fail(f'--teacher={teacher_path}: {e}')
  else:  # a directory's card is checked against what is given (--dataset included)
    info = data.get_info(dataset) if dataset else None
    try:
      module, variables, card = teacher_io.load_teacher(
          teacher_path, arch=arch,
          num_classes=num_classes or (info.num_classes if info else None),
          input_shape=shape or (info.image_shape if info else None))
    except (ValueError, OSError) as e:
      _fail(f'--teacher={teacher_path}: {e}')
  dataset = dataset or card.get('meta', {}).get('dataset')
  if dataset is None and (mean is None or std is None):
    _fail('The teacher does not name its dataset: pass --dataset (one of '
          f'{sorted(data.DATASETS)}) or --mean and --std (per channel).')
  kwargs = {}
  if batch_size is not None:
    kwargs['batch_size'] = batch_size
  if g_steps is not None:
    kwargs['g_steps'] = g_steps
  defaults = SynthesisConfig(image_shape=(1, 1, 1), num_classes=1, mean=(0.0,), std=(1.0,))
  for field, text in (overrides or {}).items():
    if not hasattr(defaults, field) or field in ('image_shape', 'num_classes', 'mean', 'std',
                                                 'weights'):
      _fail(f'--set={field}=...: not a settable SynthesisConfig field; known: '
            f'{sorted(f.name for f in dataclasses.fields(SynthesisConfig) if f.name not in ("image_shape", "num_classes", "mean", "std", "weights"))}.')
    kwargs[field] = _parse_value(field, text, getattr(defaults, field))
  try:
    cfg = api.make_config(dataset=dataset, image_shape=card['input_shape'],
                          num_classes=card['num_classes'],
                          mean=tuple(float(v) for v in mean) if mean else None,
                          std=tuple(float(v) for v in std) if std else None,
                          method=method, **kwargs)
    # The pool keeps every image: whole rounds (of batch x loops images for NAYER, whose
    # round is an epoch of g_loops loops) up to num_images; a larger --set=pool_size stays.
    per_round = cfg.batch_size * (max(cfg.g_loops, 1) if cfg.algorithm == 'nayer' else 1)
    pool_size = max(math.ceil(num_images / per_round) * per_round,
                    kwargs.get('pool_size', 0))
    cfg = dataclasses.replace(cfg, pool_size=pool_size).validate()
  except (ValueError, TypeError) as e:
    _fail(f'Invalid synthesis settings: {e}')
  return Teacher(module, variables), cfg, dataset


def synthesize_dataset(teacher, cfg, num_images: int, out: str, seed: int = 0,
                       save_every: int = 5, settings: Optional[Dict[str, Any]] = None,
                       progress: bool = True) -> Dict[str, Any]:
  """Runs rounds until the pool holds `num_images`, checkpointing in out/progress;
  writes out/synthetic.npz, contact_sheet.png and synthesis.json; returns the report."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from cmi_jax import distill, report  # pylint: disable=g-import-not-at-top
  from cmi_jax.checkpoint import Checkpointer, abstract  # pylint: disable=g-import-not-at-top
  from cmi_jax.state import rng_stream  # pylint: disable=g-import-not-at-top
  from cmi_jax.synthesis import algorithms, api, footprint  # pylint: disable=g-import-not-at-top
  from experiments.resume import StopSignal  # pylint: disable=g-import-not-at-top

  settings = dict(settings or {}, num_images=num_images, seed=seed, config=repr(cfg))
  os.makedirs(out, exist_ok=True)
  report_path = os.path.join(out, REPORT)
  if os.path.exists(os.path.join(out, NPZ)) and os.path.exists(report_path):
    with open(report_path, encoding='utf-8') as f:
      done = json.load(f)
    _check_same(done['settings'], settings, out)
    print(f'{out} already holds the finished dataset ({done["num_images"]} images).')
    return done
  key = jax.random.key(seed)
  message = footprint.startup_message(cfg, teacher)  # CMI's head and bank, sized by D
  if message:
    print(message)
  state = algorithms.get(cfg.algorithm).init_state(cfg, teacher, rng_stream(key, 'head'))
  # Committed to one device, as the round's outputs and a restored state are: one compile.
  state = jax.device_put(state, jax.devices()[0])
  if 'images' not in getattr(getattr(state, 'pool', None), 'data', {}):
    _fail(f'algorithm {cfg.algorithm!r} keeps no image pool; it cannot export a dataset.')
  ckpt = Checkpointer(os.path.join(out, PROGRESS), max_to_keep=1)
  restored = ckpt.restore(abstract(state))
  if restored is not None:
    state, meta = restored
    _check_same(meta['settings'], settings, out)
    print(f'Resuming {out}: {int(state.pool.count)}/{num_images} images after '
          f'{int(state.round)} round(s).')
  t0 = time.time()
  count = int(state.pool.count)
  bar = tqdm(total=num_images, initial=min(count, num_images), unit='img',
             desc=f'{cfg.algorithm} synthesis', dynamic_ncols=True, disable=not progress)
  stopped = None
  rounds_since_save = 0
  with StopSignal() as stop:
    while count < num_images:
      result = api.synthesize(teacher, rounds=1, config=cfg, state=state, rng=key)
      state = result.state
      rounds_since_save += 1
      new = int(state.pool.count)
      if new == state.pool.capacity and int(state.pool.index) != 0:  # wrapped: images lost
        raise RuntimeError(f'algorithm {cfg.algorithm!r} added more images per round than '
                           f'expected; the pool of {state.pool.capacity} overflowed. Set '
                           '--set=pool_size=<num_images + images per round>.')
      bar.update(min(new, num_images) - min(count, num_images))
      count = new
      if 'loss' in result.metrics[0]:
        bar.set_postfix(loss=f'{float(np.asarray(result.metrics[0]["loss"]).reshape(-1)[-1]):.3g}')
      if count < num_images and (rounds_since_save >= save_every or stop.requested()):
        ckpt.save(int(state.round), state, {'settings': settings})
        rounds_since_save = 0
        if stop.requested():
          stopped = stop.received
          break
  bar.close()
  if stopped:
    ckpt.close()
    print(f'Stopped by {stopped} at {count}/{num_images} images; state saved in '
          f'{ckpt.directory}. Run the same command again to continue.')
    return {'stopped': stopped, 'images_so_far': count}
  pool = jax.tree_util.tree_map(np.asarray, state.pool.data)
  images, labels = pool['images'][:num_images], pool['targets'][:num_images].astype(np.int32)
  tmp = os.path.join(out, NPZ + '.tmp.npz')
  np.savez(tmp, images=images, labels=labels)
  os.replace(tmp, os.path.join(out, NPZ))
  # The teacher check: how many images the teacher assigns the class they were
  # synthesized for (inference form, models.fold), batches of the synthesis batch size.
  check = distill.evaluate(distill.make_eval_fn(teacher.module, cfg.mean, cfg.std),
                           teacher.variables, images, labels,
                           min(cfg.batch_size, len(labels)))
  sheet = report.class_grid(images, labels, cfg.num_classes, per_row=10)
  report.save_png(os.path.join(out, SHEET), sheet,
                  scale=2 if cfg.image_shape[0] <= 32 else 1)
  summary = {
      'num_images': int(len(images)), 'image_shape': list(images.shape[1:]),
      'per_class': np.bincount(labels, minlength=cfg.num_classes).tolist(),
      'teacher_check': {'agreement': check['accuracy'], 'mean_ce': check['loss']},
      'rounds': int(state.round), 'seconds_this_session': time.time() - t0,
      'files': {'npz': os.path.abspath(os.path.join(out, NPZ)),
                'contact_sheet': os.path.abspath(os.path.join(out, SHEET))},
      'settings': settings,
  }
  tmp = report_path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, report_path)
  ckpt.close()
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(out, PROGRESS), ignore_errors=True)  # the npz holds it all now
  return summary


def _check_same(saved: Dict[str, Any], now: Dict[str, Any], out: str) -> None:
  diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if diff:
    _fail(f'{out} holds a synthesis with other settings ({", ".join(diff)} differ: '
          f'{ {k: saved.get(k) for k in diff} } there, { {k: now.get(k) for k in diff} } now). '
          'Use the same command to continue it, or another --out.')


def main(argv):
  if len(argv) > 1:
    _fail(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  for name, value in (('teacher', _TEACHER.value), ('out', _OUT.value)):
    if not value:
      _fail(f'--{name} is required.')
  overrides = {}
  for item in _SET.value:
    if '=' not in item:
      _fail(f'--set={item}: expected field=value, e.g. --set=ngf=32.')
    k, v = item.split('=', 1)
    overrides[k] = v
  teacher, cfg, dataset = build(
      _TEACHER.value, _METHOD.value, _NUM.value, _BATCH.value, _G_STEPS.value, _DATASET.value,
      _ARCH.value, _NUM_CLASSES.value, _INPUT_SHAPE.value, _MEAN.value, _STD.value, overrides)
  if _SAVE_EVERY.value < 1:
    _fail(f'--save_every={_SAVE_EVERY.value}: must be >= 1.')
  settings = {'teacher': os.path.abspath(_TEACHER.value), 'method': _METHOD.value,
              'dataset': dataset}
  summary = synthesize_dataset(teacher, cfg, _NUM.value, _OUT.value, _SEED.value,
                               _SAVE_EVERY.value, settings)
  if 'stopped' in summary:
    print('Resume with: python -m experiments.synthesize ' + shlex.join(sys.argv[1:]))
    return
  print(f'Wrote {summary["num_images"]} images ({summary["per_class"]} per class) to '
        f'{summary["files"]["npz"]}; contact sheet {summary["files"]["contact_sheet"]}')
  check = summary.get('teacher_check')
  if check:  # absent from a report written before the check existed
    print(f'Teacher check: the teacher assigns {check["agreement"]:.2f}% of the images the '
          f'class they were synthesized for (mean CE {check["mean_ce"]:.3f}).')


if __name__ == '__main__':
  app.run(errors.main_guard(main), flags_parser=errors.parse_flags)  # user errors: one line

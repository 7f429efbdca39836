"""The data-free KD run behind `experiments.run`: config -> objects -> loop.

Kept separate from the absl entry point so tests can call `run(cfg, workdir)`.
"""

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from cmi_jax import data, distill, models, parallel, report
from cmi_jax.errors import ConfigError
from cmi_jax.checkpoint import Checkpointer, abstract
from cmi_jax.state import cosine_per_epoch, create_classifier_state, rng_stream, sgd
from cmi_jax.synthesis import algorithms, gan, presets
from cmi_jax.synthesis.config import LossWeights, SynthesisConfig
from cmi_jax.teacher import Teacher
from experiments import guard
from experiments.plan import compile_plan


# ---------------------------------------------------------------- validation

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
  for field in ('teacher.arch', 'student.arch'):
    sec, key = field.split('.')
    if cfg[sec][key] not in models.CLASSIFIERS:
      bad(field, cfg[sec][key], f'must be one of {sorted(models.CLASSIFIERS)}')
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
  ]:
    if not ok:
      bad(field, value, must)
  synthesis_config(cfg, dataset_info(cfg), cfg.synthesis.weights.to_dict())


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
  if s['global_padding'] < 0:
    s['global_padding'] = info.crop_padding
  try:
    return SynthesisConfig(image_shape=info.image_shape, num_classes=info.num_classes,
                           mean=info.mean, std=info.std, **s).validate()
  except TypeError as e:
    raise ValueError(f'config.synthesis has a field SynthesisConfig does not know: {e}') from e


# ---------------------------------------------------------------- setup

def load_teacher(cfg, info: data.DatasetInfo, dtype) -> Teacher:
  """The frozen teacher from a directory, a .pth, or 'random' (smoke tests)."""
  if cfg.teacher.checkpoint == 'random':
    logging.warning('teacher.checkpoint=random: a randomly initialized teacher (tests only).')
    module = models.get(cfg.teacher.arch, info.num_classes)
    variables = models.init(module, jax.random.fold_in(jax.random.key(cfg.seed), 99),
                            (1,) + info.image_shape)
  else:
    from cmi_jax import teacher_io  # pylint: disable=g-import-not-at-top
    _, variables, card = teacher_io.load_teacher(
        cfg.teacher.checkpoint, arch=cfg.teacher.arch, num_classes=info.num_classes,
        input_shape=info.image_shape)
    del card
  # Rebuild with the compute dtype (params stay float32).
  module = models.get(cfg.teacher.arch, info.num_classes, dtype=dtype)
  return Teacher(module, variables)


# ---- data.name / data options (issue 21 loaders): the dataset entry and test split
def dataset_info(cfg) -> data.DatasetInfo:
  """The dataset's entry, refined by data.image_size/mean/std/num_classes where set."""
  return data.get_info(cfg.data.name, cfg.data.dir or None, **data.config_options(cfg.data))


def load_test_split(cfg) -> Optional[data.Split]:
  """The real test split for evaluation (data.eval_limit examples when set, never
  decoded beyond them), or None (training is data-free)."""
  try:
    return data.load(cfg.data.name, 'test', cfg.data.dir or None, cfg.data.backend,
                     limit=cfg.data.eval_limit, **data.config_options(cfg.data))
  except data.DataCorruptError:
    raise  # a damaged file must be replaced, not silently skipped
  except data.DataNotFoundError as e:
    print(f'Evaluation is off: {e}')
    return None
# ---- end of the data edit


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


# ---------------------------------------------------------------- the run

class StopSignal:
  """SIGTERM/SIGINT -> a clean stop: the first signal sets `requested` (the loop
  stops after the current round, saves and says how to resume); handlers are
  restored at the first signal (a second one acts as usual, e.g. Ctrl-C twice
  interrupts at once) and on exit. Installed only in the main thread."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[str] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self.handle)
    return self

  def handle(self, signum, frame=None) -> None:
    del frame
    self.received = signal.Signals(signum).name
    self._restore()
    print(f'\n{self.received} received: stopping after the current round (saving a '
          'checkpoint first); send it again to stop at once.', flush=True)

  def requested(self) -> bool:
    """Whether any process received a signal (all processes agree: a collective)."""
    flag = self.received is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
      self.received = self.received or 'a signal (on another process)' if flag else None
    return flag

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __exit__(self, *exc):
    self._restore()


def run(cfg, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) the data-free KD described by `cfg`; returns the summary.

  SIGTERM/SIGINT stop it cleanly after the current round (see StopSignal); an
  exception still finishes the checkpoint being written."""
  with contextlib.ExitStack() as cleanup, StopSignal() as stop_signal:
    return _run(cfg, workdir, cleanup, stop_signal)


def _run(cfg, workdir: str, cleanup: contextlib.ExitStack, stop_signal: StopSignal
         ) -> Dict[str, Any]:
  guard.phase('setup')
  validate(cfg)
  # Before anything loads or compiles: a writable workdir, and no silent continuation of
  # another config's or teacher's run (experiments/guard.py).
  guard.check_workdir(workdir)
  guard.check_resume(cfg, workdir, guard.teacher_hash(cfg.teacher.checkpoint),
                     write=parallel.is_main_process())
  if jax.process_count() > 1 and cfg.mesh.num_devices not in (0, jax.device_count()):
    raise ConfigError(f'config.mesh.num_devices={cfg.mesh.num_devices} is invalid: a multi-host '
                     f'run uses all {jax.device_count()} devices; set 0.')
  info = dataset_info(cfg)
  mesh = parallel.make_mesh(cfg.mesh.num_devices)
  synth = synthesis_config(cfg, info, cfg.synthesis.weights.to_dict())
  # The pre-rounds (synthesis-only warm-up) run with weights adv=pre_adv, oh=pre_oh and
  # pre_loops loops per round (NAYER's gwp_loops; 0: synthesis.g_loops).
  pre_synth = dataclasses.replace(synth, g_loops=cfg.kd.pre_loops or synth.g_loops,
                                  weights=dataclasses.replace(
                                      synth.weights, adv=cfg.kd.pre_adv, oh=cfg.kd.pre_oh))
  try:
    parallel.check_divisible(mesh, **{'synthesis.batch_size': synth.batch_size,
                                     'kd.batch_size': cfg.kd.batch_size})
  except ValueError as e:
    raise ConfigError(str(e)) from e
  teacher = parallel.replicate(mesh, load_teacher(cfg, info, synth.compute_dtype))
  student_module = models.get(cfg.student.arch, info.num_classes, dtype=synth.compute_dtype)
  test = load_test_split(cfg)
  plan = Plan(cfg.kd.pre_rounds, cfg.kd.ep_steps // cfg.kd.kd_steps, cfg.kd.epochs,
              cfg.kd.kd_steps)
  fresh = cfg.kd.mode == 'fresh'
  kd_cfg = distill.KDConfig(batch_size=cfg.kd.batch_size, loss=cfg.kd.loss,
                            temperature=cfg.kd.temperature, crop_padding=info.crop_padding,
                            flip=info.flip, mean=info.mean, std=info.std,
                            augment=cfg.kd.augment and not fresh)

  root = jax.random.key(cfg.seed)
  tx = sgd(cosine_per_epoch(cfg.kd.lr, plan.epochs, plan.rounds_per_epoch * plan.kd_steps,
                            cfg.kd.lr_min),
           cfg.kd.momentum, cfg.kd.weight_decay)
  state = {'student': create_classifier_state(student_module, rng_stream(root, 'student_init'),
                                              (1,) + info.image_shape, tx)}
  if fresh:
    state['generator'] = gan.init_generator_state(synth, rng_stream(root, 'generator'))
  else:
    state['synth'] = algorithms.get(synth.algorithm).init_state(synth, teacher,
                                                                 rng_stream(root, 'head'))
  state = parallel.replicate(mesh, state)

  # Resume order: the workdir's latest checkpoint, else a fresh start.
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.log.max_checkpoints,
                     async_save=cfg.log.async_checkpoints)
  cleanup.callback(ckpt.close)  # on any exit: the save in flight completes
  meta = {'round': 0, 'history': [], 'teacher_accuracy': None}
  restored = ckpt.restore(abstract(state))
  if restored is not None:
    state, meta = restored
    print(f'Resuming {workdir} after round {meta["round"]}/{plan.total_rounds}.')
  writer = report.MetricWriter(workdir, enabled=parallel.is_main_process())
  writer.truncate_after(meta['round'])  # rows a crashed run wrote after its last checkpoint
  writer.write_json('config.json', cfg.to_dict())

  guard.phase('compile')
  fns = compile_plan(mesh, synth, pre_synth, kd_cfg, fresh)
  eval_fn = distill.make_eval_fn(student_module.apply, info.mean, info.std)
  if test is not None and meta['teacher_accuracy'] is None:
    meta['teacher_accuracy'] = distill.evaluate_on_hosts(
        distill.make_eval_fn(teacher.module.apply, info.mean, info.std), teacher.variables, test.images, test.labels, cfg.data.eval_batch_size)['accuracy']
    print(f'Teacher accuracy on the {cfg.data.name} test split: {meta["teacher_accuracy"]:.2f}%')

  synth_key, pre_key, kd_key = (rng_stream(root, n) for n in ('synthesis', 'pre_synthesis', 'kd'))
  history: List[Dict[str, Any]] = list(meta['history'])
  start = int(meta['round'])
  bar = tqdm(total=plan.total_rounds, initial=start, desc=f'{cfg.method} rounds', unit='round',
             dynamic_ncols=True, disable=not parallel.is_main_process())
  if fresh:  # GAN baselines keep no pool: grids show fresh samples, once per epoch
    preview = jax.jit(functools.partial(gan.preview, synth, n=info.num_classes *
                                        cfg.log.grid_per_class * 2))
  t0 = time.time()
  for r in range(start, plan.total_rounds):
    row: Dict[str, Any] = {'round': r + 1}
    bar.set_description(f'{cfg.method} round {r + 1}: synthesis')
    guard.phase('synthesis', r + 1)
    student = Teacher(student_module, {'params': state['student'].params,
                                       'batch_stats': state['student'].batch_stats})
    # 1. Synthesis.
    if fresh:
      state['generator'], m, retries, ok = guard.run_round(
          lambda s, k: fns.gan_round(teacher, student, s, k), state['generator'],
          jax.random.fold_in(synth_key, r), cfg.faults.round_retries, lambda m: m,
          f'Round {r + 1}')
      images = targets = None
    else:
      pre = r < plan.pre_rounds
      round_fn = fns.pre_round if pre else fns.round
      # A round whose best loss is not finite is retried with a fresh key, then skipped.
      state['synth'], out, retries, ok = guard.run_round(
          lambda s, k: round_fn(teacher, student, s, k), state['synth'],
          jax.random.fold_in(pre_key if pre else synth_key, r), cfg.faults.round_retries,
          lambda o: o.metrics, f'Round {r + 1}')
      m, images, targets = out.metrics, out.images, out.targets
      if not ok:
        images = targets = None  # no grid of a skipped round
    row.update(_synthesis_row(m))
    row['synthesis_retries'], row['synthesis_skipped'] = retries, int(not ok)
    # 2. KD on the pool (or fresh samples), in chunks for the progress bar.
    if r >= plan.pre_rounds and (fresh or int(state['synth'].pool.count) > 0):
      bar.set_description(f'{cfg.method} round {r + 1}: KD')  # (an empty pool: first round skipped)
      guard.phase('kd', r + 1)
      source = (gan.FreshSource(state['generator'], synth.nz) if fresh else state['synth'].pool)
      kd_rows = []
      done = 0
      while done < plan.kd_steps:
        n = min(cfg.log.every_kd_steps, plan.kd_steps - done)
        state['student'], km = fns.kd(state['student'], teacher, source, kd_key, n)
        kd_rows.append((n, km))
        done += n
      row.update({k: float(sum(n * v[k] for n, v in kd_rows) / plan.kd_steps)
                  for k in kd_rows[0][1]})
      row['lr'] = float(tx_lr(cfg, plan, int(state['student'].step)))
    if not fresh:
      row['pool_size'] = int(state['synth'].pool.count)
    # 3. Evaluation at epoch ends.
    if plan.ends_epoch(r):
      bar.set_description(f'{cfg.method} round {r + 1}: eval')
      guard.phase('eval', r + 1)
      row['epoch'] = plan.epoch_of(r) + 1
      if fresh:
        images, targets = preview(teacher, state['generator'], jax.random.fold_in(synth_key, r))
      if test is not None:
        t_eval = time.time()
        ev = distill.evaluate_on_hosts(eval_fn, {'params': state['student'].params,
                                        'batch_stats': state['student'].batch_stats},
                              test.images, test.labels, cfg.data.eval_batch_size)
        row['student_accuracy'], row['student_test_loss'] = ev['accuracy'], ev['loss']
        row['eval_s'] = time.time() - t_eval  # inside elapsed_s; time-to-accuracy subtracts it
      history.append({k: row[k] for k in ('round', 'epoch', 'student_accuracy') if k in row})
    guard.phase('log', r + 1)
    row['elapsed_s'] = time.time() - t0
    writer.write_scalars(r + 1, row)
    grid_due = (r + 1) % cfg.log.grid_every_rounds == 0 or fresh
    if images is not None and grid_due:
      images_np, targets_np = parallel.fetch((images, targets))  # collective: every process
      if parallel.is_main_process():
        grid = report.class_grid(images_np, targets_np, info.num_classes,
                                 cfg.log.grid_per_class)
        report.save_png(os.path.join(workdir, 'images', f'round_{r + 1:05d}.png'), grid,
                        scale=2 if info.image_shape[0] <= 32 else 1)
    bar.update(1)
    bar.set_postfix({k: f'{row[k]:.3g}' for k in ('loss', 'l_bn', 'l_cr', 'kd_loss',
                                                   'student_accuracy') if k in row})
    # 4. Checkpoint (asynchronous: blocks for the host copy only) every
    # log.checkpoint_every_rounds rounds, at epoch ends when an epoch is at least that
    # long, at the end, and before a stop (log.stop_after_rounds, SIGTERM/SIGINT).
    last = r + 1 == plan.total_rounds
    stop_after = bool(cfg.log.stop_after_rounds) and r + 1 - start >= cfg.log.stop_after_rounds
    signalled = stop_signal.requested()
    stop = (stop_after or signalled) and not last
    if plan.checkpoint_due(r, cfg.log.checkpoint_every_rounds) or stop:
      meta = {'round': r + 1, 'history': history,
              'teacher_accuracy': meta['teacher_accuracy']}
      guard.phase('checkpoint', r + 1)
      ckpt.save(r + 1, state, meta)
      guard.phase('plots', r + 1)
    if plan.ends_epoch(r) and not last:  # the end of the run plots after the summary
      _plots(workdir, writer)
    if stop:
      bar.close()
      writer.close()
      ckpt.close()
      if signalled:
        print(f'Stopped by {stop_signal.received} after round {r + 1}/{plan.total_rounds}; '
              f'checkpoint saved in {ckpt.directory}. Run the same command again to resume.')
        return {'stopped_at_round': r + 1, 'workdir': os.path.abspath(workdir),
                'signal': stop_signal.received}
      print(f'Stopping after {cfg.log.stop_after_rounds} round(s) as log.stop_after_rounds asks; '
            'run the same command again to continue.')
      return {'stopped_at_round': r + 1, 'workdir': os.path.abspath(workdir)}
  bar.close()

  guard.phase('summary')
  summary = _summary(cfg, plan, history, meta, workdir, time.time() - t0)
  summary.update(guard.fault_counts(writer.path))  # retried / skipped non-finite rounds
  writer.write_json('summary.json', summary)
  _plots(workdir, writer)
  writer.close()
  ckpt.close()
  return summary


def tx_lr(cfg, plan: Plan, step: int) -> float:
  """The student's learning rate at `step` (for logging)."""
  return float(cosine_per_epoch(cfg.kd.lr, plan.epochs, plan.rounds_per_epoch * plan.kd_steps,
                               cfg.kd.lr_min)(max(step - 1, 0)))


def _synthesis_row(m: Dict[str, Any]) -> Dict[str, float]:
  """Per-round scalars: the last step of each loss term, the first step's total,
  and the round's diagnostics."""
  out = {}
  for k, v in m.items():
    a = np.asarray(v)
    if a.ndim == 1:
      out[k] = float(a[-1])
      if k == 'loss':
        out['loss_first'] = float(a[0])
    else:
      out[k] = float(a)
  return out


def _plots(workdir: str, writer: report.MetricWriter) -> None:
  if not writer.enabled or not os.path.exists(writer.path):
    return
  rows = report.read_metrics(writer.path)
  report.plot_metrics(rows, os.path.join(workdir, 'accuracy.png'),
                      {'student test accuracy (%)': ['student_accuracy'],
                       'KD': ['kd_loss'], 'teacher-student agreement (%)': ['kd_agreement']})
  report.plot_metrics(rows, os.path.join(workdir, 'losses.png'),
                      {'synthesis loss': ['loss', 'loss_first', 'best_loss'],
                       'terms': ['l_bn', 'l_oh', 'l_adv', 'l_cr', 'l_balance', 'l_act', 'l_tv'],
                       'diagnostics': ['confidence', 'feature_diversity', 'class_entropy']})


def _summary(cfg, plan, history, meta, workdir, seconds) -> Dict[str, Any]:
  accs = [h['student_accuracy'] for h in history if 'student_accuracy' in h]
  return {
      'method': cfg.method, 'dataset': cfg.data.name, 'teacher': cfg.teacher.arch,
      'student': cfg.student.arch, 'teacher_accuracy': meta.get('teacher_accuracy'),
      'student_accuracy': accs[-1] if accs else None,
      'best_student_accuracy': max(accs) if accs else None,
      'epochs': plan.epochs, 'rounds': plan.total_rounds, 'history': history,
      'seconds_this_session': seconds, 'workdir': os.path.abspath(workdir),
      'evaluation': 'on' if accs else 'off (no test data)',
      'student_teacher_ratio': (accs[-1] / meta['teacher_accuracy']
                                if accs and meta.get('teacher_accuracy') else None),
      'images_dir': 'images', 'plots': ['accuracy.png', 'losses.png'],  # in the workdir
  }


def maybe_initialize_distributed(cfg) -> None:
  """config.mesh.distributed: 'auto' (follow the environment), 'on' or 'off'."""
  choices = {'auto': None, 'on': True, 'off': False}
  if cfg.mesh.distributed not in choices:
    raise ValueError(f'config.mesh.distributed={cfg.mesh.distributed!r} is invalid: must be '
                     f'one of {sorted(choices)}.')
  parallel.maybe_initialize_distributed(choices[cfg.mesh.distributed])


def summary_line(summary, seconds: float) -> str:
  """The run's one-line result: student and teacher accuracy, their ratio, and
  where the image grids and plots are."""
  def pct(v):
    return 'n/a (no test data)' if v is None else f'{v:.2f}%'
  def where(name):  # summary.json holds paths relative to the workdir
    return os.path.join(summary['workdir'], name)
  ratio = summary.get('student_teacher_ratio')
  return (f'Done in {seconds:.0f} s: {summary["method"]} student {summary["student"]} '
          f'{pct(summary["student_accuracy"])}, teacher {summary["teacher"]} '
          f'{pct(summary["teacher_accuracy"])}, ratio '
          f'{"n/a" if ratio is None else f"{ratio:.4f}"}; image grids in '
          f'{where(summary["images_dir"])}, plots {", ".join(map(where, summary["plots"]))}')

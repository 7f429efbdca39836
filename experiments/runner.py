"""The data-free KD run behind `experiments.run`: config -> objects -> loop.

Orchestration only: the config's checks and structs are `run_config`, the teacher
and test split `inputs`, the compiled steps `plan`, stopping and resuming
`resume`, evaluation `evaluation`, the metrics rows, plots and summary `summary`.
Kept separate from the absl entry point so tests can call `run(cfg, workdir)`.
"""

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Dict, List, Optional

import jax
from tqdm import tqdm

from cmi_jax import data, distill, models, parallel, report
from cmi_jax.checkpoint import Checkpointer
from cmi_jax.errors import CheckpointError, ConfigError
from cmi_jax.pool_checkpoint import PoolCheckpointer, without_pool
from cmi_jax.state import create_classifier_state, rng_stream
from cmi_jax.synthesis import algorithms, footprint, gan
from cmi_jax.synthesis.round_kit import check_teacher
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.teacher import Teacher
from experiments import evaluation, guard, resume, summary
from experiments.inputs import load_init_pool, load_teacher, load_test_split
from experiments.plan import compile_plan, synth_shardings
from experiments.resume import StopSignal
from experiments.run_config import (Plan, checked_mesh, dataset_info, kd_config, make_plan,
                                    pre_synthesis_config, student_tx, synthesis_config, tx_lr,
                                    validate)
from experiments.summary import summary_line

__all__ = ['run', 'validate', 'summary_line', 'maybe_initialize_distributed', 'apply_runtime',
           'Plan',
           'StopSignal', 'load_teacher', 'load_test_split', 'dataset_info', 'synthesis_config']


@dataclasses.dataclass
class Session:
  """What the round loop needs, built once by `_setup`."""
  cfg: Any
  workdir: str
  info: data.DatasetInfo
  synth: SynthesisConfig
  plan: Plan
  teacher: Teacher
  student_module: Any
  test: Optional[data.Split]
  fns: Any              # experiments.plan.Steps: the compiled round(s), KD chunk
  eval_fn: Callable
  writer: report.MetricWriter
  ckpt: Checkpointer
  keys: Dict[str, jax.Array]   # 'synthesis', 'pre_synthesis', 'kd' streams
  preview: Optional[Callable]  # GAN baselines: fresh samples for the grids
  init: Optional[jax.Array] = None  # kd.init_pool's images [M, H, W, C] uint8 (replicated)
  # log.pool_checkpoint='incremental': the pool's own checkpointer, and a bound on the
  # images the pool received since its last save (RoundOutput sizes).
  pool_ckpt: Optional[PoolCheckpointer] = None
  pool_added: int = 0

  @property
  def fresh(self) -> bool:
    return self.cfg.kd.mode == 'fresh'


def run(cfg, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) the data-free KD described by `cfg`; returns the summary.

  SIGTERM/SIGINT stop it cleanly after the current round (see StopSignal); an
  exception still finishes the checkpoint being written."""
  with contextlib.ExitStack() as cleanup, StopSignal() as stop_signal:
    return _run(cfg, workdir, cleanup, stop_signal)


def _setup(cfg, workdir: str, cleanup: contextlib.ExitStack):
  """Checks, builds and restores everything before the first round: (session, state, meta)."""
  guard.phase('setup')
  validate(cfg)
  # Before anything loads or compiles: a writable workdir, and no silent continuation of
  # another config's or teacher's run (experiments/guard.py).
  guard.check_workdir(workdir)
  guard.check_resume(cfg, workdir, guard.teacher_hash(cfg.teacher.checkpoint),
                     write=parallel.is_main_process(),
                     inputs={'kd.init_pool': guard.input_hash(cfg.kd.init_pool)})
  if jax.process_count() > 1 and cfg.mesh.num_devices not in (0, jax.device_count()):
    raise ConfigError(f'config.mesh.num_devices={cfg.mesh.num_devices} is invalid: a multi-host '
                      f'run uses all {jax.device_count()} devices; set 0.')
  info = dataset_info(cfg)
  init = load_init_pool(cfg, info)  # checked against the teacher's input shape
  synth = synthesis_config(cfg, info, cfg.synthesis.weights.to_dict())
  mesh = checked_mesh(cfg.mesh.num_devices, **{'synthesis.batch_size': synth.batch_size,
                                               'kd.batch_size': cfg.kd.batch_size})
  teacher = parallel.replicate(mesh, load_teacher(cfg, info, synth.compute_dtype))
  student_module = models.get(cfg.student.arch, info.num_classes, dtype=synth.compute_dtype,
                              remat=synth.remat)
  test = load_test_split(cfg)
  if init is not None:
    init = parallel.replicate(mesh, init)
  plan = make_plan(cfg)
  fresh = cfg.kd.mode == 'fresh'

  root = jax.random.key(cfg.seed)
  state = {'student': create_classifier_state(student_module, rng_stream(root, 'student_init'),
                                              (1,) + info.image_shape, student_tx(cfg, plan))}
  if fresh:
    check_teacher(synth, teacher)  # the pool methods' init_state check it themselves
    state['generator'] = gan.init_generator_state(synth, rng_stream(root, 'generator'))
  else:
    if synth.algorithm == 'cmi':  # CMI's head and bank, sized by D
      print(footprint.startup_message(synth, teacher))
    init_synth = functools.partial(algorithms.get(synth.algorithm).init_state, synth)
    if cfg.kd.pool_mode == 'device':
      state['synth'] = init_synth(teacher, rng_stream(root, 'head'))
  state = parallel.replicate(mesh, state)
  state_shardings = None
  if not fresh and cfg.kd.pool_mode != 'device':
    # The pool split over the devices from the start (never whole on one device); the
    # jitted init gives the eager one's values (tests/test_pool.py).
    key = rng_stream(root, 'head')
    state_shardings = synth_shardings(mesh, jax.eval_shape(init_synth, teacher, key),
                                      cfg.kd.pool_mode)
    state['synth'] = parallel.init_sharded(init_synth, state_shardings, teacher, key)
    # The round's out_shardings must carry this state's own static fields (its optimizers).
    state_shardings = synth_shardings(mesh, state['synth'], cfg.kd.pool_mode)
  pool_ckpt, saved = None, state
  if cfg.log.pool_checkpoint == 'incremental' and not fresh:
    pool_ckpt = PoolCheckpointer(os.path.join(workdir, 'pool'))
    saved = dict(state, synth=state['synth'].replace(pool=without_pool(state['synth'].pool)))
  ckpt, saved, meta = resume.open_checkpoints(cfg, workdir, saved, plan.total_rounds, cleanup)
  if pool_ckpt is None:
    state = saved
  else:  # the pool from its chunks, into the fresh (replicated or sharded) pool
    pool = pool_ckpt.restore(int(meta['round']), state['synth'].pool)
    if int(meta['round']) and int(saved['synth'].pool.count) != int(pool.count):
      raise CheckpointError(f'The pool manifest of round {meta["round"]} in {pool_ckpt.directory} '
                            'does not match its checkpoint (pool count); delete the workdir.')
    state = dict(saved, synth=saved['synth'].replace(pool=pool))
  writer = report.MetricWriter(workdir, enabled=parallel.is_main_process())
  writer.truncate_after(meta['round'])  # rows a crashed run wrote after its last checkpoint
  writer.write_json('config.json', cfg.to_dict())

  guard.phase('compile')
  fns = compile_plan(mesh, synth, pre_synthesis_config(cfg, synth), kd_config(cfg, info), fresh,
                     state_shardings)
  if test is not None and meta['teacher_accuracy'] is None:
    meta['teacher_accuracy'] = evaluation.teacher_accuracy(cfg, teacher, info, test)
  preview = None
  if fresh:  # GAN baselines keep no pool: grids show fresh samples, once per epoch
    preview = jax.jit(functools.partial(gan.preview, synth, n=info.num_classes *
                                        cfg.log.grid_per_class * 2))
  session = Session(cfg, workdir, info, synth, plan, teacher, student_module, test, fns,
                    distill.make_eval_fn(student_module, info.mean, info.std), writer,
                    ckpt, {n: rng_stream(root, n) for n in ('synthesis', 'pre_synthesis', 'kd')},
                    preview, init, pool_ckpt)
  return session, state, meta


def _synthesize(s: Session, state, r: int, row: Dict[str, Any]):
  """1. Synthesis: round r's compiled call (the warm-up's program in the pre-rounds),
  retried with a fresh key while its best loss is non-finite, then skipped.
  Returns (state, images, targets) of the round (None: nothing to show)."""
  cfg, plan = s.cfg, s.plan
  guard.phase('synthesis', r + 1)
  student = Teacher(s.student_module, {'params': state['student'].params,
                                       'batch_stats': state['student'].batch_stats})
  if s.fresh:
    state['generator'], m, retries, ok = guard.run_round(
        lambda st, k: s.fns.gan_round(s.teacher, student, st, k), state['generator'],
        jax.random.fold_in(s.keys['synthesis'], r), cfg.faults.round_retries, lambda m: m,
        f'Round {r + 1}')
    images = targets = None
  else:
    pre = r < plan.pre_rounds
    round_fn = s.fns.pre_round if pre else s.fns.round
    state['synth'], out, retries, ok = guard.run_round(
        lambda st, k: round_fn(s.teacher, student, st, k), state['synth'],
        jax.random.fold_in(s.keys['pre_synthesis' if pre else 'synthesis'], r),
        cfg.faults.round_retries, lambda o: o.metrics, f'Round {r + 1}')
    m, images, targets = out.metrics, out.images, out.targets
    s.pool_added += images.shape[0]  # at most what the pool received (a skipped round: 0)
    if not ok:
      images = targets = None  # no grid of a skipped round
  row.update(summary.synthesis_row(m))
  row['synthesis_retries'], row['synthesis_skipped'] = retries, int(not ok)
  return state, images, targets


def _distill(s: Session, state, r: int, row: Dict[str, Any], bar) -> Any:
  """2. KD on the pool (or fresh samples) after the warm-up, in chunks of
  log.every_kd_steps for the progress bar (an empty pool: the round is skipped)."""
  cfg, plan = s.cfg, s.plan
  if r >= plan.pre_rounds and (s.fresh or s.init is not None
                               or int(state['synth'].pool.count) > 0):
    bar.set_description(f'{cfg.method} round {r + 1}: KD')
    guard.phase('kd', r + 1)
    if s.fresh:
      source = gan.FreshSource(state['generator'], s.synth.nz)
    elif s.init is not None:  # uniform over pool + init images (the reference's --cmi_init)
      source = distill.PoolWithInit(state['synth'].pool, s.init)
    else:
      source = state['synth'].pool
    kd_rows = []
    done = 0
    while done < plan.kd_steps:
      n = min(cfg.log.every_kd_steps, plan.kd_steps - done)
      state['student'], km = s.fns.kd(state['student'], s.teacher, source, s.keys['kd'], n)
      kd_rows.append((n, km))
      done += n
    row.update({k: float(sum(n * v[k] for n, v in kd_rows) / plan.kd_steps)
                for k in kd_rows[0][1]})
    row['lr'] = float(tx_lr(cfg, plan, int(state['student'].step)))
  if not s.fresh:
    row['pool_size'] = int(state['synth'].pool.count)
  return state


def _run(cfg, workdir: str, cleanup: contextlib.ExitStack, stop_signal: StopSignal
         ) -> Dict[str, Any]:
  s, state, meta = _setup(cfg, workdir, cleanup)
  plan = s.plan
  history: List[Dict[str, Any]] = list(meta['history'])
  start = int(meta['round'])
  bar = tqdm(total=plan.total_rounds, initial=start, desc=f'{cfg.method} rounds', unit='round',
             dynamic_ncols=True, disable=not parallel.is_main_process())
  t0 = time.time()
  for r in range(start, plan.total_rounds):
    row: Dict[str, Any] = {'round': r + 1}
    bar.set_description(f'{cfg.method} round {r + 1}: synthesis')
    state, images, targets = _synthesize(s, state, r, row)
    state = _distill(s, state, r, row, bar)
    # 3. Evaluation at epoch ends.
    if plan.ends_epoch(r):
      bar.set_description(f'{cfg.method} round {r + 1}: eval')
      guard.phase('eval', r + 1)
      row['epoch'] = plan.epoch_of(r) + 1
      if s.fresh:
        images, targets = s.preview(s.teacher, state['generator'],
                                    jax.random.fold_in(s.keys['synthesis'], r))
      if s.test is not None:
        row.update(evaluation.student_row(cfg, s.eval_fn, state['student'], s.test))
      history.append({k: row[k] for k in ('round', 'epoch', 'student_accuracy') if k in row})
    guard.phase('log', r + 1)
    row['elapsed_s'] = time.time() - t0
    s.writer.write_scalars(r + 1, row)
    if images is not None and ((r + 1) % cfg.log.grid_every_rounds == 0 or s.fresh):
      summary.save_grid(workdir, r + 1, images, targets, s.info.num_classes,
                        cfg.log.grid_per_class)
    bar.update(1)
    bar.set_postfix({k: f'{row[k]:.3g}' for k in ('loss', 'l_bn', 'l_cr', 'kd_loss',
                                                   'student_accuracy') if k in row})
    # 4. Checkpoint (asynchronous: blocks for the host copy only) every
    # log.checkpoint_every_rounds rounds, at epoch ends when an epoch is at least that
    # long, at the end, and before a stop (log.stop_after_rounds, SIGTERM/SIGINT).
    last = r + 1 == plan.total_rounds
    stop = resume.stop_reason(cfg, stop_signal, r + 1 - start, last)
    if plan.checkpoint_due(r, cfg.log.checkpoint_every_rounds) or stop:
      meta = {'round': r + 1, 'history': history,
              'teacher_accuracy': meta['teacher_accuracy']}
      guard.phase('checkpoint', r + 1)
      saved = state
      if s.pool_ckpt is not None:  # the pool's new rounds first: each checkpoint has its manifest
        s.ckpt.wait()  # the previous save on disk (and listed) before manifests are pruned
        pool = state['synth'].pool
        s.pool_ckpt.save(r + 1, pool, s.pool_added)
        s.pool_ckpt.prune(set(s.ckpt.all_steps()) | {r + 1})
        s.pool_added = 0
        saved = dict(state, synth=state['synth'].replace(pool=without_pool(pool)))
      s.ckpt.save(r + 1, saved, meta)
      guard.phase('plots', r + 1)
    if plan.ends_epoch(r) and not last:  # the end of the run plots after the summary
      summary.plots(workdir, s.writer)
    if stop:
      bar.close()
      s.writer.close()
      s.ckpt.close()
      return resume.stopped(cfg, stop, stop_signal, s.ckpt, workdir, r + 1, plan.total_rounds)
  bar.close()

  guard.phase('summary')
  result = summary.summarize(cfg, plan, history, meta, workdir, time.time() - t0)
  result.update(guard.fault_counts(s.writer.path))  # retried / skipped non-finite rounds
  s.writer.write_json('summary.json', result)
  summary.plots(workdir, s.writer)
  s.writer.close()
  s.ckpt.close()
  return result


def maybe_initialize_distributed(cfg) -> None:
  """config.mesh.distributed: 'auto' (follow the environment), 'on' or 'off'."""
  choices = {'auto': None, 'on': True, 'off': False}
  if cfg.mesh.distributed not in choices:
    raise ValueError(f'config.mesh.distributed={cfg.mesh.distributed!r} is invalid: must be '
                     f'one of {sorted(choices)}.')
  parallel.maybe_initialize_distributed(choices[cfg.mesh.distributed])




YNN_FUSION_FLAG = '--xla_cpu_experimental_ynn_fusion_type'


def apply_runtime(cfg, environ=os.environ) -> Optional[str]:
  """config.runtime -> XLA_FLAGS, before JAX starts a backend (XLA reads the variable
  once, when it creates the first client). Returns the flag added, or None: the
  setting asks for nothing, the user's XLA_FLAGS already decides it, or the backends
  are already running (then a warning says the setting had no effect)."""
  runtime = cfg.get('runtime') or {}  # a user's config from before this section: the default
  if runtime.get('xla_cpu_ynn_fusions', False):
    return None
  flags = environ.get('XLA_FLAGS', '')
  if YNN_FUSION_FLAG in flags:
    return None
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    print(f'Warning: config.runtime.xla_cpu_ynn_fusions=False not applied: JAX\'s backends '
          f'are already running. Set XLA_FLAGS="{YNN_FUSION_FLAG}=" before the process '
          'starts, or call experiments.run before any JAX computation.')
    return None
  flag = f'{YNN_FUSION_FLAG}='
  environ['XLA_FLAGS'] = f'{flags} {flag}'.strip()
  return flag

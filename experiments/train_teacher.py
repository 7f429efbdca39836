"""Trains a classifier on real labeled data: teachers, and students from scratch.

  python -m experiments.train_teacher --config=configs/teacher_fashion_mnist.py \
      --workdir=runs/teacher_wrn_16_2
  python -m experiments.train_teacher --config=configs/teacher.py:cifar10,wrn_40_2 \
      --config.data.dir=data/cifar10 --workdir=runs/teacher_cifar10_wrn_40_2

configs/teacher.py is the reference's recipe for every dataset (multistep lr);
configs/teacher_fashion_mnist.py the shipped teacher's (cosine).

Evaluates on the test split every epoch, logs to <workdir>/metrics.jsonl,
checkpoints the full train state (orbax) every `log.checkpoint_every_steps`
steps and at each epoch end, and resumes from the latest checkpoint when the
same workdir is used again (mid-epoch too: the shuffling of every epoch is a
function of (seed, epoch), so a resumed run sees the same batches). At the end
the teacher is exported to <workdir>/teacher (or `export_dir`) in the format
`cmi_jax.teacher_io.load_teacher` reads.

A split held in memory (every dataset but ImageNet) lives on the device and is
augmented there (crop + flip, cmi_jax.augment). ImageNet's train split streams:
each batch is decoded on the host through RandomResizedCrop + flip
(cmi_jax.data.images.decode_train) while the previous step runs, with draws
that are a function of (seed, step), so the resume stays exact.
"""

import concurrent.futures
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from cmi_jax import augment, data, models
from cmi_jax.checkpoint import Checkpointer, abstract
from cmi_jax.data.images import train_draws
from cmi_jax.distill import classifier_step, evaluate, make_eval_fn, supervised_loss
from cmi_jax.report import MetricWriter
from cmi_jax.state import create_classifier_state, sgd
from experiments.run_config import epoch_schedule

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (checkpoints, metrics, teacher).')


def lr_schedule(train_cfg, steps_per_epoch: int, total_steps: int):
  """The learning rate per step from the config's train section (run_config.epoch_schedule:
  'cosine', the default, per step; 'multistep', the reference's train_scratch.py)."""
  return epoch_schedule(train_cfg, steps_per_epoch, total_steps, 'train')


def streamed(split: data.Split) -> bool:
  """Whether a split's images stay on disk (ImageNet) rather than in memory."""
  return isinstance(split.images, data.FolderImages)


class StreamedBatches:
  """The batches of a streamed train split, decoded through the train transform one
  step ahead on a host thread (the device runs the step meanwhile).

  Step s takes the images `order[i * B:(i + 1) * B]` of its epoch's shuffle and the
  draws `data.images.train_draws(seed, s, B)`: nothing depends on what ran before,
  so a resumed run decodes the same batches.
  """

  def __init__(self, split: data.Split, info: data.DatasetInfo, seed: int, batch_size: int):
    self.split, self.info, self.seed, self.bs = split, info, seed, batch_size
    self.pool = concurrent.futures.ThreadPoolExecutor(1)
    self.pending = None
    self.queue = []

  def _decode(self, idx: np.ndarray, step: int):
    draws, flips = train_draws(self.seed, step, len(idx))
    x = self.split.images.train_views(idx, draws, flips, self.info.crop_scale)
    return x, self.split.labels[idx]  # [B, H, W, C] uint8, [B] int32

  def start(self, order: np.ndarray, first: int, step: int, count: int) -> None:
    """Queues `count` steps: batch `first + k` of the epoch's `order` at global step
    `step + k`."""
    self.queue = [(order[(first + k) * self.bs:(first + k + 1) * self.bs], step + k)
                  for k in range(count)]
    self._submit()

  def _submit(self) -> None:
    self.pending = self.pool.submit(self._decode, *self.queue.pop(0)) if self.queue else None

  def next(self):
    """The next step's (images, labels); starts decoding the one after."""
    out = self.pending.result()  # re-raises a decoding error (file named)
    self._submit()
    return out

  def close(self) -> None:
    self.pool.shutdown(wait=True, cancel_futures=True)


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) the training described by `cfg`; returns the summary dict."""
  lr_schedule(cfg.train, 1, 1)  # a bad train.schedule fails before the data load
  data_dir = cfg.data.dir or None
  options = data.config_options(cfg.data)  # data.image_size etc., where the config has them
  info = data.get_info(cfg.data.name, data_dir, **options)
  train_split = data.load(cfg.data.name, 'train', data_dir, cfg.data.backend,
                          limit=cfg.data.train_limit, **options)
  test_split = data.load(cfg.data.name, 'test', data_dir, cfg.data.backend,
                         limit=cfg.data.test_limit, **options)
  n, bs = len(train_split.labels), cfg.train.batch_size
  if bs > n:
    raise ValueError(f'train.batch_size={bs} exceeds the {n} training images.')
  steps_per_epoch = n // bs
  total_steps = steps_per_epoch * cfg.train.epochs

  module = models.get(cfg.model.arch, info.num_classes)
  schedule = lr_schedule(cfg.train, steps_per_epoch, total_steps)
  tx = sgd(schedule, cfg.train.momentum, cfg.train.weight_decay, cfg.train.nesterov)
  root = jax.random.key(cfg.seed)
  init_key, aug_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  state = create_classifier_state(module, init_key, (1,) + info.image_shape, tx)

  # Resume order: the workdir's latest checkpoint, else a fresh init.
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  restored = ckpt.restore(abstract(state))
  history = []
  if restored is not None:
    state, meta = restored
    history = meta.get('history', [])
    logging.info('Resumed from step %d (%s).', int(state.step), ckpt.directory)

  def fit(state, x, y):  # x: [B, H, W, C] normalized, y: [B]
    state, m = classifier_step(state, x, supervised_loss(y))
    acc = jnp.mean(jnp.argmax(m['logits'], -1) == y)
    return state, {'loss': m['loss'], 'accuracy': 100.0 * acc, 'lr': schedule(state.step - 1)}

  stream = streamed(train_split)
  if stream:
    if not info.crop_scale:
      raise ValueError(f'{cfg.data.name} streams its train split but has no RandomResizedCrop '
                       'scale (DatasetInfo.crop_scale) to train on.')
    batches = StreamedBatches(train_split, info, cfg.seed, bs)
    step_fn = jax.jit(lambda state, x, y: fit(state, augment.normalize(augment.to_float(x),
                                                                       info.mean, info.std), y))
  else:
    images = jnp.asarray(train_split.images)  # device-resident training set
    labels = jnp.asarray(train_split.labels)

    @jax.jit
    def in_memory_step(state, images, labels, idx):  # the split as arguments, not constants
      rng = jax.random.fold_in(aug_key, state.step)
      x = augment.standard_train_view(rng, images[idx], info.crop_padding, info.flip,
                                      info.mean, info.std)
      return fit(state, x, labels[idx])

  eval_fn = make_eval_fn(module, info.mean, info.std)
  writer = MetricWriter(workdir)
  writer.truncate_after(int(state.step))  # rows a crashed run logged after its checkpoint
  writer.write_json('config.json', cfg.to_dict())

  def save(step):
    ckpt.save(step, state, {'step': step, 'history': history, 'arch': cfg.model.arch})

  step = int(state.step)
  bar = tqdm(total=total_steps, initial=step, desc=f'train {cfg.model.arch}', unit='step',
             dynamic_ncols=True)
  t0 = time.time()
  while step < total_steps:
    epoch = step // steps_per_epoch
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    first = step % steps_per_epoch
    if stream:
      batches.start(order, first, step, steps_per_epoch - first)
    for i in range(first, steps_per_epoch):
      if stream:
        state, metrics = step_fn(state, *batches.next())
      else:
        state, metrics = in_memory_step(state, images, labels,
                                        jnp.asarray(order[i * bs:(i + 1) * bs]))
      step += 1
      bar.update(1)
      if step % cfg.log.every_steps == 0:
        m = {k: float(v) for k, v in metrics.items()}
        writer.write_scalars(step, {f'train/{k}': v for k, v in m.items()})
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.1f}")
      if step % cfg.log.checkpoint_every_steps == 0 and step % steps_per_epoch:
        save(step)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    ev = evaluate(eval_fn, variables, test_split.images, test_split.labels,
                  cfg.train.eval_batch_size)
    history.append({'epoch': epoch + 1, 'step': step, 'test_accuracy': ev['accuracy'],
                    'test_loss': ev['loss']})
    writer.write_scalars(step, {'epoch': epoch + 1, 'test/accuracy': ev['accuracy'],
                                'test/loss': ev['loss'], 'elapsed_s': time.time() - t0})
    bar.write(f'epoch {epoch + 1}/{cfg.train.epochs}: test accuracy {ev["accuracy"]:.2f}% '
              f'loss {ev["loss"]:.4f}')
    save(step)
  bar.close()
  if stream:
    batches.close()

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  final = history[-1] if history else {}
  export_dir = cfg.export_dir or os.path.join(workdir, 'teacher')
  from cmi_jax import teacher_io  # pylint: disable=g-import-not-at-top
  teacher_io.save_teacher(
      export_dir, arch=cfg.model.arch, num_classes=info.num_classes,
      input_shape=info.image_shape, variables=variables,
      meta={'dataset': cfg.data.name, 'test_accuracy': final.get('test_accuracy'),
            'epochs': cfg.train.epochs, 'steps': step, 'seed': cfg.seed},
      overwrite=True)  # re-running a finished workdir re-exports the same weights
  summary = {'arch': cfg.model.arch, 'dataset': cfg.data.name,
             'test_accuracy': final.get('test_accuracy'), 'history': history,
             'teacher_dir': os.path.abspath(export_dir)}
  writer.write_json('summary.json', summary)
  writer.close()
  ckpt.close()
  return summary


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cfg = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('runs', f'train_{cfg.data.name}_{cfg.model.arch}')
  summary = train(cfg, workdir)
  print(f"Done: {summary['arch']} on {summary['dataset']}: test accuracy "
        f"{summary['test_accuracy']:.2f}%; teacher saved to {summary['teacher_dir']}")


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  from cmi_jax import errors  # pylint: disable=g-import-not-at-top
  app.run(errors.main_guard(main), flags_parser=errors.parse_flags)  # user errors: one line

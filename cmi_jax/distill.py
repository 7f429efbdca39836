"""Classifier updates and evaluation: the KD step (student from the teacher on
synthetic images) and the supervised step (teachers / students from scratch)
share one update, `classifier_step`; the KD step's pmap shim (`pmap_kd_step`)
and the multi-host evaluation (`evaluate_on_hosts`) sit beside their steps.
KD batches come from the image pool (`kd_steps`; with pre-inverted images beside
it: `PoolWithInit`) or from a transfer set held on device (`epoch_kd_steps`).
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import flax.linen as nn
from flax import struct

from cmi_jax import augment, parallel
from cmi_jax.models import fold
from cmi_jax.parallel import constrain
from cmi_jax.state import ClassifierState, select
from cmi_jax.synthesis.bank import RingBuffer, ring_sample
from cmi_jax.synthesis.gan import FreshSource
from cmi_jax.synthesis.gan import sample as gan_sample
from cmi_jax.synthesis.losses import kl_per_sample
from cmi_jax.teacher import Teacher


KD_LOSSES = ('kl', 'l1')


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean (reference KD criterion)."""
  return jnp.mean(kl_per_sample(teacher_logits, student_logits, temperature)) * temperature ** 2


@dataclasses.dataclass(frozen=True)
class KDConfig:
  """Static hyperparameters of the distillation step (hashable: a jit static arg)."""
  batch_size: int = 128
  loss: str = 'kl'            # 'kl' (KL * T^2) or 'l1' (DFAD: mean |s - t| of logits)
  temperature: float = 20.0
  crop_padding: int = 4       # the dataset's standard augmentation on pool images
  flip: bool = True
  crop_scale: Tuple[float, ...] = ()  # set: RandomResizedCrop(scale) + flip instead (ImageNet)
  mean: Tuple[float, ...] = (0.0,)
  std: Tuple[float, ...] = (1.0,)
  augment: bool = True
  kd_weight: float = 1.0      # vanilla_kd.py's alpha: weight of the KD term
  label_weight: float = 0.0   # ... and beta: CE on the images' labels (when given)

  def objective(self, student_logits, teacher_logits, labels=None):
    if self.loss == 'kl':
      loss = kd_loss(student_logits, teacher_logits, self.temperature)
    elif self.loss == 'l1':
      loss = jnp.mean(jnp.abs(student_logits - teacher_logits))
    else:
      raise ValueError(f'kd.loss must be one of {KD_LOSSES}, got {self.loss!r}.')
    if self.kd_weight != 1.0:
      loss = self.kd_weight * loss
    if labels is not None and self.label_weight:  # DF:vanilla_kd.py:320-329
      loss = loss + self.label_weight * supervised_loss(labels)(student_logits)
    return loss


def classifier_step(state: ClassifierState, x: jax.Array,
                    loss_of_logits: Callable[[jax.Array], jax.Array],
                    axis_name: Optional[str] = None
                    ) -> Tuple[ClassifierState, Dict[str, jax.Array]]:
  """One optimizer step of a BN classifier in train mode on normalized images x.

  loss_of_logits maps the [N, K] logits to the scalar loss (CE on labels, or KD).
  Non-finite losses leave the state unchanged (no NaN ever reaches the params).
  axis_name: only under pmap (`parallel.pmap_kd_step`): the loss and gradients
  are averaged over that axis (equal per-device batches, so this is the
  gradient of the global-batch loss); mesh-jit needs nothing.
  """
  chex.assert_rank(x, 4)

  def loss_fn(params):
    logits, new_vars = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, x,
                                      train=True, mutable=['batch_stats'])
    return loss_of_logits(logits), (logits, new_vars['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    loss, grads = jax.lax.pmean((loss, grads), axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  ok = jnp.isfinite(loss)
  new_state = select(ok, new_state, state)
  return new_state, {'loss': loss, 'logits': logits, 'finite': ok}


def kd_step(cfg: KDConfig, state: ClassifierState, teacher: Teacher, images: jax.Array,
            rng: jax.Array, axis_name: Optional[str] = None,
            labels: Optional[jax.Array] = None
            ) -> Tuple[ClassifierState, Dict[str, jax.Array]]:
  """One KD step on a batch of images in [0, 1] (uint8 or float).

  Pool images get the dataset's standard augmentation (cfg.augment), then the
  frozen teacher's logits (no gradient) are the target of cfg.objective.
  axis_name: only under pmap, where `images` is this device's slice of the
  global batch (see classifier_step); the augmentation is then drawn for the
  global batch and sliced, so pmap and mesh-jit see the same views.
  labels: [B] class ids of the images (a labeled transfer set): the objective
  adds cfg.label_weight x CE, and `label_accuracy` is reported.
  """
  x = augment.to_float(images)
  if cfg.augment:
    n, offset = x.shape[0], 0
    if axis_name is not None:
      offset = jax.lax.axis_index(axis_name) * n
      n = n * jax.lax.psum(1, axis_name)
    if cfg.crop_scale:
      warp = augment.resized_crop_flip(rng, n, x.shape[1:3], cfg.crop_scale, flip=cfg.flip)
    else:
      warp = augment.crop_flip(rng, n, x.shape[1:3], cfg.crop_padding, cfg.flip)
    if axis_name is not None:
      warp = jax.tree_util.tree_map(
          lambda a: jax.lax.dynamic_slice_in_dim(a, offset, x.shape[0]), warp)
    x = augment.apply_warp(x, warp)
  x = augment.normalize(x, cfg.mean, cfg.std)
  t_logits = teacher(x, taps=False).logits
  state, m = classifier_step(state, x, lambda s: cfg.objective(s, t_logits, labels), axis_name)
  agree = jnp.mean(jnp.argmax(m['logits'], -1) == jnp.argmax(t_logits, -1))
  metrics = {'kd_loss': m['loss'], 'kd_agreement': 100.0 * agree}
  if labels is not None:
    metrics['label_accuracy'] = 100.0 * jnp.mean(jnp.argmax(m['logits'], -1) == labels)
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  return state, metrics


@struct.dataclass
class PoolWithInit:
  """The image pool plus a fixed set of pre-inverted images (the reference's
  `--cmi_init`): KD draws from both, the bank never sees the init images."""
  pool: RingBuffer
  init: jax.Array   # [M, H, W, C] uint8, on device like the pool


def union_sample(source: PoolWithInit, rng: jax.Array, k: int) -> jax.Array:
  """k images drawn uniformly with replacement from the pool's filled slots and
  the init images together: index i < count is pool slot i, else init image
  i - count (DF:contrastive.py:342-356, ConcatDataset([pool, init]) shuffled)."""
  count, n_init = source.pool.count, source.init.shape[0]
  idx = jax.random.randint(rng, (k,), 0, count + n_init)
  pool_images = source.pool.data['images']
  from_pool = pool_images[jnp.minimum(idx, pool_images.shape[0] - 1)]
  from_init = source.init[jnp.clip(idx - count, 0, n_init - 1)]
  return jnp.where((idx < count)[:, None, None, None], from_pool, from_init)


def kd_steps(cfg: KDConfig, state: ClassifierState, teacher: Teacher,
             source: Union[RingBuffer, PoolWithInit, FreshSource], rng: jax.Array,
             num_steps: int, data_sharding: Optional[Any] = None
             ) -> Tuple[ClassifierState, Dict[str, jax.Array]]:
  """`num_steps` KD steps in one scan, on batches drawn on device from `source`:
  the image pool (uniform over filled slots; with init images: uniform over
  both) or a generator (fresh samples).

  Each step's key is fold_in(rng, student step), so a resumed run draws the same
  batches. Returns the new state and the metrics averaged over the steps.
  """
  def body(state, _):
    key = jax.random.fold_in(rng, state.step)
    k_idx, k_aug = jax.random.split(key)
    if isinstance(source, RingBuffer):
      images = ring_sample(source, k_idx, cfg.batch_size)['images']
    elif isinstance(source, PoolWithInit):
      images = union_sample(source, k_idx, cfg.batch_size)
    else:
      images = gan_sample(source, k_idx, cfg.batch_size)
    return kd_step(cfg, state, teacher, constrain(images, data_sharding), k_aug)

  state, rows = jax.lax.scan(body, state, None, length=num_steps)
  return state, jax.tree_util.tree_map(jnp.mean, rows)


def epoch_kd_steps(cfg: KDConfig, state: ClassifierState, teacher: Teacher, images: jax.Array,
                   labels: Optional[jax.Array], batch_idx: jax.Array, rng: jax.Array,
                   data_sharding: Optional[Any] = None
                   ) -> Tuple[ClassifierState, Dict[str, jax.Array]]:
  """KD steps on a transfer set held on device, one per row of `batch_idx`
  [n, B] (the caller's epoch shuffle; DF:vanilla_kd.py's loop), in one scan.

  images: [N, H, W, C] uint8; labels: [N] class ids or None. Each step's
  augmentation key is fold_in(rng, student step), so a resumed run repeats it.
  Returns the new state and the metrics averaged over the steps.
  """
  chex.assert_rank(batch_idx, 2)

  def body(state, idx):
    x = constrain(images[idx], data_sharding)
    y = None if labels is None else constrain(labels[idx], data_sharding)
    return kd_step(cfg, state, teacher, x, jax.random.fold_in(rng, state.step), labels=y)

  state, rows = jax.lax.scan(body, state, batch_idx)
  return state, jax.tree_util.tree_map(jnp.mean, rows)


def pmap_kd_step(cfg, student_module, axis_name: str = parallel.PMAP_AXIS,
                 devices: Optional[Any] = None) -> Callable:
  """`kd_step` under `jax.pmap` (legacy shim; mesh-jit is the main path).

  Args:
    cfg: the distill.KDConfig.
    student_module: the student's Flax module (as built for the run); the shim
      rebuilds it with `axis_name` so its BN statistics are global.
    axis_name: the pmap axis name.
    devices: optional device list for pmap (default: all local devices).
  Returns:
    step(state, teacher, images, rng) -> (state, metrics). state, teacher and
    rng are broadcast to every device (pass them already replicated, e.g.
    `parallel.replicate`, to avoid a transfer per call); images is [n_dev, B / n_dev,
    H, W, C] (`parallel.split_for_pmap`). state and metrics come back once, not stacked:
    kd_step pmeans loss and gradients, so every device holds the same values,
    equal to one mesh-jit kd_step on the whole batch (the augmentation is drawn
    for the global batch and sliced per device).
  """
  module = student_module.clone(axis_name=axis_name)

  def step(state, teacher, images, rng):
    new, metrics = kd_step(cfg, state.replace(apply_fn=module.apply), teacher, images, rng,
                           axis_name=axis_name)
    return new.replace(apply_fn=state.apply_fn), metrics

  pmapped = jax.pmap(step, axis_name=axis_name, in_axes=(None, None, 0, None), out_axes=None,
                     devices=devices)

  def call(state, teacher, images, rng):
    # pmap (on shard_map) does not reshard a committed batch (e.g. one computed
    # from replicated arrays): place it on the pmap devices, split, first.
    devs = list(devices) if devices is not None else jax.local_devices()[:images.shape[0]]
    split = NamedSharding(Mesh(np.asarray(devs), (axis_name,)), P(axis_name))
    return pmapped(state, teacher, jax.device_put(images, split), rng)

  return call


def supervised_loss(labels: jax.Array) -> Callable[[jax.Array], jax.Array]:
  return lambda logits: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_eval_fn(model: Union[nn.Module, Callable], mean, std) -> Callable:
  """Jitted (variables, uint8 images, labels, valid mask) -> (#correct, summed CE).

  model: a classifier module, run in inference form (BN folded into the convs,
  `models.fold`: the unfolded logits within float32 rounding), or any
  apply(variables, x, train=False) function, run as it is.
  """
  from cmi_jax.augment import normalize, to_float  # pylint: disable=g-import-not-at-top
  if isinstance(model, nn.Module):
    apply_fn = lambda variables, x, train: fold.inference_apply(model, variables, x)
  else:
    apply_fn = model

  @jax.jit
  def eval_batch(variables, images, labels, valid):
    logits = apply_fn(variables, normalize(to_float(images), mean, std), train=False)
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return correct, jnp.sum(jnp.where(valid, ce, 0.0))
  return eval_batch


def evaluate(eval_fn: Callable, variables, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> Dict[str, float]:
  """Top-1 accuracy (%) and mean CE over a labeled split.

  Batches have a fixed size (the last is zero-padded and masked), so one
  compilation serves the whole split. `images` may be a `data.FolderImages`
  (ImageNet): each batch is decoded as it is read.
  """
  n = len(labels)
  if n == 0:
    raise ValueError('evaluate() got an empty split.')
  correct, ce = 0, 0.0
  for i in range(0, n, batch_size):
    xb, yb = np.asarray(images[i:i + batch_size]), labels[i:i + batch_size]
    m = len(yb)
    valid = np.arange(batch_size) < m
    if m < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - m,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros(batch_size - m, yb.dtype)])
    c, e = eval_fn(variables, xb, yb, valid)
    correct += int(c)
    ce += float(e)
  return {'accuracy': 100.0 * correct / n, 'loss': ce / n}


def evaluate_on_hosts(eval_fn: Callable, variables: Any, images: np.ndarray,
                      labels: np.ndarray, batch_size: int = 1000) -> Dict[str, float]:
  """`evaluate` where each host scores its `parallel.host_shard` of the split.

  Every process passes the whole split (or the same arrays) and gets the
  global accuracy (%) and mean CE back. On one host this is `evaluate`.
  """
  n = len(labels)
  if n == 0:
    raise ValueError('evaluate_on_hosts() got an empty split.')
  sl = parallel.host_shard(n)
  local = sl.stop - sl.start
  # Host copies of the (replicated) variables: the local evaluation then runs
  # on this host's default device without touching other hosts.
  variables = jax.device_get(variables)
  totals = np.zeros(3, np.float64)
  if local:
    ev = evaluate(eval_fn, variables, images[sl], labels[sl], batch_size)
    totals[:] = (ev['accuracy'] * local / 100.0, ev['loss'] * local, local)
  # Python floats: the multi-host gather returns numpy (float32) scalars, which
  # JSON (metrics, checkpoint meta) does not take.
  correct, ce, count = (float(v) for v in parallel.host_sum(totals))
  return {'accuracy': 100.0 * correct / count, 'loss': ce / count}

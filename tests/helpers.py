"""Shared test helpers (imported by test modules; not a test module itself)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(cache_dir, **extra):
  """The test process's environment for a `python -m experiments...` subprocess:
  the repository on PYTHONPATH and the session's persistent compilation cache
  with XLA's slow optimizations off (as the `compilation_cache` fixture sets)."""
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             JAX_THREEFRY_PARTITIONABLE='1', PYTHONPATH=ROOT, **extra)
  return env


def abstract_variables(module, shape, **kwargs):
  """Variables as ShapeDtypeStructs (no real init cost)."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), **kwargs))


def random_variables(module, shape, seed=0, **init_kwargs):
  """Random params/batch_stats of the right shapes, drawn in numpy (real init is slow
  on a busy CPU); kernels scaled by 1/sqrt(fan_in), running stats non-trivial."""
  rng = np.random.default_rng(seed)
  abstract = abstract_variables(module, shape, **init_kwargs)

  def draw(path, x):
    name = path[-1].key
    if name == 'kernel':
      v = rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    elif name in ('scale', 'var'):
      v = rng.uniform(0.5, 1.5, size=x.shape)
    else:  # bias, mean
      v = 0.1 * rng.normal(size=x.shape)
    return jnp.asarray(v, x.dtype)
  return {k: jax.tree_util.tree_map_with_path(draw, abstract[k])
          for k in ('params', 'batch_stats')}


def load_checkpoint(workdir, step=None):
  """(state as nested dicts of numpy arrays, meta) of a run's checkpoint (default:
  the latest), read with orbax alone (independent of the runner's code) onto this
  process's first device, whatever devices or processes saved it."""
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               item_handlers={'state': ocp.StandardCheckpointHandler(),
                                              'meta': ocp.JsonCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  local = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
      mngr.item_metadata(step)['state'])
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                   meta=ocp.args.JsonRestore()))
  mngr.close()
  return jax.tree_util.tree_map(np.asarray, out['state']), out['meta']


def teacher_student(num_classes, shape, dtype=None):
  """A wrn_16_1 teacher whose running statistics are those of random images (so L_bn
  is of a realistic size) and a student near it (so the adversarial mask is not all
  zero): the pair the round tests distill between."""
  from cmi_jax import models  # pylint: disable=g-import-not-at-top
  from cmi_jax.teacher import Teacher  # pylint: disable=g-import-not-at-top
  module = models.get('wrn_16_1', num_classes, dtype=dtype)
  t_vars = models.init(module, jax.random.key(0), (2,) + tuple(shape))
  x = (jax.random.uniform(jax.random.key(9), (32,) + tuple(shape)) - 0.5) / 0.25
  _, new = module.apply(t_vars, x, train=True, mutable=['batch_stats', 'taps'])
  stats = jax.tree_util.tree_map(lambda n, o: (n - 0.9 * o) / 0.1, new['batch_stats'],
                                 t_vars['batch_stats'])
  teacher = Teacher(module, {'params': t_vars['params'], 'batch_stats': stats})
  noise = models.init(module, jax.random.key(1), (2,) + tuple(shape))['params']
  params = jax.tree_util.tree_map(lambda a, e: a + 0.3 * e * jnp.std(a), t_vars['params'], noise)
  return teacher, Teacher(module, {'params': params, 'batch_stats': stats})


class Interrupt(Exception):
  """Stands for a kill in the resume tests."""


def train_interrupted_then_resumed(cfg, workdir, crash_step):
  """experiments.train_teacher.train killed when it logs step `crash_step`, then the
  same call again (it resumes); returns the resumed run's summary."""
  import pytest  # pylint: disable=g-import-not-at-top
  from experiments import train_teacher  # pylint: disable=g-import-not-at-top
  original = train_teacher.MetricWriter.write_scalars

  def crash(self, step, scalars):
    if step == crash_step:
      raise Interrupt()
    return original(self, step, scalars)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train_teacher.MetricWriter, 'write_scalars', crash)
    with pytest.raises(Interrupt):
      train_teacher.train(cfg, str(workdir))
  return train_teacher.train(cfg, str(workdir))


def have_fmnist_test() -> bool:
  """Whether the Fashion-MNIST test split is found (it ships in the repo)."""
  from cmi_jax import data  # pylint: disable=g-import-not-at-top
  try:
    data.load('fashion_mnist', 'test')
  except data.DataNotFoundError:
    return False
  return True


def fails_fast(run, cfg, workdir, exc, *patterns):
  """`run(cfg, workdir)` raises `exc` (a cmi_jax UserError) whose message holds every
  pattern, before anything is jit-compiled and without adding a checkpoint.

  The one check of the "bad input is refused before compiling" rule for every entry point
  (runner.run, transfer_kd.run, ...): `jax.jit` is patched to fail, so a message that only
  comes after a compile fails the test. Returns the message."""
  import pytest
  from cmi_jax import errors

  def no_jit(*a, **k):
    raise AssertionError('compiled before the error')

  def steps():
    d = os.path.join(str(workdir), 'checkpoints')
    return sorted(os.listdir(d)) if os.path.isdir(d) else []
  before = steps()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax, 'jit', no_jit)
    with pytest.raises(exc) as e:
      run(cfg, str(workdir))
  assert isinstance(e.value, errors.UserError), type(e.value)
  for p in patterns:
    assert p in str(e.value), (p, str(e.value))
  assert steps() == before
  return str(e.value)


def fake_imagenet(root, classes=3, per_class=4, n_val=2):
  """An ImageNet folder of the standard layout under `root`: train/<wnid>/*.JPEG
  (`per_class` each) and val/<wnid>/*.JPEG (`n_val` each), of assorted sizes, class k
  of brightness ~40 + 80k; returns `root` as a string."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in (('train', per_class), ('val', n_val)):
    for k in range(classes):
      folder = os.path.join(root, split, f'n{k:08d}')
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        hw = (20 + 5 * i, 30 - 3 * k)
        img = np.clip(40 + 80 * k + rng.integers(-20, 21, hw + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f'n{k:08d}_{i}.JPEG'), format='JPEG')
  return str(root)

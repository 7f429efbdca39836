"""Test setup: 4 fake CPU devices (multi-device tests need them; single-device
code simply runs on device 0). Must run before JAX initializes its backend."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_threefry_partitionable', True)


import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_CACHE_FLAGS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
                'jax_persistent_cache_min_entry_size_bytes', 'jax_disable_most_optimizations')


def _reset_compilation_cache():
  try:
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
  """One persistent-compilation-cache folder for the whole session, shared by the
  pytest-xdist workers (their base temps are siblings), so that a program one
  worker compiled is a lookup for the other. A half-written entry read by the
  other worker is a cache miss with a warning (JAX recompiles), never an error."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  return str(base / 'jax_cache')


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(cache_dir):
  """For every test module: a persistent compilation cache shared by the modules and
  workers of one session (runs rebuild their jitted closures, so identical programs
  recompile; the cache turns that into a lookup) and XLA's slow optimizations off (the
  suite is compile-bound: measured x0.70-0.74 of the wall time on the files that had
  run with full optimizations, same tests passing); the previous settings are restored
  at the end. Modules that run whole experiments still name it
  (`pytestmark = pytest.mark.usefixtures('compilation_cache')`) to say they rely on it."""
  old = {name: jax.config.values[name] for name in _CACHE_FLAGS}
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  jax.config.update('jax_disable_most_optimizations', True)
  _reset_compilation_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  _reset_compilation_cache()

"""Test setup: 4 fake CPU devices (multi-device tests need them; single-device
code simply runs on device 0). Must run before JAX initializes its backend."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_threefry_partitionable', True)

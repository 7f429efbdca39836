"""What CMI's contrastive state costs per device, checked before anything compiles.

The head is Linear(D, D) -> ReLU -> Linear(D, head_dim) (`head_kind='mlp'`, the
reference's), so its parameters grow with D^2, and the bank holds bank_size rows
of 2D float32 features: D is the width of the teacher's contrastive features
(`synthesis.feature_layers`). A resnet50 teacher with every BN input (D = 26560)
needs a 705M-parameter head and an 8.7 GB bank; with 'stages' a few thousand
dimensions. The head, its Adam moments, its gradient, the bank and the image pool
are replicated on every device (cmi_jax.parallel), so each device holds all of it;
a pool sharded over n devices (`pool_shards`, kd.pool_mode='sharded') counts 1/n.

The budget per device: `synthesis.memory_budget_gb` when set (> 0); otherwise
the device's `bytes_limit` from `memory_stats()` (GPU/TPU); otherwise (CPU, where
jax reports none) the host's physical RAM divided by the local device count,
since CPU devices share the host's memory.
"""

import os
from typing import NamedTuple, Tuple

import jax

from cmi_jax.errors import ConfigError
from cmi_jax.synthesis.config import SynthesisConfig
from cmi_jax.synthesis.round_kit import feature_dim
from cmi_jax.teacher import Teacher

_F32 = 4
# Head bytes per parameter: the parameter, its gradient and Adam's two moments.
_HEAD_COPIES = 4


class Footprint(NamedTuple):
  feature_dim: int
  head_params: int
  head_bytes: int     # params + gradient + Adam moments, float32
  bank_bytes: int     # [bank_size, 2D] float32
  pool_bytes: int     # [pool_size, H, W, C] uint8 + [pool_size] int32 targets, / pool_shards
  budget_bytes: int
  budget_source: str

  @property
  def total_bytes(self) -> int:
    return self.head_bytes + self.bank_bytes + self.pool_bytes

  @property
  def message(self) -> str:
    return (f'CMI contrastive state per device: feature dim D={self.feature_dim}, head '
            f'{self.head_params:,} parameters ({_gb(self.head_bytes)} with gradient '
            f'and Adam), bank {_gb(self.bank_bytes)}, pool {_gb(self.pool_bytes)}; total '
            f'{_gb(self.total_bytes)} of {_gb(self.budget_bytes)} ({self.budget_source}).')


def _gb(n: int) -> str:
  """Bytes in GB (MB, kB below them), 3 decimals."""
  for unit, scale in (('GB', 1e9), ('MB', 1e6)):
    if n >= scale:
      return f'{n / scale:.3f} {unit}'
  return f'{n / 1e3:.3f} kB'


def head_params(d: int, kind: str, head_dim: int) -> int:
  """Parameters of the contrastive head (cmi_jax.models.head) on D-dim features."""
  if kind == 'mlp':
    return d * d + d + d * head_dim + head_dim
  if kind == 'linear':
    return d * head_dim + head_dim
  return 0


def memory_budget(cfg: SynthesisConfig) -> Tuple[int, str]:
  """(bytes per device, where the figure comes from); see the module docstring."""
  if cfg.memory_budget_gb > 0:
    return int(cfg.memory_budget_gb * 1e9), 'synthesis.memory_budget_gb'
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without the query raise)
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.platform} device memory'
  try:
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return 0, 'unknown (set synthesis.memory_budget_gb)'
  n = jax.local_device_count()
  return ram // n, f'host RAM / {n} local device(s)'


def footprint(cfg: SynthesisConfig, d: int) -> Footprint:
  """The per-device bytes of the head (+ Adam), bank and pool for D-dim features."""
  h, w, c = cfg.image_shape
  params = head_params(d, cfg.head_kind, cfg.head_dim)
  budget, source = memory_budget(cfg)
  return Footprint(d, params, _HEAD_COPIES * _F32 * params, cfg.bank_size * 2 * d * _F32,
                   cfg.pool_size * (h * w * c + 4) // max(cfg.pool_shards, 1), budget, source)


def check_fits(cfg: SynthesisConfig, d: int) -> Footprint:
  """The footprint, or a ConfigError (a ValueError) naming the figures and the fixes when it
  exceeds the budget (a budget of 0 bytes, unknown, is not enforced)."""
  fp = footprint(cfg, d)
  if fp.budget_bytes and fp.total_bytes > fp.budget_bytes:
    raise ConfigError(
        f'{fp.message} It does not fit. Choose fewer feature layers '
        "(synthesis.feature_layers='stages'), a smaller head (head_kind='linear': "
        f"{head_params(d, 'linear', cfg.head_dim):,} parameters) or bank "
        '(bank_size), or a pool of fewer images (pool_size); or raise '
        'synthesis.memory_budget_gb if the figure is wrong.')
  return fp


def startup_message(cfg: SynthesisConfig, teacher: Teacher) -> str:
  """The entry points' start-up line for CMI's round ('' for the other methods,
  which keep no head or bank)."""
  if cfg.algorithm != 'cmi':
    return ''
  return footprint(cfg, feature_dim(teacher, cfg.image_shape, cfg.feature_layers)).message

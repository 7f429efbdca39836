"""What every benchmark records: the machine it ran on, and the JSON it leaves."""

import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(__file__), 'results')


def machine_info() -> dict:
  """Backend, devices, CPU count and versions: timings mean nothing without them."""
  import jax  # pylint: disable=import-outside-toplevel  (scaling's parent sets XLA_FLAGS first)
  return {'backend': jax.default_backend(), 'devices': [str(d) for d in jax.devices()],
          'cpu_count': os.cpu_count(), 'machine': platform.machine(),
          'jax': jax.__version__}


def write_result(path: str, result: dict) -> None:
  """Writes `result` as indented JSON to `path` (creating its folder) and says where."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {path}')

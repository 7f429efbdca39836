"""Helpers shared by config files (big_vision's `parse_arg` pattern)."""

from typing import Dict, Optional


def parse_arg(arg: Optional[str], **defaults) -> Dict:
  """Parses the config's colon argument, e.g. 'wrn_16_1,quick' or 'arch=wrn_16_1,epochs=3'.

  `k=v` pairs set values (typed after the default); a bare word that names a
  boolean default sets it True; the first other bare word fills the key named
  by `_positional` (e.g. the architecture or the paper row).
  """
  out = dict(defaults)
  if not arg:
    return out
  for i, part in enumerate(p for p in arg.split(',') if p):
    if '=' in part:
      k, v = part.split('=', 1)
    elif part not in out and i == 0 and '_positional' in defaults:
      k, v = defaults['_positional'], part
    else:
      k, v = part, 'True'
    if k not in out:
      raise ValueError(f'Unknown config argument {k!r}; known: {sorted(x for x in out if not x.startswith("_"))}.')
    d = out[k]
    if isinstance(d, bool):
      v = v.lower() in ('1', 'true', 'yes')
    elif isinstance(d, int):
      v = int(v)
    elif isinstance(d, float):
      v = float(v)
    out[k] = v
  out.pop('_positional', None)
  return out

"""The README's commands and its library example stay true."""

import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')


def _blocks(lang):
  text = open(README, encoding='utf-8').read()
  return re.findall(rf'```{lang}\n(.*?)```', text, flags=re.S)


def test_readme_starts_with_exactly_two_setup_commands():
  text = open(README, encoding='utf-8').read()
  head = text.split('---', 1)[0]
  cmds = re.findall(r'```bash\n(.*?)```', head, flags=re.S)
  assert len(cmds) == 2
  run_cmd, test_cmd = (c.strip() for c in cmds)
  assert 'pip install -e .' in run_cmd and 'experiments.run --config=configs/fashion_mnist.py' in run_cmd
  assert 'pip install -e ".[dev]"' in test_cmd and test_cmd.endswith('python -m pytest')
  # CI runs the very same test command.
  ci = open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8').read()
  assert ci.strip().splitlines()[-1].strip() == 'python -m pytest'


@pytest.mark.usefixtures('compilation_cache')  # three synthesize calls: see conftest
def test_library_example_runs(monkeypatch):
  """Executes the README's Python example (the synthesize calls) as written."""
  monkeypatch.chdir(ROOT)
  example = next(b for b in _blocks('python') if 'cmi_jax.synthesize(' in b)
  scope = {}
  exec(compile(example, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  out, more, deepinv = scope['out'], scope['more'], scope['deepinv']
  assert out.images.shape == (32, 28, 28, 1) and out.images.dtype == np.uint8
  assert int(more.state.pool.count) == 48 and int(more.state.round) == 3
  assert deepinv.images.shape[0] == 16 and 'l_tv' in deepinv.metrics[0]


def test_readme_config_arguments_build():
  """Every `--config=configs/<file>.py[:arg]` in the README's commands builds."""
  import importlib  # pylint: disable=import-outside-toplevel
  found = set()
  for block in _blocks('bash'):
    found.update(re.findall(r'--config=configs/(\w+)\.py(?::(\S+))?', block))
  assert ('tiny_imagenet', 'resnet34-resnet18') in found
  assert ('teacher', 'tiny_imagenet,resnet34') in found
  for name, arg in sorted(found):
    cfg = importlib.import_module(f'configs.{name}').get_config(arg or None)
    assert cfg.seed == 0, (name, arg)

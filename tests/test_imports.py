"""The house order: the package's import graph (module-level and function-level
imports alike) has no cycle, no module imports another's private names, and the
device layer (`cmi_jax.parallel`) imports nothing of cmi_jax."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('cmi_jax', 'experiments')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules(package: str):
  return {_module_name(p): p for p in sorted((ROOT / package).rglob('*.py'))}


def _resolve(name: str, known) -> str:
  """The module an imported dotted name lives in (`a.b.c` -> `a.b` when c is a name in a.b)."""
  while name and name not in known:
    name = name.rpartition('.')[0]
  return name


def _imports(module: str, path: pathlib.Path, known):
  """(imported module, names taken from it) for every import statement, at any depth."""
  tree = ast.parse(path.read_text(), str(path))
  is_pkg = path.name == '__init__.py'
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = _resolve(alias.name, known)
        if target:
          yield target, ()
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        pkg = module.split('.') if is_pkg else module.split('.')[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = '.'.join(pkg + ([base] if base else []))
      for alias in node.names:
        full = f'{base}.{alias.name}'
        if full in known:  # `from pkg import submodule`
          yield full, ()
        else:
          target = _resolve(base, known)
          if target:
            yield target, (alias.name,)


def import_graph(packages=PACKAGES):
  """{module: {imported module: set of names imported from it}} over `packages`."""
  known = {}
  for package in packages:
    known.update(_modules(package))
  graph = {}
  for module, path in known.items():
    edges = graph.setdefault(module, {})
    for target, names in _imports(module, path, known):
      if target != module:
        edges.setdefault(target, set()).update(names)
  return graph


def find_cycle(graph):
  """One import cycle as a list of modules (first == last), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, {})):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_find_cycle_names_a_cycle():
  """The checker itself can fail: a planted circle is found and named."""
  graph = {'a': {'b': set()}, 'b': {'c': set()}, 'c': {'a': set()}, 'd': {'a': set()}}
  assert find_cycle(graph) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b': set()}, 'b': {}}) is None
  # A package importing its submodules is not a cycle; a submodule importing a name
  # from the package's __init__ that imports it is (the edge goes to the package).
  assert find_cycle({'p': {'p.m': set()}, 'p.m': {}}) is None
  assert find_cycle({'p': {'p.m': set()}, 'p.m': {'p': set()}}) == ['p', 'p.m', 'p']


def _private(name: str) -> bool:
  return name.startswith('_') and not name.startswith('__')


def _private_attribute_uses(module: str, path: pathlib.Path, known):
  """`alias._name` where alias is a module of the package bound by an import."""
  tree = ast.parse(path.read_text(), str(path))
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name in known:
          aliases[a.asname or a.name] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      for a in node.names:
        if f'{node.module}.{a.name}' in known:
          aliases[a.asname or a.name] = f'{node.module}.{a.name}'
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and _private(node.attr)):
      yield aliases[node.value.id], node.attr


def test_no_private_names_across_modules():
  known = {}
  for package in PACKAGES:
    known.update(_modules(package))
  bad = [(m, t, n) for m, edges in import_graph().items() for t, names in edges.items()
         for n in names if _private(n)]
  bad += [(m, t, n) for m, p in known.items() for t, n in _private_attribute_uses(m, p, known)
          if t != m]
  assert not bad, bad


def test_device_layer_is_the_bottom_floor():
  edges = import_graph()['cmi_jax.parallel']
  assert not [t for t in edges if t.startswith('cmi_jax')], sorted(edges)


@pytest.mark.parametrize('package', PACKAGES)
def test_no_module_over_400_lines(package):
  # "About 400": a module may run a little over while it reads as one unit.
  long = {m: n for m, p in _modules(package).items()
          if (n := len(p.read_text().splitlines())) > 420}
  assert not long, long


def test_config_names_every_algorithm_of_the_table():
  """config.py holds the names as a plain tuple (it imports no method): equal to the table."""
  from cmi_jax.synthesis import algorithms, config  # pylint: disable=import-outside-toplevel
  assert tuple(sorted(config.ALGORITHM_NAMES)) == tuple(sorted(algorithms.ALGORITHMS))


def test_old_config_import_path_still_works_with_a_warning():
  from cmi_jax.synthesis import cmi, config  # pylint: disable=import-outside-toplevel
  for name in ('SynthesisConfig', 'LossWeights'):
    with pytest.warns(DeprecationWarning, match=f'cmi.{name} moved to cmi_jax.synthesis.config'):
      assert getattr(cmi, name) is getattr(config, name)
  with pytest.warns(DeprecationWarning):
    from cmi_jax.synthesis.cmi import SynthesisConfig  # pylint: disable=import-outside-toplevel
  assert SynthesisConfig is config.SynthesisConfig
  with pytest.raises(AttributeError, match='no_such_name'):
    getattr(cmi, 'no_such_name')

"""The package's import graph: no cycle, and the method depends on nothing.

Read from the source with `ast` (every `import` and `from ... import`,
including those inside functions), so a lazy import cannot hide an arrow.
"""
import ast
import os

import pytest

PACKAGE = 'mixmo_jax'
ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _read(path):
  with open(path) as f:
    return f.read()


def _module_name(path):
  rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _modules():
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        out[_module_name(os.path.join(folder, f))] = os.path.join(folder, f)
  return out


def _imports(path, modules):
  """The package modules imported by the file at `path`."""
  tree = ast.parse(_read(path))
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    for name in names:
      if name in modules and name != PACKAGE:
        found.add(name)
  return found


@pytest.fixture(scope='module')
def graph():
  modules = _modules()
  return {m: _imports(p, modules) for m, p in modules.items()}


def _under(module, package):
  return module == package or module.startswith(package + '.')


def test_the_method_imports_nothing_else_of_the_package(graph):
  method = f'{PACKAGE}.mixmo'
  for module, deps in graph.items():
    if _under(module, method):
      outside = sorted(d for d in deps if not _under(d, method))
      assert not outside, f'{module} imports {outside}'


@pytest.mark.parametrize('package, forbidden', [
    ('data', ('mixmo', 'training', 'evaluation', 'models', 'cli', 'main')),
    ('evaluation', ('training', 'main', 'feed', 'progress')),
    ('models', ('training', 'data', 'evaluation', 'main')),
])
def test_forbidden_arrows(graph, package, forbidden):
  for module, deps in graph.items():
    if _under(module, f'{PACKAGE}.{package}'):
      bad = sorted(
          d for d in deps if any(
              _under(d, f'{PACKAGE}.{f}') for f in forbidden))
      assert not bad, f'{module} imports {bad}'


def test_no_import_cycle(graph):
  # Depth-first search for a back edge; a package's __init__ importing its
  # own submodules is the usual re-export, not a cycle.
  state, stack = {}, []

  def visit(module):
    state[module] = 'open'
    stack.append(module)
    for dep in graph[module]:
      if _under(dep, module):  # __init__ re-exporting a submodule.
        continue
      if state.get(dep) == 'open':
        cycle = stack[stack.index(dep):] + [dep]
        raise AssertionError(f'import cycle: {" -> ".join(cycle)}')
      if dep not in state:
        visit(dep)
    stack.pop()
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module)


def test_the_graph_is_read(graph):
  """Guards the checks above against an empty or broken graph."""
  assert f'{PACKAGE}.mixmo.blocks' in graph
  assert f'{PACKAGE}.mixmo.masks' in graph[f'{PACKAGE}.mixmo.blocks']
  assert f'{PACKAGE}.training' in graph[f'{PACKAGE}.main']
  assert f'{PACKAGE}.optim' in graph[f'{PACKAGE}.training']


def test_importing_the_package_starts_no_backend():
  # An array built at import time starts the XLA backend: after it,
  # jax.distributed.initialize refuses to run and the platform's XLA flags
  # (mixmo_jax.platform) no longer apply. Checked in a fresh interpreter.
  import subprocess
  import sys
  code = ('import importlib, pkgutil, mixmo_jax\n'
          'for m in pkgutil.walk_packages(mixmo_jax.__path__, "mixmo_jax."):\n'
          '  importlib.import_module(m.name)\n'
          'from jax._src import xla_bridge\n'
          'started = sorted(xla_bridge._backends)\n'
          'assert not started, f"importing mixmo_jax started {started}"\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def _private_jax_imports(path):
  """The `jax._src...` modules a file imports (at any depth)."""
  found = []
  for node in ast.walk(ast.parse(_read(path))):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
             [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
    found += [n for n in names if n == 'jax._src' or n.startswith('jax._src.')]
    if isinstance(node, ast.ImportFrom) and node.module == 'jax':
      found += [f'jax.{a.name}' for a in node.names if a.name == '_src']
  return found


def test_no_private_jax_api(tmp_path):
  """jax._src is jax's private tree: it moves between releases. No module
  imports it, the opt-in contrib kernels included (they are FFI calls)."""
  offenders = {}
  for module, path in _modules().items():
    found = _private_jax_imports(path)
    if found:
      offenders[module] = found
  assert not offenders, offenders
  # The check sees what it should.
  planted = tmp_path / 'planted.py'
  planted.write_text('from jax._src.interpreters import mlir\n'
                     'from jax import _src\n')
  assert _private_jax_imports(
      str(planted)) == ['jax._src.interpreters', 'jax._src']


def test_the_core_does_not_import_contrib(graph):
  """Deleting mixmo_jax/contrib leaves the core whole: only the models'
  conv selector names it, lazily, behind its setting."""
  for module, deps in graph.items():
    if _under(module, f'{PACKAGE}.contrib'):
      continue
    contrib = sorted(d for d in deps if _under(d, f'{PACKAGE}.contrib'))
    if module == f'{PACKAGE}.models.common':
      assert contrib == [
          f'{PACKAGE}.contrib.onednn', f'{PACKAGE}.contrib.onednn.conv'
      ], contrib
    else:
      assert not contrib, f'{module} imports {contrib}'


def test_one_version_number():
  """mixmo_jax.__version__ is the version setup.py installs and the one
  CITATION.cff names."""
  import importlib.metadata
  import re
  import mixmo_jax
  root = os.path.dirname(ROOT)
  with open(os.path.join(root, 'CITATION.cff')) as f:
    cited = re.search(r'^version: (\S+)$', f.read(), re.M).group(1)
  assert cited == mixmo_jax.__version__
  assert importlib.metadata.version('mixmo_jax') == mixmo_jax.__version__


def test_the_validator_declares_no_vocabulary_of_its_own():
  """Every `c.choice(field, allowed)` of config_validation takes `allowed`
  from the module that implements it, never a literal written twice."""
  path = _modules()[f'{PACKAGE}.config_validation']
  literals, choices = [], 0
  for node in ast.walk(ast.parse(_read(path))):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
        node.func.attr == 'choice' and len(node.args) == 2):
      choices += 1
      if isinstance(node.args[1], (ast.Tuple, ast.List, ast.Set)):
        literals.append(ast.literal_eval(node.args[0]))
  assert choices >= 8, choices  # The check sees the calls.
  assert not literals, literals


def test_no_pragmas_for_a_linter_nobody_runs():
  """The lint is ruff's (pyproject.toml); pylint runs nowhere, so its
  pragmas would only be noise."""
  pragma = '# ' + 'pylint' + ':'
  repo = os.path.dirname(ROOT)
  found = []
  for top in (PACKAGE, 'experiments', 'scripts', 'tests', 'configs'):
    for folder, _, files in os.walk(os.path.join(repo, top)):
      found += [
          os.path.join(folder, f)
          for f in files
          if f.endswith('.py') and pragma in _read(os.path.join(folder, f))
      ]
  assert not found, found


# Files about one idea: the one exception is AugMix (Hendrycks et al.'s list
# of image operations, one small jax.numpy function each).
MAX_LINES = 450
LONG_ALLOWED = {os.path.join(PACKAGE, 'data', 'augmix.py')}


def test_no_module_grows_past_the_budget():
  repo = os.path.dirname(ROOT)
  long = {}
  for top in (PACKAGE, 'experiments', 'scripts', 'configs', 'examples'):
    for folder, _, files in os.walk(os.path.join(repo, top)):
      for f in files:
        path = os.path.join(folder, f)
        rel = os.path.relpath(path, repo)
        if f.endswith('.py') and rel not in LONG_ALLOWED:
          lines = _read(path).count('\n')
          if lines > MAX_LINES:
            long[rel] = lines
  assert not long, f'over {MAX_LINES} lines: {long}'
  assert all(os.path.exists(os.path.join(repo, p)) for p in LONG_ALLOWED)

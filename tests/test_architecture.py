"""The package's layers, checked by parsing the imports of every module (no import is executed).

- no import cycle between modules of lbyl_jax and converters;
- imports point one way: entry points -> api / pipeline -> stages -> core pieces -> models / io
  -> core (the ranks below); a module imports only modules of its own rank or lower;
- ``converters`` (the torch-free readers) imports nothing from ``lbyl_jax``;
- no function-level import of a project module (hidden cycles), except the lazy attributes of
  ``lbyl_jax/__init__.py`` that keep ``import lbyl_jax`` light;
- the registries give every method, quantizer and criterion a command-line choice, and every
  option a documented flag.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ('lbyl_jax', 'converters')

# Lower rank = lower layer. Prefix match, the longest prefix wins.
RANKS = {
    'lbyl_jax.core': 0,
    'converters': 0,
    'lbyl_jax.models': 1,
    'lbyl_jax.io.publish': 1,
    'lbyl_jax.io.download': 1,
    'lbyl_jax.pruning': 2,
    'lbyl_jax.quant.uniform': 2,
    'lbyl_jax.io': 2,
    'lbyl_jax.pruning.methods': 3,
    'lbyl_jax.quant': 3,
    'lbyl_jax.experimental': 3,
    'lbyl_jax.plan': 4,
    'lbyl_jax.pipeline': 4,
    'lbyl_jax.evaluation': 4,
    'lbyl_jax.report': 4,
    'lbyl_jax.api': 5,
    'lbyl_jax.cli': 5,
    'lbyl_jax.restore': 5,
    'lbyl_jax.evaluate': 5,
    'lbyl_jax.convert': 5,
    'lbyl_jax': 5,  # the package __init__
}


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob('*.py')):
      out[module_name(path)] = path
  return out


def rank(mod: str) -> int:
  best = max((k for k in RANKS if mod == k or mod.startswith(k + '.')), key=len)
  return RANKS[best]


def _resolve(name: str, known: set[str]) -> str | None:
  """The project module an imported name refers to (``lbyl_jax.io.data.X`` -> ``lbyl_jax.io.data``)."""
  parts = name.split('.')
  for i in range(len(parts), 0, -1):
    cand = '.'.join(parts[:i])
    if cand in known:
      return cand
  return None


def imports(path: pathlib.Path, known: set[str]) -> tuple[set[str], list[tuple[int, str]]]:
  """(modules imported at module level, [(line, module) imported inside functions])."""
  tree = ast.parse(path.read_text(encoding='utf-8'))
  top, nested = set(), []

  def targets(node) -> list[str]:
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # ``from pkg import mod`` depends on pkg.mod; ``from mod import name`` on mod.
      return [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in known else node.module
              for a in node.names]
    return []

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        for t in targets(child):
          mod = _resolve(t, known)
          if mod is None:
            continue
          if in_function:
            nested.append((child.lineno, mod))
          else:
            top.add(mod)
      visit(child, inner)

  visit(tree, False)
  return top, nested


@pytest.fixture(scope='module')
def graph():
  mods = modules()
  known = set(mods)
  edges, nested = {}, {}
  for name, path in mods.items():
    top, inner = imports(path, known)
    # ``from lbyl_jax.x import y`` also lists the package lbyl_jax.x; a package's own
    # __init__ importing its submodules is not a dependency of the submodule on the package.
    edges[name] = {m for m in top if m != name and not name.startswith(m + '.')}
    nested[name] = inner
  return mods, edges, nested


def test_no_import_cycles(graph):
  _, edges, _ = graph
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        cycle = stack[stack.index(nxt):] + [nxt]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if nxt not in state:
        dfs(nxt)
    stack.pop()
    state[node] = 2

  for node in sorted(edges):
    if node not in state:
      dfs(node)


def test_imports_point_down_the_layers(graph):
  _, edges, _ = graph
  bad = [f'{a} (rank {rank(a)}) imports {b} (rank {rank(b)})'
         for a, deps in sorted(edges.items()) for b in sorted(deps) if rank(b) > rank(a)]
  assert not bad, '\n'.join(bad)


def test_converters_do_not_import_lbyl_jax(graph):
  _, edges, nested = graph
  bad = [(a, b) for a, deps in edges.items() if a.startswith('converters')
         for b in deps if b.startswith('lbyl_jax')]
  bad += [(a, b) for a, inner in nested.items() if a.startswith('converters')
          for _, b in inner if b.startswith('lbyl_jax')]
  assert not bad


def test_no_function_level_project_imports(graph):
  _, _, nested = graph
  bad = [f'{a}:{line} imports {b}' for a, inner in sorted(nested.items()) for line, b in inner
         if a != 'lbyl_jax']
  assert not bad, '\n'.join(bad)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
  # The parser itself: a cycle and a function-level import are found in a synthetic package.
  pkg = tmp_path / 'lbyl_jax'
  (pkg / 'core').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'core' / '__init__.py').write_text('')
  (pkg / 'core' / 'a.py').write_text('from lbyl_jax.core import b\n')
  (pkg / 'core' / 'b.py').write_text('import lbyl_jax.core.a\ndef f():\n  from lbyl_jax import pipeline\n')
  (pkg / 'pipeline.py').write_text('')
  known = {'lbyl_jax', 'lbyl_jax.core', 'lbyl_jax.core.a', 'lbyl_jax.core.b', 'lbyl_jax.pipeline'}
  top_a, _ = imports(pkg / 'core' / 'a.py', known)
  top_b, nested_b = imports(pkg / 'core' / 'b.py', known)
  assert 'lbyl_jax.core.b' in top_a and 'lbyl_jax.core.a' in top_b
  assert nested_b == [(3, 'lbyl_jax.pipeline')]
  assert rank('lbyl_jax.pipeline') > rank('lbyl_jax.core.b')


def test_every_registered_stage_has_flags_and_help():
  from lbyl_jax.cli import restore as cli_restore  # pylint: disable=import-outside-toplevel
  from lbyl_jax import plan as plan_lib  # pylint: disable=import-outside-toplevel

  full = cli_restore.parser(True).format_help()
  for kind, classes in plan_lib.stages().items():
    for cls in classes:
      for name, field in cls.option_fields().items():
        flag = field.metadata.get('flag') or '--' + name.replace('_', '-')
        assert flag in full, (kind, cls, flag)
        assert field.metadata['help'], (cls, name)
  short = cli_restore.parser(False).format_help()
  assert '--lbyl-mode' not in short and '--guard' not in short  # research knobs behind --help-all
  assert '--ratio' in short and '--method' in short

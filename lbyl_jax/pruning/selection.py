"""Selection: which channels of every unit stay (docs/criteria.md), the first stage of a plan.

:func:`build_problems` ranks every unit's filters by the criterion, keeps the kept count of the
unit's ratio, and packs filters, BN terms and the kept / pruned indices into a
:class:`~lbyl_jax.pruning.problem.UnitProblem`, all from the ORIGINAL weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from lbyl_jax.core import threads
from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.core.options import Options, RATIO, number, option
from lbyl_jax.pruning import criteria
from lbyl_jax.pruning import terms
from lbyl_jax.pruning.problem import UnitProblem


def _matches(pattern: str, name: str) -> bool:
  """fnmatch glob on the unit name, or a full-match regular expression after 're:'."""
  if pattern.startswith('re:'):
    return re.fullmatch(pattern[3:], name) is not None
  return fnmatch.fnmatchcase(name, pattern)


def _overrides(value) -> tuple[tuple[str, float], ...]:
  if isinstance(value, Mapping):
    value = tuple(value.items())
  norm = []
  for item in value:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise ValueError(f'entries must be (pattern, ratio) pairs, got {item!r}')
    pattern, r = item
    if pattern.startswith('re:'):
      try:
        re.compile(pattern[3:])
      except re.error as e:
        raise ValueError(f'bad regular expression {pattern!r}: {e}') from None
    try:
      norm.append((pattern, RATIO(r)))
    except ValueError as e:
      raise ValueError(f'{pattern!r}: {e}') from None
  return tuple(norm)


@dataclasses.dataclass(frozen=True)
class Selection(Options):
  """Which channels go: criterion, ratio (per unit), kept-count rounding, and the BN terms' sigma.

  ``ratio_overrides``: ((pattern, ratio), ...) per-unit ratios; a pattern is an fnmatch glob on
  the unit name (e.g. 'layer4_*/conv1'), or a full-match regular expression after 're:'. The LAST
  matching pattern wins; a pattern that matches no unit is an error.
  """

  stage: ClassVar[str] = 'selection'

  criterion: str = option('l2', help='filter ranking', choices=criteria.names)
  ratio: float = option(0.3, help='fraction of channels pruned in every unit, in [0, 1)',
                        check=RATIO)
  ratio_overrides: tuple = option((), help="per-unit ratio, e.g. 'layer3_*/conv1=0.5'",
                                  flag='--ratio-override', check=_overrides,
                                  metavar='PATTERN=RATIO')
  seed: int = option(0, help='seed of the random criterion', check=number(integer=True))
  keep_rounding: str | None = option(None, help='kept count = floor or round of N (1 - ratio)',
                                     choices=(None, 'floor', 'round'), advanced=True,
                                     default_text='round for MLPs, floor otherwise')
  bn_sigma: str = option('std', help="BN sigma in the methods' algebra: sqrt(var + eps), or the"
                         " raw running variance as the reference codes use it",
                         choices=('std', 'variance'), advanced=True)

  def ratio_for(self, unit_name: str) -> float:
    """The ratio of one unit: the last matching override, else ``ratio``."""
    r = self.ratio
    for pattern, value in self.ratio_overrides:
      if _matches(pattern, unit_name):
        r = value
    return r

  def rounding_for(self, spec) -> str:
    if self.keep_rounding is not None:
      return self.keep_rounding
    return 'round' if spec.family == 'mlp' else 'floor'


def _path_str(path) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)


def check_finite(variables: Mapping[str, Any], *, where: str = 'variables') -> None:
  """ValueError for non-finite values (naming the leaf) or BN running variances <= 0 (naming the
  layer): a network that computes NaN gives no accuracy worth reporting."""
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError(f"{where}: variables must be a mapping with a 'params' collection")
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
    a = np.asarray(leaf)
    if a.dtype.kind not in 'fiub':
      raise ValueError(f'{where}: {_path_str(path)} is not a numeric array (dtype {a.dtype})')
    if a.dtype.kind == 'f' and not np.all(np.isfinite(a)):
      raise ValueError(f'{where}: non-finite values in {_path_str(path)} '
                       f'({int(np.sum(~np.isfinite(a)))} of {a.size})')
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables.get('batch_stats', {})))[0]:
    if path[-1].key == 'var' and np.any(np.asarray(leaf) <= 0):
      layer = _path_str(path[:-1])
      raise ValueError(f'{where}: BN running variance <= 0 in layer {layer} '
                       f'(min {float(np.min(leaf)):.3g})')


def validate_variables(spec, variables: Mapping[str, Any]) -> None:
  """:func:`check_finite`, plus: every unit's layers exist and every consumer reads the producer's
  channels where the unit says (the widths of the variables fit the units)."""
  check_finite(variables)
  params = variables['params']
  for unit in spec.units:
    paths = [unit.producer] + [c.path for c in unit.consumers] + ([unit.bn] if unit.bn else [])
    for path in paths:
      if not trees.has_path(params, path):
        raise ValueError(f'{spec.name}: variables lack layer {path!r} of unit {unit.name}')
    n = units_lib.width_of(variables, unit)
    for con in unit.consumers:
      v = np.shape(trees.get_path(params, con.path)['kernel'])
      fan_in = v[-2] if con.kind == 'conv' else v[0]
      need = int(np.max(con.indices(np.arange(n)))) + 1
      exact = con.offset == 0 and not con.through and len(unit.consumers) == 1
      if need > fan_in or (exact and fan_in != n * con.flatten):
        raise ValueError(f'{con.path}: reads {fan_in} inputs but {unit.producer} has {n}'
                         f' channels (x{con.flatten} positions)')


def check_overrides(spec, selection: Selection) -> None:
  """A ratio-override pattern that matches no unit is a typo: refuse it."""
  for pattern, _ in selection.ratio_overrides:
    if not any(_matches(pattern, u.name) for u in spec.units):
      raise ValueError(f'ratio override {pattern!r} matches no unit of {spec.name}'
                       f' (units look like {spec.units[0].name!r})')


def unit_dims(spec, variables: Mapping[str, Any], selection: Selection
              ) -> list[tuple[int, int, int]]:
  """(m kept, p pruned, filter length D) of every unit's problem, as :func:`build_problems` makes
  them, from the shapes alone (``variables`` may hold ``jax.ShapeDtypeStruct`` leaves:
  :meth:`~lbyl_jax.models.archs.ArchSpec.abstract_variables`)."""
  rounding = selection.rounding_for(spec)
  out = []
  for unit in spec.units:
    layer = trees.get_path(variables['params'], unit.producer)
    shape = tuple(int(x) for x in layer['kernel'].shape)
    n, d = shape[-1], math.prod(shape[:-1])
    if unit.bn is None and 'bias' in layer:  # terms.filters appends the bias
      d += 1
    m = criteria.n_keep(n, selection.ratio_for(unit.name), rounding=rounding)
    out.append((m, n - m, d))
  return out


def build_problems(spec, variables: Mapping[str, Any], selection: Selection) -> list[UnitProblem]:
  """One :class:`UnitProblem` per unit of ``spec`` from the ORIGINAL weights."""
  rounding = selection.rounding_for(spec)
  check_overrides(spec, selection)

  def one(index: int, unit) -> UnitProblem:  # units are independent (core.threads)
    W = terms.filters(variables, unit, np.float64)
    m = criteria.n_keep(W.shape[0], selection.ratio_for(unit.name), rounding=rounding)
    keep, prune = criteria.select(W, m, selection.criterion, seed=selection.seed, index=index)
    eps = spec.bn_epsilon(unit.bn) if unit.bn is not None else BN_EPS
    return UnitProblem(unit, W, terms.bn_terms(variables, unit, sigma=selection.bn_sigma,
                                               eps=eps), keep, prune)

  return threads.map_ordered(one, range(len(spec.units)), spec.units)

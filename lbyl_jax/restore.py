"""Data-free restore: select channels, compute compensation, remove channels physically.

``restore(spec, variables, config) -> (widths, new_variables, report)`` is a pure function: it
never modifies ``variables`` and its result depends only on its arguments (the random criterion is
seeded by ``config.seed`` and the unit index). Steps (ALGORITHMS.md 5.7):

1. validate the variables (finite weights, positive BN variances, unit shapes);
2. per unit: filters W, BN affine terms, kept count (3, A10), kept / pruned channels by the
   criterion, all from the ORIGINAL weights (2.1, 2.4, A6);
3. the method (:mod:`lbyl_jax.methods` registry) returns S_P (and optionally a constant) per unit;
4. optional BN-mean bias correction (BN_MOMENTS.md), from :mod:`lbyl_jax.bnm`;
5. surgery (:mod:`lbyl_jax.surgery`) and a report with sizes, FLOPs, timings and per-layer
   diagnostics.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lbyl_jax import criteria
from lbyl_jax import methods
from lbyl_jax import stats
from lbyl_jax import surgery
from lbyl_jax import units as units_lib
from lbyl_jax.methods import UnitProblem, UnitSolution

# Used when neither the config nor ``spec.hparams['lbyl']`` gives a value (8.1 orders of magnitude).
DEFAULT_LAMBDA1 = 1e-5
DEFAULT_LAMBDA2 = 1e-3

_CHOICES = dict(
    lbyl_mode=('consistent', 'reference_code'),
    nm_mode=('exact', 'reference_code'),
    bn_sigma=('std', 'variance'),
    keep_rounding=(None, 'floor', 'round'),
    dtype=('float32', 'float64'),
    bias_correction=(None, 'off', 'on', 'auto', 'blend'),
    bnm_cov=('identity', 'diag'),
    guard=('off', 'moments'),
    bias_fold=('padding_aware', 'all_taps'),
)


def _check_ratio(ratio: Any, what: str) -> float:
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
    raise ValueError(f'{what} must be a number in [0, 1), got {ratio!r}')
  if not 0.0 <= float(ratio) < 1.0:
    raise ValueError(f'{what} must be in [0, 1), got {ratio!r}')
  return float(ratio)


def _check_nonneg(value: Any, what: str) -> None:
  if value is None:
    return
  if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)
          and value >= 0):
    raise ValueError(f'{what} must be a finite number >= 0, got {value!r}')


def _matches(pattern: str, name: str) -> bool:
  """fnmatch glob on the unit name, or a full-match regular expression after 're:'."""
  if pattern.startswith('re:'):
    return re.fullmatch(pattern[3:], name) is not None
  return fnmatch.fnmatchcase(name, pattern)


@dataclasses.dataclass(frozen=True)
class RestoreConfig:
  """Options of :func:`restore`; validated on construction (errors name the bad value).

  Attributes:
    method: a :mod:`lbyl_jax.methods` name: 'prune', 'nm', 'lbyl', 'bnm'.
    criterion: a :mod:`lbyl_jax.criteria` name: 'l1', 'l2', 'l2-gm', 'random'.
    ratio: pruning ratio in [0, 1) for every unit.
    ratio_overrides: ((pattern, ratio), ...) per-unit ratios; a pattern is an fnmatch glob on the
      unit name (e.g. 'layer4_*/conv1'), or a regular expression (full match) when prefixed by
      're:'. The LAST matching pattern wins. A mapping is accepted and converted.
    lambda1, lambda2: LBYL weights (5.3 / 5.4); None: ``spec.hparams['lbyl']['lambda1' /
      'lambda2']`` if the preset has them, else DEFAULT_LAMBDA1 / DEFAULT_LAMBDA2.
    nm_t, nm_lam: NM threshold and score weight (4.3); None: ``spec.hparams['nm']['t' / 'lam']``.
    lbyl_mode: 'consistent' (5.3) or 'reference_code' (5.4).
    nm_mode: 'exact' or 'reference_code' (A2).
    bn_sigma: 'std' (sqrt(var + eps)) or 'variance' (A1) for the BN terms of the consistent /
      exact forms (the reference_code forms always use the variance).
    keep_rounding: 'floor', 'round', or None for the arch default (round for the MLP, A10).
    dtype: solver precision, 'float32' or 'float64' (A12).
    seed: seed of the 'random' criterion (combined with the unit index).
    bias_correction: 'off', 'on' (constant c from :func:`lbyl_jax.bnm.bias_constant` on every
      unit), 'auto' (``bias_constant`` decides per unit, returning None where it abstains),
      'blend' (the same rule's error model picks a weight in [0, 1] per unit) or
      None: the method's default (:meth:`resolved_bias_correction`): 'on' for 'lbyl' and 'nm' in
      their consistent / exact forms, 'off' otherwise. LBYL and NM fit their delivery on filter
      weights, which leaves the pruned channel's mean activation undelivered; the constant adds
      it. 'bnm' defaults to 'off' because its uncentred fit already carries the means.
    bnm_cov: input-patch covariance model of the BN-moments method ('identity' or 'diag').
    guard: 'off' or 'moments': scale each pruned channel's delivery row by the factor in [0, 1]
      that minimises its post-ReLU error under the BN-moments model (:func:`lbyl_jax.bnm.guard`;
      data-free). Applied before the bias correction.
    bias_fold: how the bias-correction constant is folded into a zero-padded consumer:
      'padding_aware' (default: the position-averaged shift, :func:`lbyl_jax.bnm.fold_constant`) or
      'all_taps' (the raw constant through every tap, as the BN_MOMENTS.md prototype does).
  """

  method: str = 'lbyl'
  criterion: str = 'l2'
  ratio: float = 0.1
  ratio_overrides: tuple[tuple[str, float], ...] = ()
  lambda1: float | None = None
  lambda2: float | None = None
  nm_t: float | None = None
  nm_lam: float | None = None
  lbyl_mode: str = 'consistent'
  nm_mode: str = 'exact'
  bn_sigma: str = 'std'
  keep_rounding: str | None = None
  dtype: str = 'float32'
  seed: int = 0
  bias_correction: str | None = None
  bnm_cov: str = 'diag'
  guard: str = 'off'
  bias_fold: str = 'padding_aware'

  def __post_init__(self):
    if self.method not in methods.names():
      raise ValueError(f'unknown method {self.method!r}; known: {", ".join(methods.names())}')
    if self.criterion not in criteria.names():
      known = ', '.join(criteria.names())
      raise ValueError(f'unknown criterion {self.criterion!r}; known: {known}')
    object.__setattr__(self, 'ratio', _check_ratio(self.ratio, 'ratio'))
    overrides = self.ratio_overrides
    if isinstance(overrides, Mapping):
      overrides = tuple(overrides.items())
    norm = []
    for item in overrides:
      if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f'ratio_overrides entries must be (pattern, ratio) pairs, got {item!r}')
      pattern, r = item
      if pattern.startswith('re:'):
        try:
          re.compile(pattern[3:])
        except re.error as e:
          raise ValueError(f'ratio_overrides: bad regular expression {pattern!r}: {e}') from None
      norm.append((pattern, _check_ratio(r, f'ratio_overrides[{pattern!r}]')))
    object.__setattr__(self, 'ratio_overrides', tuple(norm))
    for name, allowed in _CHOICES.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {getattr(self, name)!r}')
    for name in ('lambda1', 'lambda2', 'nm_t'):
      _check_nonneg(getattr(self, name), name)
    if self.nm_lam is not None:
      _check_nonneg(self.nm_lam, 'nm_lam')
      if self.nm_lam > 1:
        raise ValueError(f'nm_lam must be in [0, 1], got {self.nm_lam!r}')
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f'seed must be an integer, got {self.seed!r}')

  def ratio_for(self, unit_name: str) -> float:
    """The ratio of one unit: the last matching override, else ``ratio``."""
    r = self.ratio
    for pattern, value in self.ratio_overrides:
      if _matches(pattern, unit_name):
        r = value
    return r

  def resolved_bias_correction(self) -> str:
    """'off' | 'on' | 'auto' | 'blend': the explicit setting, else the method's default (see above)."""
    if self.bias_correction is not None:
      return self.bias_correction
    if self.method == 'lbyl' and self.lbyl_mode == 'consistent':
      return 'on'
    if self.method == 'nm' and self.nm_mode == 'exact':
      return 'on'
    return 'off'

  def rounding_for(self, spec) -> str:
    if self.keep_rounding is not None:
      return self.keep_rounding
    return 'round' if spec.family == 'mlp' else 'floor'

  def resolved_lambdas(self, spec) -> tuple[float, float]:
    hp = spec.hparams.get('lbyl', {})
    lam1 = self.lambda1 if self.lambda1 is not None else hp.get('lambda1', DEFAULT_LAMBDA1)
    lam2 = self.lambda2 if self.lambda2 is not None else hp.get('lambda2', DEFAULT_LAMBDA2)
    return float(lam1), float(lam2)

  def resolved_nm(self, spec) -> tuple[float, float]:
    hp = spec.hparams.get('nm', {})
    t = self.nm_t if self.nm_t is not None else hp.get('t')
    lam = self.nm_lam if self.nm_lam is not None else hp.get('lam')
    if t is None or lam is None:
      raise ValueError(f'{spec.name}: no NM defaults in spec.hparams; set nm_t and nm_lam'
                       ' explicitly')
    return float(t), float(lam)


# --------------------------------------------------------------------------------------------


def _path_str(path) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)


def validate_variables(spec, variables: Mapping[str, Any]) -> None:
  """Raises ValueError for non-finite weights (naming the leaf), BN variances <= 0 (naming the
  layer), missing unit layers or consumer shapes that do not match their producer."""
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError("variables must be a mapping with a 'params' collection")
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
    a = np.asarray(leaf)
    if not np.all(np.isfinite(a)):
      raise ValueError(f'non-finite values in {_path_str(path)} ({int(np.sum(~np.isfinite(a)))} '
                       f'of {a.size})')
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables.get('batch_stats', {})))[0]:
    if path[-1].key == 'var' and np.any(np.asarray(leaf) <= 0):
      layer = _path_str(path[:-1])
      raise ValueError(f'BN running variance <= 0 in layer {layer} '
                       f'(min {float(np.min(leaf)):.3g})')
  params = variables['params']
  for unit in spec.units:
    for path in (unit.producer, unit.consumer) + ((unit.bn,) if unit.bn else ()):
      if not units_lib.has_path(params, path):
        raise ValueError(f'{spec.name}: variables lack layer {path!r} of unit {unit.name}')
    n = units_lib.width_of(variables, unit)
    v = np.shape(units_lib.get_path(params, unit.consumer)['kernel'])
    fan_in = v[2] if unit.consumer_kind == 'conv' else v[0]
    if fan_in != n * unit.flatten:
      raise ValueError(f'{unit.consumer}: reads {fan_in} inputs but {unit.producer} has {n}'
                       f' channels (x{unit.flatten} positions)')


def bn_terms(variables: Mapping[str, Any], unit: units_lib.Unit, *, sigma: str = 'std'):
  """:func:`units.bn_affine` with a producer bias in front of the BN folded into mu and b
  (BN(Wx + bias) = alpha W x + beta - alpha (mu - bias); torchvision VGG convs have biases)."""
  affine = units_lib.bn_affine(variables, unit, sigma=sigma)
  bn = {k: np.asarray(v, np.float64) for k, v in affine.items()}
  bias = units_lib.producer_bias(variables, unit)
  if unit.bn is not None and bias is not None:
    bn['mu'] = bn['mu'] - np.asarray(bias, np.float64)
    bn['b'] = bn['beta'] - bn['alpha'] * bn['mu']
  return bn


def build_problems(spec, variables: Mapping[str, Any], config: RestoreConfig) -> list[UnitProblem]:
  """One :class:`UnitProblem` per unit of ``spec`` from the ORIGINAL weights."""
  rounding = config.rounding_for(spec)
  for pattern, _ in config.ratio_overrides:  # a typo in a pattern must not pass silently
    if not any(_matches(pattern, u.name) for u in spec.units):
      raise ValueError(f'ratio_overrides pattern {pattern!r} matches no unit of {spec.name}'
                       f' (units look like {spec.units[0].name!r})')
  out = []
  for index, unit in enumerate(spec.units):
    W = np.asarray(units_lib.filters(variables, unit), np.float64)
    m = criteria.n_keep(W.shape[0], config.ratio_for(unit.name), rounding=rounding)
    keep, prune = criteria.select(W, m, config.criterion, seed=config.seed, index=index)
    out.append(UnitProblem(unit, W, bn_terms(variables, unit, sigma=config.bn_sigma), keep, prune))
  return out


def _check_solutions(problems: Sequence[UnitProblem], sols: Sequence[UnitSolution], method: str):
  if len(sols) != len(problems):
    raise ValueError(f'method {method!r} returned {len(sols)} solutions for {len(problems)} units')
  for p, s in zip(problems, sols):
    shape = (p.prune.size, p.m)
    if np.shape(s.S_P) != shape:
      raise ValueError(f'{p.unit.name}: method {method!r} returned S_P of shape {np.shape(s.S_P)},'
                       f' expected {shape}')
    if not np.all(np.isfinite(s.S_P)):
      raise ValueError(f'{p.unit.name}: method {method!r} returned non-finite coefficients')


def _apply_bias_correction(spec, variables, problems, sols, config) -> list[UnitSolution]:
  """Replaces each unit's constant by BN_MOMENTS.md's c = E[a_P] - S_P E[a_K].

  ``lbyl_jax.bnm.bias_constant(spec, variables, problems, solutions, config)`` returns one
  constant (|P|) or None per unit; with ``config.bias_correction == 'auto'`` its None marks the
  units where its data-free rule declines the correction.
  """
  consts = list(methods.bias_module().bias_constant(spec, variables, problems, sols, config))
  if len(consts) != len(problems):
    raise ValueError(f'bias_constant returned {len(consts)} constants for {len(problems)} units')
  out = []
  for p, s, c in zip(problems, sols, consts):
    c = None if (c is None or p.prune.size == 0) else np.asarray(c, np.float64)
    if c is not None and (c.shape != (p.prune.size,) or not np.all(np.isfinite(c))):
      raise ValueError(f'{p.unit.name}: bias_constant returned shape {c.shape} or non-finite'
                       f' values; expected {p.prune.size} finite values')
    out.append(dataclasses.replace(s, bias=c, diag={**s.diag, 'bias_correction': c is not None}))
  return out


def restore(
    spec, variables: Mapping[str, Any], config: RestoreConfig
) -> tuple[tuple[int, ...], dict[str, Any], dict[str, Any]]:
  """Prunes every unit of ``spec`` and folds the compensation into the consumers.

  Args:
    spec: :class:`lbyl_jax.archs.ArchSpec`.
    variables: original-width variables ({'params', 'batch_stats'}), not modified.
    config: :class:`RestoreConfig`.

  Returns:
    (widths, new_variables, report). ``spec.build(widths).apply(new_variables, x)`` runs the
    pruned network. The report holds arch, method, criterion, ratio, params/flops/bytes before
    and after, solve and compile seconds, and per layer name, widths and diagnostics.
  """
  if not isinstance(config, RestoreConfig):
    raise ValueError(f'config must be a RestoreConfig, got {type(config).__name__}')
  t_start = time.perf_counter()
  validate_variables(spec, variables)
  problems = build_problems(spec, variables, config)
  sols = list(methods.get(config.method)(spec, variables, problems, config))
  _check_solutions(problems, sols, config.method)
  if config.guard != 'off':
    sols = list(methods.bias_module().guard(spec, variables, problems, sols, config))
    _check_solutions(problems, sols, config.method)
  bias_correction = config.resolved_bias_correction()
  if bias_correction != 'off':
    sols = _apply_bias_correction(spec, variables, problems, sols,
                                  dataclasses.replace(config, bias_correction=bias_correction))
  plan = {p.unit.name: (p.keep, s.S_P, s.bias) for p, s in zip(problems, sols)}
  widths, new_variables = surgery.apply(spec, variables, plan)
  before = stats.summary(spec, variables)
  after = stats.summary(spec, new_variables)
  layers = []
  for p, s in zip(problems, sols):
    layers.append(dict(
        name=p.unit.name, width_before=p.n, width_after=p.m,
        ratio=config.ratio_for(p.unit.name), pool=p.unit.pool, diagnostics=dict(s.diag)))
  report = dict(
      arch=spec.name, method=config.method, criterion=config.criterion, ratio=config.ratio,
      config=dataclasses.asdict(config), bias_correction=bias_correction, widths=list(widths),
      params_before=before['params'], params_after=after['params'],
      macs_before=before['macs'], macs_after=after['macs'],
      flops_before=before['flops'], flops_after=after['flops'],
      bytes_before=before['bytes'], bytes_after=after['bytes'],
      solve_seconds=float(sum(s.diag.get('solve_seconds', 0.0) for s in sols)),
      compile_seconds=float(sum(s.diag.get('compile_seconds', 0.0) for s in sols)),
      seconds=time.perf_counter() - t_start,
      layers=layers,
  )
  return widths, new_variables, report


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m lbyl_jax.restore``: the command line lives in :mod:`lbyl_jax.cli`."""
  from lbyl_jax import cli  # pylint: disable=import-outside-toplevel

  cli.main(argv)


if __name__ == '__main__':
  main()

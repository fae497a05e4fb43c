"""The data-free bias correction: the pruned channels' mean that a delivery does not carry.

For any delivery rows S_P, the constant c = E[a_P] - S_P E[a_K] (a_P ~ S_P a_K + c) under the
BN-moments model of the ORIGINAL network (docs/bias_correction.md) is folded into the consumer:
its BN mean (or its bias) absorbs sum over taps V[:, P] c. Under zero padding a per-channel shift
cannot reproduce the border effect; :func:`fold_constant` returns the constant whose all-taps fold
best matches the position-averaged effect ('padding_aware', the default), or the raw constant
('all_taps', the BN-moments prototype's fold).

The per-layer rules that decide whether to apply it ('auto', 'blend') are research options and
live in :mod:`lbyl_jax.experimental.rules`; they plug in through the ``rule`` argument of
:func:`constants`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning.problem import UnitProblem, UnitSolution

FOLDS = ('padding_aware', 'all_taps')


@dataclasses.dataclass(frozen=True)
class ConsumerTerms:
  """What the constants and the 'auto' rule need to know about a unit's consumer layer.

  Attributes:
    V: (T, N, O) float64 consumer weights: T taps (kernel positions, or the positions a dense
      layer reads per channel after a flatten), N input channels, O outputs.
    tap_weight: (T,) fraction of output positions at which each tap reads inside the (zero-padded)
      input, or None when every tap always does (dense consumers, unknown geometry).
    alpha: (O,) scale gamma / sigma of the BN after the consumer (ones without one).
    bn_energy: sum of (gamma^2 + beta^2) of that BN (the second moment of its output per
      position), or None without one.
    bias: (O,) consumer bias, zeros without one.
    shortcut_energy: second moment per position of the shortcut added after the consumer's BN
      (0 outside residual blocks).
  """

  V: np.ndarray
  tap_weight: np.ndarray | None
  alpha: np.ndarray
  bn_energy: float | None
  bias: np.ndarray
  shortcut_energy: float = 0.0




def _residual_shortcut_energy(spec, variables, unit, moments) -> float:
  """Second moment of the shortcut that meets the consumer's BN output (residual blocks only)."""
  if spec is None or spec.family not in ('cifar_resnet', 'resnet') or moments is None:
    return 0.0
  blk, _, leaf = unit.consumer.rpartition('/')
  params = variables['params'].get(blk, {})
  last = 'conv3' if 'conv3' in params else 'conv2'
  if leaf != last:
    return 0.0
  if 'downsample_bn' in params:
    p = params['downsample_bn']
    return float(np.sum(np.asarray(p['scale'], np.float64) ** 2 + np.asarray(p['bias'], np.float64) ** 2))
  x = moments.get(f'{blk}/conv1')
  return 0.0 if x is None else float(np.sum(x.var + x.mean ** 2))


def consumer_terms(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem],
                   moments=None, *, index: int = 0) -> list[ConsumerTerms]:
  """:class:`ConsumerTerms` of every unit's ``index``-th consumer: its weights on the unit's
  channels, where its taps read inside the zero padding (the traced geometry of
  :class:`lbyl_jax.core.units.Consumer`), and the BatchNorm after it."""
  out = []
  for p in problems:
    u = p.unit
    con = u.consumers[index]
    layer = trees.get_path(variables['params'], con.path)
    k = np.asarray(layer['kernel'], np.float64)
    if con.kind == 'conv':
      ch = con.offset + np.arange(p.n)
      if con.offset or k.shape[-2] != p.n:
        k = np.take(k, ch, axis=-2)
      V = k.reshape(-1, k.shape[-2], k.shape[-1])
      tw = None if con.geometry is None else con.geometry.tap_fractions().reshape(-1)
    else:
      V = np.transpose(k[con.indices(np.arange(p.n))], (1, 0, 2))
      tw = None
    o = V.shape[2]
    bias = np.asarray(layer['bias'], np.float64) if 'bias' in layer else np.zeros(o)
    if con.bn is not None and trees.has_path(variables.get('batch_stats', {}), con.bn):
      bp = trees.get_path(variables['params'], con.bn)
      bs = trees.get_path(variables['batch_stats'], con.bn)
      gamma = np.asarray(bp['scale'], np.float64)
      beta = np.asarray(bp['bias'], np.float64)
      alpha = gamma / np.sqrt(np.asarray(bs['var'], np.float64) + BN_EPS)
      energy = float(np.sum(gamma ** 2 + beta ** 2))
    else:
      alpha, energy = np.ones(o), None
    out.append(ConsumerTerms(V, tw, alpha, energy, bias,
                             _residual_shortcut_energy(spec, variables, u, moments)))
  return out


def absorbs(variables: Mapping[str, Any], consumer) -> bool:
  """Whether a constant shift of the consumer's output has a home: its BatchNorm or its bias."""
  return consumer.bn is not None or 'bias' in trees.get_path(variables['params'], consumer.path)


def needs_fold(consumer) -> bool:
  """Whether :func:`fold_constant` can change a constant for this consumer
  (:class:`lbyl_jax.core.units.Consumer`): a conv whose traced taps read zero padding somewhere.
  For the others the constant is folded unchanged, so their :class:`ConsumerTerms` (a float64
  copy of the kernel) are never built."""
  if consumer.kind != 'conv' or consumer.geometry is None:
    return False
  return not np.all(consumer.geometry.tap_fractions() == 1.0)


def fold_constant(consumer: ConsumerTerms, prune: np.ndarray, c: np.ndarray) -> np.ndarray:
  """The constant c' whose fold, sum over ALL taps V[:, P] c' (how surgery shifts the consumer's
  BN mean), best matches the position-averaged effect of c under zero padding,
  sum over taps w_tap V[tap, P] c (docs/README.md#folding-into-the-consumer; docs/bias_correction.md#padding-aware-fold).

  A per-channel BN shift cannot reproduce the position-dependent border effect; its best L2 value
  is the position average. c' solves min ||A c' - target||^2 + lam ||c' - c||^2 with
  A = sum_t V_t[P]^T and lam = 1e-3 trace(A^T A) / |P| (a ridge towards c where A is
  rank-deficient). Without padding information c is returned unchanged.
  """
  c = np.asarray(c, np.float64)
  if consumer.tap_weight is None or np.all(consumer.tap_weight == 1.0) or c.size == 0:
    return c
  VP = consumer.V[:, prune, :]
  target = np.einsum('t,tpo,p->o', consumer.tap_weight, VP, c)
  A = VP.sum(axis=0).T
  G = A.T @ A
  lam = 1e-3 * np.trace(G) / c.size
  if lam <= 0:
    return c
  return c + np.linalg.solve(G + lam * np.eye(c.size), A.T @ (target - A @ c))


def raw_constant(spec, variables: Mapping[str, Any], problem: UnitProblem, S_P) -> np.ndarray:
  """c = E[a_P] - S_P E[a_K] of one unit for the rows ``S_P`` (no padding correction)."""
  (E,) = moments_lib.activation_means(spec, variables, [problem])
  return E[problem.prune] - np.asarray(S_P, np.float64) @ E[problem.keep]


# rule(problems, moments2, candidates, consumers) -> per-unit weight in [0, 1].
Rule = Callable[[Sequence[UnitProblem], Sequence[tuple[np.ndarray, np.ndarray]],
                 Sequence[Sequence[tuple[np.ndarray, np.ndarray | None]]], Sequence[ConsumerTerms]],
                Sequence[float]]




def apply(problems: Sequence[UnitProblem], solutions: Sequence[UnitSolution],
          consts: Sequence[Any]) -> list[UnitSolution]:
  """The solutions with their constants replaced by ``consts`` (checked: |P| finite values per
  consumer; a dict {consumer path: constant or None} for units with several consumers)."""
  if len(consts) != len(problems):
    raise ValueError(f'{len(consts)} bias constants for {len(problems)} units')
  out = []
  for p, s, c in zip(problems, solutions, consts):
    if c is None or p.prune.size == 0:
      c = None
    else:
      parts = c if isinstance(c, Mapping) else {None: c}
      checked = {}
      for key, v in parts.items():
        if v is None:
          checked[key] = None
          continue
        v = np.asarray(v, np.float64)
        if v.shape != (p.prune.size,) or not np.all(np.isfinite(v)):
          raise ValueError(f'{p.unit.name}: bias constant of shape {v.shape} or non-finite values;'
                           f' expected {p.prune.size} finite values')
        checked[key] = v
      c = checked if isinstance(c, Mapping) else checked[None]
    out.append(dataclasses.replace(s, bias=c, diag={**s.diag, 'bias_correction': c is not None}))
  return out


def constants(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem],
              solutions: Sequence[UnitSolution], *, fold: str = 'padding_aware',
              rule: Rule | None = None, cov_model: str = 'diag',
              skipped: list[dict[str, str]] | None = None) -> list[Any]:
  """Per unit the constant for surgery's fold, or None (nothing pruned / declined).

  A bnm solution that already fitted its constant (``diag['bias_mode']`` not 'off') keeps it.
  Otherwise c = E[a_P] - S_P E[a_K] is computed for the given S_P, made padding-aware
  (:func:`fold_constant`) when ``fold == 'padding_aware'``, and, with a ``rule``, scaled by the
  rule's per-unit weight (the 'auto' / 'blend' modes; the unit means then come from the full
  second-moment model with ``cov_model``). A unit with several consumers gets
  ``{consumer path: constant}`` (each folded for its own geometry).

  Units whose compensation is 'prune_only' get None; so do, in a user's model (no network-wide
  moment model), units without a BatchNorm, and consumers that have neither a BatchNorm after them
  nor a bias: each is appended to ``skipped`` with the reason.
  """
  problems, solutions = list(problems), list(solutions)
  if len(problems) != len(solutions):
    raise ValueError(f'bias constants: {len(problems)} problems but {len(solutions)} solutions')
  if fold not in FOLDS:
    raise ValueError(f'fold must be one of {FOLDS}, got {fold!r}')
  skipped = [] if skipped is None else skipped
  with solvers.single_threaded_blas():  # small host solves of the fold (see there)
    return _constants(spec, variables, problems, solutions, fold=fold, rule=rule,
                      cov_model=cov_model, skipped=skipped)


def _constants(spec, variables, problems, solutions, *, fold, rule, cov_model, skipped):
  padding_aware = fold == 'padding_aware'
  custom = spec is not None and spec.family == 'custom'
  out: list[Any] = [None] * len(problems)
  todo = []
  for i, (p, s) in enumerate(zip(problems, solutions)):
    if not p.prune.size or p.unit.compensation == 'prune_only':
      continue
    if s.diag.get('method') == 'bnm' and s.diag.get('bias_mode', 'off') != 'off':
      out[i] = None if s.bias is None else np.asarray(s.bias, np.float64)
    elif custom and p.unit.bn is None:
      skipped.append(dict(unit=p.unit.name, reason='no BatchNorm: its activation mean needs the'
                          ' network-level moment model, which exists for the presets only'))
    else:
      todo.append(i)
  if not todo:
    return out
  probs = [problems[i] for i in todo]
  if rule is not None and any(len(p.unit.consumers) != 1 for p in probs):
    raise ValueError('the per-layer bias rules need one consumer per unit')
  need_geo = variables is not None and (padding_aware or rule is not None)
  moments = None
  if spec is not None and not custom and (rule is not None
                                          or any(p.unit.bn is None for p in probs)):
    moments = moments_lib.propagate(spec, variables)
  if rule is not None:
    mom2 = moments_lib.unit_moments(spec, variables, probs, cov_model=cov_model, moments=moments)
    means = [E for E, _ in mom2]
  else:
    means = moments_lib.activation_means(spec, variables, probs, moments=moments)
  consts = [E[p.prune] - np.asarray(solutions[i].S_P, np.float64) @ E[p.keep]
            for i, p, E in zip(todo, probs, means)]
  weight = [1.0] * len(todo)
  if rule is not None:
    cons = consumer_terms(spec, variables, probs, moments)
    S_list = [np.asarray(solutions[i].S_P, np.float64) for i in todo]
    weight = list(rule(probs, mom2, [[(S, None), (S, c)] for S, c in zip(S_list, consts)], cons))
  for k, (i, p, c) in enumerate(zip(todo, probs, consts)):
    if weight[k] <= 0:
      continue
    c = weight[k] * c
    folded = {}
    for index, con in enumerate(p.unit.consumers):
      if variables is not None and not absorbs(variables, con):
        skipped.append(dict(unit=p.unit.name, consumer=con.path,
                            reason='the consumer has neither a following BatchNorm nor a bias'))
        folded[con.path] = None
        continue
      if need_geo and padding_aware and c.size and needs_fold(con):
        # One consumer's float64 kernel at a time, and none where no tap reads padding.
        terms_ = consumer_terms(spec, variables, [p], moments, index=index)[0]
        folded[con.path] = fold_constant(terms_, p.prune, c)
      else:
        folded[con.path] = c
    if len(p.unit.consumers) == 1:
      out[i] = folded[p.unit.consumers[0].path]
    elif any(v is not None for v in folded.values()):
      out[i] = folded
  return out

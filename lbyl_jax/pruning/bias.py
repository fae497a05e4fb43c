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
from lbyl_jax.models import trace

FOLDS = ('padding_aware', 'all_taps')


@dataclasses.dataclass(frozen=True)
class Consumer:
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

def _tap_fraction(size: int, k: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
  """Per kernel offset, the fraction of output positions whose input index is inside [0, size)."""
  out = (size + pad[0] + pad[1] - k) // stride + 1
  idx = np.arange(out)[:, None] * stride - pad[0] + np.arange(k)[None, :]
  return ((idx >= 0) & (idx < size)).mean(axis=0)


def consumer_geometry(spec, variables: Mapping[str, Any] | None = None) -> dict[str, tuple]:
  """{unit name: (tap fractions (kh, kw),)} for conv consumers, from the preset's one abstract
  forward pass (:func:`lbyl_jax.models.trace.trace_layers`): channel pruning changes no spatial
  size, so the geometry is that of the original widths whatever ``variables`` hold."""
  del variables  # the geometry does not depend on the widths
  consumers = {u.consumer: u.name for u in spec.units if u.consumer_kind == 'conv'}
  geo: dict[str, tuple] = {}
  for call in trace.trace_layers(spec).calls:
    if call.path not in consumers or call.kind != 'conv':
      continue
    pads = call.padding
    if isinstance(pads, str):
      raise ValueError(f'{call.path}: padding {pads!r} is not explicit; the models pad explicitly')
    fr = [_tap_fraction(call.in_shape[1 + a], call.kernel_size[a], call.strides[a],
                        tuple(pads[a])) for a in range(2)]
    geo[consumers[call.path]] = (np.outer(fr[0], fr[1]),)
  return geo


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

def consumers(spec, variables, problems: Sequence[UnitProblem], moments=None) -> list[Consumer]:
  """:class:`Consumer` of every unit (geometry and BN from an abstract forward pass of ``spec``)."""
  if spec is None:
    raise ValueError('the consumer geometry needs the architecture (spec)')
  geo = consumer_geometry(spec, variables)
  return [consumer(spec, variables, p, geo, moments) for p in problems]


def tap_weight(spec, problem: UnitProblem, geo: Mapping[str, tuple]) -> np.ndarray | None:
  """The flattened tap fractions of the unit's conv consumer, or None (dense consumer, unknown
  geometry)."""
  if problem.unit.consumer_kind != 'conv':
    return None
  tw = geo.get(problem.unit.name, (None,))[0]
  return None if tw is None else tw.reshape(-1)


def consumer(spec, variables, problem: UnitProblem, geo: Mapping[str, tuple],
             moments=None) -> Consumer:
  """:class:`Consumer` of one unit (``geo`` from :func:`consumer_geometry`); its float64 copy of
  the consumer's kernel lives as long as the caller keeps it."""
  p = problem
  u = p.unit
  layer = trees.get_path(variables['params'], u.consumer)
  k = np.asarray(layer['kernel'], np.float64)
  if u.consumer_kind == 'conv':
    V = k.reshape(-1, k.shape[2], k.shape[3])
  else:
    V = np.transpose(k.reshape(p.n, u.flatten, k.shape[1]), (1, 0, 2))
  tw = tap_weight(spec, p, geo)
  o = V.shape[2]
  bias = np.asarray(layer['bias'], np.float64) if 'bias' in layer else np.zeros(o)
  bn_path = trace.consumer_bn(spec, u.consumer)
  if bn_path is not None:
    bp = trees.get_path(variables['params'], bn_path)
    bs = trees.get_path(variables['batch_stats'], bn_path)
    gamma = np.asarray(bp['scale'], np.float64)
    beta = np.asarray(bp['bias'], np.float64)
    alpha = gamma / np.sqrt(np.asarray(bs['var'], np.float64) + BN_EPS)
    energy = float(np.sum(gamma ** 2 + beta ** 2))
  else:
    alpha, energy = np.ones(o), None
  return Consumer(V, tw, alpha, energy, bias, _residual_shortcut_energy(spec, variables, u, moments))


def _needs_fold(tw: np.ndarray | None, c: np.ndarray) -> bool:
  """Whether :func:`fold_constant` changes c (some tap reads zero padding)."""
  return not (tw is None or np.all(tw == 1.0) or c.size == 0)


def fold_constant(consumer: Consumer, prune: np.ndarray, c: np.ndarray) -> np.ndarray:
  """The constant c' whose fold, sum over ALL taps V[:, P] c' (how surgery shifts the consumer's
  BN mean), best matches the position-averaged effect of c under zero padding,
  sum over taps w_tap V[tap, P] c (docs/README.md#folding-into-the-consumer; docs/bias_correction.md#padding-aware-fold).

  A per-channel BN shift cannot reproduce the position-dependent border effect; its best L2 value
  is the position average. c' solves min ||A c' - target||^2 + lam ||c' - c||^2 with
  A = sum_t V_t[P]^T and lam = 1e-3 trace(A^T A) / |P| (a ridge towards c where A is
  rank-deficient). Without padding information c is returned unchanged.
  """
  c = np.asarray(c, np.float64)
  if not _needs_fold(consumer.tap_weight, c):
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
                 Sequence[Sequence[tuple[np.ndarray, np.ndarray | None]]], Sequence[Consumer]],
                Sequence[float]]


def constants(spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem],
              solutions: Sequence[UnitSolution], *, fold: str = 'padding_aware',
              rule: Rule | None = None, cov_model: str = 'diag') -> list[np.ndarray | None]:
  """Per unit the constant for surgery's all-taps fold, or None (nothing pruned / declined).

  A bnm solution that already fitted its constant (``diag['bias_mode']`` not 'off') keeps it.
  Otherwise c = E[a_P] - S_P E[a_K] is computed for the given S_P, made padding-aware
  (:func:`fold_constant`) when ``fold == 'padding_aware'``, and, with a ``rule``, scaled by the
  rule's per-unit weight (the 'auto' / 'blend' modes; the unit means then come from the full
  second-moment model with ``cov_model``).
  """
  problems, solutions = list(problems), list(solutions)
  if len(problems) != len(solutions):
    raise ValueError(f'bias constants: {len(problems)} problems but {len(solutions)} solutions')
  if fold not in FOLDS:
    raise ValueError(f'fold must be one of {FOLDS}, got {fold!r}')
  with solvers.single_threaded_blas():  # small host solves (see there)
    return _constants(spec, variables, problems, solutions, fold=fold, rule=rule,
                      cov_model=cov_model)


def _constants(spec, variables, problems, solutions, *, fold, rule, cov_model):
  padding_aware = fold == 'padding_aware'
  out: list[np.ndarray | None] = [None] * len(problems)
  todo = []
  for i, (p, s) in enumerate(zip(problems, solutions)):
    if not p.prune.size:
      continue
    if s.diag.get('method') == 'bnm' and s.diag.get('bias_mode', 'off') != 'off':
      out[i] = None if s.bias is None else np.asarray(s.bias, np.float64)
    else:
      todo.append(i)
  if not todo:
    return out
  probs = [problems[i] for i in todo]
  need_geo = variables is not None and (padding_aware or rule is not None)
  if rule is None:
    # The means of BN units need no propagation (activation_means propagates by itself for
    # BN-free units), and the fold reads only the consumer's kernel and tap fractions: one
    # consumer's float64 kernel at a time, none for consumers without padded taps.
    means = moments_lib.activation_means(spec, variables, probs)
    consts = [E[p.prune] - np.asarray(solutions[i].S_P, np.float64) @ E[p.keep]
              for i, p, E in zip(todo, probs, means)]
    if need_geo and spec is None:
      raise ValueError('the consumer geometry needs the architecture (spec)')
    geo = consumer_geometry(spec, variables) if need_geo and padding_aware else None
    for i, p, c in zip(todo, probs, consts):
      c = 1.0 * c
      if geo is not None and _needs_fold(tap_weight(spec, p, geo), c):
        c = fold_constant(consumer(spec, variables, p, geo), p.prune, c)
      out[i] = c
    return out
  moments = moments_lib.propagate(spec, variables) if need_geo and spec is not None else None
  mom2 = moments_lib.unit_moments(spec, variables, probs, cov_model=cov_model, moments=moments)
  means = [E for E, _ in mom2]
  consts = [E[p.prune] - np.asarray(solutions[i].S_P, np.float64) @ E[p.keep]
            for i, p, E in zip(todo, probs, means)]
  cons = consumers(spec, variables, probs, moments) if need_geo else None
  weight = [1.0] * len(todo)
  if rule is not None:
    S_list = [np.asarray(solutions[i].S_P, np.float64) for i in todo]
    weight = list(rule(probs, mom2, [[(S, None), (S, c)] for S, c in zip(S_list, consts)], cons))
  for k, (i, p, c) in enumerate(zip(todo, probs, consts)):
    if weight[k] > 0:
      c = weight[k] * c
      out[i] = fold_constant(cons[k], p.prune, c) if (cons is not None and padding_aware) else c
  return out


def apply(problems: Sequence[UnitProblem], solutions: Sequence[UnitSolution],
          consts: Sequence[np.ndarray | None]) -> list[UnitSolution]:
  """The solutions with their constants replaced by ``consts`` (checked: |P| finite values)."""
  if len(consts) != len(problems):
    raise ValueError(f'{len(consts)} bias constants for {len(problems)} units')
  out = []
  for p, s, c in zip(problems, solutions, consts):
    c = None if (c is None or p.prune.size == 0) else np.asarray(c, np.float64)
    if c is not None and (c.shape != (p.prune.size,) or not np.all(np.isfinite(c))):
      raise ValueError(f'{p.unit.name}: bias constant of shape {c.shape} or non-finite values;'
                       f' expected {p.prune.size} finite values')
    out.append(dataclasses.replace(s, bias=c, diag={**s.diag, 'bias_correction': c is not None}))
  return out

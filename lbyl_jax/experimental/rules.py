"""Research: per-layer rules that decide how much of the bias correction to apply ('auto', 'blend').

Data-free: each rule predicts, from the BN-moments model alone, the error that a constant would
inject downstream when upstream pruning makes the real input drift from the original
(docs/bias_correction.md, "Per-layer rules"). Neither rule met its goal on every ratio and
checkpoint (benchmarks/RESULTS.md), so both stay behind ``--help-all``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lbyl_jax.pruning.bias import ConsumerTerms
from lbyl_jax.pruning.problem import UnitProblem

RULE_MODES = ('auto', 'blend')  # bias-correction modes decided per unit by auto_bias_rule


# Assumed correlation of a residual between the positions one consumer window reads. 0 makes tap
# contributions add incoherently, 1 fully coherently; the two bound the drift that the NM
# ResNet-56 actually shows at 50 % pruning (measured once on 200 test images: the predicted drift
# at 0 is 1.5-2x too small, at 1 up to 3x too large), and 0.5 tracks it within about 1.5x.
SPATIAL_CORR = 0.5

def _tap_energy(consumer: ConsumerTerms) -> np.ndarray:
  """q_n: E||alpha * sum_t V_t[n]^T r_t||^2 per unit variance of input channel n, for r_t with
  correlation SPATIAL_CORR between any two taps of the window."""
  V2 = consumer.alpha ** 2
  incoherent = np.einsum('tno,o->n', consumer.V ** 2, V2)
  coherent = np.einsum('no,o->n', consumer.V.sum(axis=0) ** 2, V2)
  return (1.0 - SPATIAL_CORR) * incoherent + SPATIAL_CORR * coherent

def injected_error(consumer: ConsumerTerms, prune: np.ndarray, var_r: np.ndarray, mean_r: np.ndarray
                   ) -> float:
  """E||alpha * (sum_t V_t[P]^T r_t)||^2 per output position for a residual r on the pruned
  channels with per-channel variance var_r and mean mean_r.

  Fluctuations: independent across channels (the 'diag' model), correlated SPATIAL_CORR across
  the taps of a window. The mean adds coherently over taps.
  """
  q = _tap_energy(consumer)[prune]
  coherent = consumer.alpha * np.einsum('tpo,p->o', consumer.V[:, prune, :], mean_r)
  return float(np.sum(q * var_r) + np.sum(coherent ** 2))

def consumer_energy(consumer: ConsumerTerms, E: np.ndarray, M: np.ndarray) -> float:
  """Second moment per position of the tensor after the consumer (its BN output, plus the shortcut
  in residual blocks): sum(gamma^2 + beta^2) with a BN, the modelled E||V^T a + bias||^2 without."""
  if consumer.bn_energy is not None:
    return consumer.bn_energy + consumer.shortcut_energy
  var = np.maximum(np.diagonal(M) - E ** 2, 0.0)
  mean = np.einsum('tno,n->o', consumer.V, E) + consumer.bias
  return float(np.sum(_tap_energy(consumer) * var) + np.sum(mean ** 2)) + consumer.shortcut_energy

def row_terms(S, M, keep, prune):
  """Per pruned row j: (M_jj, s_j^T M_Kj, s_j^T M_KK s_j), so E(a_j - t s_j^T a_K)^2 =
  M_jj - 2 t s_j^T M_Kj + t^2 s_j^T M_KK s_j under the model."""
  MPK = M[np.ix_(prune, keep)]
  return (np.diagonal(M)[prune], np.sum(S * MPK, axis=1),
          np.sum((S @ M[np.ix_(keep, keep)]) * S, axis=1))

def residual_moments(E, M, keep, prune, S, c):
  """Per-channel variance and mean of r = a_P - S a_K - c under the model."""
  mpp, num, den = row_terms(S, M, keep, prune)
  second = mpp - 2.0 * num + den
  mean = E[prune] - S @ E[keep]
  var = np.maximum(second - mean ** 2, 0.0)
  return var, mean - (0.0 if c is None else c)

def auto_bias_rule(problems: Sequence[UnitProblem], moments2: Sequence[tuple[np.ndarray, np.ndarray]],
                   candidates: Sequence[Sequence[tuple[np.ndarray, np.ndarray | None]]],
                   cons: Sequence[ConsumerTerms], *, fractional: bool = False) -> list[dict[str, Any]]:
  """Per unit, whether to use the intercept fit, decided from the model's own predictions only.

  Why a rule is needed: under the Gaussian model the intercept fit is never worse, but it moves
  each pruned channel's mean into a constant that does not follow the real input. Upstream pruning
  makes every later unit's real input drift away from the original (measured on the NM ResNet-56
  at 50 %: activations shrink to 0.4-0.7 of their original scale in stages 2-3); a constant that
  was right for the original input is then wrong by about drift * |c|, coherently over all
  positions, while the proportional part of the fit scales with the input.

  Rule (no data, no labels), in forward unit order:
  - D_l = sum over upstream units b of eps_b^2, the modelled relative squared error that unit b's
    chosen fit injects into the tensor after its consumer (its BN output, plus the shortcut in
    residual blocks): eps_b^2 = E||alpha * V_P^T r_b||^2 / E||that tensor||^2
    (:func:`injected_error` with :data:`SPATIAL_CORR`, :func:`consumer_energy`);
  - gain_l = E||a_P - S0 a_K||^2 - E||a_P - S1 a_K - c1||^2 >= 0, what the intercept fit saves
    under the model; risk_l = D_l ||c1||^2, the expected error of the constant when the input's
    scale is off by a relative amount whose square is D_l;
  - intercept iff risk_l < gain_l.

  ``fractional=True`` ('blend'): the same error model over the mixtures S_w = (1 - w) S0 + w S1,
  c_w = w c1 (r_w = (1 - w) r0 + w r1): minimise (1 - w)^2 A + 2 w (1 - w) B + w^2 (C + R) with
  A = E||r0||^2, C = E||r1||^2, B = E[r0 . r1] and R = D_l ||c1||^2, so
  w = (A - B) / (A - 2B + C + R), clipped to [0, 1]. With R = 0 the model's best is w = 1.

  Args:
    problems: the units in forward order.
    moments2: (E[a], M) per unit.
    candidates: per unit [(S, None), (S', c')]: the no-constant option and the constant option.
    cons: the consumers.
    fractional: return the blend weight in [0, 1] ('blend') instead of 0 or 1 ('auto').

  Returns:
    Per unit a dict: weight (1.0: use the constant option, 0.0: not), drift D_l, injected eps_l^2
    of the chosen option, gain, risk (both relative to trace M_PP).
  """
  drift = 0.0
  out = []
  for p, (E, M), cand, con in zip(problems, moments2, candidates, cons):
    second = float(np.sum(np.diagonal(M)[p.prune]))
    res = []
    for S, c in cand:
      var, mean = residual_moments(E, M, p.keep, p.prune, S, c)
      res.append((float(np.sum(var + mean ** 2)), var, mean))
    (S0, _), (S1, c1) = cand[0], cand[1]
    gain = max(res[0][0] - res[1][0], 0.0)
    risk = drift * float(np.sum(np.asarray(c1) ** 2))
    if fractional:
      A, C = res[0][0], res[1][0]
      B = _residual_cross(E, M, p.keep, p.prune, S0, S1, c1)
      den = A - 2.0 * B + C + risk
      w = float(np.clip((A - B) / den, 0.0, 1.0)) if den > 0 else 0.0
      S_w = (1.0 - w) * np.asarray(S0, np.float64) + w * np.asarray(S1, np.float64)
      var, mean = residual_moments(E, M, p.keep, p.prune, S_w, w * np.asarray(c1, np.float64))
    else:
      w = 1.0 if risk < gain else 0.0
      _, var, mean = res[1] if w else res[0]
    energy = consumer_energy(con, E, M)
    eps2 = injected_error(con, p.prune, var, mean) / energy if energy > 0 else 0.0
    scale = second if second > 0 else 1.0
    out.append(dict(weight=w, drift=drift, injected=eps2, gain=gain / scale, risk=risk / scale))
    drift += eps2
  return out

def _residual_cross(E, M, keep, prune, S0, S1, c1) -> float:
  """E[r0 . r1] for r0 = a_P - S0 a_K and r1 = a_P - S1 a_K - c1 under the model."""
  S0 = np.asarray(S0, np.float64)
  S1 = np.asarray(S1, np.float64)
  MPK = M[np.ix_(prune, keep)]
  MKK = M[np.ix_(keep, keep)]
  second = (np.sum(np.diagonal(M)[prune]) - np.sum(S0 * MPK) - np.sum(S1 * MPK)
            + np.sum((S0 @ MKK) * S1))
  return float(second - np.dot(np.asarray(c1, np.float64), E[prune] - S0 @ E[keep]))


def weights(mode: str):
  """The ``rule`` argument of :func:`lbyl_jax.pruning.bias.constants` for 'auto' or 'blend'."""
  if mode not in RULE_MODES:
    raise ValueError(f'bias rule must be one of {RULE_MODES}, got {mode!r}')

  def rule(problems, moments2, candidates, cons):
    return [r['weight'] for r in auto_bias_rule(problems, moments2, candidates, cons,
                                                fractional=mode == 'blend')]

  return rule

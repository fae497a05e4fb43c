"""OMSE: the clipping range that minimises the weights' mean squared quantization error.

Choukroun, Kravchik, Yang and Kisilev, "Low-bit Quantization of Neural Networks for Efficient
Inference", ICCV Workshops 2019 ("OMSE"). We implement the data-free weight part: for every output
channel (``per_channel=True``, the default) or for the whole tensor, the symmetric b-bit grid with
``n = 2^(b-1) - 1`` positive levels gets the step

  Delta* = argmin_{0 < Delta <= max|w| / n}  MSE(Delta),
  MSE(Delta) = sum_i (w_i - Delta clip(round(w_i / Delta), -n, n))^2
             = sum_i (a_i - Delta min(round(a_i / Delta), n))^2,    a_i = |w_i|,

i.e. the clipping value ``alpha = n Delta`` in ``(0, max|w|]``. ``Delta = max|w| / n`` is plain
round-to-nearest (RTN, docs/quantization.md#uniform-quantizer), so OMSE is never worse than RTN in weight MSE. The
paper's activation part (which needs data) and its 2x4-bit "multiple quantization" are not
implemented; activation quantization is not part of this quantizer.

Exact search (not golden-section: MSE(Delta) is not unimodal). As Delta decreases, ``q_i`` steps
from k to k + 1 at the breakpoint ``Delta = a_i / (k + 1/2)`` (k = 0 .. n-1); between breakpoints
every q_i is constant and MSE is the quadratic ``S_aa - 2 Delta S_aq + Delta^2 S_qq``
(S_aq = sum a_i q_i, S_qq = sum q_i^2), minimised on that interval at
``clip(S_aq / S_qq, interval)``. MSE is continuous (at a breakpoint both levels are Delta/2 away),
so sweeping the sorted breakpoints with running sums S_aq += a_i, S_qq += 2k + 1 and taking the
best interval minimum is the exact global minimum over ``(lb, max|w| / n]``. The lower end ``lb``
only removes steps that cannot win: the clipped elements alone cost
``g(Delta) = sum_i (a_i - n Delta)_+^2 <= MSE(Delta)``, and ``g`` decreases in Delta, so every
``Delta < lb`` with ``g(lb) > MSE(max|w| / n)`` is worse than RTN (``lb`` by bisection on g).
Channels are swept together (segmented running sums over a lexicographic sort), O(B log B) for B
breakpoints. The chosen step is stored in float32 and the integers are computed against that
stored step (as in :func:`lbyl_jax.quant.uniform.quantize`); a channel whose float32-rounded step does
not beat RTN's stored result keeps RTN's, so the guarantee holds for what is stored.

Only the symmetric grid is implemented (the paper's weight quantizer); ``symmetric=False`` is an
error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lbyl_jax.quant import uniform as quant
from lbyl_jax.quant.base import QuantResult, Quantizer, register

# Breakpoints processed per chunk of channels (float64 arrays of this length, a few per chunk).
_CHUNK = 1 << 22


def _levels(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def _lower_bound(a: np.ndarray, n: int, dmax: np.ndarray, mse_max: np.ndarray,
                 iters: int = 60) -> np.ndarray:
  """Per row, a step ``lb`` with ``g(lb) > mse_max`` (or 0): no step below it can beat RTN."""
  lo = np.zeros_like(dmax)
  hi = dmax.copy()
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    g = np.sum(np.maximum(a - n * mid[:, None], 0.0) ** 2, axis=1)
    above = g > mse_max
    lo = np.where(above, mid, lo)
    hi = np.where(above, hi, mid)
  return lo


def _sweep(a: np.ndarray, n: int, dmax: np.ndarray, lb: np.ndarray, q0: np.ndarray,
           saa: np.ndarray, saq0: np.ndarray, sqq0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Best (step, mse) per row of ``a`` over the breakpoints inside [lb, dmax)."""
  rows, cols = a.shape
  # Breakpoints k = q0 .. kend of element i lie in [lb, dmax): k >= q0 <=> a/(k+1/2) < dmax.
  with np.errstate(divide='ignore', invalid='ignore'):
    kend = np.where(lb[:, None] > 0, np.floor(a / lb[:, None] - 0.5), n - 1)
  kend = np.minimum(kend, n - 1)
  counts = np.where(a > 0, np.maximum(kend - q0 + 1, 0), 0).astype(np.int64).reshape(-1)
  total = int(counts.sum())
  # The interval just below dmax, with the initial state.
  best_d = np.clip(saq0 / sqq0, lb, dmax)
  best = saa - 2.0 * best_d * saq0 + best_d ** 2 * sqq0
  if total == 0:
    return best_d, best
  elem = np.repeat(np.arange(rows * cols), counts)
  offs = np.cumsum(counts) - counts
  k = q0.reshape(-1)[elem] + (np.arange(total) - offs[elem])
  av = a.reshape(-1)[elem]
  ch = elem // cols
  pos = av / (k + 0.5)
  order = np.lexsort((-pos, ch))
  ch, pos, av, k = ch[order], pos[order], av[order], k[order]
  cs_aq = np.cumsum(av)
  cs_qq = np.cumsum(2.0 * k + 1.0)
  first = np.searchsorted(ch, np.arange(rows))  # first entry of each row (== next row's if empty)
  pre_aq = np.concatenate([[0.0], cs_aq])[first]
  pre_qq = np.concatenate([[0.0], cs_qq])[first]
  saq = saq0[ch] + cs_aq - pre_aq[ch]
  sqq = sqq0[ch] + cs_qq - pre_qq[ch]
  same_next = np.concatenate([ch[1:] == ch[:-1], [False]])
  lower = np.where(same_next, np.concatenate([pos[1:], [0.0]]), lb[ch])
  d = np.clip(saq / sqq, lower, pos)
  mse = saa[ch] - 2.0 * d * saq + d * d * sqq
  # The initial interval ends at the row's first (largest) breakpoint.
  has = first < np.concatenate([first[1:], [total]])
  top = np.where(has, pos[np.minimum(first, total - 1)], lb)
  best_d = np.clip(saq0 / sqq0, top, dmax)
  best = saa - 2.0 * best_d * saq0 + best_d ** 2 * sqq0
  pick = np.lexsort((mse, ch))
  lead = pick[np.searchsorted(ch[pick], np.arange(rows))[has]]
  rows_has = np.flatnonzero(has)
  better = mse[lead] < best[rows_has]
  best_d[rows_has[better]] = d[lead[better]]
  best[rows_has[better]] = mse[lead[better]]
  return best_d, best


def optimal_steps(a, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The exact MSE-optimal symmetric steps of each row of ``|a|`` (module docstring).

  Args:
    a: (R, N) array; each row is one slice (output channel, or the whole tensor).
    bits: 2..8.

  Returns:
    ``(step, mse, mse_rtn)`` per row, float64: the optimal step in ``(0, max|a| / n]``, its squared
    error (sum over the row) and the squared error of RTN's step ``max|a| / n``. An all-zero row
    gets step 1 and error 0.
  """
  bits = quant.check_bits(bits, where='omse')
  a = np.abs(np.asarray(a, np.float64))
  if a.ndim != 2 or a.size == 0:
    raise ValueError(f'optimal_steps: expected a non-empty (rows, n) array, got shape {a.shape}')
  if not np.all(np.isfinite(a)):
    raise ValueError('optimal_steps: the array holds non-finite values')
  n = _levels(bits)
  amax = a.max(axis=1)
  live = amax > 0
  dmax = np.where(live, amax / n, 1.0)
  q0 = np.minimum(np.floor(a / dmax[:, None] + 0.5), n)
  saa = np.sum(a * a, axis=1)
  saq0 = np.sum(a * q0, axis=1)
  sqq0 = np.maximum(np.sum(q0 * q0, axis=1), 1.0)  # >= n^2 on live rows; dead rows are masked
  mse_max = np.maximum(saa - 2.0 * dmax * saq0 + dmax ** 2 * sqq0, 0.0)
  lb = _lower_bound(a, n, dmax, mse_max)
  step = dmax.copy()
  mse = mse_max.copy()
  rows = np.flatnonzero(live)
  # Chunks of rows bounded by the number of candidate breakpoints (each element has at most n).
  per_row = a.shape[1] * n
  size = max(1, _CHUNK // max(per_row, 1))
  for lo in range(0, rows.size, size):
    r = rows[lo:lo + size]
    d, m = _sweep(a[r], n, dmax[r], lb[r], q0[r], saa[r], saq0[r], sqq0[r])
    step[r] = d
    mse[r] = np.maximum(m, 0.0)
  step = np.where(live, step, 1.0)
  return step, np.where(live, mse, 0.0), np.where(live, mse_max, 0.0)


def _rows(w: np.ndarray, per_channel: bool) -> np.ndarray:
  return np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1) if per_channel else w.reshape(1, -1)


def quantize_with_info(w, *, bits: int, per_channel: bool = True, symmetric: bool = True
                       ) -> tuple[quant.QTensor, dict[str, Any]]:
  """OMSE quantization of ``w`` (channels on the last axis) and what it chose.

  Returns:
    ``(qtensor, info)``; info: ``clip`` (alpha / max|w| per slice, 1.0 = RTN), ``mse`` and
    ``mse_rtn`` (summed squared errors of the stored, dequantized float32 weights, OMSE's and
    RTN's), ``rtn_kept`` (slices whose
    float32-rounded optimum did not beat RTN and keep RTN's step).

  Raises:
    ValueError: ``symmetric=False``, bad bits, or an array ``quant.quantize`` rejects.
  """
  if not symmetric:
    raise ValueError('omse: only the symmetric grid is implemented (the paper quantizes weights '
                     'symmetrically); pass symmetric=True')
  rtn = quant.quantize(w, bits=bits, per_channel=per_channel, symmetric=True)  # validates w, bits
  w = np.asarray(w, np.float64)
  n = _levels(bits)
  rows = _rows(w, per_channel)
  step, _, _ = optimal_steps(rows, bits)
  cand = step.astype(np.float32)
  cand = np.where(cand > 0, cand, np.float32(1.0))
  c64 = cand.astype(np.float64)
  q = np.clip(np.round(rows / c64[:, None]), -n, n)

  def stored_error(step, ints):  # against what quant.dequantize returns (float32 values)
    deq = (step[:, None] * ints).astype(np.float32).astype(np.float64)
    return np.sum((rows - deq) ** 2, axis=1)

  err = stored_error(c64, q)
  q_rtn = np.asarray(_rows(rtn.q.astype(np.float64), per_channel))
  err_rtn = stored_error(rtn.scale.astype(np.float64), q_rtn)
  keep_rtn = ~(err <= err_rtn)
  scale = np.where(keep_rtn, rtn.scale, cand).astype(np.float32)
  q = np.where(keep_rtn[:, None], q_rtn, q)
  if per_channel:
    qa = np.moveaxis(q.reshape((w.shape[-1],) + w.shape[:-1]), 0, -1)
  else:
    qa = q.reshape(w.shape)
  qt = quant.QTensor(q=qa.astype(np.int8), scale=scale, zero_point=None, bits=int(bits),
                     axis=w.ndim - 1, shape=tuple(w.shape))
  amax = np.abs(rows).max(axis=1)
  clip = np.where(amax > 0, scale.astype(np.float64) * n / np.where(amax > 0, amax, 1.0), 1.0)
  info = dict(clip=clip, mse=np.where(keep_rtn, err_rtn, err), mse_rtn=err_rtn,
              rtn_kept=int(keep_rtn.sum()))
  return qt, info


def quantize(w, *, bits: int, per_channel: bool = True, symmetric: bool = True,
             path: str | None = None) -> quant.QTensor:
  """OMSE quantization of one kernel (channels on the last axis); a ``uniform.quantize_tree``
  quantizer (``path`` is accepted and ignored)."""
  del path
  return quantize_with_info(w, bits=bits, per_channel=per_channel, symmetric=symmetric)[0]


def omse(variables: Mapping[str, Any], *, bits: int, per_channel: bool = True,
         symmetric: bool = True, keep_8bit: Iterable[str] = (), skip: Iterable[str] = (),
         layer_bits: Mapping[str, int] | None = None
         ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """OMSE weight quantization of every conv / dense kernel of a variable tree.

  Args:
    variables: float variables (original or pruned).
    bits, per_channel, keep_8bit, skip, layer_bits: as :func:`lbyl_jax.quant.uniform.quantize_tree`.
    symmetric: must be True.

  Returns:
    ``(qtree, qmeta, report)``: the stored format of :func:`lbyl_jax.quant.uniform.quantize_tree`
    (``qmeta['method'] = 'omse'``); the report has per layer the mean / min clip ratio
    alpha / max|w|, the summed squared weight error against RTN's, and how many slices kept RTN.
  """
  infos: dict[str, dict[str, Any]] = {}

  def quantizer(w, *, bits, per_channel, symmetric, path):
    qt, info = quantize_with_info(w, bits=bits, per_channel=per_channel, symmetric=symmetric)
    infos[path] = info
    return qt

  qtree, qmeta = quant.quantize_tree(variables, bits=bits, per_channel=per_channel,
                                     symmetric=symmetric, keep_8bit=keep_8bit, skip=skip,
                                     layer_bits=layer_bits, quantizer=quantizer)
  qmeta['method'] = 'omse'
  layers = {p: dict(clip_mean=float(np.mean(i['clip'])), clip_min=float(np.min(i['clip'])),
                    sq_error=float(np.sum(i['mse'])), sq_error_rtn=float(np.sum(i['mse_rtn'])),
                    rtn_kept=i['rtn_kept'])
            for p, i in infos.items()}
  report = dict(method='omse', bits=bits, per_channel=per_channel, symmetric=symmetric,
                layers=layers, nbytes=quant.tree_nbytes(qtree),
                layer_errors={p: d['rel_error'] for p, d in qmeta['layers'].items()})
  return qtree, qmeta, report


@register
@dataclasses.dataclass(frozen=True)
class OMSE(Quantizer):
  """OMSE (Choukroun et al., ICCVW 2019): per channel (or per tensor) the symmetric step with the
  least squared weight error, found exactly (module docstring); integers stored like RTN's."""

  name = 'omse'
  summary = 'OMSE: MSE-optimal clipping of the weights'
  per_layer = True

  def __post_init__(self):
    super().__post_init__()
    if not self.symmetric:
      raise ValueError('--quant-method omse: only the symmetric grid is implemented (the paper '
                       'quantizes weights symmetrically); drop --asymmetric')

  def quantize(self, spec, variables, *, keep_8bit, context):
    del spec, context
    qtree, qmeta, report = omse(variables, bits=self.bits, per_channel=self.per_channel,
                                symmetric=self.symmetric, keep_8bit=keep_8bit)
    return QuantResult(qtree, qmeta, report)

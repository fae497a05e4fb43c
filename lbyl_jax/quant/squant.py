"""SQuant: data-free rounding by flipping rounding directions (Guo et al., ICLR 2022).

Guo, Qiu, Leng, Gao, Zhang, Liu, Yang, Zhu and Guo, "SQuant: On-the-Fly Data-Free Quantization via
Diagonal Hessian Approximation", ICLR 2022. The layer's output error is approximated with a
diagonal Hessian that decomposes into an element-wise, a kernel-wise and an output-channel-wise
term; SQuant minimises them progressively by choosing, for every weight, rounding up or down
instead of to nearest. In grid units (``x = w / Delta`` (+ z), ``q`` the integer, the perturbation
``d = q - x``), with kernels = (output channel m, input channel n) slices over the spatial taps:

- SQuant-E: ``q = round(x)``, so ``|d| <= 1/2`` per element;
- SQuant-K: per kernel, the accumulated perturbation ``e_mn = sum_taps d`` is brought to
  ``|e_mn| <= 1/2`` by flipping ``f = round(|e_mn|)`` elements whose ``d`` has the sign of ``e_mn``
  (``q -= sign(e_mn)``), the ones with the largest ``|d|`` first (each flip changes ``e_mn`` by
  exactly 1 and raises ``sum d^2`` by ``1 - 2|d|``, least for the largest ``|d|``);
- SQuant-C: per output channel, ``e_m = sum_n e_mn`` is brought to ``|e_m| <= 1/2`` by flipping
  ``round(|e_m|)`` more elements, at most one per kernel and only in kernels whose residual
  ``e_mn`` has the sign of ``e_m`` (those move from ``|e_mn| <= 1/2`` to ``|e_mn| < 1``: the paper's
  relaxation of the kernel constraint to 1 -- all kernels at <= 1/2 and the channel at <= 1/2
  cannot hold together in general). Each such kernel offers one candidate: its element with the
  largest ``d`` in the flip direction (for a kernel that flipped past its error in SQuant-K this is
  undoing its last flip; otherwise the next element SQuant-K would have flipped), ranked across
  the channel by that ``|d|``.

After both stages ``|d| < 1`` per element, ``|e_mn| < 1`` per kernel and ``|e_m| <= 1/2`` per
channel (tests/test_omse_squant.py checks these and the SQuant-K-only bound ``|e_mn| <= 1/2``).

Choices where the paper leaves room, and what we do (each matches the official code
github.com/clevercool/SQuant, ``adaptive_round`` / ``SQuant_func``, where it decides):

- the flip count is ``floor(|e| + 1/2)`` (C's ``round``: half away from zero);
- the C-stage candidate per kernel and its priority: as above (the official code's
  ``over_squant`` bookkeeping, written as an argmax over the kernel's current perturbations);
- ties (equal priorities) go to the lower index (stable sorts), so the result is deterministic;
  the official code uses an unstable GPU sort there;
- a kernel with exactly zero accumulated error offers no C-stage candidate (the official code then
  reads index -1, an artefact);
- dense layers have one tap per kernel: SQuant-K is skipped (as in the official code) and SQuant-C
  flips single weights;
- the grid (step, zero point, clipping range) is :func:`lbyl_jax.quant.uniform.quantize`'s (per-channel
  symmetric by default, asymmetric supported): flips never leave the integer range (a flip that
  reduces an accumulated error never needs to, since ``x`` lies inside it).

Vectorised NumPy over all kernels / channels of a layer (argsorts along taps and kernels); float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lbyl_jax.quant import uniform as quant
from lbyl_jax.quant.base import QuantResult, Quantizer, register


def _rank(key: np.ndarray) -> np.ndarray:
  """Rank of every entry along the last axis in descending ``key`` order (stable: lower index
  first among equals); -inf entries rank last."""
  order = np.argsort(-key, axis=-1, kind='stable')
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.broadcast_to(np.arange(key.shape[-1]), key.shape), axis=-1)
  return rank


def _movable(q: np.ndarray, direction: np.ndarray, lo: int, hi: int) -> np.ndarray:
  """Whether ``q + direction`` stays in [lo, hi] (direction broadcast against q)."""
  return np.where(direction > 0, q + 1 <= hi, q - 1 >= lo)


def kernel_stage(q: np.ndarray, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
  """SQuant-K on (O, I, T) integers ``q`` (float64) with targets ``x``: per kernel (last axis)
  flip ``round(|e|)`` same-sign elements, largest ``|d|`` first. Returns the new q."""
  d = q - x
  s = np.sign(d.sum(axis=-1))
  f = np.floor(np.abs(d.sum(axis=-1)) + 0.5)
  p = d * s[..., None]
  cand = (p > 0) & _movable(q, -s[..., None], lo, hi)
  rank = _rank(np.where(cand, p, -np.inf))
  flip = cand & (rank < f[..., None])
  return q - s[..., None] * flip


def channel_stage(q: np.ndarray, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
  """SQuant-C on (O, I, T): per output channel flip ``round(|e_m|)`` elements, one per eligible
  kernel (module docstring). Returns the new q."""
  d = q - x
  ek = d.sum(axis=-1)
  ec = ek.sum(axis=-1)
  s = np.sign(ec)
  f = np.floor(np.abs(ec) + 0.5)
  p = d * s[:, None, None]
  key = np.where((p > 0) & _movable(q, -s[:, None, None], lo, hi), p, -np.inf)
  j = np.argmax(key, axis=-1)  # first maximum: the lower tap index on ties
  pk = np.take_along_axis(key, j[..., None], axis=-1)[..., 0]
  elig = (ek * s[:, None] > 0) & np.isfinite(pk)
  chosen = elig & (_rank(np.where(elig, pk, -np.inf)) < f[:, None])
  delta = np.zeros_like(q)
  np.put_along_axis(delta, j[..., None], (chosen * s[:, None])[..., None].astype(q.dtype), axis=-1)
  return q - delta


def flip_rounding(x: np.ndarray, lo: int, hi: int, *, kernel: bool = True,
                  channel: bool = True) -> np.ndarray:
  """SQuant's integers for targets ``x`` of shape (O, I, T) (output channel, input channel, taps)
  on the integer range [lo, hi]: SQuant-E, then -K (if ``kernel`` and T > 1), then -C (if
  ``channel``). ``x`` is clipped to [lo, hi] first. Returns float64 integer values."""
  x = np.clip(np.asarray(x, np.float64), lo, hi)
  if x.ndim != 3:
    raise ValueError(f'flip_rounding: expected (out, in, taps) targets, got shape {x.shape}')
  q = np.round(x)
  if kernel and x.shape[-1] > 1:
    q = kernel_stage(q, x, lo, hi)
  if channel:
    q = channel_stage(q, x, lo, hi)
  return q


def to_oit(a: np.ndarray) -> np.ndarray:
  """A HWIO conv kernel or an (in, out) dense kernel as (out, in, taps)."""
  a = np.asarray(a)
  if a.ndim == 4:
    return np.transpose(a, (3, 2, 0, 1)).reshape(a.shape[3], a.shape[2], -1)
  if a.ndim == 2:
    return a.T[:, :, None]
  raise ValueError(f'squant: expected a conv (HWIO) or dense (in, out) kernel, got shape {a.shape}')


def from_oit(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of :func:`to_oit` for a kernel of ``shape``."""
  if len(shape) == 4:
    kh, kw, ci, co = shape
    return np.transpose(a.reshape(co, ci, kh, kw), (2, 3, 1, 0))
  return a[:, :, 0].T


def targets(w, qt: quant.QTensor) -> tuple[np.ndarray, int, int]:
  """The grid-unit targets ``x = clip(w / Delta (+ z), lo, hi)`` of ``w`` on ``qt``'s grid (same
  float32 step and zero point), as (O, I, T), and the integer range [lo, hi]. The clip matters
  only for the asymmetric grid, whose rounded zero point can put an extreme weight up to half a
  step outside: that part of the error belongs to the grid, not to the rounding."""
  w = np.asarray(w, np.float64)
  d = quant._bcast(qt.scale.astype(np.float64), w.ndim, qt.axis) if qt.scale.size > 1 else \
      qt.scale.astype(np.float64)
  x = w / d
  if qt.zero_point is not None:
    z = qt.zero_point.astype(np.float64)
    x = x + (quant._bcast(z, w.ndim, qt.axis) if z.size > 1 else z)
  lo, hi = quant.qrange(qt.bits, qt.symmetric)
  return to_oit(np.clip(x, lo, hi)), lo, hi


def quantize(w, *, bits: int, per_channel: bool = True, symmetric: bool = True,
             path: str | None = None, kernel: bool = True, channel: bool = True) -> quant.QTensor:
  """SQuant integers for one kernel on :func:`lbyl_jax.quant.uniform.quantize`'s grid (same step and zero
  point; only the rounding differs). Usable as a ``uniform.quantize_tree`` quantizer."""
  del path
  rtn = quant.quantize(w, bits=bits, per_channel=per_channel, symmetric=symmetric)
  if rtn.q.ndim not in (2, 4):
    raise ValueError(f'squant: expected a conv (HWIO) or dense (in, out) kernel, '
                     f'got shape {rtn.shape}')
  x, lo, hi = targets(w, rtn)
  q = from_oit(flip_rounding(x, lo, hi, kernel=kernel, channel=channel), rtn.shape)
  return quant.QTensor(q=q.astype(rtn.q.dtype), scale=rtn.scale, zero_point=rtn.zero_point,
                       bits=rtn.bits, axis=rtn.axis, shape=rtn.shape)


def accumulated_errors(w, qt: quant.QTensor) -> dict[str, np.ndarray]:
  """Perturbations ``q - x`` of ``qt`` against the targets of ``w`` (:func:`targets`), in grid
  units: ``element`` (O, I, T), ``kernel`` (O, I) and ``channel`` (O,) sums."""
  x, _, _ = targets(w, qt)
  d = to_oit(np.asarray(qt.q, np.float64).reshape(qt.shape)) - x
  return dict(element=d, kernel=d.sum(-1), channel=d.sum((-1, -2)))


def squant(variables: Mapping[str, Any], *, bits: int, per_channel: bool = True,
           symmetric: bool = True, keep_8bit: Iterable[str] = (), skip: Iterable[str] = (),
           layer_bits: Mapping[str, int] | None = None, kernel: bool = True, channel: bool = True
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """SQuant weight quantization of every conv / dense kernel of a variable tree.

  Returns:
    ``(qtree, qmeta, report)`` in :func:`lbyl_jax.quant.uniform.quantize_tree`'s stored format
    (``qmeta['method'] = 'squant'``); the report holds, per layer, the largest absolute
    element / kernel / channel accumulated perturbation (grid units) and the number of weights
    whose rounding differs from round-to-nearest.
  """
  stats: dict[str, dict[str, Any]] = {}

  def quantizer(w, *, bits, per_channel, symmetric, path):
    qt = quantize(w, bits=bits, per_channel=per_channel, symmetric=symmetric, kernel=kernel,
                  channel=channel)
    e = accumulated_errors(w, qt)
    rtn = quant.quantize(w, bits=bits, per_channel=per_channel, symmetric=symmetric)
    stats[path] = dict(max_element=float(np.abs(e['element']).max()),
                       max_kernel=float(np.abs(e['kernel']).max()),
                       max_channel=float(np.abs(e['channel']).max()),
                       flipped=int(np.sum(qt.q != rtn.q)), size=int(qt.q.size))
    return qt

  qtree, qmeta = quant.quantize_tree(variables, bits=bits, per_channel=per_channel,
                                     symmetric=symmetric, keep_8bit=keep_8bit, skip=skip,
                                     layer_bits=layer_bits, quantizer=quantizer)
  qmeta['method'] = 'squant'
  report = dict(method='squant', bits=bits, per_channel=per_channel, symmetric=symmetric,
                kernel_stage=kernel, channel_stage=channel, layers=stats,
                nbytes=quant.tree_nbytes(qtree),
                layer_errors={p: d['rel_error'] for p, d in qmeta['layers'].items()})
  return qtree, qmeta, report


@register
@dataclasses.dataclass(frozen=True)
class SQuant(Quantizer):
  """SQuant (Guo et al., ICLR 2022): RTN's grid, rounding directions flipped to bound the
  element-, kernel- and output-channel-wise accumulated errors (module docstring)."""

  name = 'squant'
  summary = 'SQuant: data-free flips of rounding directions (E/K/C)'
  per_layer = True

  def quantize(self, spec, variables, *, keep_8bit, context):
    del spec, context
    qtree, qmeta, report = squant(variables, bits=self.bits, per_channel=self.per_channel,
                                  symmetric=self.symmetric, keep_8bit=keep_8bit)
    return QuantResult(qtree, qmeta, report)

"""Uniform weight quantization (docs/quantization.md#uniform-quantizer) and quantized variable trees.

The quantizer is the ``Q`` used everywhere (DFQ docs/quantization.md#dfq, UDFC docs/quantization.md#udfc-style-compensation, plain round-to-nearest):

- symmetric (default): ``Delta_c = max|W_c| / (2^(b-1) - 1)``, ``q = clip(round(W / Delta_c))``
  in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, ``What = Delta_c q``;
- asymmetric: ``Delta_c = (max_c - min_c) / (2^b - 1)``, ``z_c = round(-min_c / Delta_c)``,
  ``q = clip(round(W / Delta_c) + z_c, 0, 2^b - 1)``, ``What = Delta_c (q - z_c)``. The range is
  widened to contain 0 (``min_c <= 0 <= max_c``), as in TFLite / PyTorch: zero is then exactly
  representable, ``z_c`` lies in ``[0, 2^b - 1]``, and a constant non-zero channel keeps its value
  instead of collapsing to the Delta=1 guard. For ordinary weights (``min < 0 < max``) this is the
  formula of docs/quantization.md#asymmetric-grid unchanged.

``round`` is round-half-to-even everywhere (``np.round``, the same rule as ``jnp.round``) and an
all-zero channel gets ``Delta = 1``. Channels are output channels: the last axis of an HWIO conv
kernel or an (in, out) dense kernel. Ranges are computed in float64; the step is stored in float32
and the integers are computed against that stored step, so ``dequantize`` reproduces exactly the
weights the error bounds are stated for.

A quantized tree keeps the structure of the variables; every quantized ``.../kernel`` leaf becomes
a dict ``{'q': ints, 'scale': float32 (C,) or (1,), ['zero_point': int32]}`` where ``q`` is int8
(symmetric) / uint8 (asymmetric) in the kernel's shape for ``bits > 4``, or two values per byte
(:func:`pack_int4`, flat uint8) for ``bits <= 4``. Biases and BatchNorm stay float32. ``qmeta`` is
JSON-serializable and is what :mod:`lbyl_jax.io.checkpoint` stores as ``meta['quant']``.

Everything here is host-side NumPy: quantization is a one-off transform of a checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lbyl_jax.core import trees

MIN_BITS = 2
MAX_BITS = 8
FORMAT = 'quantized'
QMETA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class QTensor:
  """A uniformly quantized array.

  Attributes:
    q: integers in the array's shape; int8 for symmetric, uint8 for asymmetric quantization.
    scale: float32 step Delta, shape (C,) per channel or (1,) per tensor.
    zero_point: int32 z, same shape as ``scale`` (asymmetric), or None (symmetric).
    bits: bit width (2..8).
    axis: the channel axis of ``q`` that ``scale`` runs along.
    shape: the array's shape.
  """

  q: np.ndarray
  scale: np.ndarray
  zero_point: np.ndarray | None
  bits: int
  axis: int
  shape: tuple[int, ...]

  @property
  def symmetric(self) -> bool:
    return self.zero_point is None


def check_bits(bits: int, *, where: str = 'quantize') -> int:
  """``bits`` as an int in [2, 8]; a ValueError naming ``where`` otherwise."""
  if isinstance(bits, bool) or int(bits) != bits or not MIN_BITS <= int(bits) <= MAX_BITS:
    raise ValueError(f'{where}: bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}')
  return int(bits)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
  """The integer range [lo, hi] of ``q`` (docs/quantization.md#uniform-quantizer)."""
  if symmetric:
    hi = 2 ** (bits - 1) - 1
    return -hi, hi
  return 0, 2**bits - 1


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
  """Reshapes a per-channel vector to broadcast along ``axis`` of an ``ndim`` array."""
  shape = [1] * ndim
  shape[axis] = -1
  return np.reshape(v, shape)


def quantize(w, *, bits: int, per_channel: bool = True, symmetric: bool = True,
             axis: int = -1) -> QTensor:
  """Quantizes ``w`` with the uniform quantizer of docs/quantization.md#uniform-quantizer.

  Args:
    w: array to quantize (conv HWIO or dense (in, out) kernels, or N x D filter rows with
      ``axis=0``).
    bits: 2..8.
    per_channel: one step per slice along ``axis`` (default) or one for the whole tensor.
    symmetric: signed symmetric grid (default) or asymmetric grid with a zero point.
    axis: the output-channel axis (default: last).

  Returns:
    The :class:`QTensor`.

  Raises:
    ValueError: ``bits`` outside 2..8, a 0-d or empty array, or non-finite values.
  """
  bits = check_bits(bits)
  w = np.asarray(w, np.float64)
  if w.ndim == 0 or w.size == 0:
    raise ValueError(f'quantize: expected a non-empty array with at least one axis, got shape {w.shape}')
  if not np.all(np.isfinite(w)):
    raise ValueError('quantize: the array holds non-finite values')
  axis = axis % w.ndim
  red = tuple(a for a in range(w.ndim) if a != axis) if per_channel else tuple(range(w.ndim))
  lo_q, hi_q = qrange(bits, symmetric)
  if symmetric:
    amax = np.max(np.abs(w), axis=red)
    delta = amax / hi_q
  else:
    wmin = np.minimum(np.min(w, axis=red), 0.0)
    wmax = np.maximum(np.max(w, axis=red), 0.0)
    delta = (wmax - wmin) / hi_q
  delta = np.atleast_1d(delta).astype(np.float32)
  delta = np.where(delta > 0, delta, np.float32(1.0))  # docs/quantization.md#rounding-and-empty-channels: all-zero channel -> Delta=1
  d = _bcast(delta.astype(np.float64), w.ndim, axis) if per_channel else delta.astype(np.float64)
  if symmetric:
    q = np.clip(np.round(w / d), lo_q, hi_q).astype(np.int8)
    zp = None
  else:
    zp = np.round(-np.atleast_1d(wmin) / delta.astype(np.float64))
    z = _bcast(zp, w.ndim, axis) if per_channel else zp
    q = np.clip(np.round(w / d) + z, lo_q, hi_q).astype(np.uint8)
    zp = zp.astype(np.int32)
  return QTensor(q=q, scale=delta, zero_point=zp, bits=bits, axis=axis, shape=tuple(w.shape))


def dequantize(qt: QTensor) -> np.ndarray:
  """``Delta (q - z)`` as float32 (docs/quantization.md#uniform-quantizer)."""
  nd = len(qt.shape)
  q = np.asarray(qt.q, np.float64).reshape(qt.shape)
  if qt.zero_point is not None:
    q = q - _bcast(np.asarray(qt.zero_point, np.float64), nd, qt.axis)
  return (q * _bcast(np.asarray(qt.scale, np.float64), nd, qt.axis)).astype(np.float32)


def fake_quantize(w, *, bits: int, per_channel: bool = True, symmetric: bool = True,
                  axis: int = -1) -> np.ndarray:
  """``dequantize(quantize(w))`` in float64 (the What of docs/quantization.md#udfc-style-compensation / docs/quantization.md#dfq)."""
  qt = quantize(w, bits=bits, per_channel=per_channel, symmetric=symmetric, axis=axis)
  return dequantize(qt).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Packing: two 4-bit values per byte.


def pack_int4(q) -> np.ndarray:
  """Packs integers in [-8, 7] (signed) or [0, 15] (unsigned) two per byte (flat uint8).

  Element ``2i`` goes to the low nibble of byte ``i`` and ``2i + 1`` to the high nibble; an odd
  count leaves the last high nibble zero. Signed values are stored as 4-bit two's complement, so
  :func:`unpack_int4` needs to be told the signedness.
  """
  flat = np.asarray(q).reshape(-1)
  if flat.size and not np.issubdtype(flat.dtype, np.integer):
    raise ValueError(f'pack_int4: expected integers, got dtype {flat.dtype}')
  flat = flat.astype(np.int16)
  if flat.size and (flat.min() < -8 or flat.max() > 15 or (flat.min() < 0 and flat.max() > 7)):
    raise ValueError(
        f'pack_int4: values must lie in [-8, 7] or [0, 15], got [{flat.min()}, {flat.max()}]')
  nib = (flat & 0xF).astype(np.uint8)
  if nib.size % 2:
    nib = np.concatenate([nib, np.zeros(1, np.uint8)])
  return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, n: int, *, signed: bool = True) -> np.ndarray:
  """Inverse of :func:`pack_int4`: the first ``n`` values, int8 (signed) or uint8 (unsigned)."""
  packed = np.asarray(packed, np.uint8).reshape(-1)
  if not 0 <= n <= 2 * packed.size:
    raise ValueError(f'unpack_int4: cannot read {n} values from {packed.size} bytes')
  out = np.empty(2 * packed.size, np.uint8)
  out[0::2] = packed & 0xF
  out[1::2] = packed >> 4
  out = out[:n]
  if signed:
    return np.where(out >= 8, out.astype(np.int16) - 16, out).astype(np.int8)
  return out


# --------------------------------------------------------------------------------------------
# Quantized trees.


def kernel_paths(variables: Mapping[str, Any]) -> list[str]:
  """Layer paths (relative to ``params``) of every conv / dense kernel, in key order."""
  out = []

  def walk(node, prefix):
    for key, value in node.items():
      path = f'{prefix}/{key}' if prefix else str(key)
      if isinstance(value, Mapping):
        walk(value, path)
      elif key == 'kernel' and np.ndim(value) in (2, 4):
        out.append(prefix)

  walk(variables['params'], '')
  return out


def normalize_layer_paths(paths: Iterable[str] | None, known: Sequence[str], what: str) -> set[str]:
  """Layer paths (a trailing '/kernel' allowed) checked against ``known``; ValueError naming ``what``."""
  out = set()
  for p in paths or ():
    p = p.strip('/')
    p = p[: -len('/kernel')] if p.endswith('/kernel') else p
    if p not in known:
      raise ValueError(f'{what}: {p!r} is not a conv/dense layer; known layers: {", ".join(known)}')
    out.add(p)
  return out


def encode(qt: QTensor) -> dict[str, np.ndarray]:
  """The stored leaves of one quantized kernel (packed for bits <= 4)."""
  q = pack_int4(qt.q) if qt.bits <= 4 else np.asarray(qt.q)
  out = {'q': q, 'scale': np.asarray(qt.scale, np.float32)}
  if qt.zero_point is not None:
    out['zero_point'] = np.asarray(qt.zero_point, np.int32)
  return out


def decode(stored: Mapping[str, Any], info: Mapping[str, Any]) -> QTensor:
  """Inverse of :func:`encode`, given the layer's entry of ``qmeta['layers']``."""
  shape = tuple(int(s) for s in info['shape'])
  signed = bool(info['symmetric'])
  if info['packed']:
    q = unpack_int4(stored['q'], int(np.prod(shape)), signed=signed).reshape(shape)
  else:
    q = np.asarray(stored['q']).reshape(shape)
  zp = np.asarray(stored['zero_point'], np.int32) if 'zero_point' in stored else None
  return QTensor(q=q, scale=np.asarray(stored['scale'], np.float32), zero_point=zp,
                 bits=int(info['bits']), axis=int(info['axis']), shape=shape)


def relative_error(w, what) -> float:
  """``||W - What||_F / ||W||_F`` (0 for an all-zero W quantized exactly)."""
  w = np.asarray(w, np.float64)
  err = np.linalg.norm(w - np.asarray(what, np.float64))
  ref = np.linalg.norm(w)
  return float(err / ref) if ref > 0 else float(err)


def quantize_tree(variables: Mapping[str, Any], *, bits: int, per_channel: bool = True,
                  symmetric: bool = True, keep_8bit: Iterable[str] = (),
                  skip: Iterable[str] = (), layer_bits: Mapping[str, int] | None = None,
                  quantizer: Callable[..., QTensor] | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Quantizes every conv / dense kernel of a variable tree (docs/quantization.md#storage).

  Args:
    variables: ``{'params': ..., ['batch_stats': ...]}``.
    bits: bit width of the quantized kernels (2..8).
    per_channel, symmetric: quantizer options (docs/quantization.md#uniform-quantizer).
    keep_8bit: layer paths (e.g. ``first_and_last_layers(spec)``) quantized at 8 bits instead.
    skip: layer paths left in float32.
    layer_bits: per-layer bit widths overriding ``bits`` (mixed precision); ``keep_8bit`` wins.
    quantizer: ``quantizer(w, bits=, per_channel=, symmetric=, path=) -> QTensor`` replacing
      :func:`quantize` (OMSE clipping, SQuant rounding): any grid whose integers and steps fit
      the stored format (one float32 step per output channel or per tensor, last axis); checked.

  Returns:
    ``(qtree, qmeta)``: the tree with quantized kernels (biases and BN in float32) and the
    JSON-serializable description :func:`dequantize_tree` needs, including each layer's relative
    Frobenius quantization error (``qmeta['layers'][path]['rel_error']``).
  """
  bits = check_bits(bits, where='quantize_tree')
  known = kernel_paths(variables)
  keep = normalize_layer_paths(keep_8bit, known, 'quantize_tree keep_8bit')
  skipped = normalize_layer_paths(skip, known, 'quantize_tree skip')
  per_layer = {}
  for p, b in (layer_bits or {}).items():
    (name,) = normalize_layer_paths([p], known, 'quantize_tree layer_bits')
    per_layer[name] = check_bits(b, where=f'quantize_tree layer_bits[{p!r}]')
  qtree = trees.copy_arrays(variables)
  layers = {}
  for path in known:
    if path in skipped:
      continue
    b = MAX_BITS if path in keep else per_layer.get(path, bits)
    w = np.asarray(trees.get_path(variables['params'], path)['kernel'])
    if quantizer is None:
      qt = quantize(w, bits=b, per_channel=per_channel, symmetric=symmetric)
    else:
      qt = quantizer(w, bits=b, per_channel=per_channel, symmetric=symmetric, path=path)
      _check_qtensor(qt, w, b, per_channel, symmetric, path)
    trees.get_path(qtree['params'], path)['kernel'] = encode(qt)
    layers[path] = dict(bits=b, shape=list(qt.shape), axis=qt.axis, packed=b <= 4,
                        symmetric=bool(symmetric), per_channel=bool(per_channel),
                        rel_error=relative_error(w, dequantize(qt)))
  qmeta = dict(format=FORMAT, version=QMETA_VERSION, bits=bits, per_channel=bool(per_channel),
               symmetric=bool(symmetric), keep_8bit=sorted(keep), skip=sorted(skipped),
               layers=layers)
  return qtree, qmeta


def _check_qtensor(qt: QTensor, w: np.ndarray, bits: int, per_channel: bool, symmetric: bool,
                   path: str) -> None:
  """A custom quantizer's result must fit the stored format of :func:`encode` / :func:`decode`."""
  lo, hi = qrange(bits, symmetric)
  n_scale = w.shape[-1] if per_channel else 1
  problems = []
  if tuple(qt.shape) != tuple(w.shape) or tuple(np.shape(qt.q)) != tuple(w.shape):
    problems.append(f'shape {np.shape(qt.q)} != {w.shape}')
  if qt.bits != bits or qt.axis != w.ndim - 1 or qt.symmetric != symmetric:
    problems.append(f'bits/axis/symmetric {qt.bits}/{qt.axis}/{qt.symmetric}')
  if np.shape(qt.scale) != (n_scale,) or np.asarray(qt.scale).dtype != np.float32:
    problems.append(f'scale {np.shape(qt.scale)} {np.asarray(qt.scale).dtype}')
  if np.asarray(qt.q).dtype != (np.int8 if symmetric else np.uint8):
    problems.append(f'integer dtype {np.asarray(qt.q).dtype}')
  if np.size(qt.q) and (np.min(qt.q) < lo or np.max(qt.q) > hi):
    problems.append(f'integers outside [{lo}, {hi}]')
  if problems:
    raise ValueError(f'quantize_tree: the quantizer returned a tensor that does not fit the stored '
                     f'format for {path}: {"; ".join(problems)}')


def _check_qmeta(qmeta: Mapping[str, Any]) -> None:
  if not isinstance(qmeta, Mapping) or qmeta.get('format') != FORMAT or 'layers' not in qmeta:
    raise ValueError(f"not a quantization description (need format={FORMAT!r} and 'layers'): {qmeta!r:.200}")


def dequantize_tree(qtree: Mapping[str, Any], qmeta: Mapping[str, Any]) -> dict[str, Any]:
  """The float32 variables of a quantized tree (what :func:`lbyl_jax.io.checkpoint.load` returns)."""
  _check_qmeta(qmeta)
  out = trees.copy_arrays(qtree)
  for path, info in qmeta['layers'].items():
    layer = trees.get_path(out['params'], path)
    if not isinstance(layer.get('kernel'), Mapping):
      raise ValueError(f'dequantize_tree: {path}/kernel is not a quantized leaf')
    layer['kernel'] = dequantize(decode(layer['kernel'], info))
  return out


def integer_form(qtree: Mapping[str, Any], qmeta: Mapping[str, Any]
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
  """Per quantized layer: ``(q, scale, zero_point)`` with ``q`` unpacked to the kernel's shape
  (int8 / uint8), for deployment on integer hardware. ``kernel = scale * (q - zero_point)``
  along the last axis."""
  _check_qmeta(qmeta)
  out = {}
  for path, info in qmeta['layers'].items():
    qt = decode(trees.get_path(qtree['params'], path)['kernel'], info)
    out[path] = (qt.q, qt.scale, qt.zero_point)
  return out


def tree_nbytes(tree: Mapping[str, Any]) -> int:
  """Bytes actually stored by the leaves of a (quantized or float) tree."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def layer_errors(variables: Mapping[str, Any], qtree: Mapping[str, Any],
                 qmeta: Mapping[str, Any]) -> dict[str, float]:
  """Relative Frobenius error ``||W - What|| / ||W||`` of every quantized kernel, against the
  float ``variables`` of the same shapes (e.g. the weights before quantization)."""
  deq = dequantize_tree(qtree, qmeta)
  return {p: relative_error(trees.get_path(variables['params'], p)['kernel'], trees.get_path(deq['params'], p)['kernel'])
          for p in qmeta['layers']}

"""Readers for the non-pickle weight formats: ``.safetensors`` and ``.npz``.

Both return a flat ``{name: np.ndarray}`` dict with the names exactly as stored, like a PyTorch
``state_dict``; mapping names to Flax variables is :mod:`converters.mapping`'s job.

The safetensors reader is written against the published file layout rather than the
``safetensors`` package, so converting weights needs nothing beyond NumPy:

  [8 bytes: N, little-endian uint64][N bytes: UTF-8 JSON header][byte buffer]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the byte buffer) plus an optional ``"__metadata__"`` dict of strings.
Tensor data is little-endian and C-ordered.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

# safetensors dtype codes -> little-endian NumPy dtypes. BF16 has no NumPy dtype: it is read as
# raw uint16 and widened to float32 (exact: bf16 is the top half of a float32).
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    'F64': np.dtype('<f8'),
    'F32': np.dtype('<f4'),
    'F16': np.dtype('<f2'),
    'BF16': np.dtype('<u2'),
    'I64': np.dtype('<i8'),
    'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'),
    'I8': np.dtype('i1'),
    'U64': np.dtype('<u8'),
    'U32': np.dtype('<u4'),
    'U16': np.dtype('<u2'),
    'U8': np.dtype('u1'),
    'BOOL': np.dtype('?'),
}

# The reference implementation refuses headers above 100 MB; a larger length field is a sign of
# a file that is not safetensors at all (e.g. a zip or pickle whose first bytes read as a length).
_MAX_HEADER_BYTES = 100_000_000


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
  return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file into ``{name: array}`` without the safetensors package.

  BF16 tensors are returned as float32; every other dtype keeps its width, in native byte order.

  Raises:
    ValueError: the file is not safetensors, is truncated, or its header is inconsistent
      (unknown dtype, offsets outside the data, a byte count that does not match the shape,
      overlapping tensors); the message names the file and the offending tensor.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f'{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)')
    n = int.from_bytes(prefix, 'little')
    if n < 2 or n > _MAX_HEADER_BYTES:
      raise ValueError(f'{path}: not a safetensors file (header length field {n} is implausible)')
    if 8 + n > size:
      raise ValueError(f'{path}: truncated safetensors file: header needs {n} bytes, file has {size - 8} after the length field')
    header_bytes = f.read(n)
    try:
      header = json.loads(header_bytes.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'{path}: not a safetensors file (header is not UTF-8 JSON: {e})') from None
    if not isinstance(header, dict):
      raise ValueError(f'{path}: safetensors header must be a JSON object, got {type(header).__name__}')
    header.pop('__metadata__', None)
    entries = _validate_header(path, header)
    data_len = size - 8 - n
    needed = max((end for _, _, _, (_, end) in entries), default=0)
    if needed > data_len:
      worst = max(entries, key=lambda e: e[3][1])[0]
      raise ValueError(
          f'{path}: truncated safetensors file: tensor {worst!r} ends at byte {needed} of the data'
          f' section, which holds only {data_len} bytes'
      )
    # One read of the data section; the arrays are views into it (no second copy).
    buf = bytearray(needed)
    got = f.readinto(buf)
    if got != needed:
      raise ValueError(f'{path}: truncated safetensors file: read {got} of {needed} data bytes')

  out: dict[str, np.ndarray] = {}
  for name, code, shape, (begin, end) in entries:
    dtype = _SAFETENSORS_DTYPES[code]
    count = (end - begin) // dtype.itemsize
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=begin).reshape(shape)
    if code == 'BF16':
      arr = _bf16_to_f32(arr)
    elif not arr.dtype.isnative:  # only on big-endian hosts
      arr = arr.astype(arr.dtype.newbyteorder('='))
    out[name] = arr
  return out


def _validate_header(path: str, header: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...], tuple[int, int]]]:
  """Checks every header entry; returns (name, dtype, shape, (begin, end)) sorted by offset."""
  entries = []
  for name, info in header.items():
    if not isinstance(info, dict) or not {'dtype', 'shape', 'data_offsets'} <= set(info):
      raise ValueError(f'{path}: safetensors entry {name!r} lacks dtype/shape/data_offsets: {info!r}')
    code = info['dtype']
    if code not in _SAFETENSORS_DTYPES:
      raise ValueError(
          f'{path}: tensor {name!r} has unsupported dtype {code!r}'
          f' (supported: {", ".join(_SAFETENSORS_DTYPES)})'
      )
    shape = info['shape']
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
      raise ValueError(f'{path}: tensor {name!r} has an invalid shape {shape!r}')
    offsets = info['data_offsets']
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
      raise ValueError(f'{path}: tensor {name!r} has invalid data_offsets {offsets!r}')
    expected = int(np.prod(shape, dtype=np.int64)) * _SAFETENSORS_DTYPES[code].itemsize
    if offsets[1] - offsets[0] != expected:
      raise ValueError(
          f'{path}: tensor {name!r} ({code} {tuple(shape)}) needs {expected} bytes but its'
          f' data_offsets {offsets} span {offsets[1] - offsets[0]}'
      )
    entries.append((name, code, tuple(shape), (offsets[0], offsets[1])))
  entries.sort(key=lambda e: e[3])
  for (a, _, _, (_, a_end)), (b, _, _, (b_begin, _)) in zip(entries, entries[1:]):
    if b_begin < a_end:
      raise ValueError(f'{path}: tensors {a!r} and {b!r} overlap in the data section')
  return entries


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads an ``.npz`` archive into ``{name: array}`` (names as saved; '/'-joined Flax paths too).

  Pickled object arrays are refused (``allow_pickle=False``): an npz of weights never needs them,
  and unpickling an untrusted file can run code.

  Raises:
    ValueError: the file is not a readable npz archive (a ``.npy`` file, a truncated or corrupt
      zip, an object array).
  """
  path = os.fspath(path)
  try:
    loaded = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise ValueError(f'{path}: not a readable .npz archive ({type(e).__name__}: {e})') from None
  except ValueError as e:
    raise ValueError(f'{path}: not a readable .npz archive ({e})') from None
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise ValueError(f'{path}: expected an .npz archive of named arrays, found a single {type(loaded).__name__}')
  out: dict[str, np.ndarray] = {}
  with loaded:
    for name in loaded.files:
      try:
        out[name] = loaded[name]
      except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise ValueError(f'{path}: cannot read array {name!r} ({type(e).__name__}: {e})') from None
  return out

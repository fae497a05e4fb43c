"""Readers for the non-pickle weight formats: ``.safetensors`` and ``.npz``.

Both return a flat ``{name: np.ndarray}`` dict with the names exactly as stored, like a PyTorch
``state_dict``; mapping names to Flax variables is :mod:`converters.mapping`'s job.

The safetensors reader is written against the published file layout rather than the
``safetensors`` package, so converting weights needs nothing beyond NumPy:

  [8 bytes: N, little-endian uint64][N bytes: UTF-8 JSON header][byte buffer]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the byte buffer) plus an optional ``"__metadata__"`` dict of strings.
Tensor data is little-endian and C-ordered.

Both readers are bounded by the file: a safetensors header must account for every byte it
declares; an npz member's ``.npy`` header (shape x itemsize) must equal the member's declared size
before a byte of data is read, and compressed members may not inflate beyond a fixed ratio of the
archive (:class:`ZipBudget`), so a small file cannot make them allocate gigabytes.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Collection
from typing import Any

import numpy as np

from converters.errors import CheckpointError

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

# A compressed zip member may inflate to at most ZIP_RATIO x the archive size, plus an allowance
# (deflate reaches ~1000x on constant data; weights and images compress 1-5x).
ZIP_RATIO = 64
ZIP_ALLOWANCE = 16 << 20
_NPY_KINDS = frozenset('biufcSUmM')


class ZipBudget:
  """Reads zip members only after checking their declared sizes; caps the total inflated bytes.

  Args:
    zf: the open archive.
    archive_size: its size on disk.
    error: the exception type raised (a reader's own error type).
  """

  def __init__(self, zf: zipfile.ZipFile, archive_size: int, error: type[Exception]):
    self.zf = zf
    self.error = error
    self.archive_size = archive_size
    self.limit = ZIP_RATIO * archive_size + ZIP_ALLOWANCE
    self.total = 0

  def info(self, name: str) -> zipfile.ZipInfo:
    try:
      return self.zf.getinfo(name)
    except KeyError:
      raise self.error(f'corrupt archive: member {name!r} is missing') from None

  def check(self, info: zipfile.ZipInfo, expected: int | None = None) -> None:
    """Refuses a member whose declared size is wrong or too large, before reading it."""
    if expected is not None and info.file_size != expected:
      raise self.error(
          f'member {info.filename!r} declares {info.file_size} bytes but its content needs'
          f' {expected}')
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
      raise self.error(
          f'member {info.filename!r} is stored uncompressed but declares {info.file_size} bytes'
          f' for {info.compress_size} stored')
    if info.file_size > self.limit - self.total:
      raise self.error(
          f'member {info.filename!r} declares {info.file_size} bytes: reading it would inflate'
          f' the {self.archive_size}-byte archive beyond {self.limit} bytes (a zip bomb?)')

  def charge(self, info: zipfile.ZipInfo) -> None:
    self.check(info)
    self.total += info.file_size

  def read(self, info: zipfile.ZipInfo, expected: int | None = None) -> bytearray:
    """The member's bytes, exactly its declared size (CRC-checked by zipfile)."""
    self.check(info, expected)
    self.total += info.file_size
    buf = bytearray(info.file_size)
    with self.zf.open(info) as f:
      got = f.readinto(buf)
      extra = f.read(1)
    if got != info.file_size or extra:
      raise self.error(
          f'member {info.filename!r} does not hold its declared {info.file_size} bytes')
    return buf


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
  return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file into ``{name: array}`` without the safetensors package.

  BF16 tensors are returned as float32; every other dtype keeps its width, in native byte order.

  Raises:
    CheckpointError (a ValueError): the file is not safetensors, is truncated, or its header is
      inconsistent (unknown dtype, offsets outside the data, a byte count that does not match the
      shape, overlapping tensors); the message names the file and the offending tensor.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise CheckpointError(f'{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)')
    n = int.from_bytes(prefix, 'little')
    if n < 2 or n > _MAX_HEADER_BYTES:
      raise CheckpointError(f'{path}: not a safetensors file (header length field {n} is implausible)')
    if 8 + n > size:
      raise CheckpointError(f'{path}: truncated safetensors file: header needs {n} bytes, file has {size - 8} after the length field')
    header_bytes = f.read(n)
    try:
      header = json.loads(header_bytes.decode('utf-8'))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nesting, huge numbers
      raise CheckpointError(f'{path}: not a safetensors file (header is not UTF-8 JSON: {e})') from None
    if not isinstance(header, dict):
      raise CheckpointError(f'{path}: safetensors header must be a JSON object, got {type(header).__name__}')
    header.pop('__metadata__', None)
    entries = _validate_header(path, header)
    data_len = size - 8 - n
    needed = max((end for _, _, _, (_, end) in entries), default=0)
    if needed > data_len:
      worst = max(entries, key=lambda e: e[3][1])[0]
      raise CheckpointError(
          f'{path}: truncated safetensors file: tensor {worst!r} ends at byte {needed} of the data'
          f' section, which holds only {data_len} bytes'
      )
    # One read of the data section; the arrays are views into it (no second copy).
    buf = bytearray(needed)
    got = f.readinto(buf)
    if got != needed:
      raise CheckpointError(f'{path}: truncated safetensors file: read {got} of {needed} data bytes')

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


def _short(value: Any) -> str:
  text = repr(value) if not isinstance(value, (list, dict)) or len(value) < 20 else (
      f'<{type(value).__name__} of {len(value)} items>')
  return text if len(text) <= 200 else text[:200] + '...'


def _validate_header(path: str, header: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...], tuple[int, int]]]:
  """Checks every header entry; returns (name, dtype, shape, (begin, end)) sorted by offset."""
  entries = []
  for name, info in header.items():
    if not isinstance(info, dict) or not {'dtype', 'shape', 'data_offsets'} <= set(info):
      raise CheckpointError(
          f'{path}: safetensors entry {name!r} lacks dtype/shape/data_offsets: {_short(info)}')
    code = info['dtype']
    if not isinstance(code, str) or code not in _SAFETENSORS_DTYPES:
      raise CheckpointError(
          f'{path}: tensor {name!r} has unsupported dtype {code!r}'
          f' (supported: {", ".join(_SAFETENSORS_DTYPES)})'
      )
    shape = info['shape']
    if (not isinstance(shape, list) or len(shape) > 64
        or not all(type(d) is int and d >= 0 for d in shape)):
      raise CheckpointError(f'{path}: tensor {name!r} has an invalid shape {_short(shape)}')
    offsets = info['data_offsets']
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
      raise CheckpointError(f'{path}: tensor {name!r} has invalid data_offsets {_short(offsets)}')
    expected = math.prod(shape) * _SAFETENSORS_DTYPES[code].itemsize
    if offsets[1] - offsets[0] != expected:
      raise CheckpointError(
          f'{path}: tensor {name!r} ({code} {tuple(shape)}) needs {expected} bytes but its'
          f' data_offsets {offsets} span {offsets[1] - offsets[0]}'
      )
    entries.append((name, code, tuple(shape), (offsets[0], offsets[1])))
  entries.sort(key=lambda e: e[3])
  for (a, _, _, (_, a_end)), (b, _, _, (b_begin, _)) in zip(entries, entries[1:]):
    if b_begin < a_end:
      raise CheckpointError(f'{path}: tensors {a!r} and {b!r} overlap in the data section')
  return entries


def read_npz(path: str | os.PathLike,
             names: Collection[str] | None = None) -> dict[str, np.ndarray]:
  """Reads an ``.npz`` archive into ``{name: array}`` (names as saved; '/'-joined Flax paths too).

  Pickled object arrays are refused: an npz of weights or images never needs them, and
  unpickling an untrusted file can run code. Each member's ``.npy`` header is read first and its
  shape x itemsize must match the member's declared size before any data is read; compressed
  members may not inflate beyond :data:`ZIP_RATIO` x the archive size (plus an allowance).

  Args:
    path: the archive.
    names: read only these arrays (in this order); all of them if None.

  Raises:
    CheckpointError (a ValueError): the file is not a readable npz archive (a ``.npy`` file, a
      truncated or corrupt zip, an object or structured array, a header that disagrees with the
      member's size, a member that would inflate too far, a missing name); the message names the
      file and array.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(6)
  if head == b'\x93NUMPY':
    raise CheckpointError(
        f'{path}: expected an .npz archive of named arrays, found a single .npy array')
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
      raise
    raise CheckpointError(
        f'{path}: not a readable .npz archive ({type(e).__name__}: {e})') from None
  out: dict[str, np.ndarray] = {}
  with zf:
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
      if info.is_dir():
        continue
      members[info.filename.removesuffix('.npy')] = info
    wanted = list(members) if names is None else list(names)
    missing = [n for n in wanted if n not in members]
    if missing:
      raise CheckpointError(f'{path}: .npz lacks {sorted(missing)} (has {sorted(members)})')
    budget = ZipBudget(zf, size, CheckpointError)
    for name in wanted:
      try:
        out[name] = _read_npy_member(budget, members[name])
      except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
              NotImplementedError, OverflowError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
          raise
        detail = str(e) if isinstance(e, CheckpointError) else f'{type(e).__name__}: {e}'
        raise CheckpointError(f'{path}: cannot read array {name!r}: {detail}') from None
  return out


def _read_npy_member(budget: ZipBudget, info: zipfile.ZipInfo) -> np.ndarray:
  """One ``.npy`` member, its header checked against the member's declared size first."""
  budget.charge(info)
  fmt = np.lib.format
  with budget.zf.open(info) as f:
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):
      raise CheckpointError(f'unsupported .npy format version {version}')
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    try:  # a bounded (10,000-character) literal parse, but it raises many exception types
      shape, fortran, dtype = read_header(f)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, (zipfile.BadZipFile, OSError, zlib.error)):
        raise
      raise CheckpointError(f'malformed .npy header ({type(e).__name__}: {e})') from None
    header = f.tell()
    if dtype.hasobject:
      raise CheckpointError('object arrays are not read (they would need pickle)')
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in _NPY_KINDS or (
        dtype.itemsize == 0):
      raise CheckpointError(f'dtype {dtype} is not a plain numeric or string dtype')
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if header + nbytes != info.file_size:
      raise CheckpointError(
          f'its header declares shape {shape} of {dtype} ({nbytes} data bytes) but the member'
          f' holds {info.file_size - header}')
    buf = bytearray(nbytes)
    got = f.readinto(buf) if nbytes else 0
    extra = f.read(1)
  if got != nbytes or extra:
    raise CheckpointError(f'member holds {got} of its {nbytes} data bytes')
  return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape, order='F' if fortran else 'C')

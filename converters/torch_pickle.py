"""Reads PyTorch checkpoints without torch, and without ever running code from the file.

Two serializations exist:

* legacy (torch < 1.6, and ``_use_new_zipfile_serialization=False``): a pickle of a magic number,
  a protocol version, a system-info dict, then the object pickle whose tensors point at storages
  through ``persistent_id``, then a pickle of the storage keys, then each storage as an int64
  element count followed by its raw little-endian bytes;
* zip (torch >= 1.6): a zip archive ``<name>/data.pkl`` plus one file ``<name>/data/<key>`` per
  storage.

The unpickler resolves globals against an explicit allow-list; anything else (``os.system``,
``builtins.eval``, arbitrary classes) raises :class:`UnsafePickleError` naming the global, before
it could be called. Tensors come back as NumPy arrays.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class CheckpointError(ValueError):
  """A file that is not a readable PyTorch checkpoint, or that does not fit an architecture."""


class UnsafePickleError(CheckpointError):
  """The pickle references a global outside the allow-list."""


_STORAGE_DTYPES = {
    'DoubleStorage': np.dtype('<f8'),
    'FloatStorage': np.dtype('<f4'),
    'HalfStorage': np.dtype('<f2'),
    'BFloat16Storage': np.dtype('<u2'),  # converted to float32 on materialization
    'LongStorage': np.dtype('<i8'),
    'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'),
    'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'),
    'BoolStorage': np.dtype('?'),
}

_TORCH_DTYPES = {
    'float64': 'DoubleStorage', 'double': 'DoubleStorage',
    'float32': 'FloatStorage', 'float': 'FloatStorage',
    'float16': 'HalfStorage', 'half': 'HalfStorage',
    'bfloat16': 'BFloat16Storage',
    'int64': 'LongStorage', 'long': 'LongStorage',
    'int32': 'IntStorage', 'int': 'IntStorage',
    'int16': 'ShortStorage', 'short': 'ShortStorage',
    'int8': 'CharStorage', 'uint8': 'ByteStorage', 'bool': 'BoolStorage',
}


class _StorageType:
  """Stands in for ``torch.FloatStorage`` etc.; only its element dtype matters."""

  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]

  def __setstate__(self, state):  # a BUILD opcode must not mutate the shared allow-list entries
    raise UnsafePickleError(f'pickle tries to modify torch.{self.name}')


class _Storage:
  """A storage whose bytes may arrive later (legacy format: after the object pickle)."""

  def __init__(self, stype: _StorageType, key: str, numel: int):
    self.stype = stype
    self.key = key
    self.numel = numel
    self.data: np.ndarray | None = None


class _TensorRef:
  """A tensor view (offset, size, stride) into a storage, materialized once storages are read."""

  def __init__(self, storage: Any, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    if not isinstance(storage, _Storage):
      raise CheckpointError(f'tensor refers to a non-storage object {type(storage).__name__}')
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)

  def materialize(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise CheckpointError(f'storage {self.storage.key!r} was never read (truncated file?)')
    n = int(np.prod(self.size)) if self.size else 1
    if n == 0:
      out = np.zeros(self.size, data.dtype)
    else:
      last = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride))
      if self.offset < 0 or last >= data.size or any(st < 0 for st in self.stride):
        raise CheckpointError(
            f'tensor of size {self.size} at offset {self.offset} overruns storage {self.storage.key!r}'
            f' of {data.size} elements'
        )
      item = data.itemsize
      out = np.lib.stride_tricks.as_strided(
          data[self.offset:], shape=self.size, strides=tuple(st * item for st in self.stride)
      ).copy()
    if self.storage.stype.name == 'BFloat16Storage':
      out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks
  return data


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise UnsafePickleError('numpy scalar with a non-numeric dtype')
  return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(name, align=False, copy=True):
  dt = np.dtype(name, align=align, copy=copy)
  if dt.hasobject:
    raise UnsafePickleError(f'numpy dtype {name!r} holds Python objects')
  return dt


def _codecs_encode(obj, encoding='latin1'):
  if not isinstance(obj, str) or encoding not in ('latin1', 'latin-1'):
    raise UnsafePickleError(f'_codecs.encode({type(obj).__name__}, {encoding!r})')
  return obj.encode(encoding)


class _Namespace(dict):
  """argparse.Namespace stored in some checkpoints: kept as a plain dict of its attributes."""

  def __setstate__(self, state):
    self.update(state or {})


def _torch_dtype(name: str):
  return ('torch.dtype', name)


_ALLOWED: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch.nn.parameter', 'Parameter'): _rebuild_parameter,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy', 'dtype'): _numpy_dtype,
    ('_codecs', 'encode'): _codecs_encode,
    ('argparse', 'Namespace'): _Namespace,
}
for _name in _STORAGE_DTYPES:
  _ALLOWED[('torch', _name)] = _StorageType(_name)
for _name in _TORCH_DTYPES:
  _ALLOWED[('torch', _name)] = _torch_dtype(_name)


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage], load_storage=None):
    super().__init__(file, encoding='latin1')
    self._storages = storages
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'refusing to unpickle global {module}.{name}: it is not on the allow-list of'
          ' tensor/container types, so the file may try to run code'
      ) from None

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage' and len(pid) >= 5):
      raise CheckpointError(f'unsupported persistent id {pid!r:.80}')
    stype, key, numel = pid[1], str(pid[2]), pid[4]
    if isinstance(stype, tuple) and stype and stype[0] == 'torch.dtype':
      stype = _StorageType(_TORCH_DTYPES[stype[1]])
    if not isinstance(stype, _StorageType):
      raise CheckpointError(f'storage {key!r} has unsupported type {stype!r:.80}')
    storage = self._storages.get(key)
    if storage is None:
      storage = _Storage(stype, key, int(numel) if isinstance(numel, int) else -1)
      self._storages[key] = storage
      if self._load_storage is not None:
        storage.data = self._load_storage(storage)
    if len(pid) >= 6 and pid[5] is not None:  # legacy view of a larger storage
      raise CheckpointError('storage views (pre-1.0 torch) are not supported')
    return storage


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _TensorRef):
    return obj.materialize()
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v)
    return out
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v) for v in obj)
  return obj


def _load_legacy(f: BinaryIO, size: int) -> Any:
  unpickler = lambda: _RestrictedUnpickler(f, storages)  # noqa: E731
  storages: dict[str, _Storage] = {}
  magic = unpickler().load()
  if magic != LEGACY_MAGIC:
    raise CheckpointError('not a PyTorch checkpoint (bad magic number)')
  protocol = unpickler().load()
  if protocol != 1001:
    raise CheckpointError(f'unsupported legacy protocol version {protocol!r}')
  sys_info = unpickler().load()
  if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
    raise CheckpointError('big-endian checkpoints are not supported')
  obj = unpickler().load()
  keys = unpickler().load()
  if not isinstance(keys, list):
    raise CheckpointError('corrupt checkpoint: storage key list missing')
  for key in keys:
    storage = storages.get(str(key))
    if storage is None:
      raise CheckpointError(f'corrupt checkpoint: unknown storage key {key!r}')
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointError(f'truncated checkpoint: storage {key!r} is missing')
    (numel,) = struct.unpack('<q', head)
    nbytes = numel * storage.stype.dtype.itemsize
    if numel < 0 or nbytes > size:
      raise CheckpointError(f'corrupt checkpoint: storage {key!r} claims {numel} elements')
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise CheckpointError(
          f'truncated checkpoint: storage {key!r} has {len(raw)} of {nbytes} bytes'
      )
    storage.data = np.frombuffer(raw, storage.stype.dtype)
  return _materialize(obj)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
    if not pkl:
      raise CheckpointError('zip file without <name>/data.pkl: not a PyTorch checkpoint')
    prefix = pkl[0][: -len('data.pkl')]
    if f'{prefix}byteorder' in names and zf.read(f'{prefix}byteorder').strip() != b'little':
      raise CheckpointError('big-endian checkpoints are not supported')

    def load_storage(storage: _Storage) -> np.ndarray:
      name = f'{prefix}data/{storage.key}'
      try:
        raw = zf.read(name)
      except KeyError:
        raise CheckpointError(f'corrupt checkpoint: storage file {name!r} is missing') from None
      if len(raw) % storage.stype.dtype.itemsize:
        raise CheckpointError(f'corrupt checkpoint: storage {name!r} has a partial element')
      return np.frombuffer(raw, storage.stype.dtype)

    storages: dict[str, _Storage] = {}
    data = zf.read(pkl[0])
    obj = _RestrictedUnpickler(io.BytesIO(data), storages, load_storage).load()
  return _materialize(obj)


def load(path: str) -> Any:
  """Loads a PyTorch checkpoint (legacy or zip) into Python containers of NumPy arrays.

  Raises:
    CheckpointError: the file is truncated, corrupt, or not a PyTorch checkpoint.
    UnsafePickleError: the pickle references a global outside the allow-list (nothing was run).
  """
  path = str(path)
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    with open(path, 'rb') as f:
      if f.read(4) == b'PK\x03\x04':  # a zip whose central directory (at the end) is gone
        raise CheckpointError(f'{path}: truncated or corrupt zip checkpoint (no central directory)')
      f.seek(0, 2)
      size = f.tell()
      f.seek(0)
      return _load_legacy(f, size)
  except CheckpointError as e:
    if path in str(e):
      raise
    raise type(e)(f'{path}: {e}') from e  # name the file in every error
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, ValueError,
          IndexError, KeyError, TypeError, AttributeError, MemoryError, OverflowError) as e:
    raise CheckpointError(
        f'{path}: not a readable PyTorch checkpoint (truncated or corrupt?): '
        f'{type(e).__name__}: {e}'
    ) from e

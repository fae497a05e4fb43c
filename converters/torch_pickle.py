"""Reads PyTorch checkpoints without torch, never running code from the file, in bounded memory.

Two serializations exist:

* legacy (torch < 1.6, and ``_use_new_zipfile_serialization=False``): a pickle of a magic number,
  a protocol version, a system-info dict, then the object pickle whose tensors point at storages
  through ``persistent_id``, then a pickle of the storage keys, then each storage as an int64
  element count followed by its raw little-endian bytes;
* zip (torch >= 1.6): a zip archive ``<name>/data.pkl`` plus one file ``<name>/data/<key>`` per
  storage.

The pickles are interpreted by :mod:`converters.safe_pickle`, a restricted pickle machine: globals
resolve against an explicit allow-list of names (nothing is imported); anything else
(``os.system``, ``builtins.eval``, ``functools.partial``, arbitrary classes) raises
:class:`UnsafePickleError` naming the global, before it could be called. BUILD (state setting) is
refused on every real object.

Whole pickled modules (``torch.save(model)``) are read too: class names under ``torch.nn.modules``,
``torchvision.models`` and ``torchvision.ops`` (and any extra prefixes the caller trusts) become
inert stubs whose BUILD only records the module's ``__dict__`` as data; :func:`load_weights`
then walks ``_parameters`` / ``_buffers`` / ``_modules`` the way ``nn.Module.state_dict()`` does.

Resource bounds (a small file never makes the reader allocate far beyond its size):

* a tensor view must have positive strides on every dimension longer than 1, must not need more
  elements than its storage holds (``offset + sum((size - 1) * stride) + 1 <= numel``) and must
  not have more elements than the storage;
* a zip storage member must declare exactly the bytes its storage needs, before it is read; a
  compressed member may not inflate beyond ``formats.ZIP_RATIO`` times its archive (plus an
  allowance);
  a legacy storage must declare the element count its persistent id gave;
* only the tensors of the weights are materialized (:func:`load_weights`): optimizer state and
  other entries are never copied, and the bytes materialized are capped relative to the file
  size (:data:`MATERIALIZE_FACTOR`, :data:`MATERIALIZE_ALLOWANCE`);
* pickle size, depth and object counts are bounded by :class:`converters.safe_pickle.Limits`.
"""

from __future__ import annotations

import collections
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from converters import safe_pickle as sp
from converters.errors import CheckpointError, UnsafePickleError
from converters.formats import ZipBudget

__all__ = ['CheckpointError', 'UnsafePickleError', 'load', 'load_weights', 'module_state_dict',
           'CONTAINER_KEYS', 'MODULE_PREFIXES']

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Materialized tensor bytes may reach MATERIALIZE_FACTOR x the file size plus the allowance
# (bfloat16 widens 2x to float32, and tied weights are views of one storage).
MATERIALIZE_FACTOR = 3
MATERIALIZE_ALLOWANCE = 64 << 20
_MAX_DIMS = 64
_MAX_MODULE_CLASSES = 4096

# Keys of the usual checkpoint wrappers around a state dict (mirrors converters.mapping).
CONTAINER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net', 'params')

# Module-class names read as inert nn.Module stubs: (module prefix, class-name pattern).
MODULE_PREFIXES = ('torch.nn.modules.', 'torchvision.models.', 'torchvision.ops.')
_CLASS_NAME = re.compile(r'^_*[A-Z][A-Za-z0-9_]*$')
_DOTTED = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')


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
  """Stands in for ``torch.FloatStorage`` etc.: an inert marker; only its element dtype matters."""

  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]

  def __repr__(self) -> str:
    return f'<torch.{self.name}>'

  @property
  def describe_as(self) -> str:
    return f'torch.{self.name}'


class _TorchDtype:
  """Stands in for ``torch.float32`` etc."""

  __slots__ = ('name',)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return f'<torch.{self.name}>'

  @property
  def describe_as(self) -> str:
    return f'torch.{self.name}'


class _Storage:
  """``numel`` elements whose bytes are read on demand (zip) or after the pickle (legacy)."""

  def __init__(self, stype: _StorageType, key: str, numel: int,
               reader: Callable[[_Storage], np.ndarray] | None = None):
    self.stype = stype
    self.key = key
    self.numel = numel
    self.data: np.ndarray | None = None
    self._reader = reader

  def array(self) -> np.ndarray:
    if self.data is None and self._reader is not None:
      self.data = self._reader(self)
    if self.data is None:
      raise CheckpointError(f'storage {self.key!r} was never read (truncated file?)')
    return self.data


class _TensorRef:
  """A validated tensor view (offset, size, stride) into a storage; materialized on demand."""

  def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
    if not isinstance(storage, _Storage):
      raise sp.PickleFormatError(f'tensor refers to {sp.describe(storage)}, not a storage')
    if type(offset) is not int or offset < 0:
      raise sp.PickleFormatError(f'tensor storage offset {sp.describe(offset)}')
    for what, dims in (('size', size), ('stride', stride)):
      if type(dims) not in (tuple, list) or len(dims) > _MAX_DIMS or not all(
          type(d) is int for d in dims):
        raise sp.PickleFormatError(f'tensor {what} {sp.describe(dims)} is not a tuple of ints')
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride):
      raise sp.PickleFormatError(f'tensor size {size} and stride {stride} differ in length')
    if any(s < 0 for s in size):
      raise sp.PickleFormatError(f'tensor size {size} has a negative dimension')
    numel = math.prod(size)
    if numel > 0:
      bad = [st for s, st in zip(size, stride) if s > 1 and st <= 0]
      if bad:
        raise sp.PickleFormatError(
            f'tensor of size {size} has stride {stride}: zero or negative strides (broadcast or'
            ' reversed views) are not read')
      extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
      if extent > storage.numel:
        raise sp.PickleFormatError(
            f'tensor of size {size}, stride {stride} at offset {offset} needs {extent} elements but'
            f' storage {storage.key!r} holds {storage.numel}')
      if numel > storage.numel:
        raise sp.PickleFormatError(
            f'tensor of size {size} has {numel} elements, more than the {storage.numel} of its'
            f' storage {storage.key!r} (an overlapping view)')
    self.storage = storage
    self.offset = offset
    self.size = size
    self.stride = stride
    self.numel = numel

  @property
  def nbytes(self) -> int:
    item = 4 if self.storage.stype.name == 'BFloat16Storage' else self.storage.stype.dtype.itemsize
    return self.numel * item

  def materialize(self) -> np.ndarray:
    dtype = self.storage.stype.dtype
    if self.numel == 0:
      out = np.zeros(self.size, dtype)
    else:
      data = self.storage.array()
      if data.size != self.storage.numel:
        raise CheckpointError(
            f'storage {self.storage.key!r} holds {data.size} elements, its tensors were declared'
            f' for {self.storage.numel}')
      item = data.itemsize
      out = np.lib.stride_tricks.as_strided(
          data[self.offset:], shape=self.size, strides=tuple(st * item for st in self.stride)
      ).copy()
    if self.storage.stype.name == 'BFloat16Storage':
      out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_tensor(ctx, storage=None, storage_offset=None, size=None, stride=None, *unused):
  del ctx, unused
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(ctx, storage=None, storage_offset=None, size=None, stride=None,
                       requires_grad=False, backward_hooks=None, metadata=None, *unused):
  del ctx, requires_grad, metadata, unused
  if backward_hooks is not None and (not isinstance(backward_hooks, dict) or backward_hooks):
    raise sp.PickleRefusedError('tensor with backward hooks')
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(ctx, data=None, requires_grad=False, backward_hooks=None, *unused):
  del ctx, requires_grad, unused
  if not isinstance(data, _TensorRef):
    raise sp.PickleFormatError(f'Parameter of {sp.describe(data)}, not a tensor')
  if backward_hooks is not None and (not isinstance(backward_hooks, dict) or backward_hooks):
    raise sp.PickleRefusedError('parameter with backward hooks')
  return data


class ModuleStub(sp.Stub):
  """An inert stand-in for a pickled ``nn.Module``: BUILD records its ``__dict__``; nothing runs."""

  pickle_name = 'torch.nn.Module'

  def pickle_build(self, ctx, state):
    if type(state) is not dict:
      raise sp.PickleRefusedError(
          f'BUILD of {self.pickle_name} with {sp.describe(state)}: only a dict of attributes is'
          ' read')
    super().pickle_build(ctx, state)


_OBJECT = sp.Marker('builtins.object')


def _reconstructor(ctx, cls=None, base=None, state=None, *rest):
  """``copyreg._reconstructor(cls, object, None)``: how pickle protocols 0 and 1 create a module."""
  if rest or not (isinstance(cls, type) and issubclass(cls, ModuleStub)) or base is not _OBJECT or (
      state is not None):
    raise sp.PickleRefusedError(
        f'copyreg._reconstructor({sp.describe(cls)}, {sp.describe(base)}, ...): only allowed'
        ' module classes are created')
  return cls.pickle_new(ctx, (), {})


class _Namespace(sp.Stub):
  """``argparse.Namespace`` stored in some checkpoints: its attributes are kept as a dict."""

  pickle_name = 'argparse.Namespace'

  def pickle_build(self, ctx, state):
    if type(state) is not dict:
      raise sp.PickleRefusedError(f'BUILD of argparse.Namespace with {sp.describe(state)}')
    super().pickle_build(ctx, state)


_ALLOWED: dict[tuple[str, str], Any] = {
    **sp.BASIC_GLOBALS,
    **sp.numpy_globals(),
    ('torch._utils', '_rebuild_tensor'): sp.Function('torch._utils._rebuild_tensor',
                                                     _rebuild_tensor),
    ('torch._utils', '_rebuild_tensor_v2'): sp.Function('torch._utils._rebuild_tensor_v2',
                                                        _rebuild_tensor_v2),
    ('torch._utils', '_rebuild_parameter'): sp.Function('torch._utils._rebuild_parameter',
                                                        _rebuild_parameter),
    ('torch.nn.parameter', 'Parameter'): sp.Function('torch.nn.parameter.Parameter',
                                                     _rebuild_parameter),
    ('argparse', 'Namespace'): _Namespace,
    ('copyreg', '_reconstructor'): sp.Function('copyreg._reconstructor', _reconstructor),
    ('builtins', 'object'): _OBJECT,
}
for _name in _STORAGE_DTYPES:
  _ALLOWED[('torch', _name)] = _StorageType(_name)
for _name in _TORCH_DTYPES:
  _ALLOWED[('torch', _name)] = _TorchDtype(_name)


def _is_module_class(module: str, name: str, prefixes: Sequence[str]) -> bool:
  if not _DOTTED.match(module) or not _CLASS_NAME.match(name):
    return False
  return any(module.startswith(p) or module == p.rstrip('.') for p in prefixes)


class _Reader:
  """The state of one checkpoint read: allow-list lookups, storages, budgets."""

  def __init__(self, file_size: int, module_prefixes: Sequence[str] = ()):
    self.file_size = file_size
    self.prefixes = tuple(MODULE_PREFIXES) + tuple(
        p if p.endswith('.') else p + '.' for p in module_prefixes)
    self.storages: dict[str, _Storage] = {}
    self.module_classes: dict[tuple[str, str], type] = {}
    self.load_storage: Callable[[_Storage], np.ndarray] | None = None
    self.check_storage: Callable[[_Storage], None] = lambda storage: None
    self.zip: zipfile.ZipFile | None = None
    self.max_materialized = MATERIALIZE_FACTOR * file_size + MATERIALIZE_ALLOWANCE
    self.materialized = 0
    self.nesting = 0

  def find_global(self, module: str, name: str) -> Any:
    entry = _ALLOWED.get((module, name))
    if entry is not None:
      return entry
    if _is_module_class(module, name, self.prefixes):
      cls = self.module_classes.get((module, name))
      if cls is None:
        if len(self.module_classes) >= _MAX_MODULE_CLASSES:
          raise sp.PickleFormatError(f'more than {_MAX_MODULE_CLASSES} module classes')
        cls = type(name, (ModuleStub,), {'pickle_name': f'{module}.{name}'})
        self.module_classes[(module, name)] = cls
      return cls
    raise sp.PickleRefusedError(
        f'refusing to unpickle global {module}.{name}: it is not on the allow-list of'
        ' tensor/container types and torch.nn / torchvision module classes, so the file may try'
        ' to run code (a whole pickled model of your own classes: re-save its state_dict())'
    )

  def persistent_load(self, pid: Any) -> Any:
    if not (type(pid) is tuple and pid and type(pid[0]) is str):
      raise sp.PickleFormatError(f'unsupported persistent id {sp.describe(pid)}')
    if pid[0] == 'module' and len(pid) == 4:  # legacy whole-module pickles: (tag, class, file, src)
      cls = pid[1]
      if not (isinstance(cls, type) and issubclass(cls, ModuleStub)):
        raise sp.PickleRefusedError(f'persistent module id of {sp.describe(cls)}')
      return cls  # the recorded source code is data, never executed
    if pid[0] != 'storage' or len(pid) < 5:
      raise sp.PickleFormatError(f'unsupported persistent id {sp.describe(pid)}')
    stype, key, numel = pid[1], pid[2], pid[4]
    if isinstance(stype, _TorchDtype):
      stype = _ALLOWED[('torch', _TORCH_DTYPES[stype.name])]
    if not isinstance(stype, _StorageType):
      raise sp.PickleFormatError(f'storage has unsupported type {sp.describe(stype)}')
    if type(key) not in (str, int) or len(str(key)) > 256:
      raise sp.PickleFormatError(f'storage key {sp.describe(key)}')
    key = str(key)
    if type(numel) is not int or numel < 0:
      raise sp.PickleFormatError(f'storage {key!r} declares {sp.describe(numel)} elements')
    if len(pid) >= 6 and pid[5] is not None:  # legacy view of a larger storage
      raise sp.PickleFormatError('storage views (pre-1.0 torch) are not supported')
    storage = self.storages.get(key)
    if storage is None:
      if numel * stype.dtype.itemsize > max(self.file_size, 0) + 4096 and self.load_storage is None:
        raise sp.PickleFormatError(
            f'storage {key!r} declares {numel} elements ({numel * stype.dtype.itemsize} bytes),'
            f' more than the whole file ({self.file_size} bytes)')
      storage = _Storage(stype, key, numel, self.load_storage)
      self.check_storage(storage)
      self.storages[key] = storage
    elif storage.stype is not stype or storage.numel != numel:
      raise sp.PickleFormatError(f'storage {key!r} is declared twice with different types or sizes')
    return storage

  def unpickle(self, data: bytes, start: int = 0, persistent: bool = True) -> tuple[Any, int]:
    u = sp.Unpickler(data, find_global=self.find_global,
                     persistent_load=self.persistent_load if persistent else None,
                     encoding='latin1', start=start)
    return u.load(), u.end

  # ---- materialization

  def tensor(self, ref: _TensorRef, memo: dict[int, Any]) -> np.ndarray:
    key = id(ref)
    if key in memo:
      return memo[key]
    self.materialized += ref.nbytes
    if self.materialized > self.max_materialized:
      raise CheckpointError(
          f'the tensors to read need more than {self.max_materialized} bytes, far more than the'
          f' {self.file_size}-byte file holds (overlapping views?)')
    out = ref.materialize()
    memo[key] = out
    return out

  def value(self, obj: Any, memo: dict[int, Any], depth: int = 0) -> Any:
    """A leaf as the data it stands for; containers are left to ``sp.rebuild``."""
    if isinstance(obj, _TensorRef):
      return self.tensor(obj, memo)
    if isinstance(obj, (sp.ArrayStub, sp.DtypeStub)):
      return sp.resolve_numpy(obj)
    if isinstance(obj, (ModuleStub, _Namespace)):
      key = id(obj)
      if key not in memo:
        self.nesting += 1
        if self.nesting > 50:
          raise CheckpointError('pickled modules / namespaces nest more than 50 levels deep')
        if isinstance(obj, ModuleStub):
          memo[key] = collections.OrderedDict(
              (k, self.value(v, memo)) for k, v in module_state_dict(obj).items())
        else:
          memo[key] = self.materialize(obj.pickle_state or {}, memo, depth + 1)
        self.nesting -= 1
      return memo[key]
    if isinstance(obj, _Storage):
      raise CheckpointError(f'a bare storage {obj.key!r} outside any tensor is not read')
    return obj

  def materialize(self, obj: Any, memo: dict[int, Any] | None = None, depth: int = 0) -> Any:
    memo = {} if memo is None else memo
    return sp.rebuild(obj, lambda x, d: self.value(x, memo, d), start_depth=depth,
                      leaf_depth=True)


def module_state_dict(module: ModuleStub, *, max_entries: int = 200_000,
                      max_depth: int = 100) -> collections.OrderedDict:
  """The ``state_dict()`` a pickled module would return, as names -> unmaterialized tensors.

  Mirrors ``nn.Module.state_dict``: per module its ``_parameters`` (skipping None), then its
  ``_buffers`` (skipping None and names in ``_non_persistent_buffers_set``;
  ``num_batches_tracked`` is a persistent buffer), then each child of ``_modules`` under
  ``prefix + name + '.'``. Module-specific ``_save_to_state_dict`` overrides cannot be
  replicated (nothing of the class runs); torch.nn's standard layers do not have them.
  """
  out: collections.OrderedDict = collections.OrderedDict()

  def attr(mod: ModuleStub, name: str, path: str, required: bool = True) -> Any:
    state = mod.pickle_state
    if state is None:
      raise CheckpointError(f'module {path or "<root>"} ({mod.pickle_name}) has no pickled state')
    value = state.get(name)
    if value is None and not required:
      return None
    if not isinstance(value, dict) and not (name == '_non_persistent_buffers_set'
                                            and isinstance(value, (set, frozenset))):
      raise CheckpointError(
          f'module {path or "<root>"} ({mod.pickle_name}): {name} is {sp.describe(value)}')
    return value

  def walk(mod: ModuleStub, prefix: str, depth: int) -> None:
    if depth > max_depth:
      raise CheckpointError(f'pickled modules nest deeper than {max_depth} levels (a cycle?)')
    path = prefix[:-1]
    skip = attr(mod, '_non_persistent_buffers_set', path, required=False) or set()
    for kind in ('_parameters', '_buffers'):
      for name, value in attr(mod, kind, path).items():
        if value is None or (kind == '_buffers' and name in skip):
          continue
        if type(name) is not str or not isinstance(value, (_TensorRef, sp.ArrayStub)):
          raise CheckpointError(
              f'module {path or "<root>"} ({mod.pickle_name}): {kind[1:-1]} {name!r} is'
              f' {sp.describe(value)}, not a tensor')
        if len(out) >= max_entries:
          raise CheckpointError(f'pickled modules hold more than {max_entries} tensors')
        out[prefix + name] = value
    for name, child in attr(mod, '_modules', path).items():
      if child is None:
        continue
      if type(name) is not str or not isinstance(child, ModuleStub):
        raise CheckpointError(
            f'module {path or "<root>"} ({mod.pickle_name}): child {name!r} is'
            f' {sp.describe(child)}, not a module')
      walk(child, f'{prefix}{name}.', depth + 1)

  walk(module, '', 0)
  return out


_DICTS = (dict, collections.OrderedDict, sp.RecordedOrderedDict)


def _select_weights(obj: Any) -> Any:
  """The state dict inside the usual wrappers (``{'state_dict': ...}``, a whole module, ...)."""
  for _ in range(5):
    if isinstance(obj, ModuleStub):
      return module_state_dict(obj)
    if type(obj) not in _DICTS:
      raise CheckpointError(f'the checkpoint holds {sp.describe(obj)}, not a state dict of tensors'
                            ' (nor a model, nor a container with a state_dict entry)')
    inner = next((obj[k] for k in CONTAINER_KEYS
                  if k in obj and (type(obj[k]) in _DICTS or isinstance(obj[k], ModuleStub))),
                 None)
    if inner is None:
      return obj
    obj = inner
  return obj


# --------------------------------------------------------------------------------------------
# The two container formats.


def _read_legacy(path: str, reader: _Reader) -> Any:
  with open(path, 'rb') as f:
    data = f.read()
  magic, pos = reader.unpickle(data, 0, persistent=False)
  if magic != LEGACY_MAGIC:
    raise CheckpointError('not a PyTorch checkpoint (bad magic number)')
  protocol, pos = reader.unpickle(data, pos, persistent=False)
  if protocol != 1001:
    raise CheckpointError(f'unsupported legacy protocol version {sp.describe(protocol)}')
  sys_info, pos = reader.unpickle(data, pos, persistent=False)
  if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
    raise CheckpointError('big-endian checkpoints are not supported')
  obj, pos = reader.unpickle(data, pos)
  keys, pos = reader.unpickle(data, pos, persistent=False)
  if type(keys) is not list:
    raise CheckpointError('corrupt checkpoint: storage key list missing')
  for key in keys:
    storage = reader.storages.get(str(key)) if type(key) in (str, int) else None
    if storage is None:
      raise CheckpointError(f'corrupt checkpoint: unknown storage key {sp.describe(key)}')
    if storage.data is not None:
      raise CheckpointError(f'corrupt checkpoint: storage {storage.key!r} stored twice')
    if len(data) - pos < 8:
      raise CheckpointError(f'truncated checkpoint: storage {storage.key!r} is missing')
    (numel,) = struct.unpack_from('<q', data, pos)
    pos += 8
    if numel != storage.numel:
      raise CheckpointError(
          f'corrupt checkpoint: storage {storage.key!r} holds {numel} elements, its tensors were'
          f' declared for {storage.numel}')
    nbytes = numel * storage.stype.dtype.itemsize
    if nbytes > len(data) - pos:
      raise CheckpointError(
          f'truncated checkpoint: storage {storage.key!r} has {len(data) - pos} of {nbytes} bytes')
    storage.data = np.frombuffer(data, storage.stype.dtype, numel, pos)
    pos += nbytes
  return obj


def _read_zip(path: str, reader: _Reader) -> Any:
  zf = zipfile.ZipFile(path)
  reader.zip = zf  # kept open for lazy storage reads; closed by _with_errors
  budget = ZipBudget(zf, reader.file_size, CheckpointError)
  names = zf.namelist()
  pkl = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
  if not pkl:
    raise CheckpointError('zip file without <name>/data.pkl: not a PyTorch checkpoint')
  prefix = pkl[0][: -len('data.pkl')]
  if f'{prefix}byteorder' in names:
    info = budget.info(f'{prefix}byteorder')
    if info.file_size > 64 or bytes(budget.read(info)).strip() != b'little':
      raise CheckpointError('big-endian checkpoints are not supported')

  def member(storage: _Storage) -> zipfile.ZipInfo:
    return budget.info(f'{prefix}data/{storage.key}')

  def check_storage(storage: _Storage) -> None:
    try:
      budget.check(member(storage), storage.numel * storage.stype.dtype.itemsize)
    except CheckpointError as e:
      raise sp.PickleFormatError(f'storage {storage.key!r}: {e}') from None

  def load_storage(storage: _Storage) -> np.ndarray:
    raw = budget.read(member(storage), storage.numel * storage.stype.dtype.itemsize)
    return np.frombuffer(raw, storage.stype.dtype)

  reader.load_storage = load_storage
  reader.check_storage = check_storage
  data = bytes(budget.read(budget.info(pkl[0])))
  obj, _ = reader.unpickle(data)
  return obj


def _open(path: str, reader: _Reader) -> Any:
  if zipfile.is_zipfile(path):
    return _read_zip(path, reader)
  with open(path, 'rb') as f:
    if f.read(4) == b'PK\x03\x04':  # a zip whose central directory (at the end) is gone
      raise CheckpointError('truncated or corrupt zip checkpoint (no central directory)')
  return _read_legacy(path, reader)


def _with_errors(path: str, fn: Callable[[_Reader], Any], module_prefixes: Sequence[str]) -> Any:
  path = os.fspath(path)
  reader = _Reader(os.path.getsize(path), module_prefixes)
  try:
    return fn(reader)
  except sp.PickleRefusedError as e:
    raise UnsafePickleError(f'{path}: {e}') from None
  except sp.PickleFormatError as e:
    raise CheckpointError(f'{path}: not a readable PyTorch checkpoint: {e}') from None
  except CheckpointError as e:
    if path in str(e):
      raise
    raise type(e)(f'{path}: {e}') from None  # name the file in every error
  except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, struct.error,
          ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError,
          NotImplementedError, RuntimeError, OSError) as e:
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
      raise
    raise CheckpointError(
        f'{path}: not a readable PyTorch checkpoint (truncated or corrupt?): '
        f'{type(e).__name__}: {e}') from None
  finally:
    if reader.zip is not None:
      reader.zip.close()


def load(path: str | os.PathLike, *, module_prefixes: Sequence[str] = ()) -> Any:
  """Loads a PyTorch checkpoint (legacy or zip) into Python containers of NumPy arrays.

  Everything in the file is materialized (within the bounds in the module docstring); pickled
  modules become their ``state_dict()`` (an OrderedDict). Prefer :func:`load_weights`, which
  copies only the weights.

  Raises:
    CheckpointError: the file is truncated, corrupt, over a resource bound, or not a checkpoint.
    UnsafePickleError: the pickle references a global, call or state change outside the
      allow-list (nothing was run).
  """
  def run(reader: _Reader) -> Any:
    return reader.materialize(_open(os.fspath(path), reader))

  return _with_errors(path, run, module_prefixes)


def load_weights(path: str | os.PathLike, *, module_prefixes: Sequence[str] = ()) -> Any:
  """The weights of a PyTorch checkpoint: the state dict, with only its tensors materialized.

  The state dict is found the way :func:`converters.mapping.normalize_state_dict` looks for it
  (``state_dict`` / ``model_state_dict`` / ``model`` / ``net`` / ``params`` wrappers), and a
  pickled ``nn.Module`` (at the top or under such a key) is turned into its ``state_dict()``.
  Other entries (optimizer state, arguments, ...) are never copied: values of the state dict that
  are plain numbers, strings or None are returned as they are; any other value, or a top-level
  object that is neither a tensor nor (something holding) a state dict, is refused.

  Args:
    path: the checkpoint file.
    module_prefixes: extra module prefixes (e.g. ``('mypkg.models',)``) whose class names are
      read as inert ``nn.Module`` stubs, for whole-module pickles of your own classes. Nothing
      of those classes is imported or run.

  Raises:
    CheckpointError / UnsafePickleError: as :func:`load`.
  """
  def run(reader: _Reader) -> Any:
    obj = _select_weights(_open(os.fspath(path), reader))
    memo: dict[int, Any] = {}
    if isinstance(obj, _TensorRef):
      return reader.tensor(obj, memo)
    if type(obj) not in _DICTS:
      raise CheckpointError(f'the checkpoint holds {sp.describe(obj)}, not a state dict of tensors'
                            ' (nor a model, nor a container with a state_dict entry)')
    out = collections.OrderedDict()
    for key, value in obj.items():
      if isinstance(value, _TensorRef):
        value = reader.tensor(value, memo)
      elif isinstance(value, sp.ArrayStub):
        value = sp.resolve_numpy(value)
      elif not isinstance(value, (int, float, str, bytes, type(None))):
        raise CheckpointError(f'state dict entry {key!r} is {sp.describe(value)}, not a tensor')
      out[key] = value
    return out

  return _with_errors(path, run, module_prefixes)

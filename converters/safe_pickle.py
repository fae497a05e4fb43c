"""A bounded, restricted pickle virtual machine: reads data out of pickles without running them.

``pickle.Unpickler`` with an overridden ``find_class`` stops unknown globals, but it still lets a
file call ``__setstate__`` / ``setattr`` on whatever the allow-list hands out (BUILD), call
``append`` / ``__setitem__`` on any object (APPEND, SETITEM), and build structures of unbounded
depth and size. This module interprets the pickle opcodes itself (protocols 0-5), so every
operation is checked before it happens:

* globals resolve only through the caller's ``find_global`` (names, never imports); what it returns
  is one of: a :class:`Function` (the only thing REDUCE may call, with validated arguments), a
  :class:`Stub` subclass (the only thing NEWOBJ may instantiate), or an inert marker that can only
  be passed around as data;
* BUILD (state setting) is accepted only on :class:`Stub` instances created by this unpickling,
  whose ``pickle_build`` records the state as data, once; never on a global, a container, a
  function or any other object;
* APPEND(S) / SETITEM(S) / ADDITEMS only on lists / dicts / sets this unpickling created; dict keys
  and set elements must be ``str``, ``bytes``, ``bool``, ``None`` or an ``int`` below 2**61 (no
  user-defined ``__hash__``/``__eq__`` runs, no recursive hashing, no engineered hash collisions);
* out-of-band buffers, extension codes, INST / OBJ are refused;
* resource bounds (:class:`Limits`): objects created, memo entries, container elements, MARK
  nesting, bytes per integer, and the work of called functions (e.g. bytes copied) relative to
  the pickle's own size, so a small file cannot make the reader allocate or loop far beyond its
  size.

Structures returned may share sub-objects (memo references) or even contain cycles; consumers
walk them with :func:`walk_depth_check` or their own depth-bounded walk.

Errors: :class:`PickleFormatError` (malformed, truncated, over a bound) and its subclass
:class:`PickleRefusedError` (a global, call or state change outside the allow-list). Both are
``ValueError``; readers translate them into their own error types.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import functools
import math
import reprlib
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    'PickleFormatError', 'PickleRefusedError', 'Limits', 'Function', 'Stub', 'Context',
    'Unpickler', 'loads', 'describe', 'Marker', 'NDARRAY', 'DtypeStub', 'ArrayStub', 'numpy_globals',
    'resolve_numpy', 'check_key',
]


class PickleFormatError(ValueError):
  """The pickle is malformed or truncated, or it exceeds a resource bound."""


class PickleRefusedError(PickleFormatError):
  """The pickle asks for a global, a call or a state change outside the allow-list."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource bounds of one unpickling.

  Attributes:
    max_objects: new Python objects (containers, strings, numbers, stubs) created.
    max_memo: memo entries.
    max_items: elements inserted into containers plus references pushed (GET, DUP), in total.
    max_depth: MARK nesting (the stack of partially built containers).
    max_int_bytes: bytes of one LONG1 / LONG4 integer.
    work_factor, work_allowance: called functions may spend ``work_factor * len(pickle) +
      work_allowance`` work units in total: bytes they allocate (copied bytes, array data, set
      tables), so shared references cannot multiply a small pickle's memory.
  """

  max_objects: int = 1_000_000
  max_memo: int = 2_000_000
  max_items: int = 20_000_000
  max_depth: int = 200
  max_int_bytes: int = 4096
  work_factor: int = 4
  work_allowance: int = 1 << 20


DEFAULT_LIMITS = Limits()

_MAX_KEY_INT = (1 << 61) - 1  # ints below the hash modulus hash to themselves: no collisions


class Context:
  """What a :class:`Function` or :class:`Stub` sees of the running unpickling: its budget."""

  def __init__(self, max_work: int, encoding: str):
    self.max_work = max_work
    self.work = 0
    self.encoding = encoding

  def charge(self, units: int, what: str) -> None:
    """Spends ``units`` of work (bytes allocated or copied); raises past the budget."""
    self.work += max(int(units), 0)
    if self.work > self.max_work:
      raise PickleFormatError(
          f'{what} would allocate or copy {self.work} bytes in total, more than the'
          f' {self.max_work} this pickle\'s size allows (amplification through shared references?)'
      )


class Function:
  """An allow-listed callable: REDUCE calls ``fn(ctx, *args)``; ``fn`` validates the arguments."""

  __slots__ = ('name', 'fn')

  def __init__(self, name: str, fn: Callable[..., Any]):
    self.name = name
    self.fn = fn

  def __repr__(self) -> str:
    return f'<allowed function {self.name}>'


class Stub:
  """Base of inert stand-ins for classes: NEWOBJ instantiates them, BUILD records their state.

  Subclasses override :meth:`pickle_new` (validate the NEWOBJ arguments) and
  :meth:`pickle_build` (validate and record the state). Nothing of the named class ever runs.
  """

  pickle_name = 'stub'

  def __init__(self):
    self.pickle_state: Any = None
    self.pickle_built = False

  @classmethod
  def pickle_new(cls, ctx: Context, args: tuple, kwargs: dict) -> Stub:
    del ctx
    if args or kwargs:
      raise PickleRefusedError(f'{cls.pickle_name} takes no constructor arguments in a pickle')
    return cls()

  def pickle_build(self, ctx: Context, state: Any) -> None:
    """Records ``state`` (once). Subclasses validate it first."""
    del ctx
    if self.pickle_built:
      raise PickleRefusedError(f'second BUILD (state setting) on one {self.pickle_name}')
    self.pickle_state = state
    self.pickle_built = True


class Marker:
  """An inert named value (e.g. ``numpy.ndarray`` as the argument of ``_reconstruct``)."""

  __slots__ = ('name',)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return f'<{self.name}>'


NDARRAY = Marker('numpy.ndarray')

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = 60
_repr.maxother = 60


def describe(obj: Any) -> str:
  """A short, bounded description of a pickled value for error messages."""
  if isinstance(obj, Function):
    return obj.name
  if isinstance(obj, type) and issubclass(obj, Stub):
    return obj.pickle_name
  if isinstance(obj, Stub):
    return f'a {obj.pickle_name} object'
  if isinstance(obj, Marker):
    return obj.name
  if isinstance(getattr(type(obj), 'describe_as', None), property):  # readers' own markers
    return obj.describe_as
  if type(obj) is int and obj.bit_length() > 64:  # no decimal conversion of huge ints
    return f'an int of {obj.bit_length()} bits'
  if isinstance(obj, (str, bytes, int, float, bool, type(None))):
    return f'{type(obj).__name__} {_repr.repr(obj)}'
  return f'a {type(obj).__name__}'


def check_key(key: Any) -> Any:
  """Accepts a dict key / set element: str, bytes, bool, None, or an int below 2**61 in size."""
  t = type(key)
  if t is str or t is bytes or t is bool or key is None:
    return key
  if t is int and -_MAX_KEY_INT < key < _MAX_KEY_INT:
    return key
  raise PickleFormatError(
      f'unsupported dict key or set element: {describe(key)} (only str, bytes, bool, None and'
      ' ints below 2**61 are read)'
  )


class RecordedOrderedDict(collections.OrderedDict):
  """An OrderedDict whose BUILD (a state dict's ``_metadata``) is recorded, not set on it."""

  pickle_state: Any = None

  def pickle_build(self, ctx: Context, state: Any) -> None:
    del ctx
    if self.pickle_state is not None:
      raise PickleRefusedError('second BUILD (state setting) on one OrderedDict')
    if not isinstance(state, dict):
      raise PickleRefusedError(f'BUILD of an OrderedDict with {describe(state)}: only a dict of'
                               ' attributes is read')
    self.pickle_state = state


def _ordered_dict(ctx: Context, *args) -> RecordedOrderedDict:
  del ctx
  if args:
    raise PickleRefusedError('collections.OrderedDict is only read with no arguments (protocol 2)')
  return RecordedOrderedDict()


_SET_ENTRY_BYTES = 32  # a hash-table slot (hash + reference) at the usual fill factor


def _make_set(factory):
  def make(ctx: Context, items=()):
    if type(items) not in (list, tuple, set, frozenset):
      raise PickleRefusedError(f'{factory.__name__}() of {describe(items)}')
    ctx.charge(_SET_ENTRY_BYTES * len(items), f'{factory.__name__}()')
    return factory(check_key(x) for x in items)
  return make


def _codecs_encode(ctx: Context, obj=None, encoding='utf-8', *rest):
  if rest or type(obj) is not str or encoding not in ('latin1', 'latin-1'):
    raise PickleRefusedError(f'_codecs.encode({describe(obj)}, {describe(encoding)})')
  ctx.charge(len(obj), '_codecs.encode')
  return obj.encode('latin1')


def _bytes(ctx: Context, *args):
  del ctx
  if args:
    raise PickleRefusedError('builtins.bytes is only read with no arguments (protocol < 3 b"")')
  return b''


def _bytearray(ctx: Context, data=b'', *rest):
  if rest or type(data) is not bytes:
    raise PickleRefusedError(f'builtins.bytearray({describe(data)})')
  ctx.charge(len(data), 'builtins.bytearray')
  return bytearray(data)


def _complex(ctx: Context, real=0.0, imag=0.0, *rest):
  del ctx
  if rest or type(real) not in (int, float) or type(imag) not in (int, float):
    raise PickleRefusedError('builtins.complex of non-numbers')
  return complex(real, imag)


# Globals that any reader may allow: containers and the Python 2 / 3 spellings of bytes.
BASIC_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): Function('collections.OrderedDict', _ordered_dict),
    ('builtins', 'set'): Function('builtins.set', _make_set(set)),
    ('builtins', 'frozenset'): Function('builtins.frozenset', _make_set(frozenset)),
    ('builtins', 'bytes'): Function('builtins.bytes', _bytes),
    ('builtins', 'bytearray'): Function('builtins.bytearray', _bytearray),
    ('builtins', 'complex'): Function('builtins.complex', _complex),
    ('_codecs', 'encode'): Function('_codecs.encode', _codecs_encode),
}

# --------------------------------------------------------------------------------------------
# NumPy arrays, dtypes and scalars, rebuilt from validated data (numpy's own reducers never run).

_PLAIN_KINDS = frozenset('biufc')


class DtypeStub(Stub):
  """``numpy.dtype(name, align, copy)`` + BUILD ``(version, byteorder, ..., elsize, ...)``."""

  pickle_name = 'numpy.dtype'

  def __init__(self, base: np.dtype):
    super().__init__()
    self.base = base
    self.dtype = base  # replaced by BUILD (byte order, flexible size)

  def pickle_build(self, ctx: Context, state: Any) -> None:
    if type(state) is tuple and len(state) in (8, 9) and type(state[1]) is bytes:
      state = (state[0], state[1].decode('latin1'), *state[2:])  # Python 2 str, encoding='bytes'
    if (type(state) is not tuple or len(state) not in (8, 9) or type(state[0]) is not int
        or type(state[1]) is not str or len(state[1]) != 1 or state[1] not in '<>|='
        or state[2] is not None or state[3] is not None or state[4] is not None
        or type(state[5]) is not int or type(state[6]) is not int):
      raise PickleRefusedError(f'numpy dtype state {describe(state)} is not a plain numeric dtype'
                               ' (structured, object or subarray dtypes are not read)')
    elsize = state[5]
    dt = self.base
    if dt.kind in 'SU':
      if elsize < 0 or elsize > (1 << 20) or (dt.kind == 'U' and elsize % 4):
        raise PickleFormatError(f'numpy dtype {dt.kind} with element size {elsize}')
      dt = np.dtype(f'{dt.kind}{elsize // 4 if dt.kind == "U" else elsize}')
    elif elsize not in (-1, dt.itemsize):
      raise PickleFormatError(f'numpy dtype {dt} with element size {elsize}')
    byteorder = state[1]
    if byteorder in '<>' and dt.itemsize > 1:
      dt = dt.newbyteorder(byteorder)
    super().pickle_build(ctx, state)
    self.dtype = dt


def _plain_dtype(name: Any) -> np.dtype:
  if type(name) is bytes and len(name) <= 16:  # Python 2 str read with encoding='bytes'
    name = name.decode('latin1')
  if type(name) is not str or len(name) > 16:
    raise PickleRefusedError(f'numpy.dtype({describe(name)})')
  try:
    dt = np.dtype(name)
  except (TypeError, ValueError) as e:
    raise PickleFormatError(f'numpy.dtype({name!r}): {e}') from None
  if dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.kind not in (
      _PLAIN_KINDS | {'S', 'U'}):
    raise PickleRefusedError(f'numpy dtype {name!r} is not a plain numeric dtype')
  return dt


def _numpy_dtype(ctx: Context, name=None, align=False, copy=False, *rest):
  del ctx
  if rest or type(align) not in (bool, int) or type(copy) not in (bool, int):
    raise PickleRefusedError('numpy.dtype called with unexpected arguments')
  return DtypeStub(_plain_dtype(name))


def _as_dtype(dt: Any) -> np.dtype:
  if isinstance(dt, DtypeStub):
    return dt.dtype
  raise PickleRefusedError(f'expected a numpy dtype, got {describe(dt)}')


def _shape(shape: Any) -> tuple[int, ...]:
  if type(shape) not in (tuple, list) or len(shape) > 32 or not all(
      type(d) is int and d >= 0 for d in shape):
    raise PickleFormatError(f'invalid array shape {describe(shape)}')
  return tuple(shape)


def _raw_bytes(ctx: Context, raw: Any) -> bytes | bytearray:
  if type(raw) is str:  # Python 2 str read with encoding='latin1'
    ctx.charge(len(raw), 'array data')
    return raw.encode('latin1')
  if type(raw) not in (bytes, bytearray):
    raise PickleRefusedError(
        f'array data is {describe(raw)}, not bytes (object arrays are not read)')
  return raw


def _array_from(ctx: Context, raw: Any, dt: np.dtype, shape: tuple[int, ...],
                order: str) -> np.ndarray:
  raw = _raw_bytes(ctx, raw)
  need = math.prod(shape) * dt.itemsize
  if len(raw) != need:
    raise PickleFormatError(
        f'array of shape {shape} and dtype {dt} needs {need} bytes, the pickle holds {len(raw)}')
  ctx.charge(need, 'array data')
  out = np.frombuffer(bytearray(raw), dtype=dt).reshape(shape, order=order)
  return out


class ArrayStub(Stub):
  """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` + BUILD of the array state."""

  pickle_name = 'numpy.ndarray'

  def __init__(self):
    super().__init__()
    self.array: np.ndarray | None = None

  def pickle_build(self, ctx: Context, state: Any) -> None:
    if type(state) is not tuple or len(state) not in (4, 5):
      raise PickleFormatError(f'numpy array state {describe(state)}')
    if len(state) == 5:
      if type(state[0]) is not int:
        raise PickleFormatError(f'numpy array state version {describe(state[0])}')
      state = state[1:]
    shape, dt, fortran, raw = state
    shape = _shape(shape)
    dt = _as_dtype(dt)
    if type(fortran) not in (bool, int):
      raise PickleFormatError(f'numpy array order flag {describe(fortran)}')
    array = _array_from(ctx, raw, dt, shape, 'F' if fortran else 'C')
    super().pickle_build(ctx, state[:0])
    self.array = array


def _reconstruct(ctx: Context, subtype=None, shape=None, code=None, *rest):
  del ctx
  if rest or subtype is not NDARRAY or shape != (0,) or code not in (b'b', 'b'):
    raise PickleRefusedError(
        f'numpy _reconstruct({describe(subtype)}, ...): only plain ndarrays are read')
  return ArrayStub()


def _scalar(ctx: Context, dt=None, data=None, *rest):
  if rest:
    raise PickleRefusedError('numpy scalar() with unexpected arguments')
  dt = _as_dtype(dt)
  if data is None:
    raise PickleRefusedError('numpy scalar without data (object scalars are not read)')
  return _array_from(ctx, data, dt, (), 'C')[()]


def _frombuffer(ctx: Context, buf=None, dt=None, shape=None, order='C', *rest):
  if rest or order not in ('C', 'F'):
    raise PickleRefusedError('numpy _frombuffer() with unexpected arguments')
  return _array_from(ctx, buf, _as_dtype(dt), _shape(shape), order)


def numpy_globals() -> dict[tuple[str, str], Any]:
  """The NumPy names a pickle of plain arrays and scalars uses (NumPy 1 and 2 spellings)."""
  table: dict[tuple[str, str], Any] = {
      ('numpy', 'ndarray'): NDARRAY,
      ('numpy', 'dtype'): Function('numpy.dtype', _numpy_dtype),
  }
  for core in ('numpy.core', 'numpy._core'):
    table[(f'{core}.multiarray', '_reconstruct')] = Function(
        f'{core}.multiarray._reconstruct', _reconstruct)
    table[(f'{core}.multiarray', 'scalar')] = Function(f'{core}.multiarray.scalar', _scalar)
    table[(f'{core}.numeric', '_frombuffer')] = Function(f'{core}.numeric._frombuffer', _frombuffer)
  return table


def resolve_numpy(obj: Any) -> Any:
  """An :class:`ArrayStub` / :class:`DtypeStub` as the array / dtype it stands for; else ``obj``."""
  if isinstance(obj, ArrayStub):
    if obj.array is None:
      raise PickleFormatError('numpy array without its data (BUILD missing)')
    return obj.array
  if isinstance(obj, DtypeStub):
    return obj.dtype
  return obj


# --------------------------------------------------------------------------------------------
# The virtual machine.

_COMPAT_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}

_OPNAMES = {
    b'('[0]: 'MARK', b'.'[0]: 'STOP', b'0'[0]: 'POP', b'1'[0]: 'POP_MARK', b'2'[0]: 'DUP',
    b'F'[0]: 'FLOAT', b'I'[0]: 'INT', b'J'[0]: 'BININT', b'K'[0]: 'BININT1', b'L'[0]: 'LONG',
    b'M'[0]: 'BININT2', b'N'[0]: 'NONE', b'P'[0]: 'PERSID', b'Q'[0]: 'BINPERSID',
    b'R'[0]: 'REDUCE', b'S'[0]: 'STRING', b'T'[0]: 'BINSTRING', b'U'[0]: 'SHORT_BINSTRING',
    b'V'[0]: 'UNICODE', b'X'[0]: 'BINUNICODE', b'a'[0]: 'APPEND', b'b'[0]: 'BUILD',
    b'c'[0]: 'GLOBAL', b'd'[0]: 'DICT', b'}'[0]: 'EMPTY_DICT', b'e'[0]: 'APPENDS',
    b'g'[0]: 'GET', b'h'[0]: 'BINGET', b'i'[0]: 'INST', b'j'[0]: 'LONG_BINGET', b'l'[0]: 'LIST',
    b']'[0]: 'EMPTY_LIST', b'o'[0]: 'OBJ', b'p'[0]: 'PUT', b'q'[0]: 'BINPUT',
    b'r'[0]: 'LONG_BINPUT', b's'[0]: 'SETITEM', b't'[0]: 'TUPLE', b')'[0]: 'EMPTY_TUPLE',
    b'u'[0]: 'SETITEMS', b'G'[0]: 'BINFLOAT', 0x80: 'PROTO', 0x81: 'NEWOBJ', 0x82: 'EXT1',
    0x83: 'EXT2', 0x84: 'EXT4', 0x85: 'TUPLE1', 0x86: 'TUPLE2', 0x87: 'TUPLE3', 0x88: 'NEWTRUE',
    0x89: 'NEWFALSE', 0x8A: 'LONG1', 0x8B: 'LONG4', b'B'[0]: 'BINBYTES',
    b'C'[0]: 'SHORT_BINBYTES', 0x8C: 'SHORT_BINUNICODE', 0x8D: 'BINUNICODE8', 0x8E: 'BINBYTES8',
    0x8F: 'EMPTY_SET', 0x90: 'ADDITEMS', 0x91: 'FROZENSET', 0x92: 'NEWOBJ_EX',
    0x93: 'STACK_GLOBAL', 0x94: 'MEMOIZE', 0x95: 'FRAME', 0x96: 'BYTEARRAY8', 0x97: 'NEXT_BUFFER',
    0x98: 'READONLY_BUFFER',
}

_REFUSED_OPS = {
    'INST': 'INST (old-style class instantiation)', 'OBJ': 'OBJ (class instantiation)',
    'EXT1': 'extension codes (EXT1)', 'EXT2': 'extension codes (EXT2)',
    'EXT4': 'extension codes (EXT4)', 'NEXT_BUFFER': 'out-of-band buffers',
    'READONLY_BUFFER': 'out-of-band buffers',
}


class _Stop(Exception):

  def __init__(self, value):
    super().__init__()
    self.value = value


class Unpickler:
  """Interprets one pickle from ``data[start:]`` under an allow-list and :class:`Limits`.

  Args:
    data: the bytes holding the pickle (possibly followed by other data).
    find_global: ``(module, name) -> value``; raises :class:`PickleRefusedError` for names it
      does not allow. Python 2 module names (``__builtin__``, ``copy_reg``) arrive translated.
    persistent_load: ``pid -> value`` for PERSID / BINPERSID; None refuses persistent ids.
    encoding: how Python 2 ``str`` opcodes are decoded (``'bytes'`` keeps them as bytes).
    limits: resource bounds.
    start: offset of the pickle in ``data``.

  After :meth:`load`, ``end`` is the offset just past the STOP opcode.
  """

  def __init__(self, data: bytes, *, find_global: Callable[[str, str], Any],
               persistent_load: Callable[[Any], Any] | None = None, encoding: str = 'latin1',
               limits: Limits = DEFAULT_LIMITS, start: int = 0):
    if not isinstance(data, bytes):
      data = bytes(data)
    self._data = data
    self._pos = start
    self._end_of_data = len(data)
    self._find_global = find_global
    self._persistent_load = persistent_load
    self._encoding = encoding
    self._limits = limits
    self.ctx = Context(limits.work_factor * (len(data) - start) + limits.work_allowance, encoding)
    self.end = start
    self._objects = 0
    self._items = 0
    self._memo: dict[int, Any] = {}
    self._stack: list[Any] = []
    self._metastack: list[list[Any]] = []
    self._proto = 0
    self._dispatch = [functools.partial(self._bad_opcode, code) for code in range(256)]
    for code, name in _OPNAMES.items():
      if name not in _REFUSED_OPS:
        self._dispatch[code] = getattr(self, f'_op_{name}')

  # ---- reading

  def _read(self, n: int) -> bytes:
    pos = self._pos
    if n < 0 or n > self._end_of_data - pos:
      raise PickleFormatError(
          f'truncated pickle: {n} bytes declared at offset {pos}, {self._end_of_data - pos} left')
    self._pos = pos + n
    return self._data[pos:pos + n]

  def _readline(self) -> bytes:
    pos = self._pos
    i = self._data.find(b'\n', pos)
    if i < 0:
      raise PickleFormatError(f'truncated pickle: unterminated text argument at offset {pos}')
    self._pos = i + 1
    return self._data[pos:i]

  def _u8(self) -> int:
    return self._read(1)[0]

  def _unpack(self, fmt: str) -> int:
    s = struct.Struct(fmt)
    return s.unpack(self._read(s.size))[0]

  # ---- bookkeeping

  def _new(self, obj: Any) -> None:
    self._objects += 1
    if self._objects > self._limits.max_objects:
      raise PickleFormatError(
          f'pickle creates more than {self._limits.max_objects} objects (a resource bound)')
    self._stack.append(obj)

  def _count_items(self, n: int) -> None:
    self._items += n
    if self._items > self._limits.max_items:
      raise PickleFormatError(
          f'pickle inserts more than {self._limits.max_items} container elements (a resource'
          ' bound)')

  def _pop_mark(self) -> list[Any]:
    if not self._metastack:
      raise PickleFormatError('pickle pops a MARK that was never set')
    items = self._stack
    self._stack = self._metastack.pop()
    return items

  def _top(self) -> Any:
    if not self._stack:
      raise PickleFormatError('pickle stack underflow')
    return self._stack[-1]

  def _pop(self) -> Any:
    if not self._stack:
      raise PickleFormatError('pickle stack underflow')
    return self._stack.pop()

  def _decode_str(self, raw: bytes) -> Any:
    if self._encoding == 'bytes':
      return raw
    return raw.decode(self._encoding, 'strict')

  # ---- main loop

  def load(self) -> Any:
    """Runs the pickle to its STOP opcode and returns the value."""
    dispatch = self._dispatch
    data = self._data
    try:
      while True:
        pos = self._pos
        self._pos = pos + 1
        dispatch[data[pos]]()
    except _Stop as stop:
      self.end = self._pos
      return stop.value
    except PickleFormatError:
      raise
    except IndexError as e:
      if self._pos > self._end_of_data:
        raise PickleFormatError('truncated pickle: no STOP opcode') from None
      raise PickleFormatError(f'corrupt pickle near offset {self._pos}: IndexError: {e}') from None
    except (struct.error, UnicodeDecodeError, ValueError, TypeError, OverflowError, KeyError,
            AttributeError) as e:
      raise PickleFormatError(
          f'corrupt pickle near offset {self._pos}: {type(e).__name__}: {e}') from None

  def _bad_opcode(self, code: int) -> None:
    name = _OPNAMES.get(code)
    if name in _REFUSED_OPS:
      raise PickleRefusedError(f'pickle uses {_REFUSED_OPS[name]}, which is not supported')
    raise PickleFormatError(f'invalid pickle opcode 0x{code:02x} at offset {self._pos - 1}')

  # ---- opcodes: framing and control

  def _op_PROTO(self):
    proto = self._u8()
    if proto > 5:
      raise PickleFormatError(f'unsupported pickle protocol {proto}')
    self._proto = proto

  def _op_FRAME(self):
    n = self._unpack('<Q')
    if n > self._end_of_data - self._pos:
      raise PickleFormatError(f'truncated pickle: frame of {n} bytes')

  def _op_STOP(self):
    raise _Stop(self._pop())

  def _op_MARK(self):
    if len(self._metastack) >= self._limits.max_depth:
      raise PickleFormatError(
          f'pickle nests containers more than {self._limits.max_depth} levels deep')
    self._metastack.append(self._stack)
    self._stack = []

  def _op_POP(self):
    if self._stack:
      self._stack.pop()
    else:
      self._pop_mark()

  def _op_POP_MARK(self):
    self._pop_mark()

  def _op_DUP(self):
    self._count_items(1)
    self._stack.append(self._top())

  # ---- scalars

  def _op_NONE(self):
    self._stack.append(None)

  def _op_NEWTRUE(self):
    self._stack.append(True)

  def _op_NEWFALSE(self):
    self._stack.append(False)

  def _op_INT(self):
    line = self._readline()
    if line == b'00':
      self._stack.append(False)
    elif line == b'01':
      self._stack.append(True)
    else:
      self._new(int(line, 0))

  def _op_BININT(self):
    self._new(self._unpack('<i'))

  def _op_BININT1(self):
    self._stack.append(self._u8())

  def _op_BININT2(self):
    self._new(self._unpack('<H'))

  def _op_LONG(self):
    line = self._readline()
    if line.endswith(b'L'):
      line = line[:-1]
    self._new(int(line, 0))

  def _long(self, n: int):
    if n < 0 or n > self._limits.max_int_bytes:
      raise PickleFormatError(
          f'pickled integer of {n} bytes (at most {self._limits.max_int_bytes})')
    self._new(int.from_bytes(self._read(n), 'little', signed=True))

  def _op_LONG1(self):
    self._long(self._u8())

  def _op_LONG4(self):
    self._long(self._unpack('<i'))

  def _op_FLOAT(self):
    self._new(float(self._readline()))

  def _op_BINFLOAT(self):
    self._new(self._unpack('>d'))

  # ---- strings and bytes

  def _op_STRING(self):
    line = self._readline()
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b'"', b"'"):
      raise PickleFormatError('STRING opcode argument must be quoted')
    self._new(self._decode_str(codecs.escape_decode(line[1:-1])[0]))

  def _op_BINSTRING(self):
    self._new(self._decode_str(self._read(self._unpack('<i'))))

  def _op_SHORT_BINSTRING(self):
    self._new(self._decode_str(self._read(self._u8())))

  def _op_UNICODE(self):
    self._new(self._readline().decode('raw-unicode-escape'))

  def _op_BINUNICODE(self):
    self._new(str(self._read(self._unpack('<I')), 'utf-8', 'surrogatepass'))

  def _op_BINUNICODE8(self):
    self._new(str(self._read(self._unpack('<Q')), 'utf-8', 'surrogatepass'))

  def _op_SHORT_BINUNICODE(self):
    self._new(str(self._read(self._u8()), 'utf-8', 'surrogatepass'))

  def _op_BINBYTES(self):
    self._new(self._read(self._unpack('<I')))

  def _op_SHORT_BINBYTES(self):
    self._new(self._read(self._u8()))

  def _op_BINBYTES8(self):
    self._new(self._read(self._unpack('<Q')))

  def _op_BYTEARRAY8(self):
    self._new(bytearray(self._read(self._unpack('<Q'))))

  # ---- containers

  def _op_EMPTY_TUPLE(self):
    self._stack.append(())

  def _op_TUPLE(self):
    items = self._pop_mark()
    self._new(tuple(items))

  def _tuple_n(self, n: int):
    if len(self._stack) < n:
      raise PickleFormatError('pickle stack underflow')
    items = tuple(self._stack[-n:])
    del self._stack[-n:]
    self._new(items)

  def _op_TUPLE1(self):
    self._tuple_n(1)

  def _op_TUPLE2(self):
    self._tuple_n(2)

  def _op_TUPLE3(self):
    self._tuple_n(3)

  def _op_EMPTY_LIST(self):
    self._objects += 1
    if self._objects > self._limits.max_objects:
      self._new(None)  # raises
    self._stack.append([])

  def _op_LIST(self):
    items = self._pop_mark()
    self._count_items(len(items))
    self._new(items)

  def _list_target(self) -> list:
    target = self._top()
    if type(target) is not list:
      raise PickleRefusedError(f'APPEND to {describe(target)}: only lists are appended to')
    return target

  def _op_APPEND(self):
    value = self._pop()
    self._count_items(1)
    self._list_target().append(value)

  def _op_APPENDS(self):
    items = self._pop_mark()
    self._count_items(len(items))
    self._list_target().extend(items)

  def _op_EMPTY_DICT(self):
    self._objects += 1
    if self._objects > self._limits.max_objects:
      self._new(None)  # raises
    self._stack.append({})

  def _op_DICT(self):
    items = self._pop_mark()
    if len(items) % 2:
      raise PickleFormatError('DICT with an odd number of items')
    self._count_items(len(items) // 2)
    self._new({check_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

  def _dict_target(self) -> dict:
    target = self._top()
    if type(target) not in (dict, RecordedOrderedDict):
      raise PickleRefusedError(f'SETITEM on {describe(target)}: only dicts are filled')
    return target

  def _op_SETITEM(self):
    value = self._pop()
    key = self._pop()
    self._count_items(1)
    self._dict_target()[check_key(key)] = value

  def _op_SETITEMS(self):
    items = self._pop_mark()
    if len(items) % 2:
      raise PickleFormatError('SETITEMS with an odd number of items')
    self._count_items(len(items) // 2)
    target = self._dict_target()
    for i in range(0, len(items), 2):
      target[check_key(items[i])] = items[i + 1]

  def _op_EMPTY_SET(self):
    self._new(set())

  def _op_ADDITEMS(self):
    items = self._pop_mark()
    target = self._top()
    if type(target) is not set:
      raise PickleRefusedError(f'ADDITEMS on {describe(target)}: only sets are filled')
    self._count_items(len(items))
    target.update(check_key(x) for x in items)

  def _op_FROZENSET(self):
    items = self._pop_mark()
    self._count_items(len(items))
    self._new(frozenset(check_key(x) for x in items))

  # ---- memo

  def _put(self, idx: int):
    if idx < 0:
      raise PickleFormatError(f'negative memo index {idx}')
    if idx not in self._memo and len(self._memo) >= self._limits.max_memo:
      raise PickleFormatError(
          f'pickle memo exceeds {self._limits.max_memo} entries (a resource bound)')
    self._memo[idx] = self._top()

  def _get(self, idx: int):
    self._count_items(1)
    try:
      self._stack.append(self._memo[idx])
    except KeyError:
      raise PickleFormatError(
          f'pickle refers to memo entry {idx}, which was never stored') from None

  def _op_PUT(self):
    self._put(int(self._readline()))

  def _op_BINPUT(self):
    self._put(self._u8())

  def _op_LONG_BINPUT(self):
    self._put(self._unpack('<I'))

  def _op_MEMOIZE(self):
    self._put(len(self._memo))

  def _op_GET(self):
    self._get(int(self._readline()))

  def _op_BINGET(self):
    self._get(self._u8())

  def _op_LONG_BINGET(self):
    self._get(self._unpack('<I'))

  # ---- globals, calls, state

  def _global(self, module: Any, name: Any):
    if type(module) is not str or type(name) is not str:
      raise PickleFormatError('STACK_GLOBAL needs two strings')
    if self._proto < 3:
      module = _COMPAT_MODULES.get(module, module)
    self._new(self._find_global(module, name))

  def _op_GLOBAL(self):
    module = self._readline().decode('utf-8')
    name = self._readline().decode('utf-8')
    self._global(module, name)

  def _op_STACK_GLOBAL(self):
    name = self._pop()
    module = self._pop()
    self._global(module, name)

  def _op_REDUCE(self):
    args = self._pop()
    func = self._top()
    if type(func) is not Function:
      raise PickleRefusedError(f'pickle calls {describe(func)}, which is not an allowed function')
    if type(args) is not tuple:
      raise PickleFormatError(f'REDUCE arguments must be a tuple, got {describe(args)}')
    try:
      result = func.fn(self.ctx, *args)
    except TypeError as e:
      raise PickleFormatError(f'{func.name} called with bad arguments: {e}') from None
    self._stack.pop()
    self._new(result)

  def _newobj(self, cls: Any, args: Any, kwargs: Any):
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
      raise PickleRefusedError(
          f'pickle instantiates {describe(cls)}, which is not an allowed class')
    if type(args) is not tuple or type(kwargs) is not dict:
      raise PickleFormatError('NEWOBJ arguments must be a tuple (and a dict)')
    self._new(cls.pickle_new(self.ctx, args, kwargs))

  def _op_NEWOBJ(self):
    args = self._pop()
    cls = self._pop()
    self._newobj(cls, args, {})

  def _op_NEWOBJ_EX(self):
    kwargs = self._pop()
    args = self._pop()
    cls = self._pop()
    self._newobj(cls, args, kwargs)

  def _op_BUILD(self):
    state = self._pop()
    inst = self._top()
    if isinstance(inst, type) or not isinstance(inst, (Stub, RecordedOrderedDict)):
      raise PickleRefusedError(
          f'pickle sets the state of {describe(inst)} (BUILD), which is not allowed')
    inst.pickle_build(self.ctx, state)

  def _op_PERSID(self):
    pid = self._readline().decode('ascii')
    self._persistent(pid)

  def _op_BINPERSID(self):
    self._persistent(self._pop())

  def _persistent(self, pid: Any):
    if self._persistent_load is None:
      raise PickleRefusedError('pickle uses persistent ids, which this reader does not support')
    self._new(self._persistent_load(pid))


def loads(data: bytes, *, find_global: Callable[[str, str], Any], **kwargs) -> Any:
  """Unpickles ``data`` (one pickle) with an :class:`Unpickler`."""
  return Unpickler(data, find_global=find_global, **kwargs).load()


def rebuild(obj: Any, leaf: Callable[..., Any], *, max_depth: int = 200,
            max_nodes: int = 10_000_000, start_depth: int = 0, leaf_depth: bool = False) -> Any:
  """A copy of ``obj`` with plain containers (list, tuple, dict, set) and ``leaf(x)`` elsewhere.

  Shared sub-objects are converted once and shared in the result (linear in the number of
  distinct objects, not in the number of paths); cycles and nesting deeper than ``max_depth``
  raise :class:`PickleFormatError`. ``leaf`` may raise to refuse a value; with ``leaf_depth`` it
  is called as ``leaf(x, depth)``, so a leaf that rebuilds its own contents can continue the count
  from ``depth`` (``start_depth``) and the total nesting stays bounded.
  """
  done: dict[int, Any] = {}
  active: set[int] = set()
  nodes = 0

  def go(x: Any, depth: int) -> Any:
    nonlocal nodes
    t = type(x)
    if t not in (list, tuple, dict, RecordedOrderedDict, set, frozenset):
      return leaf(x, depth) if leaf_depth else leaf(x)
    key = id(x)
    if key in done:
      return done[key]
    if depth >= max_depth:
      raise PickleFormatError(f'pickled structure nests deeper than {max_depth} levels')
    if key in active:
      raise PickleFormatError('pickled structure contains itself (a reference cycle)')
    nodes += len(x)
    if nodes > max_nodes:
      raise PickleFormatError(f'pickled structure has more than {max_nodes} elements')
    active.add(key)
    if t is list:
      out: Any = [go(v, depth + 1) for v in x]
    elif t is tuple:
      out = tuple(go(v, depth + 1) for v in x)
    elif t in (set, frozenset):
      out = t(x)  # elements are checked scalars
    else:
      out = collections.OrderedDict() if t is RecordedOrderedDict else {}
      for k, v in x.items():
        out[k] = go(v, depth + 1)
    active.discard(key)
    done[key] = out
    return out

  return go(obj, start_depth)

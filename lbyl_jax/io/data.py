"""Evaluation data: one ``--data`` string -> a :class:`Dataset` of uint8 NHWC images and int labels.

Accepted forms of ``spec_str`` (:func:`load_dataset`):

* a dataset name, ``cifar10`` or ``fashion_mnist`` (test splits): looked up in ``$LBYL_JAX_DATA``,
  then in the user cache (``$LBYL_JAX_CACHE/data``, default ``~/.cache/lbyl_jax/data``), and only
  if no local copy exists downloaded from the official URL (md5-verified) into the user cache.
  ``imagenet`` is looked up the same way (``imagenet/val``) but cannot be downloaded;
* a ``.npz`` with ``images`` (NHWC uint8, or NHW for grayscale) and ``labels``;
* CIFAR-10 python batches: the ``cifar-10-batches-py`` directory (its ``test_batch``), a batch file,
  or ``cifar-10-python.tar.gz`` (``test_batch`` is read from the archive without extracting). The
  batches are pickles; they are read by a restricted pickle machine (``converters.safe_pickle``)
  that can rebuild NumPy arrays and nothing else, so a crafted file cannot run code;
* MNIST / FashionMNIST IDX files: a directory with ``t10k-images-idx3-ubyte[.gz]`` and
  ``t10k-labels-idx1-ubyte[.gz]``, or the images file itself;
* an ImageNet-style validation folder, decoded lazily batch by batch in a thread pool, with the
  standard evaluation transform (shorter side resized to 256 with PIL bilinear, center crop 224;
  for other input sizes the same 0.875 crop ratio). Labels come from sorted class sub-folders, or
  for a flat folder from synset-prefixed file names (``n01440764_123.JPEG``) or from
  ``LOC_val_solution.csv`` (``ILSVRC2012_val_00000001.JPEG``). A ``LOC_synset_mapping.txt`` next
  to the images (or one level up) fixes the class order to the 1000 ImageNet classes, so a
  folder holding only some classes still gets the model's label indices;
* ``tfds:NAME[:SPLIT]`` through ``tensorflow_datasets.data_source`` (optional ``tfds`` extra).

Everything is local-first: the network is only used for a named dataset without a local copy.

The file readers (npz, CIFAR batches and archives, IDX) are bounded by the file they read: sizes
declared in headers are checked against the file before anything is allocated, decompression is
capped at a fixed ratio of the file size, pickles are bounded in objects, depth and copied bytes.
Every malformed, unsafe or over-bound file raises :class:`DataFormatError` (a ``ValueError``)
naming the file.
"""

from __future__ import annotations

import abc
import concurrent.futures
import csv
import dataclasses
import gzip
import lzma
import os
import pathlib
import re
import struct
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from converters import formats
from converters import safe_pickle
from lbyl_jax.io import download as download_lib
from lbyl_jax.io import weights as weights_lib
from lbyl_jax.models import archs

IMAGE_EXTENSIONS = frozenset({'.jpeg', '.jpg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff'})

# The ImageNet evaluation transform: resize the shorter side to crop / 0.875 (224 -> 256).
_CROP_RATIO = 224 / 256


# --------------------------------------------------------------------------------------------
# Datasets.


def _check_batch_size(batch_size: int) -> int:
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
  return int(batch_size)


class Dataset(abc.ABC):
  """A finite, ordered evaluation set.

  Attributes:
    name: short name for reports ('cifar10', a file name, ...).
    source: where it was read from (a path or 'tfds:...').
  """

  name: str
  source: str

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""

  @abc.abstractmethod
  def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (uint8 [B, H, W, C] images, int32 [B] labels) in order; the last one may be short."""

  @abc.abstractmethod
  def subset(self, n: int) -> Dataset:
    """The first ``n`` examples (all of them if ``n >= len(self)``)."""

  def limit(self, n: int | None) -> Dataset:
    """``subset(n)``, or ``self`` for ``n=None``."""
    return self if n is None else self.subset(n)

  @abc.abstractmethod
  def slice(self, start: int, stop: int) -> Dataset:
    """Examples ``start .. stop - 1`` in the dataset's order (e.g. the development split 0:5000
    and the held-out split 5000:10000 of a 10,000-image test set)."""

  @abc.abstractmethod
  def shard(self, index: int, count: int) -> Dataset:
    """Part ``index`` of ``count`` contiguous parts (:func:`shard_bounds`; one per process of a
    multi-host evaluation). Nothing outside the part is decoded; a part may be empty when there
    are fewer examples than parts."""

  def __repr__(self) -> str:
    return (f'{type(self).__name__}(name={self.name!r}, n={len(self)}, '
            f'image_shape={self.image_shape})')


def _check_slice(start: int, stop: int, n: int, name: str) -> tuple[int, int]:
  if int(start) != start or int(stop) != stop or not 0 <= start < stop <= n:
    raise ValueError(f'{name}: slice {start}:{stop} is not within its {n} examples'
                     ' (0 <= START < STOP <= N)')
  return int(start), int(stop)


def parse_slice(text: str) -> tuple[int, int]:
  """'START:STOP' (as for ``--data-slice``) -> (start, stop)."""
  start, sep, stop = str(text).partition(':')
  try:
    if not sep:
      raise ValueError
    return int(start), int(stop)
  except ValueError:
    raise ValueError(f'--data-slice: expected START:STOP (e.g. 0:5000), got {text!r}') from None


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  """(start, stop) of part ``index`` of ``count`` contiguous parts of ``n`` examples: part i holds
  ``i * n // count`` .. ``(i + 1) * n // count - 1``, so the parts follow the dataset's order and
  their sizes differ by at most one."""
  if int(count) != count or count < 1:
    raise ValueError(f'shard count must be a positive integer, got {count!r}')
  if int(index) != index or not 0 <= index < count:
    raise ValueError(f'shard index must be an integer in [0, {count}), got {index!r}')
  return int(index) * int(n) // int(count), (int(index) + 1) * int(n) // int(count)


def _check_subset(n: int) -> int:
  if int(n) != n or n < 1:
    raise ValueError(f'subset size must be a positive integer, got {n!r}')
  return int(n)


class ArrayDataset(Dataset):
  """An in-memory dataset: ``images`` uint8 [N, H, W, C] and ``labels`` int32 [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, name: str, source: str = ''):
    images = np.asarray(images)
    labels = np.asarray(labels)
    where = source or name
    if images.dtype != np.uint8:
      raise ValueError(f'{where}: images must be uint8, got {images.dtype}')
    if images.ndim == 3:  # grayscale NHW
      images = images[..., None]
    if images.ndim != 4:
      raise ValueError(f'{where}: images must be NHWC (or NHW), got shape {images.shape}')
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
          f'{where}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}')
    if len(images) != len(labels):
      raise ValueError(f'{where}: {len(images)} images but {len(labels)} labels')
    if len(labels) and labels.min() < 0:
      raise ValueError(f'{where}: negative label {labels.min()}')
    self.images = images
    self.labels = labels.astype(np.int32)
    self.name = name
    self.source = source

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    batch_size = _check_batch_size(batch_size)
    for s in range(0, len(self), batch_size):
      yield self.images[s:s + batch_size], self.labels[s:s + batch_size]

  def subset(self, n: int) -> ArrayDataset:
    n = _check_subset(n)
    return ArrayDataset(self.images[:n], self.labels[:n], name=self.name, source=self.source)

  def slice(self, start: int, stop: int) -> ArrayDataset:
    start, stop = _check_slice(start, stop, len(self), self.name)
    return ArrayDataset(self.images[start:stop], self.labels[start:stop],
                        name=f'{self.name}[{start}:{stop}]', source=self.source)

  def shard(self, index: int, count: int) -> ArrayDataset:
    start, stop = shard_bounds(len(self), index, count)
    return ArrayDataset(self.images[start:stop], self.labels[start:stop],
                        name=f'{self.name}[shard {index}/{count}]', source=self.source)


class LazyDataset(Dataset):
  """Examples decoded on demand by ``load(i) -> (uint8 HWC image, int label)``.

  ``batches`` decodes each batch in a thread pool (PIL releases the GIL while decoding and
  resizing) and prefetches the next batch while the caller consumes the current one.
  """

  def __init__(self, load: Callable[[int], tuple[np.ndarray, int]], indices: Sequence[int], *,
               image_shape: tuple[int, int, int], name: str, source: str,
               workers: int | None = None, labels: np.ndarray | None = None):
    self._load = load
    self._indices = np.asarray(indices, np.int64)
    self._labels = labels
    self._image_shape = tuple(int(d) for d in image_shape)
    self.name = name
    self.source = source
    self.workers = workers if workers is not None else min(8, os.cpu_count() or 1)

  def __len__(self) -> int:
    return len(self._indices)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self._image_shape

  @property
  def labels(self) -> np.ndarray | None:
    """int32 labels when known without decoding (image folders), else None."""
    return None if self._labels is None else self._labels[self._indices]

  def _example(self, i: int) -> tuple[np.ndarray, int]:
    image, label = self._load(int(i))
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if image.dtype != np.uint8 or image.shape != self._image_shape:
      raise ValueError(
          f'{self.source}: example {i} decoded to {image.dtype} {image.shape}, '
          f'expected uint8 {self._image_shape}'
      )
    return image, int(label)

  @staticmethod
  def _collate(examples: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([e[0] for e in examples]),
            np.asarray([e[1] for e in examples], np.int32))

  def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    batch_size = _check_batch_size(batch_size)
    chunks = [self._indices[s:s + batch_size] for s in range(0, len(self), batch_size)]
    if self.workers <= 1:
      for chunk in chunks:
        yield self._collate([self._example(i) for i in chunk])
      return
    pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix='lbyl_data')
    try:
      pending = None
      for chunk in chunks:
        futures = [pool.submit(self._example, i) for i in chunk]
        if pending is not None:
          yield self._collate([f.result() for f in pending])
        pending = futures
      if pending is not None:
        yield self._collate([f.result() for f in pending])
    finally:
      pool.shutdown(wait=True, cancel_futures=True)

  def subset(self, n: int) -> LazyDataset:
    n = _check_subset(n)
    return LazyDataset(self._load, self._indices[:n], image_shape=self._image_shape,
                       name=self.name, source=self.source, workers=self.workers,
                       labels=self._labels)

  def slice(self, start: int, stop: int) -> LazyDataset:
    start, stop = _check_slice(start, stop, len(self), self.name)
    return LazyDataset(self._load, self._indices[start:stop], image_shape=self._image_shape,
                       name=f'{self.name}[{start}:{stop}]', source=self.source,
                       workers=self.workers, labels=self._labels)

  def shard(self, index: int, count: int) -> LazyDataset:
    start, stop = shard_bounds(len(self), index, count)
    return LazyDataset(self._load, self._indices[start:stop], image_shape=self._image_shape,
                       name=f'{self.name}[shard {index}/{count}]', source=self.source,
                       workers=self.workers, labels=self._labels)

  def materialize(self, batch_size: int = 256) -> ArrayDataset:
    """Decodes everything into an :class:`ArrayDataset` (for small sets)."""
    parts = list(self.batches(batch_size))
    return ArrayDataset(np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1] for p in parts]), name=self.name, source=self.source)


# --------------------------------------------------------------------------------------------
# File readers: their error type and bounds.


class DataFormatError(ValueError):
  """A data file that is corrupt, malformed, over a resource bound, or unsafe to read.

  Raised by every file reader of this module (npz, CIFAR batches and archives, IDX) with a
  message naming the file; a ``ValueError``, so existing handlers keep working.
  """


# Decompressed bytes a data file may expand to: _INFLATE_RATIO x its size plus an allowance
# (the real datasets compress 1.1-5x; gzip / deflate reach ~1000x on constant data).
_INFLATE_RATIO = 64
_INFLATE_ALLOWANCE = 16 << 20


def _inflate_limit(path: pathlib.Path) -> int:
  return _INFLATE_RATIO * path.stat().st_size + _INFLATE_ALLOWANCE


def _dataset(images, labels, **kwargs) -> ArrayDataset:
  """An :class:`ArrayDataset` whose validation errors are :class:`DataFormatError`."""
  try:
    return ArrayDataset(images, labels, **kwargs)
  except DataFormatError:
    raise
  except ValueError as e:
    raise DataFormatError(str(e)) from None


# --------------------------------------------------------------------------------------------
# .npz


def load_npz(path: str | os.PathLike, *, name: str | None = None) -> ArrayDataset:
  """A ``.npz`` with ``images`` (NHWC or NHW uint8) and ``labels``; never unpickles objects.

  Only those two arrays are read, each after its ``.npy`` header has been checked against the
  archive member's declared size (``converters.formats.read_npz``).

  Raises:
    DataFormatError: not a readable npz, missing arrays, object arrays, a header that disagrees
      with its member, a member inflating beyond the bound, wrong dtypes or shapes.
  """
  path = pathlib.Path(path)
  try:
    arrays = formats.read_npz(path, names=('images', 'labels'))
  except (FileNotFoundError, IsADirectoryError, PermissionError):
    raise
  except (ValueError, OSError) as e:
    msg = str(e).removeprefix(f'{path}: ')
    if 'lacks' not in msg and 'not a readable' not in msg:
      msg = f'not a readable .npz file: {msg}'
    raise DataFormatError(f'{path}: {msg}') from None
  return _dataset(arrays['images'], arrays['labels'], name=name or path.name, source=str(path))


# --------------------------------------------------------------------------------------------
# CIFAR-10 python batches.


# Everything a pickled dict of NumPy arrays / lists / bytes may reference: inert stand-ins that
# rebuild plain arrays from validated bytes (numpy's own reducers never run), and the Python 2 / 3
# spellings of bytes.
_PICKLE_ALLOWED: dict = {
    **safe_pickle.numpy_globals(),
    **{name: safe_pickle.BASIC_GLOBALS[name]
       for name in (('_codecs', 'encode'), ('builtins', 'bytes'), ('builtins', 'bytearray'))},
}


def _pickle_global(module: str, name: str):
  entry = _PICKLE_ALLOWED.get((module, name))
  if entry is None:
    raise safe_pickle.PickleRefusedError(
        f'refusing to load {module}.{name}: only NumPy array reconstruction is allowed')
  return entry


def safe_unpickle(raw: bytes, *, what: str) -> object:
  """Unpickles data that may only contain builtin containers and NumPy arrays.

  The pickle is interpreted by ``converters.safe_pickle`` (a restricted, bounded pickle machine):
  no global outside NumPy array reconstruction resolves, no code from the data runs, no state is
  set on a real object, and object counts, nesting depth and copied bytes are bounded by the
  data's size. Python 2 pickles (the CIFAR batches) are read with ``encoding='bytes'``, so their
  dict keys are bytes.

  Raises:
    DataFormatError: naming ``what``, for a reference to anything else (e.g. ``os.system``), a
      corrupt or truncated pickle, or one over a resource bound.
  """
  try:
    obj = safe_pickle.loads(raw, find_global=_pickle_global, encoding='bytes')
    return safe_pickle.rebuild(obj, safe_pickle.resolve_numpy)
  except safe_pickle.PickleRefusedError as e:
    raise DataFormatError(f'{what}: unsafe or corrupt pickle: {e}') from None
  except safe_pickle.PickleFormatError as e:
    raise DataFormatError(f'{what}: corrupt pickle ({e})') from None


def _get(d: dict, key: str):
  if key in d:
    return d[key]
  return d.get(key.encode())


def parse_cifar_batch(raw: bytes, *, what: str) -> tuple[np.ndarray, np.ndarray]:
  """A CIFAR-10/100 python batch -> (uint8 [N, 32, 32, 3] images, int32 [N] labels).

  Raises:
    DataFormatError: naming ``what``, for an unsafe, corrupt or malformed batch.
  """
  d = safe_unpickle(raw, what=what)
  if not isinstance(d, dict):
    raise DataFormatError(f'{what}: expected a pickled dict, got {type(d).__name__}')
  data = _get(d, 'data')
  labels = _get(d, 'labels')
  if labels is None:
    labels = _get(d, 'fine_labels')  # CIFAR-100
  if not isinstance(data, np.ndarray) or labels is None:
    keys = ', '.join(sorted(map(repr, list(d)[:20])))
    raise DataFormatError(f'{what}: not a CIFAR batch (keys: {keys})')
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DataFormatError(
        f'{what}: CIFAR data must be uint8 [N, 3072], got {data.dtype} {data.shape}')
  if isinstance(labels, list) and all(type(v) is int for v in labels):
    labels = np.asarray(labels, np.int64) if labels else np.zeros(0, np.int64)
  if (not isinstance(labels, np.ndarray) or labels.ndim != 1 or len(labels) != len(data)
      or not np.issubdtype(labels.dtype, np.integer)):
    shape = labels.shape if isinstance(labels, np.ndarray) else f'{type(labels).__name__}'
    raise DataFormatError(f'{what}: {len(data)} images but labels of shape {shape}')
  if len(labels) and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
    raise DataFormatError(f'{what}: label {labels.min()} or {labels.max()} out of range')
  # Rows are channel-major planes (1024 R, 1024 G, 1024 B), each 32x32 row-major.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def load_cifar_batch_file(path: str | os.PathLike, *, name: str = 'cifar10') -> ArrayDataset:
  """One CIFAR python batch file (e.g. ``cifar-10-batches-py/test_batch``).

  Raises:
    DataFormatError: unsafe, corrupt or malformed batch.
  """
  path = pathlib.Path(path)
  images, labels = parse_cifar_batch(path.read_bytes(), what=str(path))
  return _dataset(images, labels, name=name, source=str(path))


# What a corrupt gzip / bz2 / xz stream raises while it is read.
_STREAM_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)


def _open_decompressed(path: pathlib.Path):
  """``path`` as a readable stream, through gzip / bz2 / xz when its first bytes say so."""
  with open(path, 'rb') as f:
    head = f.read(6)
  if head[:2] == b'\x1f\x8b':
    return gzip.open(path, 'rb')
  if head[:3] == b'BZh':
    import bz2  # pylint: disable=import-outside-toplevel

    return bz2.open(path, 'rb')
  if head == b'\xfd7zXZ\x00':
    return lzma.open(path, 'rb')
  return open(path, 'rb')


class _BoundedStream:
  """Reads from a (decompressing) stream, refusing to go past ``limit`` bytes in total."""

  def __init__(self, f, limit: int, path: pathlib.Path):
    self.f = f
    self.limit = limit
    self.total = 0
    self.path = path

  def read(self, n: int, what: str) -> bytes:
    if n > self.limit - self.total:
      raise DataFormatError(
          f'{self.path}: {what} would expand the archive beyond {self.limit} bytes (a'
          ' decompression bomb?)')
    out = self.f.read(n)
    self.total += len(out)
    return out

  def skip(self, n: int, what: str) -> None:
    if n > self.limit - self.total:
      raise DataFormatError(
          f'{self.path}: skipping {what} ({n} bytes) would expand the archive beyond'
          f' {self.limit} bytes (a decompression bomb?)')
    while n > 0:
      chunk = self.read(min(n, 1 << 20), what)
      if not chunk:
        raise DataFormatError(f'{self.path}: truncated tar archive ({what})')
      n -= len(chunk)


_TAR_MAX_MEMBERS = 10_000
_TAR_MAX_HEADER_DATA = 1 << 20


def _pax_records(buf: bytes) -> dict[str, str]:
  """Parses POSIX pax records ``"<len> <key>=<value>\\n"``."""
  out, pos = {}, 0
  while pos < len(buf):
    space = buf.find(b' ', pos)
    if space < 0 or not buf[pos:space].isdigit():
      raise ValueError('malformed pax header')
    length = int(buf[pos:space])
    record = buf[space + 1:pos + length]
    if length <= space - pos or pos + length > len(buf) or not record.endswith(b'\n') or (
        b'=' not in record):
      raise ValueError('malformed pax header')
    key, _, value = record[:-1].partition(b'=')
    out[key.decode('utf-8', 'surrogateescape')] = value.decode('utf-8', 'surrogateescape')
    pos += length
  return out


def _tar_member(path: pathlib.Path, member: str) -> tuple[str, bytes]:
  """(name, content) of the first regular file whose base name is ``member``.

  A bounded tar walk: header blocks are parsed with ``tarfile.TarInfo.frombuf``; GNU long names
  and pax records are honoured (each at most 1 MiB); members before the wanted one are skipped
  by reading through them. Decompressed bytes are capped at ``_INFLATE_RATIO`` x the archive
  size (plus an allowance) and the member count at 10,000.
  """
  with _open_decompressed(path) as raw:
    f = _BoundedStream(raw, _inflate_limit(path), path)
    long_name: str | None = None
    pax: dict[str, str] = {}
    for _ in range(_TAR_MAX_MEMBERS):
      block = f.read(tarfile.BLOCKSIZE, 'a tar header')
      if len(block) < tarfile.BLOCKSIZE:
        raise DataFormatError(f'{path}: truncated tar archive (no end-of-archive marker)')
      if block == tarfile.NUL * tarfile.BLOCKSIZE:
        raise DataFormatError(f'{path}: no {member} in the archive')
      try:
        info = tarfile.TarInfo.frombuf(block, 'utf-8', 'surrogateescape')
      except tarfile.HeaderError as e:
        raise DataFormatError(f'{path}: not a readable tar archive ({e})') from None
      size = int(pax.get('size', info.size)) if pax.get('size', '0').isdigit() else -1
      if size < 0:
        raise DataFormatError(f'{path}: tar member with a negative or malformed size')
      padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
      if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
        if size > _TAR_MAX_HEADER_DATA:
          raise DataFormatError(f'{path}: tar extended header of {size} bytes')
        data = f.read(padded, 'a tar extended header')[:size]
        if len(data) < size:
          raise DataFormatError(f'{path}: truncated tar archive (extended header)')
        if info.type == tarfile.GNUTYPE_LONGNAME:
          long_name = data.rstrip(b'\0').decode('utf-8', 'surrogateescape')
        elif info.type == tarfile.XHDTYPE:
          try:
            pax = _pax_records(data)
          except ValueError as e:
            raise DataFormatError(f'{path}: not a readable tar archive ({e})') from None
        continue
      name = pax.get('path') or long_name or info.name
      long_name, pax = None, {}
      if info.type in tarfile.REGULAR_TYPES and pathlib.PurePosixPath(name).name == member:
        content = f.read(size, member)
        if len(content) != size:
          raise DataFormatError(f'{path}: truncated tar archive ({name} has {len(content)} of'
                                f' {size} bytes)')
        return name, content
      f.skip(padded, name)
    raise DataFormatError(f'{path}: more than {_TAR_MAX_MEMBERS} tar members without {member}')


def load_cifar_tar(path: str | os.PathLike, *, member: str = 'test_batch',
                   name: str = 'cifar10') -> ArrayDataset:
  """Reads ``member`` of ``cifar-10-python.tar.gz`` straight from the archive (no extraction).

  Raises:
    DataFormatError: not a readable (gzip / bz2 / xz) tar archive, no such member, a member or
      archive that would decompress beyond the bound, or an unsafe / malformed batch.
  """
  path = pathlib.Path(path)
  try:
    found, raw = _tar_member(path, member)
  except _STREAM_ERRORS as e:  # corrupt compressed streams
    if isinstance(e, (DataFormatError, FileNotFoundError, IsADirectoryError, PermissionError)):
      raise
    raise DataFormatError(f'{path}: not a readable tar archive ({type(e).__name__}: {e})') from None
  images, labels = parse_cifar_batch(raw, what=f'{path}:{found}')
  return _dataset(images, labels, name=name, source=str(path))


# --------------------------------------------------------------------------------------------
# IDX (MNIST / FashionMNIST).

_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Parses an IDX file (optionally gzipped): magic 0x0000, dtype code, ndim, big-endian dims.

  The header is read first; a gzipped file is decompressed only up to the size its dims declare,
  which must stay below ``_INFLATE_RATIO`` x the file size (plus an allowance).

  Raises:
    DataFormatError: bad magic, truncated header, a data size that disagrees with the dims, a
      corrupt gzip stream, or dims declaring more data than the file can hold.
  """
  path = pathlib.Path(path)
  try:
    with _open_decompressed(path) as f:
      head = f.read(4)
      if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or (
          head[3] == 0):
        raise DataFormatError(f'{path}: not an IDX file (bad magic {head.hex() or "<empty>"})')
      ndim = head[3]
      dims_raw = f.read(4 * ndim)
      if len(dims_raw) < 4 * ndim:
        raise DataFormatError(
            f'{path}: IDX header truncated ({4 + len(dims_raw)} bytes for {ndim} dims)')
      dims = struct.unpack(f'>{ndim}I', dims_raw)
      dtype = np.dtype(_IDX_DTYPES[head[2]])
      count = int(np.prod(dims, dtype=object))
      nbytes = count * dtype.itemsize
      limit = _inflate_limit(path)
      if nbytes > limit:
        raise DataFormatError(
            f'{path}: IDX header says dims {dims} ({nbytes} data bytes), more than a'
            f' {path.stat().st_size}-byte file can hold (limit {limit})')
      raw = f.read(nbytes + 1)
  except _STREAM_ERRORS as e:
    if isinstance(e, (DataFormatError, FileNotFoundError, IsADirectoryError, PermissionError)):
      raise
    raise DataFormatError(f'{path}: corrupt gzip stream ({type(e).__name__}: {e})') from None
  if len(raw) != nbytes:
    has = len(raw) if len(raw) < nbytes else f'more than {nbytes}'
    raise DataFormatError(
        f'{path}: IDX header says dims {dims} ({nbytes} data bytes) but the file has {has}')
  array = np.frombuffer(raw, dtype, count).reshape(dims)
  return array.astype(dtype.newbyteorder('='))


_IDX_NAMES = {
    'images': ('t10k-images-idx3-ubyte', 't10k-images.idx3-ubyte'),
    'labels': ('t10k-labels-idx1-ubyte', 't10k-labels.idx1-ubyte'),
}


def _find_idx(directory: pathlib.Path, kind: str) -> pathlib.Path | None:
  for base in _IDX_NAMES[kind]:
    for suffix in ('', '.gz'):
      p = directory / (base + suffix)
      if p.is_file():
        return p
  return None


def _is_idx_dir(directory: pathlib.Path) -> bool:
  return _find_idx(directory, 'images') is not None and _find_idx(directory, 'labels') is not None


def _labels_for_images(path: pathlib.Path) -> pathlib.Path:
  base = path.name.removesuffix('.gz')
  label_base = base.replace('images', 'labels').replace('idx3', 'idx1')
  if label_base == base:
    raise ValueError(f'{path}: cannot derive the labels file name (expected *images-idx3-ubyte*)')
  for suffix in ('', '.gz'):
    p = path.with_name(label_base + suffix)
    if p.is_file():
      return p
  raise ValueError(f'{path}: labels file {path.with_name(label_base)}[.gz] not found')


def load_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike | None = None, *,
             name: str | None = None) -> ArrayDataset:
  """An IDX images file ([N, H, W] uint8) and its labels file ([N] uint8).

  Raises:
    DataFormatError: either file is malformed (see :func:`read_idx`), or they do not fit together.
    ValueError: the labels file cannot be found or named.
  """
  images_path = pathlib.Path(images_path)
  labels_path = pathlib.Path(labels_path) if labels_path else _labels_for_images(images_path)
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.dtype != np.uint8 or images.ndim != 3:
    raise DataFormatError(
        f'{images_path}: expected uint8 [N, H, W] images, got {images.dtype} {images.shape}')
  if labels.dtype != np.uint8 or labels.ndim != 1:
    raise DataFormatError(
        f'{labels_path}: expected uint8 [N] labels, got {labels.dtype} {labels.shape}')
  if len(images) != len(labels):
    raise DataFormatError(
        f'{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels')
  if name is None:
    name = 'fashion_mnist' if 'fashion' in str(images_path).lower() else images_path.parent.name
  return _dataset(images, labels, name=name, source=str(images_path))


def load_idx_dir(directory: str | os.PathLike, *, name: str | None = None) -> ArrayDataset:
  directory = pathlib.Path(directory)
  images, labels = _find_idx(directory, 'images'), _find_idx(directory, 'labels')
  if images is None or labels is None:
    raise ValueError(f'{directory}: no t10k-images-idx3-ubyte[.gz] + t10k-labels-idx1-ubyte[.gz]')
  return load_idx(images, labels, name=name)


def _is_idx_file(path: pathlib.Path) -> bool:
  """Sniffs the IDX magic (through gzip if compressed) without reading the whole file."""
  try:
    with open(path, 'rb') as f:
      head = f.read(4)
    if head[:2] == b'\x1f\x8b':
      with gzip.open(path, 'rb') as f:
        head = f.read(4)
  except (OSError, EOFError):
    return False
  return len(head) == 4 and head[:2] == b'\0\0' and head[2] in _IDX_DTYPES and head[3] > 0


# --------------------------------------------------------------------------------------------
# ImageNet-style image folders.


def _pil_image():
  """PIL.Image, imported on first use (only the image-folder and TFDS readers need it)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  return Image


def resize_center_crop(image: PIL.Image.Image, size: int, *, resize: int | None = None,
                       channels: int = 3) -> np.ndarray:
  """torchvision's ``Resize(resize)`` (PIL bilinear, shorter side) + ``CenterCrop(size)``.

  Returns uint8 [size, size, channels]; ``resize`` defaults to ``round(size / 0.875)`` (224 -> 256).
  """
  if resize is None:
    resize = int(round(size / _CROP_RATIO))
  image = image.convert('L' if channels == 1 else 'RGB')
  w, h = image.size
  # torchvision truncates the long side: new_long = int(resize * long / short).
  if w <= h:
    ow, oh = resize, int(resize * h / w)
  else:
    ow, oh = int(resize * w / h), resize
  if (ow, oh) != (w, h):
    image = image.resize((ow, oh), _pil_image().BILINEAR)
  if ow < size or oh < size:
    raise ValueError(f'resize {resize} is smaller than crop {size}')
  top = int(round((oh - size) / 2.0))
  left = int(round((ow - size) / 2.0))
  out = np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
  return out[..., None] if out.ndim == 2 else out


_SYNSET = re.compile(r'^(n\d{8})_')


def _first_file(root: pathlib.Path, name: str) -> pathlib.Path | None:
  for d in (root, root.parent):
    if (d / name).is_file():
      return d / name
  return None


def _synset_order(root: pathlib.Path) -> list[str] | None:
  path = _first_file(root, 'LOC_synset_mapping.txt')
  if path is None:
    return None
  wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
  if len(set(wnids)) != len(wnids):
    raise ValueError(f'{path}: duplicate synsets')
  return wnids


def _val_solution(root: pathlib.Path) -> dict[str, str] | None:
  path = _first_file(root, 'LOC_val_solution.csv')
  if path is None:
    return None
  out = {}
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      out[row['ImageId']] = row['PredictionString'].split()[0]
  return out


def _is_image(p: pathlib.Path) -> bool:
  return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith('.')


def load_image_folder(root: str | os.PathLike, *, image_shape: tuple[int, int, int] = (224, 224, 3),
                      num_classes: int | None = None, workers: int | None = None,
                      name: str | None = None) -> LazyDataset:
  """An ImageNet-style validation folder (see the module docstring for the layouts)."""
  root = pathlib.Path(root)
  h, w, c = image_shape
  if h != w:
    raise ValueError(f'center crop needs a square input, got {image_shape}')
  subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
  items: list[tuple[pathlib.Path, str]] = []
  for d in subdirs:
    items += [(p, d.name) for p in sorted(d.iterdir()) if _is_image(p)]
  if not items:
    flat = sorted(p for p in root.iterdir() if _is_image(p))
    if not flat:
      raise ValueError(f'{root}: no images (looked for {", ".join(sorted(IMAGE_EXTENSIONS))})')
    solution = None
    for p in flat:
      m = _SYNSET.match(p.name)
      if m:
        items.append((p, m.group(1)))
        continue
      if solution is None:
        solution = _val_solution(root) or {}
      if p.stem not in solution:
        raise ValueError(
            f'{root}: cannot tell the class of {p.name}: use class sub-folders, synset-prefixed '
            'names (n01440764_*.JPEG), or put LOC_val_solution.csv next to the images'
        )
      items.append((p, solution[p.stem]))

  classes = sorted({c_ for _, c_ in items})
  order = _synset_order(root)
  if order is not None:
    unknown = sorted(set(classes) - set(order))
    if unknown:
      raise ValueError(f'{root}: classes {unknown[:5]} are not in LOC_synset_mapping.txt')
    class_index = {wnid: i for i, wnid in enumerate(order)}
  else:
    class_index = {cls: i for i, cls in enumerate(classes)}
    if num_classes is not None and len(classes) != num_classes:
      warnings.warn(
          f'{root}: {len(classes)} classes but the model has {num_classes}; labels are the indices '
          'of the sorted class names, which only match the model for the full class set (add '
          'LOC_synset_mapping.txt to fix the order)', stacklevel=3)
  paths = [p for p, _ in items]
  labels = np.asarray([class_index[cls] for _, cls in items], np.int32)

  Image = _pil_image()  # pylint: disable=invalid-name

  def load(i: int) -> tuple[np.ndarray, int]:
    try:
      with Image.open(paths[i]) as im:
        return resize_center_crop(im, h, channels=c), int(labels[i])
    except (OSError, Image.DecompressionBombError) as e:
      raise ValueError(f'{paths[i]}: cannot decode image ({e})') from e

  return LazyDataset(load, range(len(paths)), image_shape=image_shape, name=name or root.name,
                     source=str(root), workers=workers, labels=labels)


# --------------------------------------------------------------------------------------------
# TensorFlow Datasets.


def load_tfds(name: str, split: str | None = None, *,
              image_shape: tuple[int, int, int] | None = None,
              workers: int | None = None) -> LazyDataset:
  """``tensorflow_datasets.data_source(name, split)``, resized like ImageNet if needed."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f'--data tfds:{name} needs TensorFlow Datasets: pip install "lbyl_jax[tfds]" '
        '(tensorflow-datasets and array_record)'
    ) from e
  if split is None:
    split = 'validation' if name.startswith('imagenet') else 'test'
  source = tfds.data_source(name, split=split)
  n = len(source)
  if n == 0:
    raise ValueError(f'tfds:{name}:{split} is empty')
  first = source[0]
  if 'image' not in first or 'label' not in first:
    raise ValueError(
        f'tfds:{name}: examples need "image" and "label" features, got {sorted(first)}')
  if image_shape is None and name.startswith('imagenet'):
    image_shape = (224, 224, 3)  # variable-size images: the standard evaluation crop
  elif image_shape is None:
    shape = np.asarray(first['image']).shape
    image_shape = (*shape, 1) if len(shape) == 2 else tuple(shape)
  target = tuple(image_shape)

  def load(i: int) -> tuple[np.ndarray, int]:
    ex = source[i]
    image = np.asarray(ex['image'], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape != target:
      pil = _pil_image().fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      image = resize_center_crop(pil, target[0], channels=target[2])
    return image, int(ex['label'])

  return LazyDataset(load, range(n), image_shape=target, name=name, source=f'tfds:{name}:{split}',
                     workers=workers)


# --------------------------------------------------------------------------------------------
# Named datasets: local-first lookup, verified download.


@dataclasses.dataclass(frozen=True)
class DataFile:
  url: str
  filename: str  # relative to the user data cache
  md5: str


_FASHION_URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'

# Official sources of the named test sets (publishers give md5 sums only).
SOURCES: dict[str, tuple[DataFile, ...]] = {
    'cifar10': (
        DataFile('https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
                 'cifar-10-python.tar.gz', 'c58f30108f718f92721af3b95e74349a'),
    ),
    'fashion_mnist': (
        DataFile(_FASHION_URL + 't10k-images-idx3-ubyte.gz',
                 'fashion-mnist/t10k-images-idx3-ubyte.gz', 'bef4ecab320f06d8554ea6380940ec79'),
        DataFile(_FASHION_URL + 't10k-labels-idx1-ubyte.gz',
                 'fashion-mnist/t10k-labels-idx1-ubyte.gz', 'bb300cfdad3c16e7a12a480ee83cd310'),
    ),
}

# Local layouts tried, in order, inside each data directory.
_LOCAL_LAYOUTS: dict[str, tuple[str, ...]] = {
    'cifar10': ('cifar10_test.npz', 'cifar-10-batches-py', 'cifar-10-python.tar.gz',
                'cifar10/cifar10_test.npz', 'cifar10/cifar-10-batches-py',
                'cifar10/cifar-10-python.tar.gz'),
    'fashion_mnist': ('fashion_mnist_test.npz', 'fashion-mnist', 'fashion_mnist',
                      'FashionMNIST/raw', 'fashion_mnist/fashion_mnist_test.npz'),
    'imagenet': ('imagenet/val', 'imagenet', 'ILSVRC2012_img_val', 'ILSVRC/Data/CLS-LOC/val'),
}

_ALIASES = {
    'cifar10': 'cifar10', 'cifar-10': 'cifar10', 'cifar_10': 'cifar10',
    'fashion_mnist': 'fashion_mnist', 'fashion-mnist': 'fashion_mnist',
    'fashionmnist': 'fashion_mnist', 'imagenet': 'imagenet', 'imagenet2012': 'imagenet',
}


def user_data_dir() -> pathlib.Path:
  """``$LBYL_JAX_CACHE/data`` (default ``~/.cache/lbyl_jax/data``)."""
  return weights_lib.cache_root() / 'data'


def data_dirs() -> list[pathlib.Path]:
  dirs = []
  env = os.environ.get('LBYL_JAX_DATA')
  if env:
    dirs.append(pathlib.Path(env).expanduser())
  dirs.append(user_data_dir())
  return dirs


def _usable(name: str, path: pathlib.Path) -> bool:
  if name == 'imagenet':
    return path.is_dir()
  if path.suffix == '.npz' or path.name.endswith('.tar.gz'):
    return path.is_file()
  if name == 'cifar10':
    return (path / 'test_batch').is_file()
  return path.is_dir() and _is_idx_dir(path)


def find_local(name: str) -> pathlib.Path | None:
  """The first local copy of a named dataset in ``data_dirs()``, or None."""
  for d in data_dirs():
    if name == 'fashion_mnist' and d.is_dir() and _is_idx_dir(d):
      return d
    for rel in _LOCAL_LAYOUTS[name]:
      if _usable(name, d / rel):
        return d / rel
  return None


def fetch_dataset(name: str, *, progress: bool = True) -> pathlib.Path:
  """Downloads a named test set into the user cache (md5-verified); returns its path."""
  cache = user_data_dir()
  for f in SOURCES[name]:
    dest = cache / f.filename
    if dest.is_file():
      download_lib.verify(dest, md5=f.md5)
    else:
      download_lib.fetch(f.url, dest, md5=f.md5, progress=progress)
  return cache / pathlib.PurePosixPath(SOURCES[name][0].filename).parts[0]


def _load_path(path: pathlib.Path, *, name: str | None, arch: archs.ArchSpec | None,
               workers: int | None) -> Dataset:
  if not path.exists():
    raise ValueError(f'data path {path} does not exist')
  if path.is_dir():
    if (path / 'test_batch').is_file():
      return load_cifar_batch_file(path / 'test_batch', name=name or 'cifar10')
    if (path / 'cifar-10-batches-py' / 'test_batch').is_file():
      return load_cifar_batch_file(path / 'cifar-10-batches-py' / 'test_batch',
                                   name=name or 'cifar10')
    if _is_idx_dir(path):
      return load_idx_dir(path, name=name)
    shape = arch.input_shape if arch is not None else (224, 224, 3)
    return load_image_folder(path, image_shape=shape, workers=workers, name=name,
                             num_classes=arch.num_classes if arch is not None else None)
  lower = path.name.lower()
  if lower.endswith('.npz'):
    return load_npz(path, name=name)
  if lower.endswith(('.tar.gz', '.tgz', '.tar')):
    return load_cifar_tar(path, name=name or 'cifar10')
  if _is_idx_file(path):
    return load_idx(path, name=name)
  if path.name in ('test_batch', 'test') or re.fullmatch(r'data_batch_\d+', path.name):
    return load_cifar_batch_file(path, name=name or 'cifar10')
  raise ValueError(
      f'{path}: unrecognized data file (expected .npz, cifar-10-python.tar.gz, a CIFAR batch, '
      'an IDX file, or a directory)'
  )


def _check_arch(ds: Dataset, arch: archs.ArchSpec) -> None:
  if not arch.accepts_image_shape(ds.image_shape):
    raise ValueError(
        f'data {ds.source or ds.name} has images of shape {ds.image_shape} but {arch.name} expects '
        f'{arch.image_shape}'
    )
  labels = getattr(ds, 'labels', None)
  if labels is not None and len(labels) and labels.max() >= arch.num_classes:
    raise ValueError(
        f'data {ds.source or ds.name} has label {labels.max()} but {arch.name} has '
        f'{arch.num_classes} classes'
    )


def load_dataset(
    spec_str: str | os.PathLike | None = None,
    *,
    arch: archs.ArchSpec | str | None = None,
    limit: int | None = None,
    slice_: tuple[int, int] | None = None,
    download: bool = True,
    progress: bool = True,
    workers: int | None = None,
) -> Dataset:
  """Resolves a ``--data`` string (see the module docstring) to a :class:`Dataset`.

  Args:
    spec_str: name, path or ``tfds:NAME[:SPLIT]``; None means the dataset of ``arch``.
    arch: preset (or name) the data is for: sets the image size of image folders and checks
      image shape and label range.
    limit: keep only the first ``limit`` examples (of the slice, when one is given).
    slice_: (start, stop): keep examples start..stop-1 (``--data-slice``), before ``limit``.
    download: allow downloading a named dataset that has no local copy.
    progress: progress bar while downloading.
    workers: decoding threads of lazily decoded sets.

  Raises:
    ValueError: nonexistent path, unrecognized or corrupt file, shape/label mismatch.
  """
  if isinstance(arch, str):
    arch = archs.get(arch)
  if spec_str is None:
    if arch is None:
      raise ValueError('load_dataset needs a data spec or an arch')
    spec_str = arch.dataset
  spec = os.fspath(spec_str)

  if spec.startswith('tfds:'):
    # NAME may carry a tfds version (cifar10:3.0.2); SPLIT may hold slices (validation[:5]).
    m = re.fullmatch(r'([^:\s]+(?::\d+\.\d+\.\d+)?)(?::(\S+))?', spec[len('tfds:'):])
    if m is None:
      raise ValueError(f'expected tfds:NAME[:SPLIT], got {spec!r}')
    ds = load_tfds(m.group(1), m.group(2),
                   image_shape=arch.image_shape if arch is not None else None, workers=workers)
  elif spec.lower() in _ALIASES and not pathlib.Path(spec).exists():
    name = _ALIASES[spec.lower()]
    path = find_local(name)
    if path is None:
      if name not in SOURCES:
        raise ValueError(
            f'{name}: no local copy in {", ".join(map(str, data_dirs()))} and it cannot be '
            'downloaded automatically; pass --data /path/to/val (class sub-folders)'
        )
      if not download:
        raise ValueError(
            f'{name}: no local copy in {", ".join(map(str, data_dirs()))} and downloading is '
            'disabled'
        )
      path = fetch_dataset(name, progress=progress)
    ds = _load_path(path, name=name, arch=arch, workers=workers)
  else:
    ds = _load_path(pathlib.Path(spec).expanduser(), name=None, arch=arch, workers=workers)

  if arch is not None:
    _check_arch(ds, arch)
  if slice_ is not None:
    ds = ds.slice(*slice_)
  return ds.limit(limit)

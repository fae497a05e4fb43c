"""Crash-safe publication of output directories, and what ``--overwrite`` may replace.

Every directory this tool writes (a checkpoint, a sweep) is assembled in a hidden sibling
``.<name>.tmp-<id>`` and renamed into place. The last file written into the staging directory is
the marker ``.lbyl_jax.json`` ({'kind', 'complete': true, ...}); a staging directory without it
is unfinished. Replacing an existing result swaps two renames::

  out -> .<name>.old-<id>      (the previous result, complete)
  .<name>.tmp-<id> -> out      (the new result, complete)

and then deletes the old one. If the process dies in between, :func:`recover` (run by the next
writer of the same ``out``, before anything else) finishes the swap from the complete staging
directory, or puts the old result back when there is none, so ``out`` is always either the old
or the new result, complete. Staging directories of killed runs (the process that made them is
gone) are removed by the same call; those of a live process are left alone.

``--overwrite`` (``overwrite=True``) replaces only a directory this tool wrote: one holding the
marker (or, for checkpoints written before the marker existed, a valid ``meta.json`` next to
``variables/``). It never replaces a regular file, a symlink, a foreign directory, the current
directory or one of its ancestors, the home directory or a filesystem root; each is refused with a
:class:`UnsafeOutputError` before any work is done, and left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import time
import uuid
from collections.abc import Iterator

MARKER = '.lbyl_jax.json'
KINDS = ('checkpoint', 'sweep', 'export')
_STAGING = 'tmp'
_OLD = 'old'
_OWNER = '.owner.json'  # pid and host of the process writing a staging directory


class UnsafeOutputError(ValueError):
  """An output path that this tool refuses to write to or replace."""


def _hint(flag: str) -> str:
  return f'pass {flag} to replace it'


def _dangerous(path: pathlib.Path) -> str | None:
  """Why ``path`` (absolute, resolved) must never be replaced, or None."""
  if path == pathlib.Path(path.anchor):
    return 'it is a filesystem root'
  try:
    home = pathlib.Path.home().resolve()
  except (RuntimeError, KeyError):  # no home directory known
    home = None
  if home is not None and path == home:
    return 'it is the home directory'
  cwd = pathlib.Path.cwd().resolve()
  if path == cwd or path in cwd.parents:
    return 'it is the current directory or one of its parents'
  return None


def read_marker(path: pathlib.Path) -> dict | None:
  """The marker of a directory this tool completed, or None."""
  try:
    info = json.loads((path / MARKER).read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  if not isinstance(info, dict) or info.get('kind') not in KINDS or info.get('complete') is not True:
    return None
  return info


def _legacy_checkpoint(path: pathlib.Path) -> bool:
  """A checkpoint written before the marker existed: meta.json with our keys and variables/."""
  try:
    meta = json.loads((path / 'meta.json').read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return False
  return (isinstance(meta, dict) and {'format_version', 'arch', 'widths', 'format'} <= meta.keys()
          and (path / 'variables').is_dir())


def is_ours(path: pathlib.Path) -> bool:
  """Whether ``path`` is a directory that this tool wrote (see the module docstring)."""
  if path.is_symlink() or not path.is_dir():
    return False
  return read_marker(path) is not None or _legacy_checkpoint(path)


def resolve_out(out: str | os.PathLike, *, flag: str = '--out') -> pathlib.Path:
  """The absolute output path; an empty path is refused (it would name the current directory)."""
  if out is None or not os.fspath(out).strip():
    raise UnsafeOutputError(f'{flag} is empty; give the directory to write')
  path = pathlib.Path(os.fspath(out)).expanduser()
  parent = path.absolute().parent.resolve()
  return parent / path.name if path.name not in ('', '.', '..') else path.absolute().resolve()


def check_target(out: str | os.PathLike, *, overwrite: bool, flag: str = '--out',
                 overwrite_flag: str = '--overwrite', create_parents: bool = False) -> pathlib.Path:
  """Validates an output directory before any work; returns its absolute path.

  With ``create_parents`` a missing parent is allowed when its nearest existing ancestor is a
  writable directory (the caller creates the parents when it writes, see :func:`make_parents`);
  nothing is created here.

  Raises:
    UnsafeOutputError: a path that must never be written or replaced (module docstring), or an
      existing path that this tool did not write while ``overwrite`` is set.
    FileExistsError: ``out`` exists and ``overwrite`` is False.
    FileNotFoundError / PermissionError: the parent directory is missing / not writable.
  """
  path = resolve_out(out, flag=flag)
  why = _dangerous(path)
  if why is not None:
    raise UnsafeOutputError(f'refusing to write {flag} {path}: {why}')
  if path.name.startswith('.') and (f'.{_STAGING}-' in path.name or f'.{_OLD}-' in path.name):
    raise UnsafeOutputError(f'refusing to write {flag} {path}: the name is one of our staging names')
  if path.is_symlink() or path.exists():
    if not overwrite:
      raise FileExistsError(f'{flag} {path} already exists; {_hint(overwrite_flag)}')
    if path.is_symlink():
      raise UnsafeOutputError(f'refusing to replace {path}: it is a symbolic link, not a '
                              'directory this tool wrote')
    if not path.is_dir():
      raise UnsafeOutputError(f'refusing to replace {path}: it is a file, not a directory this '
                              'tool wrote')
    if not is_ours(path):
      raise UnsafeOutputError(
          f'refusing to replace {path}: it is not a directory this tool wrote (no {MARKER}); '
          f'{overwrite_flag} only replaces earlier results')
  parent = path.parent
  if not parent.is_dir() and create_parents:
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
      parent = parent.parent
    if not parent.is_dir():
      raise FileNotFoundError(f'cannot write {flag} {path}: {parent} is not a directory')
  if not parent.is_dir():
    raise FileNotFoundError(f'cannot write {flag} {path}: parent directory {parent} does not exist')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f'cannot write {flag} {path}: parent directory {parent} is not writable')
  return path


def make_parents(path: pathlib.Path) -> None:
  """Creates the missing parent directories of an output checked with ``create_parents``."""
  path.parent.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------
# Staging and the swap.


def _siblings(out: pathlib.Path, kind: str) -> list[pathlib.Path]:
  prefix = f'.{out.name}.{kind}-'
  try:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))
  except OSError:
    return []


def _owner_alive(staging: pathlib.Path) -> bool:
  """Whether the process that created ``staging`` may still be writing it (same host, alive)."""
  try:
    owner = json.loads((staging / _OWNER).read_text(encoding='utf-8'))
    pid, host = int(owner['pid']), str(owner['host'])
  except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
    # No owner file: created by an older version, or killed before writing it. Leave it alone
    # while it is young (a live writer may be about to write the file).
    try:
      return time.time() - staging.stat().st_mtime < 60.0
    except OSError:
      return False
  if host != socket.gethostname():
    return True  # another machine on a shared filesystem: we cannot tell
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      path.unlink()


def recover(out: str | os.PathLike) -> str | None:
  """Finishes or rolls back a swap that a killed run left half done; removes dead staging dirs.

  Returns:
    'finished' (a complete new result was moved into place), 'restored' (the old result was put
    back), or None (nothing to do).
  """
  out = pathlib.Path(out)
  action = None
  staged = [p for p in _siblings(out, _STAGING) if not _owner_alive(p)]
  complete = [p for p in staged if read_marker(p) is not None]
  olds = _siblings(out, _OLD)
  if not (out.exists() or out.is_symlink()):
    if complete:
      newest = max(complete, key=lambda p: read_marker(p).get('created', 0.0))
      os.rename(newest, out)
      staged.remove(newest)
      action = 'finished'
    elif olds:
      os.rename(olds[-1], out)
      olds = olds[:-1]
      action = 'restored'
  for p in staged:
    _remove(p)
  if out.exists():
    for p in olds:
      _remove(p)
  return action


def _write_marker(staging: pathlib.Path, kind: str) -> None:
  info = dict(kind=kind, complete=True, created=time.time())
  with open(staging / MARKER, 'w', encoding='utf-8') as f:
    json.dump(info, f)
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: pathlib.Path) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _swap(staging: pathlib.Path, out: pathlib.Path, *, overwrite: bool, overwrite_flag: str) -> None:
  if out.exists() or out.is_symlink():
    if not overwrite:  # appeared while we were writing
      raise FileExistsError(f'{out} already exists; {_hint(overwrite_flag)}')
    if not is_ours(out):
      raise UnsafeOutputError(f'refusing to replace {out}: it is not a directory this tool wrote')
    old = out.parent / f'.{out.name}.{_OLD}-{uuid.uuid4().hex[:12]}'
    os.rename(out, old)
    try:
      os.rename(staging, out)
    except BaseException:
      os.rename(old, out)
      raise
    _fsync_dir(out.parent)
    _remove(old)
  else:
    os.rename(staging, out)
    _fsync_dir(out.parent)


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike, *, kind: str, overwrite: bool = False,
                flag: str = '--out', overwrite_flag: str = '--overwrite') -> Iterator[pathlib.Path]:
  """Yields an empty hidden staging directory; on a clean exit publishes it as ``out``.

  The target is checked first (:func:`check_target`) and a half-done swap of an earlier killed run
  is recovered (:func:`recover`). On an exception the staging directory is removed and ``out`` is
  left as it was.
  """
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  path = resolve_out(out, flag=flag)
  recover(path)
  path = check_target(path, overwrite=overwrite, flag=flag, overwrite_flag=overwrite_flag)
  staging = path.parent / f'.{path.name}.{_STAGING}-{uuid.uuid4().hex[:12]}'
  staging.mkdir()
  try:
    (staging / _OWNER).write_text(json.dumps(dict(pid=os.getpid(),
                                                         host=socket.gethostname())))
    yield staging
    _write_marker(staging, kind)
    _fsync_dir(staging)
    _swap(staging, path, overwrite=overwrite, overwrite_flag=overwrite_flag)
  except BaseException:
    _remove(staging)
    raise
  with contextlib.suppress(OSError):  # the owner file only marks a staging dir in progress
    (path / _OWNER).unlink()

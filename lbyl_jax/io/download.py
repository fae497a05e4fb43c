"""Verified downloads: a file either arrives complete with the expected checksum, or not at all.

The body is streamed to a hidden temporary file next to the destination, hashed while it arrives,
and only renamed onto ``dest_path`` (atomically, same directory) once the checksum matches. Any
failure (network, timeout, truncated body, checksum) removes the temporary file, so a later run
never mistakes a partial file for a good one.

Checksums are either a full sha256 (64 hex digits), a torch-hub style sha256 prefix (at least 8 hex
digits, compared with the start of the digest, as ``torch.hub`` does for ``name-<prefix>.pth``), or
an md5 (32 hex digits) for datasets whose publishers only give md5 sums.

Every download is bounded three ways, so a slow or hostile peer cannot hold it forever or fill
the disk:

* ``timeout`` (default 30 s): connecting and each socket read;
* ``deadline`` (default :data:`DEFAULT_DEADLINE` = 1800 s, or ``$LBYL_JAX_DOWNLOAD_DEADLINE``):
  the whole download, headers included; a watchdog shuts the connection down when it passes, so
  a peer trickling one byte every few seconds fails with :class:`DownloadError`;
* ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES` = 2 GiB, or
  ``$LBYL_JAX_DOWNLOAD_MAX_BYTES``): a ``Content-Length`` above it fails before the body is read,
  and a body growing past it fails before more than ``max_bytes`` are written.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import tqdm

_CHUNK = 1 << 20
_HEX = re.compile(r'^[0-9a-f]+$')
_USER_AGENT = 'lbyl_jax-download/1.0'

DEFAULT_DEADLINE = 1800.0  # seconds for a whole download (the largest known weights: ~550 MB)
DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB; every known weights file and dataset is below 600 MB
DEADLINE_ENV = 'LBYL_JAX_DOWNLOAD_DEADLINE'
MAX_BYTES_ENV = 'LBYL_JAX_DOWNLOAD_MAX_BYTES'


class DownloadError(RuntimeError):
  """The file could not be fetched (network down, HTTP error, timeout, truncated body)."""


class ChecksumError(ValueError):
  """A file's content does not match its expected checksum."""


def _file_digest(path: str | os.PathLike, factory: Callable[[], Any]) -> str:
  h = factory()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      h.update(chunk)
  return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 digest of a file, read in 1 MiB chunks."""
  return _file_digest(path, hashlib.sha256)


def md5_file(path: str | os.PathLike) -> str:
  """Hex md5 digest of a file (only for datasets published with md5 sums)."""
  return _file_digest(path, hashlib.md5)


def normalize_sha256(sha256: str) -> str:
  """Validates a full sha256 digest or a torch-hub prefix (>= 8 hex digits); returns it lowercase."""
  s = sha256.strip().lower()
  if not _HEX.match(s) or not 8 <= len(s) <= 64:
    raise ValueError(
        f'sha256 must be a 64-digit hex digest or a hex prefix of at least 8 digits, got {sha256!r}'
    )
  return s


def normalize_md5(md5: str) -> str:
  s = md5.strip().lower()
  if not _HEX.match(s) or len(s) != 32:
    raise ValueError(f'md5 must be a 32-digit hex digest, got {md5!r}')
  return s


def _check(actual_sha256: str | None, actual_md5: str | None, *, sha256: str | None,
           md5: str | None, what: str) -> None:
  if sha256 is not None and not actual_sha256.startswith(sha256):
    kind = 'sha256' if len(sha256) == 64 else f'sha256 prefix ({len(sha256)} digits)'
    raise ChecksumError(f'{what}: {kind} mismatch: expected {sha256}, actual {actual_sha256}')
  if md5 is not None and actual_md5 != md5:
    raise ChecksumError(f'{what}: md5 mismatch: expected {md5}, actual {actual_md5}')


def verify(path: str | os.PathLike, *, sha256: str | None = None, md5: str | None = None) -> None:
  """Raises :class:`ChecksumError` unless ``path`` matches every checksum given."""
  sha256 = normalize_sha256(sha256) if sha256 is not None else None
  md5 = normalize_md5(md5) if md5 is not None else None
  if sha256 is None and md5 is None:
    raise ValueError('verify needs sha256= or md5=')
  h_sha = hashlib.sha256() if sha256 is not None else None
  h_md5 = hashlib.md5() if md5 is not None else None
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      if h_sha is not None:
        h_sha.update(chunk)
      if h_md5 is not None:
        h_md5.update(chunk)
  _check(h_sha and h_sha.hexdigest(), h_md5 and h_md5.hexdigest(), sha256=sha256, md5=md5,
         what=str(path))


def _offline_hint(dest: pathlib.Path) -> str:
  return f'offline? put the file at {dest} or pass --weights/--data'


def _positive(value: Any, what: str, cast: Callable[[Any], Any]) -> Any:
  try:
    out = cast(value)
  except (TypeError, ValueError):
    out = None
  if out is None or not out > 0 or out != out:  # also refuses NaN
    raise ValueError(f'{what} must be a positive number, got {value!r}')
  return out


def _limit(value: Any, env: str, default: Any, what: str, cast: Callable[[Any], Any]) -> Any:
  if value is not None:
    return _positive(value, what, cast)
  raw = os.environ.get(env, '').strip()
  return _positive(raw, f'${env}', cast) if raw else default


def _int_bytes(value: Any) -> int:
  if isinstance(value, float):
    if not value.is_integer():
      raise ValueError(value)
    return int(value)
  return int(value)  # an int, or a string of digits


class _Watchdog:
  """Shuts down every connection of one download once its deadline passes."""

  def __init__(self, seconds: float):
    self.expired = False
    self._lock = threading.Lock()
    self._socks: list[socket.socket] = []
    self._timer = threading.Timer(seconds, self._expire)
    self._timer.daemon = True

  def __enter__(self) -> _Watchdog:
    self._timer.start()
    return self

  def __exit__(self, *exc) -> None:
    self._timer.cancel()

  def add(self, sock: socket.socket) -> None:
    with self._lock:
      self._socks.append(sock)
      if self.expired:
        self._shutdown(sock)

  @staticmethod
  def _shutdown(sock: socket.socket) -> None:
    try:
      sock.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass

  def _expire(self) -> None:
    with self._lock:
      self.expired = True
      for sock in self._socks:
        self._shutdown(sock)


def _opener(watch: _Watchdog) -> urllib.request.OpenerDirector:
  """A urllib opener whose HTTP(S) connections register their sockets with ``watch``."""

  class _Watched:

    def do_open(self, http_class, req, **kwargs):

      class Connection(http_class):

        def __init__(self, *args, **kw):
          super().__init__(*args, **kw)
          create = getattr(self, '_create_connection', None)
          if create is not None:  # the raw socket, before any TLS handshake
            def created(*a, **k):
              sock = create(*a, **k)
              watch.add(sock)
              return sock
            self._create_connection = created

        def connect(self):
          super().connect()
          watch.add(self.sock)

      return super().do_open(Connection, req, **kwargs)

  class _HTTP(_Watched, urllib.request.HTTPHandler):
    pass

  class _HTTPS(_Watched, urllib.request.HTTPSHandler):
    pass

  return urllib.request.build_opener(_HTTP(), _HTTPS())


def fetch(
    url: str,
    dest_path: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 30,
    progress: bool = True,
    deadline: float | None = None,
    max_bytes: int | None = None,
) -> pathlib.Path:
  """Downloads ``url`` to ``dest_path``, verified against ``sha256`` and/or ``md5``.

  Args:
    url: http(s) (or file) URL.
    dest_path: final location; its directory is created if needed.
    sha256: full hex digest or torch-hub hex prefix (>= 8 digits).
    md5: full hex md5 digest (for datasets only published with md5 sums).
    timeout: seconds for connecting and for each socket read.
    progress: show a tqdm bar on stderr.
    deadline: seconds for the whole download; default ``$LBYL_JAX_DOWNLOAD_DEADLINE``, else
      :data:`DEFAULT_DEADLINE` (1800).
    max_bytes: largest accepted body; default ``$LBYL_JAX_DOWNLOAD_MAX_BYTES``, else
      :data:`DEFAULT_MAX_BYTES` (2 GiB). At most this many bytes are ever written.

  Returns:
    ``dest_path`` as a Path, once complete and verified.

  Raises:
    ValueError: no or malformed checksum, or a non-positive deadline / size cap.
    DownloadError: network failure, HTTP error, timeout, deadline passed, body over the size
      cap, or truncated body (no file left behind).
    ChecksumError: the content does not match (no file left behind).
  """
  sha256 = normalize_sha256(sha256) if sha256 is not None else None
  md5 = normalize_md5(md5) if md5 is not None else None
  if sha256 is None and md5 is None:
    raise ValueError(f'refusing an unverified download of {url}: pass sha256= or md5=')
  deadline = _limit(deadline, DEADLINE_ENV, DEFAULT_DEADLINE, 'deadline', float)
  max_bytes = _limit(max_bytes, MAX_BYTES_ENV, DEFAULT_MAX_BYTES, 'max_bytes', _int_bytes)
  timeout = _positive(timeout, 'timeout', float)
  dest = pathlib.Path(dest_path).expanduser().absolute()
  dest.parent.mkdir(parents=True, exist_ok=True)

  fd, tmp_name = tempfile.mkstemp(prefix=f'.{dest.name}.', suffix='.part', dir=dest.parent)
  tmp = pathlib.Path(tmp_name)
  try:
    h_sha = hashlib.sha256() if sha256 is not None else None
    h_md5 = hashlib.md5() if md5 is not None else None
    received = 0
    late = (f'could not download {url}: not complete within the {deadline:g} s deadline'
            f' (set deadline= or ${DEADLINE_ENV})')
    started = time.monotonic()
    with os.fdopen(fd, 'wb') as out, _Watchdog(deadline) as watch:
      try:
        request = urllib.request.Request(url, headers={'User-Agent': _USER_AGENT})
        with _opener(watch).open(request, timeout=min(timeout, deadline)) as response:
          length = response.headers.get('Content-Length')
          total = int(length) if length and length.isdigit() else None
          if total is not None and total > max_bytes:
            raise DownloadError(
                f'could not download {url}: it is {total} bytes, more than the {max_bytes}-byte'
                f' cap (set max_bytes= or ${MAX_BYTES_ENV})')
          read = getattr(response, 'read1', None) or response.read
          with tqdm.tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                         desc=dest.name, disable=not progress, leave=False) as bar:
            while True:
              if watch.expired or time.monotonic() - started > deadline:
                raise DownloadError(f'{late}; got {received} bytes')
              chunk = read(min(_CHUNK, max_bytes - received + 1))
              if not chunk:
                break
              if received + len(chunk) > max_bytes:
                raise DownloadError(
                    f'could not download {url}: the body exceeds the {max_bytes}-byte cap'
                    f' (set max_bytes= or ${MAX_BYTES_ENV})')
              out.write(chunk)
              received += len(chunk)
              if h_sha is not None:
                h_sha.update(chunk)
              if h_md5 is not None:
                h_md5.update(chunk)
              bar.update(len(chunk))
      except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        # URLError covers HTTPError and refused connections; OSError covers resets, timeouts
        # during reads; HTTPException a broken response; ValueError a malformed URL.
        if watch.expired:
          raise DownloadError(f'{late}; got {received} bytes') from e
        if isinstance(e, urllib.error.HTTPError):
          reason = f'HTTP {e.code} {e.reason}'
        else:
          reason = getattr(e, 'reason', None) or e
        raise DownloadError(f'could not download {url}: {reason} ({_offline_hint(dest)})') from e
      if watch.expired:
        raise DownloadError(f'{late}; got {received} bytes')
      if total is not None and received != total:
        raise DownloadError(
            f'could not download {url}: got {received} of {total} bytes ({_offline_hint(dest)})'
        )
    _check(h_sha and h_sha.hexdigest(), h_md5 and h_md5.hexdigest(), sha256=sha256, md5=md5,
           what=f'download of {url}')
    os.replace(tmp, dest)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return dest

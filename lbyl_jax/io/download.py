"""Verified downloads: a file either arrives complete with the expected checksum, or not at all.

The body is streamed to a hidden temporary file next to the destination, hashed while it arrives,
and only renamed onto ``dest_path`` (atomically, same directory) once the checksum matches. Any
failure (network, timeout, truncated body, checksum) removes the temporary file, so a later run
never mistakes a partial file for a good one.

Checksums are either a full sha256 (64 hex digits), a torch-hub style sha256 prefix (at least 8 hex
digits, compared with the start of the digest, as ``torch.hub`` does for ``name-<prefix>.pth``), or
an md5 (32 hex digits) for datasets whose publishers only give md5 sums.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import tqdm

_CHUNK = 1 << 20
_HEX = re.compile(r'^[0-9a-f]+$')
_USER_AGENT = 'lbyl_jax-download/1.0'


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


def fetch(
    url: str,
    dest_path: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 30,
    progress: bool = True,
) -> pathlib.Path:
  """Downloads ``url`` to ``dest_path``, verified against ``sha256`` and/or ``md5``.

  Args:
    url: http(s) (or file) URL.
    dest_path: final location; its directory is created if needed.
    sha256: full hex digest or torch-hub hex prefix (>= 8 digits).
    md5: full hex md5 digest (for datasets only published with md5 sums).
    timeout: seconds for connecting and for each socket read.
    progress: show a tqdm bar on stderr.

  Returns:
    ``dest_path`` as a Path, once complete and verified.

  Raises:
    ValueError: no or malformed checksum.
    DownloadError: network failure, HTTP error, timeout or truncated body (no file left behind).
    ChecksumError: the content does not match (no file left behind).
  """
  sha256 = normalize_sha256(sha256) if sha256 is not None else None
  md5 = normalize_md5(md5) if md5 is not None else None
  if sha256 is None and md5 is None:
    raise ValueError(f'refusing an unverified download of {url}: pass sha256= or md5=')
  dest = pathlib.Path(dest_path).expanduser().absolute()
  dest.parent.mkdir(parents=True, exist_ok=True)

  fd, tmp_name = tempfile.mkstemp(prefix=f'.{dest.name}.', suffix='.part', dir=dest.parent)
  tmp = pathlib.Path(tmp_name)
  try:
    h_sha = hashlib.sha256() if sha256 is not None else None
    h_md5 = hashlib.md5() if md5 is not None else None
    with os.fdopen(fd, 'wb') as out:
      try:
        request = urllib.request.Request(url, headers={'User-Agent': _USER_AGENT})
        with urllib.request.urlopen(request, timeout=timeout) as response:
          length = response.headers.get('Content-Length')
          total = int(length) if length and length.isdigit() else None
          received = 0
          with tqdm.tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                         desc=dest.name, disable=not progress, leave=False) as bar:
            while chunk := response.read(_CHUNK):
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
        if isinstance(e, urllib.error.HTTPError):
          reason = f'HTTP {e.code} {e.reason}'
        else:
          reason = getattr(e, 'reason', None) or e
        raise DownloadError(f'could not download {url}: {reason} ({_offline_hint(dest)})') from e
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

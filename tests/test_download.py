"""Verified downloads against a local HTTP server, and the weights search order."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import pathlib
import socket
import threading
import time

import numpy as np
import pytest

from lbyl_jax.models import archs
from lbyl_jax.io import download
from lbyl_jax.io import weights

PAYLOAD = np.random.default_rng(0).integers(0, 256, (3 << 20) + 123, dtype=np.uint8).tobytes()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
  hits: list[str] = []

  def log_message(self, *args):  # keep pytest output clean
    pass

  def do_GET(self):  # noqa: N802 (http.server naming)
    type(self).hits.append(self.path)
    try:
      if self.path == '/slow':
        time.sleep(1.5)
      if self.path == '/truncated':
        self.send_response(200)
        self.send_header('Content-Length', str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD[:1000])
        self.wfile.flush()
        self.close_connection = True
        return
      if self.path not in ('/file.bin', '/slow'):
        self.send_error(404)
        return
      self.send_response(200)
      self.send_header('Content-Length', str(len(PAYLOAD)))
      self.end_headers()
      self.wfile.write(PAYLOAD)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
      pass


@pytest.fixture(scope='module')
def server():
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def dead_url():
  """A URL on a port nobody listens on."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return f'http://127.0.0.1:{port}/file.bin'


def _listing(d: pathlib.Path) -> list[str]:
  return sorted(p.name for p in d.iterdir())


# --------------------------------------------------------------------------------------------
# download.fetch


def test_sha256_file_matches_hashlib(tmp_path):
  p = tmp_path / 'x.bin'
  p.write_bytes(PAYLOAD)  # > 1 MiB: several chunks
  assert download.sha256_file(p) == PAYLOAD_SHA
  assert download.md5_file(p) == PAYLOAD_MD5


@pytest.mark.parametrize('check', [
    {'sha256': PAYLOAD_SHA},
    {'sha256': PAYLOAD_SHA[:8]},
    {'sha256': PAYLOAD_SHA.upper()},
    {'md5': PAYLOAD_MD5},
    {'sha256': PAYLOAD_SHA, 'md5': PAYLOAD_MD5},
])
def test_fetch_good_checksum(server, tmp_path, check):
  dest = tmp_path / 'sub' / 'file.bin'
  out = download.fetch(f'{server}/file.bin', dest, progress=False, **check)
  assert out == dest.absolute()
  assert dest.read_bytes() == PAYLOAD
  assert _listing(dest.parent) == ['file.bin']  # no temporary file left


def test_fetch_with_progress_bar(server, tmp_path, capsys):
  dest = tmp_path / 'file.bin'
  download.fetch(f'{server}/file.bin', dest, sha256=PAYLOAD_SHA, progress=True)
  assert dest.read_bytes() == PAYLOAD
  assert 'file.bin' in capsys.readouterr().err


@pytest.mark.parametrize('check', [
    {'sha256': '0' * 64},
    {'sha256': 'deadbeef'},
    {'md5': '0' * 32},
    {'sha256': PAYLOAD_SHA, 'md5': '0' * 32},  # every given checksum must match
])
def test_fetch_bad_checksum_leaves_no_file(server, tmp_path, check):
  dest = tmp_path / 'file.bin'
  with pytest.raises(download.ChecksumError) as e:
    download.fetch(f'{server}/file.bin', dest, progress=False, **check)
  msg = str(e.value)
  expected = check.get('md5', check.get('sha256'))
  assert expected in msg
  assert (PAYLOAD_MD5 if 'md5' in check else PAYLOAD_SHA) in msg  # the actual digest
  assert _listing(tmp_path) == []


def test_fetch_failure_keeps_existing_file(server, tmp_path):
  dest = tmp_path / 'file.bin'
  dest.write_bytes(b'old')
  with pytest.raises(download.ChecksumError):
    download.fetch(f'{server}/file.bin', dest, sha256='0' * 64, progress=False)
  assert dest.read_bytes() == b'old'
  assert _listing(tmp_path) == ['file.bin']


def test_fetch_server_down(dead_url, tmp_path):
  dest = tmp_path / 'file.bin'
  with pytest.raises(download.DownloadError) as e:
    download.fetch(dead_url, dest, sha256=PAYLOAD_SHA, progress=False)
  assert 'offline?' in str(e.value) and str(dest) in str(e.value)
  assert _listing(tmp_path) == []


def test_fetch_timeout(server, tmp_path):
  dest = tmp_path / 'file.bin'
  t0 = time.perf_counter()
  with pytest.raises(download.DownloadError, match='offline'):
    download.fetch(f'{server}/slow', dest, sha256=PAYLOAD_SHA, timeout=0.2, progress=False)
  assert time.perf_counter() - t0 < 1.4  # gave up before the server answered
  assert _listing(tmp_path) == []


def test_fetch_http_error(server, tmp_path):
  with pytest.raises(download.DownloadError, match='404'):
    download.fetch(f'{server}/missing', tmp_path / 'f', sha256=PAYLOAD_SHA, progress=False)
  assert _listing(tmp_path) == []


def test_fetch_truncated_body(server, tmp_path):
  with pytest.raises(download.DownloadError):
    download.fetch(f'{server}/truncated', tmp_path / 'f', sha256=PAYLOAD_SHA, progress=False)
  assert _listing(tmp_path) == []


@pytest.mark.parametrize('check', [{}, {'sha256': 'abc1234'}, {'sha256': 'xyz' * 4},
                                   {'sha256': 'a' * 65}, {'md5': 'abc'}])
def test_fetch_refuses_missing_or_malformed_checksum(server, tmp_path, check):
  before = len(_Handler.hits)
  with pytest.raises(ValueError):
    download.fetch(f'{server}/file.bin', tmp_path / 'f', progress=False, **check)
  assert len(_Handler.hits) == before  # rejected before touching the network
  assert _listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# weights.resolve_weights


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
  """HOME in tmp, no weight/cache env vars: every location under the test's control."""
  home = tmp_path / 'home'
  home.mkdir()
  monkeypatch.setenv('HOME', str(home))
  for var in ('LBYL_JAX_WEIGHTS', 'LBYL_JAX_CACHE', 'XDG_CACHE_HOME', 'TORCH_HOME'):
    monkeypatch.delenv(var, raising=False)
  return home


def _spec(url: str, filename: str = 'tiny_weights.th', sha256: str = PAYLOAD_SHA) -> archs.ArchSpec:
  return dataclasses.replace(archs.get('resnet20'),
                             weights=archs.WeightsSource(url, filename, sha256))


def _put(path: pathlib.Path, content: bytes = PAYLOAD) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  return path


def test_default_locations_follow_home(clean_env):
  assert weights.user_weights_dir() == clean_env / '.cache' / 'lbyl_jax' / 'weights'
  assert weights.torch_hub_dir() == clean_env / '.cache' / 'torch' / 'hub' / 'checkpoints'


def test_xdg_and_torch_home(clean_env, monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert weights.user_weights_dir() == tmp_path / 'xdg' / 'lbyl_jax' / 'weights'
  assert weights.torch_hub_dir() == tmp_path / 'xdg' / 'torch' / 'hub' / 'checkpoints'
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'th'))
  monkeypatch.setenv('LBYL_JAX_CACHE', str(tmp_path / 'lc'))
  assert weights.torch_hub_dir() == tmp_path / 'th' / 'hub' / 'checkpoints'
  assert weights.user_weights_dir() == tmp_path / 'lc' / 'weights'


def test_search_order(clean_env, monkeypatch, tmp_path, server, dead_url):
  spec = _spec(dead_url)
  name = spec.weights.filename
  env_dir = tmp_path / 'env'
  monkeypatch.setenv('LBYL_JAX_WEIGHTS', str(env_dir))
  locations = [
      env_dir / name,
      clean_env / '.cache' / 'lbyl_jax' / 'weights' / name,
      clean_env / '.cache' / 'torch' / 'hub' / 'checkpoints' / name,
  ]
  for p in locations:
    _put(p)
  explicit = _put(tmp_path / 'explicit.th')
  assert weights.resolve_weights(spec, explicit) == explicit
  assert weights.resolve_weights(spec, env_dir) == locations[0]  # a directory holding the name
  for p in locations:  # each location wins once the ones before it are gone
    assert weights.resolve_weights(spec) == p
    p.unlink()
  # Nothing local: the download goes into the user cache, and is then found there offline. A failed
  # download says where it looked and why the download failed.
  with pytest.raises(weights.WeightsNotFoundError,
                     match=r'no \S+ \(looked in --weights \(not given\), \$LBYL_JAX_WEIGHTS .*, user'
                           r' cache .*, torch hub cache .*\) and the download of .* failed \(.*offline\?'):
    weights.resolve_weights(spec)
  got = weights.resolve_weights(_spec(f'{server}/file.bin'), progress=False)
  assert got == locations[1] and got.read_bytes() == PAYLOAD
  assert weights.resolve_weights(spec) == locations[1]  # dead URL: no network needed


def test_explicit_missing_and_download_disabled(clean_env, tmp_path, dead_url):
  spec = _spec(dead_url)
  with pytest.raises(weights.WeightsNotFoundError, match='does not exist'):
    weights.resolve_weights(spec, tmp_path / 'nope.th')
  with pytest.raises(weights.WeightsNotFoundError, match='directory without'):
    weights.resolve_weights(spec, tmp_path)
  with pytest.raises(weights.WeightsNotFoundError, match='downloading is disabled') as e:
    weights.resolve_weights(spec, download=False)
  assert dead_url in str(e.value)


def test_local_files_are_verified(clean_env, tmp_path, dead_url):
  # The preset's own file name: checked against the registry's sha256.
  spec = _spec(dead_url)
  bad = _put(weights.user_weights_dir() / spec.weights.filename, b'corrupt')
  with pytest.raises(download.ChecksumError, match=PAYLOAD_SHA):
    weights.resolve_weights(spec)
  bad.unlink()
  # A directory given as --weights is searched by the registry name and verified like a cache.
  (tmp_path / 'wdir').mkdir()
  _put(tmp_path / 'wdir' / spec.weights.filename, b'corrupt')
  with pytest.raises(download.ChecksumError, match=PAYLOAD_SHA):
    weights.resolve_weights(spec, tmp_path / 'wdir')
  # A file torchvision left in the hub cache is verified against resnet18's prefix.
  _put(weights.torch_hub_dir() / 'resnet18-f37072fd.pth', b'not the real file')
  with pytest.raises(download.ChecksumError, match='f37072fd'):
    weights.resolve_weights('resnet18', download=False)


def test_unhosted_presets(clean_env, monkeypatch, tmp_path):
  for name, filename in weights.UNHOSTED_FILENAMES.items():
    assert archs.get(name).weights is None
    with pytest.raises(weights.WeightsNotFoundError) as e:
      weights.resolve_weights(name)
    assert filename in str(e.value) and 'LBYL_JAX_WEIGHTS' in str(e.value)
    monkeypatch.setenv('LBYL_JAX_WEIGHTS', str(tmp_path / 'w'))
    p = _put(tmp_path / 'w' / filename, b'whatever: no known checksum')
    assert weights.resolve_weights(name) == p
    monkeypatch.delenv('LBYL_JAX_WEIGHTS')
  with pytest.raises(weights.WeightsNotFoundError, match='pass --weights'):
    weights.resolve_weights('vgg16_bn_cifar')


@pytest.mark.realdata
def test_real_weights_resolve_and_verify(shared, clean_env, monkeypatch):
  monkeypatch.setenv('LBYL_JAX_WEIGHTS', str(shared / 'weights'))
  for name in ('resnet20', 'resnet56', 'resnet56_b', 'lenet_300_100'):
    p = weights.resolve_weights(name, download=False)
    assert p.parent == shared / 'weights' and p.is_file()
  # resnet20/56 carry full sha256 digests in the registry: the real files must match them.
  for name in ('resnet20', 'resnet56'):
    spec = archs.get(name)
    digest = download.sha256_file(shared / 'weights' / spec.weights.filename)
    assert digest.startswith(spec.weights.sha256)
  assert os.environ['HOME'] == str(clean_env)


def test_explicit_weights_file_is_never_rejected_by_its_name(clean_env, tmp_path, dead_url):
  """issue 13: a user's fine-tuned file named like the torchvision file it started from (or any
  torch-hub-looking name) is the user's choice; only registry / cache lookups are verified."""
  fine_tuned = _put(tmp_path / 'resnet50-0676ba61.pth', b'fine-tuned weights, not the hub file')
  assert weights.resolve_weights('resnet50', fine_tuned, download=False) == fine_tuned
  other = _put(tmp_path / 'model-deadbeef.pth', b'anything')
  assert weights.resolve_weights(_spec(dead_url), other) == other
  # The registry's own file name given explicitly is the user's file too.
  spec = _spec(dead_url)
  mine = _put(tmp_path / 'mine' / spec.weights.filename, b'my own training run')
  assert weights.resolve_weights(spec, mine) == mine
  # The same bytes found in a cache by the registry name are verified and refused.
  _put(weights.torch_hub_dir() / 'resnet50-0676ba61.pth', b'fine-tuned weights, not the hub file')
  with pytest.raises(download.ChecksumError, match='0676ba61'):
    weights.resolve_weights('resnet50', download=False)
  assert weights.expected_sha256(None, fine_tuned) is None


# --------------------------------------------------------------------------------------------
# Bounded downloads: overall deadline and size cap (issue 13 item 6).


class _HostileHandler(http.server.BaseHTTPRequestHandler):
  """Peers that trickle, send too much, or lie about Content-Length."""

  sent: dict[str, int] = {}
  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):
    pass

  def _trickle(self, data: bytes, pause: float) -> None:
    for i in range(len(data)):
      self.wfile.write(data[i:i + 1])
      self.wfile.flush()
      type(self).sent[self.path] = i + 1
      time.sleep(pause)

  def do_GET(self):  # noqa: N802
    try:
      if self.path == '/trickle-body':  # a valid header, then one byte every 0.2 s
        self.send_response(200)
        self.send_header('Content-Length', '1000')
        self.end_headers()
        self._trickle(PAYLOAD[:1000], 0.2)
      elif self.path == '/trickle-headers':  # the status line itself arrives byte by byte
        self._trickle(b'HTTP/1.1 200 OK\r\nX-Slow: ' + b'a' * 1000, 0.2)
      elif self.path == '/too-long':  # declares more than the cap
        self.send_response(200)
        self.send_header('Content-Length', str(10 << 30))
        self.end_headers()
        self.wfile.write(PAYLOAD[:1 << 16])
      elif self.path == '/endless':  # no Content-Length, streams far past the cap
        self.send_response(200)
        self.send_header('Connection', 'close')
        self.end_headers()
        for _ in range(64):
          self.wfile.write(PAYLOAD[:1 << 20])
          type(self).sent[self.path] = type(self).sent.get(self.path, 0) + (1 << 20)
      elif self.path == '/lies-short':  # says 1000 bytes, sends the whole payload
        self.send_response(200)
        self.send_header('Content-Length', '1000')
        self.end_headers()
        self.wfile.write(PAYLOAD)
      elif self.path == '/exact':
        self.send_response(200)
        self.send_header('Content-Length', str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)
      else:
        self.send_error(404)
    except (BrokenPipeError, ConnectionResetError, OSError):  # the client gave up
      pass


@pytest.fixture(scope='module')
def hostile():
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _HostileHandler)
  httpd.daemon_threads = True
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()
  httpd.server_close()


@pytest.mark.parametrize('path', ['/trickle-body', '/trickle-headers'])
def test_fetch_deadline_stops_a_trickling_peer(hostile, tmp_path, path):
  """Each read arrives well within the 5 s read timeout, but the whole exceeds the deadline."""
  t0 = time.perf_counter()
  with pytest.raises(download.DownloadError, match=r'not complete within the 1 s deadline'):
    download.fetch(f'{hostile}{path}', tmp_path / 'f.bin', sha256=PAYLOAD_SHA, timeout=5,
                   deadline=1.0, progress=False)
  elapsed = time.perf_counter() - t0
  assert 0.9 < elapsed < 3.0, elapsed
  assert _listing(tmp_path) == []  # the partial file is gone


def test_fetch_deadline_from_environment(hostile, tmp_path, monkeypatch):
  monkeypatch.setenv(download.DEADLINE_ENV, '0.5')
  t0 = time.perf_counter()
  with pytest.raises(download.DownloadError, match='LBYL_JAX_DOWNLOAD_DEADLINE'):
    download.fetch(f'{hostile}/trickle-body', tmp_path / 'f.bin', sha256=PAYLOAD_SHA,
                   progress=False)
  assert time.perf_counter() - t0 < 2.5
  monkeypatch.setenv(download.DEADLINE_ENV, 'soon')
  with pytest.raises(ValueError, match='LBYL_JAX_DOWNLOAD_DEADLINE'):
    download.fetch(f'{hostile}/exact', tmp_path / 'f.bin', sha256=PAYLOAD_SHA, progress=False)
  assert _listing(tmp_path) == []


def test_fetch_refuses_a_content_length_above_the_cap(hostile, tmp_path, monkeypatch):
  written = _count_writes(monkeypatch)
  with pytest.raises(download.DownloadError, match=r'10737418240 bytes, more than the 1048576'):
    download.fetch(f'{hostile}/too-long', tmp_path / 'f.bin', sha256=PAYLOAD_SHA,
                   max_bytes=1 << 20, progress=False)
  assert sum(written) == 0  # refused from the header alone
  assert _listing(tmp_path) == []


def _count_writes(monkeypatch) -> list[int]:
  """Records the size of every write to the download's temporary file."""
  sizes: list[int] = []
  real_fdopen = os.fdopen

  class Spy:

    def __init__(self, f):
      self.f = f

    def write(self, b):
      sizes.append(len(b))
      return self.f.write(b)

    def __enter__(self):
      self.f.__enter__()
      return self

    def __exit__(self, *exc):
      return self.f.__exit__(*exc)

  monkeypatch.setattr(download.os, 'fdopen', lambda *a, **k: Spy(real_fdopen(*a, **k)))
  return sizes


@pytest.mark.parametrize('cap', [1 << 20, 3 << 20])
def test_fetch_stops_a_body_larger_than_the_cap(hostile, tmp_path, monkeypatch, cap):
  written = _count_writes(monkeypatch)
  with pytest.raises(download.DownloadError, match=f'exceeds the {cap}-byte cap'):
    download.fetch(f'{hostile}/endless', tmp_path / 'f.bin', sha256=PAYLOAD_SHA, max_bytes=cap,
                   progress=False)
  assert 0 < sum(written) <= cap  # never more than the cap on disk
  assert _listing(tmp_path) == []


def test_fetch_reads_only_the_declared_length_of_a_lying_peer(hostile, tmp_path, monkeypatch):
  """Content-Length 1000 followed by 3 MB: only 1000 bytes are read, and they fail the hash."""
  written = _count_writes(monkeypatch)
  with pytest.raises(download.ChecksumError):
    download.fetch(f'{hostile}/lies-short', tmp_path / 'f.bin', sha256=PAYLOAD_SHA,
                   max_bytes=2000, progress=False)
  assert sum(written) == 1000
  assert _listing(tmp_path) == []


def test_fetch_within_bounds_succeeds_and_cap_is_inclusive(hostile, tmp_path, monkeypatch):
  dest = tmp_path / 'ok.bin'
  monkeypatch.setenv(download.MAX_BYTES_ENV, str(len(PAYLOAD)))
  assert download.fetch(f'{hostile}/exact', dest, sha256=PAYLOAD_SHA, deadline=30,
                        progress=False) == dest.absolute()
  assert dest.read_bytes() == PAYLOAD
  monkeypatch.setenv(download.MAX_BYTES_ENV, str(len(PAYLOAD) - 1))
  with pytest.raises(download.DownloadError, match='cap'):
    download.fetch(f'{hostile}/exact', tmp_path / 'no.bin', sha256=PAYLOAD_SHA, progress=False)
  for bad in ({'deadline': 0}, {'deadline': -1}, {'max_bytes': 0}, {'max_bytes': 1.5},
              {'timeout': 0}):
    with pytest.raises(ValueError):
      download.fetch(f'{hostile}/exact', tmp_path / 'no.bin', sha256=PAYLOAD_SHA, progress=False,
                     **bad)
  assert _listing(tmp_path) == ['ok.bin']

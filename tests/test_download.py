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
                     match=r'no local weights \(looked for --weights, .*\) and the download of .*'
                           r' failed \(.*offline\?'):
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
  # A torch-hub style name carries its own sha256 prefix, even for an explicit path.
  good = _put(tmp_path / f'model-{PAYLOAD_SHA[:8]}.pth')
  assert weights.resolve_weights(spec, good) == good
  with pytest.raises(download.ChecksumError, match='deadbeef'):
    weights.resolve_weights(spec, _put(tmp_path / 'model-deadbeef.pth'))
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

"""Property-based fuzzing of every file reader (issue 13): random bytes and mutated valid files.

Property: every reader, given any file, either loads it or raises its own error type
(CheckpointError for torch zip / torch legacy / safetensors / npz, DataFormatError for CIFAR
batches and archives, IDX, data npz) within a time bound, without the address space growing by more
than 1 GiB. Hypothesis generates the cases deterministically (``derandomize=True``: a fixed seed,
the same files on every run); they are written to disk and replayed in batches, one child process
per reader family, by ``reader_harness.run_readers`` (``RLIMIT_AS`` + a wall clock), because a
reader that allocates gigabytes or loops must fail the test, not take the test runner down.

Mutations of valid seeds: bit flips, truncations, insertions, deletions, byte and integer-field
overwrites (1/2/4/8 bytes, boundary values, either endianness) at random offsets and at offsets
where the format keeps sizes (zip local / central headers, storage counts, IDX dims); for the
formats whose integrity checks would stop most mutations early, the inner payload is mutated
and re-wrapped (the pickle inside a torch zip, the ``.npy`` inside an npz, the tar inside a gzip,
the JSON header of a safetensors file) so that the parsers themselves are exercised.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import pathlib
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import reader_harness as rh

torch = pytest.importorskip('torch')

N_MUTATIONS = 400  # per seed target; ~8,500 cases in all
N_RANDOM = 200  # random byte strings per reader
MAX_SECONDS = 3.0  # per case
MEM_BYTES = 1 << 30  # address space the readers may add
MAX_RSS_GROWTH = 256 << 20  # per case, above the RSS before it

_VALUES = [0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
           0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


# --------------------------------------------------------------------------------------------
# Seeds: small valid files of every format.


def _torch_seeds(tmp: pathlib.Path) -> dict[str, bytes]:
  g = torch.Generator().manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(36, 3))
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g))
  base = torch.randn(4, 6, generator=g)
  sd = collections.OrderedDict(model.state_dict())
  sd['view'] = base.t()[1:, ::2]
  sd['half'] = torch.randn(5, generator=g).half()
  ckpt = {'state_dict': sd, 'epoch': 7, 'best': np.float64(91.5),
          'args': argparse.Namespace(lr=0.1), 'history': [0.5, 0.25, (1, 'a')]}
  out = {}
  for legacy in (False, True):
    kind = 'legacy' if legacy else 'zip'
    for name, obj in (('ckpt', ckpt), ('module', model)):
      path = tmp / f'{name}_{kind}.pth'
      torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
      out[f'{name}_{kind}'] = path.read_bytes()
  return out


def _safetensors_seed() -> bytes:
  rng = np.random.default_rng(1)
  tensors = {'conv.weight': rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             'bn.running_var': rng.random(4).astype(np.float64),
             'idx': np.arange(5, dtype=np.int64), 'h': rng.standard_normal(6).astype(np.float16),
             'flag': np.array([True, False])}
  header, chunks, offset = {'__metadata__': {'format': 'np'}}, [], 0
  for name, arr in tensors.items():
    raw = arr.tobytes()
    code = {'float32': 'F32', 'float64': 'F64', 'int64': 'I64', 'float16': 'F16',
            'bool': 'BOOL'}[arr.dtype.name]
    header[name] = {'dtype': code, 'shape': list(arr.shape),
                    'data_offsets': [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  h = json.dumps(header).encode()
  return struct.pack('<Q', len(h)) + h + b''.join(chunks)


def _npz_seed(compressed: bool, *, dataset: bool) -> bytes:
  rng = np.random.default_rng(2)
  buf = io.BytesIO()
  if dataset:
    arrays = {'images': rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
              'labels': rng.integers(0, 10, 6).astype(np.uint8)}
  else:
    arrays = {'fc.weight': rng.standard_normal((5, 7)).astype(np.float32),
              'fc.bias': rng.standard_normal(5), 'n': np.asfortranarray(np.arange(6).reshape(2, 3))}
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  return buf.getvalue()


def _cifar_seeds() -> dict[str, bytes]:
  rng = np.random.default_rng(3)
  flat = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
  labels = [int(v) for v in rng.integers(0, 10, 3)]
  d = {b'batch_label': b'test', b'labels': labels, b'data': flat, b'filenames': [b'a', b'b', b'c']}
  return {'py2': rh.py2_cifar_pickle(flat, labels, [b'a', b'b', b'c']),
          'p2': pickle.dumps(d, protocol=2), 'p5': pickle.dumps(d, protocol=5)}


def _tar(batch: bytes) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w', format=tarfile.GNU_FORMAT) as tar:
    for name, content in (('cifar-10-batches-py/readme.html', b'<html/>'),
                          ('cifar-10-batches-py/test_batch', batch)):
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return buf.getvalue()


def _idx(a: np.ndarray, code: int = 0x08) -> bytes:
  return bytes([0, 0, code, a.ndim]) + struct.pack(f'>{a.ndim}I', *a.shape) + a.tobytes()


# --------------------------------------------------------------------------------------------
# Mutations.

_OP = st.one_of(
    st.tuples(st.just('flip'), st.integers(0, 1 << 30), st.integers(0, 7)),
    st.tuples(st.just('truncate'), st.integers(0, 1 << 30)),
    st.tuples(st.just('insert'), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just('delete'), st.integers(0, 1 << 30), st.integers(1, 32)),
    st.tuples(st.just('byte'), st.integers(0, 1 << 30), st.integers(0, 255)),
    st.tuples(st.just('field'), st.integers(0, 1 << 30), st.sampled_from([1, 2, 4, 8]),
              st.sampled_from(_VALUES), st.booleans()),
)


def _mutations(interesting: list[int]):
  """Lists of 1-4 operations; half of the offsets are drawn from ``interesting``."""
  if interesting:
    pos = st.sampled_from(interesting)
    op = st.one_of(_OP, st.tuples(st.just('field'), pos, st.sampled_from([1, 2, 4, 8]),
                                  st.sampled_from(_VALUES), st.booleans()),
                   st.tuples(st.just('flip'), pos, st.integers(0, 7)))
  else:
    op = _OP
  return st.lists(op, min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
  out = bytearray(data)
  for op in ops:
    n = len(out)
    if n == 0:
      break
    pos = op[1] % n
    if op[0] == 'flip':
      out[pos] ^= 1 << op[2]
    elif op[0] == 'truncate':
      del out[pos:]
    elif op[0] == 'insert':
      out[pos:pos] = op[2]
    elif op[0] == 'delete':
      del out[pos:pos + op[2]]
    elif op[0] == 'byte':
      out[pos] = op[2]
    else:
      _, _, width, value, big = op
      raw = (value % (1 << (8 * width))).to_bytes(width, 'big' if big else 'little')
      out[pos:pos + width] = raw
  return bytes(out)


def _draw(strategy, n: int) -> list:
  """``n`` examples of ``strategy``, deterministically (a fixed seed), without shrinking."""
  out: list = []

  @settings(max_examples=n, derandomize=True, deadline=None, database=None,
            phases=[Phase.generate], suppress_health_check=list(HealthCheck))
  @given(strategy)
  def collect(x):
    out.append(x)

  collect()
  return out[:n]


def _zip_offsets(data: bytes) -> list[int]:
  """Where a zip keeps sizes, CRCs and offsets: local headers, central directory, end record."""
  out = []
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    for info in zf.infolist():
      out += [info.header_offset + k for k in (14, 18, 22, 26, 28)]
  cd = data.rfind(b'PK\x01\x02')
  while cd > 0:
    out += [cd + k for k in (16, 20, 24, 28, 30, 42)]
    cd = data.rfind(b'PK\x01\x02', 0, cd)
  end = data.rfind(b'PK\x05\x06')
  out += [end + k for k in (8, 10, 12, 16, 20)]
  return out


def _rezip(data: bytes, member_pred, ops) -> bytes:
  """``data`` (a zip) with the members matching ``member_pred`` mutated and re-zipped."""
  src = zipfile.ZipFile(io.BytesIO(data))
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as dst:
    for info in src.infolist():
      content = src.read(info)
      if member_pred(info.filename):
        content = mutate(content, ops)
      dst.writestr(info, content)
  return buf.getvalue()


def _pickle_offsets(raw: bytes) -> list[int]:
  import pickletools  # pylint: disable=import-outside-toplevel
  out = []
  try:
    for op, _, pos in pickletools.genops(raw):
      if op.arg is not None and op.arg.n != 0:  # opcodes with sizes / indices
        out.append(pos + 1)
  except Exception:  # noqa: BLE001 (legacy files: only the first pickle parses)
    pass
  return out[:2000]


def _legacy_offsets(raw: bytes) -> list[int]:
  """Opcode arguments of the five legacy pickles, and the storage element counts after them."""
  import pickletools  # pylint: disable=import-outside-toplevel
  out, f = [], io.BytesIO(raw)
  for _ in range(5):
    for op, _, pos in pickletools.genops(f):
      if op.arg is not None and op.arg.n != 0:
        out.append(pos + 1)
  out.append(f.tell())  # the first storage's int64 element count
  return out


def _idx_offsets(raw: bytes) -> list[int]:
  return [2, 3, 4, 6, 8, 12, 16]


def _safetensors_header_cases(seed: bytes, n: int) -> list[tuple[str, bytes]]:
  """Structured mutations of the JSON header: a field of an entry set to a hostile value."""
  (hlen,) = struct.unpack('<Q', seed[:8])
  header = json.loads(seed[8:8 + hlen])
  names = [k for k in header if k != '__metadata__']
  hostile = st.one_of(st.integers(-2**70, 2**70), st.sampled_from(_VALUES),
                      st.lists(st.integers(-2**66, 2**66), max_size=5), st.text(max_size=5),
                      st.sampled_from(['F32', 'BF16', 'C64', None, [], {}]), st.booleans())
  strategy = st.tuples(st.sampled_from(names), st.sampled_from(['dtype', 'shape', 'data_offsets']),
                       hostile, st.booleans())
  cases = []
  for name, field, value, keep_len in _draw(strategy, n):
    h = json.loads(json.dumps(header))
    h[name][field] = value
    raw = json.dumps(h).encode()
    cases.append((f'header {name}.{field}={value!r:.40}', struct.pack('<Q', len(raw)) + raw
                  + seed[8 + hlen:]))
  return cases


# --------------------------------------------------------------------------------------------
# Case generation per reader family.


def _cases(tmp: pathlib.Path) -> dict[str, list[tuple[str, str, bytes]]]:
  """family -> [(reader, label, file bytes)]; the unmutated seeds come first and must load."""
  fam: dict[str, list[tuple[str, str, bytes]]] = collections.defaultdict(list)
  torch_seeds = _torch_seeds(tmp)
  for name, seed in torch_seeds.items():
    reader = 'torch'
    fam['torch'].append((reader, f'{name} seed', seed))
    fam['torch'].append(('torch_full', f'{name} seed (full)', seed))
    if name.endswith('zip'):
      offsets = _zip_offsets(seed)
      with zipfile.ZipFile(io.BytesIO(seed)) as zf:
        pkl = zf.read([n for n in zf.namelist() if n.endswith('data.pkl')][0])
      for ops in _draw(_mutations(offsets), N_MUTATIONS):
        fam['torch'].append((reader, f'{name} bytes {ops}', mutate(seed, ops)))
      for i, ops in enumerate(_draw(_mutations(_pickle_offsets(pkl)), N_MUTATIONS)):
        mutated = _rezip(seed, lambda n: n.endswith('data.pkl'), ops)
        fam['torch'].append((reader if i % 2 else 'torch_full', f'{name} data.pkl {ops}', mutated))
    else:
      for i, ops in enumerate(_draw(_mutations(_legacy_offsets(seed)), 2 * N_MUTATIONS)):
        fam['torch'].append((reader if i % 2 else 'torch_full', f'{name} {ops}', mutate(seed, ops)))
  for prefix in (b'', b'PK\x03\x04', b'\x80\x02', b'\x80\x02\x8a\x0a'):
    for raw in _draw(st.binary(max_size=2048), N_RANDOM // 4):
      fam['torch'].append(('torch', f'random {prefix!r}+{len(raw)}', prefix + raw))

  st_seed = _safetensors_seed()
  fam['formats'].append(('safetensors', 'safetensors seed', st_seed))
  for ops in _draw(_mutations(list(range(0, 8)) + list(range(8, 200, 7))), N_MUTATIONS):
    fam['formats'].append(('safetensors', f'safetensors {ops}', mutate(st_seed, ops)))
  for label, raw in _safetensors_header_cases(st_seed, N_MUTATIONS):
    fam['formats'].append(('safetensors', label, raw))
  for raw in _draw(st.binary(max_size=2048), N_RANDOM):
    fam['formats'].append(('safetensors', f'random {len(raw)}', raw))
  for compressed in (False, True):
    seed = _npz_seed(compressed, dataset=False)
    fam['formats'].append(('npz', f'npz seed c={compressed}', seed))
    for ops in _draw(_mutations(_zip_offsets(seed)), N_MUTATIONS // 2):
      fam['formats'].append(('npz', f'npz c={compressed} bytes {ops}', mutate(seed, ops)))
    header_offsets = list(range(6, 128))
    for ops in _draw(_mutations(header_offsets), N_MUTATIONS // 2):
      mutated = _rezip(seed, lambda n: n.endswith('.npy'), ops)
      fam['formats'].append(('npz', f'npz c={compressed} member {ops}', mutated))
  for raw in _draw(st.binary(max_size=2048), N_RANDOM // 2):
    fam['formats'].append(('npz', f'random PK+{len(raw)}', b'PK\x03\x04' + raw))

  for name, seed in _cifar_seeds().items():
    fam['data'].append(('cifar_batch', f'cifar {name} seed', seed))
    for ops in _draw(_mutations(_pickle_offsets(seed)), N_MUTATIONS):
      fam['data'].append(('cifar_batch', f'cifar {name} {ops}', mutate(seed, ops)))
  tar = _tar(_cifar_seeds()['py2'])
  fam['data'].append(('cifar_tar', 'tar.gz seed', gzip.compress(tar)))
  header_offsets = [k for base in range(0, len(tar), 512)
                    for k in (base + 124, base + 148, base + 156)]  # size, checksum, type
  for ops in _draw(_mutations(header_offsets), N_MUTATIONS):
    fam['data'].append(('cifar_tar', f'tar {ops}', gzip.compress(mutate(tar, ops))))
  for ops in _draw(_mutations(list(range(0, 20))), N_MUTATIONS // 2):
    fam['data'].append(('cifar_tar', f'tar.gz {ops}', mutate(gzip.compress(tar), ops)))
  rng = np.random.default_rng(4)
  for code, arr in ((0x08, rng.integers(0, 256, (5, 6, 7), dtype=np.uint8)),
                    (0x0C, rng.integers(-9, 9, (4, 3)).astype('>i4'))):
    raw = _idx(arr, code)
    fam['data'].append(('idx', f'idx {code} seed', raw))
    fam['data'].append(('idx', f'idx {code} gz seed', gzip.compress(raw)))
    for ops in _draw(_mutations(_idx_offsets(raw)), N_MUTATIONS // 2):
      fam['data'].append(('idx', f'idx {code} {ops}', mutate(raw, ops)))
      fam['data'].append(('idx', f'idx {code} gz(mutated) {ops}', gzip.compress(mutate(raw, ops))))
  for raw in _draw(st.binary(max_size=1024), N_RANDOM // 2):
    fam['data'].append(('idx', f'random gz {len(raw)}', b'\x1f\x8b' + raw))
    fam['data'].append(('idx', f'random idx {len(raw)}', b'\0\0\x08\x03' + raw))
  npz = _npz_seed(True, dataset=True)
  fam['data'].append(('data_npz', 'data npz seed', npz))
  for ops in _draw(_mutations(list(range(6, 128))), N_MUTATIONS):
    fam['data'].append(('data_npz', f'data npz member {ops}',
                        _rezip(npz, lambda n: n.endswith('.npy'), ops)))
  for raw in _draw(st.binary(max_size=2048), N_RANDOM // 2):
    fam['data'].append(('cifar_batch', f'random pickle {len(raw)}', b'\x80\x02' + raw))
  return fam


_SUFFIX = {'torch': '.pth', 'torch_full': '.pth', 'safetensors': '.safetensors', 'npz': '.npz',
           'cifar_batch': '', 'cifar_tar': '.tar.gz', 'idx': '', 'data_npz': '.npz'}


@pytest.fixture(scope='module')
def fuzz_cases(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('fuzz')
  families = {}
  for family, cases in _cases(tmp).items():
    d = tmp / family
    d.mkdir()
    entries = []
    for i, (reader, label, raw) in enumerate(cases):
      path = d / f'case{i:05d}{_SUFFIX[reader]}'
      path.write_bytes(raw)
      entries.append((reader, path, label))
    families[family] = entries
  return families


@pytest.mark.parametrize('family', ['torch', 'formats', 'data'])
def test_fuzzed_files_load_or_raise_the_readers_error_within_bounds(fuzz_cases, family, tmp_path):
  entries = fuzz_cases[family]
  report = rh.run_readers([(r, p) for r, p, _ in entries], mem_bytes=MEM_BYTES, timeout=600,
                          workdir=tmp_path)
  labels = [label for _, _, label in entries]
  rh.assert_bounded(report, max_seconds=MAX_SECONDS, max_rss_growth=MAX_RSS_GROWTH, labels=labels)
  statuses = [r[0] for r in report['results']]
  seeds = [i for i, label in enumerate(labels) if label.endswith('seed') or 'seed (' in label]
  assert seeds and all(statuses[i] == 'ok' for i in seeds), [labels[i] for i in seeds
                                                              if statuses[i] != 'ok']
  # The fuzzer reaches both outcomes: mutations that still load and refusals.
  assert statuses.count('error') > len(statuses) // 4
  assert statuses.count('ok') > len(seeds)

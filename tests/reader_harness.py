"""Runs file readers on many files in one child process under a memory limit and a clock.

Used by tests/test_fuzz_readers.py and tests/test_reader_bounds.py. The child imports only the
reader modules it needs, then sets ``RLIMIT_AS`` to its current address space plus ``mem_bytes``
(so the limit is on what the readers allocate, not on the interpreter and NumPy), and runs every
case, recording per case: ``ok`` (loaded, and the result passed the reader's shape check),
``error`` (the reader's own error type) or ``unexpected`` (anything else, with the traceback: a
MemoryError under the limit, a RecursionError, a stray exception type), and the CPU seconds it
took (CPU, not wall clock: the bound is on the reader's work, and CI machines are shared), and
how far its peak RSS rose above the RSS before it.
The parent gets the results, the child's peak RSS, and fails the test on a hang (wall clock).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# reader name -> (module to import, expression of the call on `path`, expected error type path)
READERS = {
    'torch': ('converters.torch_pickle', 'converters.torch_pickle.load_weights(path)',
              'converters.errors.CheckpointError'),
    'torch_full': ('converters.torch_pickle', 'converters.torch_pickle.load(path)',
                   'converters.errors.CheckpointError'),
    'safetensors': ('converters.formats', 'converters.formats.read_safetensors(path)',
                    'converters.errors.CheckpointError'),
    'npz': ('converters.formats', 'converters.formats.read_npz(path)',
            'converters.errors.CheckpointError'),
    'cifar_batch': ('lbyl_jax.io.data', 'lbyl_jax.io.data.load_cifar_batch_file(path)',
                    'lbyl_jax.io.data.DataFormatError'),
    'cifar_tar': ('lbyl_jax.io.data', 'lbyl_jax.io.data.load_cifar_tar(path)',
                  'lbyl_jax.io.data.DataFormatError'),
    'idx': ('lbyl_jax.io.data', 'lbyl_jax.io.data.read_idx(path)', 'lbyl_jax.io.data.DataFormatError'),
    'data_npz': ('lbyl_jax.io.data', 'lbyl_jax.io.data.load_npz(path)', 'lbyl_jax.io.data.DataFormatError'),
}

_CHILD = r'''
import importlib, json, resource, sys, time, traceback
spec = json.loads(sys.stdin.read())
readers = spec['readers']
for mod, _, _ in readers.values():
  importlib.import_module(mod)
  globals()[mod.split('.')[0]] = importlib.import_module(mod.split('.')[0])
import numpy as np
import converters
errors = {}
for name, (mod, call, err) in readers.items():
  m, _, cls = err.rpartition('.')
  errors[name] = getattr(importlib.import_module(m), cls)

def check(name, out):
  """The result of a successful read has the reader's documented shape."""
  if name in ('torch', 'torch_full', 'safetensors', 'npz'):
    if name == 'torch_full':
      return
    if name == 'torch' and isinstance(out, np.ndarray):
      return
    assert isinstance(out, dict), type(out)
    for k, v in out.items():
      assert isinstance(k, (str, int, bytes, bool, type(None))), type(k)
      if name in ('safetensors', 'npz'):
        assert isinstance(v, np.ndarray), (k, type(v))
  elif name == 'idx':
    assert isinstance(out, np.ndarray) and out.dtype.isnative
  else:
    assert out.images.dtype == np.uint8 and out.images.ndim == 4, out
    assert out.labels.dtype == np.int32 and len(out.labels) == len(out.images)

def vm_kb():
  for line in open('/proc/self/status'):
    if line.startswith('VmSize:'):
      return int(line.split()[1])

def status_kb(field):
  for line in open('/proc/self/status'):
    if line.startswith(field + ':'):
      return int(line.split()[1])

def reset_peak():
  try:  # resets the peak-RSS mark, so a peak is one case's own (Linux >= 4.0)
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False

can_reset = reset_peak()  # without it, only RLIMIT_AS bounds the memory
base_vm = vm_kb()
base_rss = status_kb('VmRSS')
limit = base_vm * 1024 + spec['mem_bytes']
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
results = []
progress = open(spec['progress'], 'w')
for i, (name, path) in enumerate(spec['cases']):
  progress.write(f'{i} {name} {path}\n')
  progress.flush()
  fn = eval('lambda path: ' + readers[name][1])
  rss0 = status_kb('VmRSS')
  reset_peak()
  t0 = time.process_time()
  try:
    out = fn(path)
    check(name, out)
    status, msg = 'ok', ''
  except errors[name] as e:
    status, msg = 'error', f'{type(e).__name__}: {e}'[:400]
  except BaseException as e:  # noqa: BLE001 (everything else is a finding)
    status, msg = 'unexpected', traceback.format_exc()[-2000:]
  seconds = time.process_time() - t0
  out = None
  grew = (status_kb('VmHWM') - rss0) * 1024 if can_reset else -1
  results.append((status, msg, seconds, grew))
print(json.dumps({'results': results, 'base_rss_kb': base_rss, 'base_vm_kb': base_vm}))
'''


def run_readers(cases: list[tuple[str, str]], *, mem_bytes: int = 1 << 30,
                timeout: float = 300.0, workdir: pathlib.Path) -> dict:
  """Runs ``(reader, path)`` cases in one bounded child; returns its JSON report."""
  names = sorted({name for name, _ in cases})
  spec = {
      'readers': {n: READERS[n] for n in names},
      'cases': [(n, str(p)) for n, p in cases],
      'mem_bytes': mem_bytes,
      'progress': str(workdir / 'progress.txt'),
  }
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
             JAX_PLATFORMS='cpu', OMP_NUM_THREADS='1')
  try:
    proc = subprocess.run([sys.executable, '-c', _CHILD], input=json.dumps(spec), env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=workdir)
  except subprocess.TimeoutExpired:
    last = (workdir / 'progress.txt').read_text().splitlines()[-1:]
    raise AssertionError(f'reader child exceeded {timeout} s; last case started: {last}') from None
  if proc.returncode != 0:
    last = (workdir / 'progress.txt').read_text().splitlines()[-1:]
    raise AssertionError(f'reader child died (rc {proc.returncode}) at {last}:\n'
                         f'{proc.stderr[-3000:]}')
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  report['cases'] = spec['cases']
  return report


def assert_bounded(report: dict, *, max_seconds: float, max_rss_growth: int,
                   labels: list[str] | None = None, expect: str | None = None) -> None:
  """Every case loaded or raised the reader's error type, in time; peak RSS grew within bound.

  ``expect='error'`` requires every case to be refused (crafted hostile files).
  """
  bad = []
  for i, (result, (name, path)) in enumerate(zip(report['results'], report['cases'])):
    status, msg, seconds, grew = result
    label = labels[i] if labels else path
    if status == 'unexpected' or (expect and status != expect):
      bad.append(f'{name} {label}: {status}: {msg}')
    elif seconds > max_seconds:
      bad.append(f'{name} {label}: took {seconds:.2f} s (bound {max_seconds} s)')
    elif grew > max_rss_growth:
      bad.append(f'{name} {label}: peak RSS rose by {grew >> 20} MiB'
                 f' (bound {max_rss_growth >> 20} MiB)')
  assert not bad, '\n'.join(bad[:20]) + (f'\n... {len(bad) - 20} more' if len(bad) > 20 else '')


# --------------------------------------------------------------------------------------------
# Building pickles and checkpoint files by opcode (for crafted hostile files and seeds).

import pickle as _pickle  # noqa: E402
import struct  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
NONE, TRUE, FALSE, EMPTY_TUPLE = b'N', b'\x88', b'\x89', b')'


def G(module: str, name: str) -> bytes:
  """GLOBAL module.name."""
  return f'c{module}\n{name}\n'.encode()


def I(v: int) -> bytes:  # noqa: E743
  if 0 <= v < 256:
    return b'K' + bytes([v])
  if -2**31 <= v < 2**31:
    return b'J' + struct.pack('<i', v)
  raw = v.to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(raw)]) + raw


def S(s: str) -> bytes:
  raw = s.encode()
  return b'X' + struct.pack('<I', len(raw)) + raw


def T(*items: bytes) -> bytes:
  return b'(' + b''.join(items) + b't'


def L(*items: bytes) -> bytes:
  return b']' + (b'(' + b''.join(items) + b'e' if items else b'')


def D(*pairs: tuple[bytes, bytes]) -> bytes:
  return b'}' + (b'(' + b''.join(k + v for k, v in pairs) + b'u' if pairs else b'')


def R(fn: bytes, args: bytes) -> bytes:
  return fn + args + b'R'


def PUT(i: int) -> bytes:
  return b'r' + struct.pack('<I', i)


def GET(i: int) -> bytes:
  return b'j' + struct.pack('<I', i)


def ODICT() -> bytes:
  return R(G('collections', 'OrderedDict'), EMPTY_TUPLE)


def P(body: bytes) -> bytes:
  """A protocol-2 pickle of ``body`` (the opcodes pushing one value)."""
  return b'\x80\x02' + body + b'.'


def storage(key: str, numel: int, *, legacy: bool, stype: str = 'FloatStorage') -> bytes:
  """BINPERSID of a torch storage persistent id."""
  extra = (NONE,) if legacy else ()
  return T(S('storage'), G('torch', stype), S(key), S('cpu'), I(numel), *extra) + b'Q'


def tensor(st: bytes, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
  return R(G('torch._utils', '_rebuild_tensor_v2'),
           T(st, I(offset), T(*map(I, size)), T(*map(I, stride)), FALSE, ODICT()))


def write_legacy(path, obj_pickle: bytes, storages: dict[str, np.ndarray]) -> None:
  """A legacy (pre-1.6) torch file around ``obj_pickle`` with the given storages."""
  with open(path, 'wb') as f:
    _pickle.dump(LEGACY_MAGIC, f, protocol=2)
    _pickle.dump(1001, f, protocol=2)
    _pickle.dump({'protocol_version': 1001, 'little_endian': True,
                  'type_sizes': {'short': 2, 'int': 4, 'long': 4}}, f, protocol=2)
    f.write(obj_pickle)
    _pickle.dump(list(storages), f, protocol=2)
    for arr in storages.values():
      f.write(struct.pack('<q', arr.size))
      f.write(np.ascontiguousarray(arr).tobytes())


def write_zip(path, obj_pickle: bytes, storages: dict[str, bytes | np.ndarray], *,
              compression: int = zipfile.ZIP_STORED) -> None:
  """A zip-format torch file around ``obj_pickle`` (members compressed with ``compression``)."""
  with zipfile.ZipFile(path, 'w', compression, compresslevel=9 if compression else None) as zf:
    zf.writestr('archive/data.pkl', obj_pickle)
    zf.writestr('archive/byteorder', 'little')
    for key, arr in storages.items():
      zf.writestr(f'archive/data/{key}', arr if isinstance(arr, bytes) else arr.tobytes())


def py2_cifar_pickle(data: np.ndarray, labels: list[int], filenames: list[bytes]) -> bytes:
  """A CIFAR batch pickled the way Python 2 cPickle wrote the real files (protocol 2, py2 str)."""
  def sstr(b: bytes) -> bytes:
    return b'U' + bytes([len(b)]) + b if len(b) < 256 else b'T' + struct.pack('<i', len(b)) + b

  n = len(data)
  out = [b'\x80\x02}q\x00(']
  out.append(sstr(b'batch_label') + sstr(b'testing batch 1 of 1'))
  out.append(sstr(b'labels') + b'](' + b''.join(b'K' + bytes([v]) for v in labels) + b'e')
  out.append(sstr(b'data') + b'cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02'
             + b'K\x00\x85' + sstr(b'b') + b'\x87R(K\x01M' + struct.pack('<H', n) + b'M'
             + struct.pack('<H', 3072) + b'\x86cnumpy\ndtype\n' + sstr(b'u1')
             + b'K\x00K\x01\x87R(K\x03' + sstr(b'|') + b'NNNJ' + struct.pack('<i', -1) + b'J'
             + struct.pack('<i', -1) + b'K\x00tb\x89' + b'T' + struct.pack('<i', data.nbytes)
             + data.tobytes() + b'tb')
  out.append(sstr(b'filenames') + b'](' + b''.join(sstr(f) for f in filenames) + b'e')
  out.append(b'u.')
  return b''.join(out)

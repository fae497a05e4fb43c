"""Readers against hostile files (issue 13 item 2) and whole pickled modules (issue 15).

Every crafted file is built here, by opcode or with the test-only torch (no binary fixtures). Each
must be refused with the reader's own error type (CheckpointError / UnsafePickleError for the
converters, DataFormatError for the data readers), quickly; the last test replays all of them in
a child process under a memory limit. Legitimate files (the real ones in ../shared, and torch.save
outputs of random models in both formats, state dicts and whole modules) must load bit-exactly.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import io
import os
import pathlib
import pickle
import re
import struct
import subprocess
import tarfile
import time
import zipfile

import numpy as np
import pytest

import converters
from converters import formats, safe_pickle, torch_pickle
from lbyl_jax.io import data
import reader_harness as rh
from reader_harness import D, FALSE, G, GET, I, L, NONE, P, PUT, R, S, T

MAX_SECONDS = 3.0  # CPU seconds per crafted file (the pickle machine runs ~1M opcodes/s)


def _f32(n: int) -> np.ndarray:
  return np.arange(n, dtype=np.float32)


def _torch_file(tmp: pathlib.Path, name: str, body: bytes, storages: dict, *, legacy: bool,
                **zip_kwargs) -> pathlib.Path:
  path = tmp / name
  if legacy:
    rh.write_legacy(path, P(body), storages)
  else:
    rh.write_zip(path, P(body), storages, **zip_kwargs)
  return path


def _sd(*pairs: tuple[str, bytes]) -> bytes:
  """{'state_dict': {name: value, ...}} by opcodes."""
  return D((S('state_dict'), D(*((S(k), v) for k, v in pairs))))


def _npy(shape, dtype='<f8', data: bytes = b'') -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {'descr': dtype, 'fortran_order': False, 'shape': tuple(shape)})
  return buf.getvalue() + data


def _laughs(depth: int = 9, width: int = 10) -> bytes:
  """Nested lists sharing references: depth**width paths from ~100 bytes of memo references."""
  out = L(S('lol')) + PUT(0)
  for i in range(1, depth + 1):  # POP the previous level (it stays in the memo), push the next
    out += b'0' + L(*([GET(i - 1)] * width)) + PUT(i)
  return out


# --------------------------------------------------------------------------------------------
# Crafted files. Each builder returns (reader, path, error type, message pattern).


def _crafted(tmp: pathlib.Path) -> dict[str, tuple[str, pathlib.Path, type, str]]:
  cases: dict[str, tuple[str, pathlib.Path, type, str]] = {}
  CE, UE, DE = converters.CheckpointError, converters.UnsafePickleError, data.DataFormatError

  def torch_case(name, body, storages, match, *, legacy=True, error=CE, **kw):
    cases[name] = ('torch', _torch_file(tmp, f'{name}.pth', body, storages, legacy=legacy, **kw),
                   error, match)

  # -- views
  for legacy in (True, False):
    kind = 'legacy' if legacy else 'zip'
    st = rh.storage('0', 1, legacy=legacy)
    torch_case(f'zero_stride_huge_view_{kind}',
               _sd(('conv1.weight', rh.tensor(st, 0, (23170, 23170), (0, 0)))), {'0': _f32(1)},
               r'stride \(0, 0\): zero or negative strides', legacy=legacy)
  torch_case('view_beyond_storage',
             _sd(('w', rh.tensor(rh.storage('0', 50, legacy=True), 0, (10, 10), (10, 1)))),
             {'0': _f32(50)}, r'needs 100 elements but storage .0. holds 50')
  torch_case('negative_stride',
             _sd(('w', rh.tensor(rh.storage('0', 5, legacy=True), 4, (5,), (-1,)))),
             {'0': _f32(5)}, 'zero or negative strides')
  torch_case('overlapping_view',
             _sd(('w', rh.tensor(rh.storage('0', 2000, legacy=True), 0, (1000, 1000), (1, 1)))),
             {'0': _f32(2000)}, r'1000000 elements, more than the 2000 .* overlapping view')
  torch_case('offset_beyond_storage',
             _sd(('w', rh.tensor(rh.storage('0', 4, legacy=True), 2**40, (2,), (1,)))),
             {'0': _f32(4)}, r'needs 1099511627778 elements')
  # -- declared sizes
  torch_case('legacy_storage_declares_2e40_elements',
             _sd(('w', rh.tensor(rh.storage('0', 2**40, legacy=True), 0, (4,), (1,)))),
             {'0': _f32(4)}, r'declares 1099511627776 elements .* more than the whole file')
  torch_case('legacy_storage_count_lies',
             _sd(('w', rh.tensor(rh.storage('0', 4, legacy=True), 0, (4,), (1,)))),
             {'0': _f32(8)}, r'holds 8 elements, its tensors were declared for 4')
  zeros = bytes(64 << 20)  # 64 MiB that deflate to ~64 KiB
  torch_case('zip_storage_inflates_beyond_its_tensor',
             _sd(('conv1.weight', rh.tensor(rh.storage('0', 432, legacy=False), 0, (16, 3, 3, 3),
                                            (27, 9, 3, 1)))),
             {'0': zeros}, r"data/0' declares 67108864 bytes but its content needs 1728",
             legacy=False, compression=zipfile.ZIP_DEFLATED)
  cases['zip_pickle_ratio_bomb'] = ('torch', tmp / 'pkl_bomb.pth', CE, r'zip bomb')
  with zipfile.ZipFile(tmp / 'pkl_bomb.pth', 'w', zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
    zf.writestr('archive/data.pkl', b'\x80\x02N' + zeros + b'.')
  torch_case('zip_storage_declared_2e40',
             _sd(('w', rh.tensor(rh.storage('0', 2**40, legacy=False), 0, (4,), (1,)))),
             {'0': _f32(4)}, r'declares 16 bytes but its content needs 4398046511104',
             legacy=False)
  # -- amplification
  torch_case('shared_references_inside_the_weights', _sd(('w', _laughs())), {},
             r"entry 'w' is a list, not a tensor")
  big = rh.storage('0', 1 << 18, legacy=True) + PUT(1)
  refs = [(f'w{i}', rh.tensor(GET(1), 0, (1 << 18,), (1,))) for i in range(1, 3000)]
  torch_case('many_views_of_one_storage', _sd(('w0', rh.tensor(big, 0, (1 << 18,), (1,))), *refs),
             {'0': _f32(1 << 18)}, r'tensors to read need more than \d+ bytes')
  ints = L(*[I(1000 + i) for i in range(20000)]) + PUT(7)
  sets = [(f's{i}', R(G('__builtin__', 'set'), T(GET(7)))) for i in range(1, 2000)]
  torch_case('set_of_a_shared_list', _sd(('s0', R(G('__builtin__', 'set'), T(ints))), *sets), {},
             r'set\(\) would allocate or copy \d+ bytes in total')
  # -- nesting
  torch_case('mark_nesting_2000', b'(' * 2000, {}, r'nests containers more than 200 levels')
  chain = L() + PUT(0) + b''.join(b'0' + L() + GET(i - 1) + b'a' + PUT(i) for i in range(1, 2001))
  cases['memo_nesting_2000'] = ('torch_full', _torch_file(tmp, 'deep.pth', D((S('x'), chain)), {},
                                                          legacy=True), CE, r'deeper than 200')
  cycle = L() + PUT(0) + GET(0) + b'a'
  cases['self_cycle'] = ('torch_full', _torch_file(tmp, 'cycle.pth', D((S('x'), cycle)), {},
                                                   legacy=True), CE, r'contains itself')
  # -- huge declared lengths and counts
  torch_case('binunicode8_2e60', b'\x8d' + struct.pack('<Q', 2**60), {},
             r'1152921504606846976 bytes declared')
  torch_case('binbytes8_2e60', b'\x8e' + struct.pack('<Q', 2**60), {},
             r'1152921504606846976 bytes declared')
  torch_case('long4_2e31', b'\x8b' + struct.pack('<i', 2**31 - 1), {},
             r'integer of 2147483647 bytes')
  torch_case('million_lists', b']' * 1_000_001, {}, r'more than 1000000 objects')
  torch_case('memo_index_2e32', L() + b'r\xff\xff\xff\xff' + b'j\x00\x00\x00\x00', {},
             r'memo entry 0, which was never stored')
  # -- BUILD on allow-listed objects, illegal container targets
  state = D((S('__code__'), NONE), (S('__call__'), NONE))
  torch_case('build_on_rebuild_function', G('torch._utils', '_rebuild_tensor_v2') + state + b'b',
             {}, r'sets the state of torch._utils._rebuild_tensor_v2 \(BUILD\)', error=UE)
  torch_case('build_on_ordereddict_class', G('collections', 'OrderedDict') + state + b'b', {},
             r'sets the state of collections.OrderedDict', error=UE)
  torch_case('build_on_storage_type', G('torch', 'FloatStorage') + state + b'b', {},
             r'sets the state of torch.FloatStorage', error=UE)
  for legacy in (True, False):  # a mutated zip checkpoint found by the fuzzer
    torch_case(f'top_object_is_a_function_{"legacy" if legacy else "zip"}',
               G('torch._utils', '_rebuild_tensor_v2'), {},
               r'holds .*_rebuild_tensor_v2.*, not a state dict of tensors', legacy=legacy)
  torch_case('build_on_list', L() + state + b'b', {}, r'sets the state of a list', error=UE)
  conv = G('torch.nn.modules.conv', 'Conv2d') + rh.EMPTY_TUPLE + b'\x81'
  torch_case('second_build_on_a_module', conv + D() + b'b' + D() + b'b', {},
             r'second BUILD', error=UE)
  torch_case('setitem_on_a_module', conv + S('k') + NONE + b's', {}, r'only dicts are filled',
             error=UE)
  torch_case('append_to_a_tuple', T(I(1)) + I(2) + b'a', {}, r'only lists are appended to',
             error=UE)
  # -- calls outside the allow-list
  marker = tmp / 'PWNED'
  for name, glob in [('os_system', G('os', 'system')), ('posix_system', G('posix', 'system')),
                     ('builtins_eval', G('__builtin__', 'eval')),
                     ('builtins_getattr', G('builtins', 'getattr')),
                     ('subprocess_popen', G('subprocess', 'Popen')),
                     ('functools_partial', G('functools', 'partial')),
                     ('torchvision_factory', G('torchvision.models.resnet', 'resnet50')),
                     ('torch_load', G('torch', 'load'))]:
    torch_case(f'reduce_{name}', R(glob, T(S(f'touch {marker}'))), {}, r'refusing to unpickle',
               error=UE)
  torch_case('reduce_storage_type', R(G('torch', 'FloatStorage'), T(I(10**12))), {},
             r'calls torch.FloatStorage, which is not an allowed function', error=UE)
  torch_case('reduce_module_class', R(G('torch.nn.modules.conv', 'Conv2d'), T(I(3))), {},
             r'calls torch.nn.modules.conv.Conv2d, which is not an allowed function', error=UE)
  torch_case('newobj_ordereddict', G('collections', 'OrderedDict') + rh.EMPTY_TUPLE + b'\x81', {},
             r'instantiates collections.OrderedDict, which is not an allowed class', error=UE)
  torch_case('inst_opcode', b'(ios\nsystem\n', {}, r'INST', error=UE)
  torch_case('ext_opcode', b'\x82\x01', {}, r'extension codes', error=UE)
  torch_case('module_pid_of_os_system', T(S('module'), G('os', 'system'), NONE, NONE) + b'Q', {},
             r'refusing to unpickle global os.system', error=UE)
  torch_case('numpy_object_dtype', R(G('numpy', 'dtype'), T(S('O8'), FALSE, rh.TRUE)), {},
             r"numpy dtype 'O8' is not a plain numeric dtype", error=UE)

  # -- npz / safetensors (converters)
  def zip_of(name, members, compression=zipfile.ZIP_STORED):
    path = tmp / name
    with zipfile.ZipFile(path, 'w', compression, compresslevel=9 if compression else None) as zf:
      for member, content in members.items():
        zf.writestr(member, content)
    return path

  cases['npz_header_lies_huge'] = (
      'npz', zip_of('lies.npz', {'w.npy': _npy((100000, 100000), '<f8', bytes(80))}), CE,
      r'header declares shape \(100000, 100000\) of float64 \(80000000000 data bytes\) but the'
      r' member holds 80')
  cases['npz_header_lies_short'] = (
      'npz', zip_of('short.npz', {'w.npy': _npy((3,), '<f8', bytes(80))}), CE,
      r'\(24 data bytes\) but the member holds 80')
  cases['npz_ratio_bomb'] = ('npz', zip_of('bomb.npz', {'w.npy': _npy((8 << 20,), '<f8', zeros)},
                                           zipfile.ZIP_DEFLATED), CE, r'zip bomb')
  cases['npz_object_array'] = ('npz', zip_of('obj.npz', {'w.npy': _npy((2,), '|O', b'')}), CE,
                               r'object arrays')
  header = (b'{"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776],'
            b' "data_offsets": [0, 16]}}')
  (tmp / 'huge.safetensors').write_bytes(struct.pack('<Q', len(header)) + header + bytes(16))
  cases['safetensors_huge_shape'] = ('safetensors', tmp / 'huge.safetensors', CE,
                                     r'needs 4835703278458516698824704 bytes')
  deep = b'[' * 100000 + b']' * 100000
  (tmp / 'deep.safetensors').write_bytes(struct.pack('<Q', len(deep)) + deep)
  cases['safetensors_deep_json'] = ('safetensors', tmp / 'deep.safetensors', CE,
                                    r'not a safetensors file')

  # -- data readers
  rng = np.random.default_rng(0)
  flat = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
  raw = rh.py2_cifar_pickle(flat, [1, 2, 3, 4], [b'a', b'b', b'c', b'd'])
  lie = raw.replace(struct.pack('<H', 4) + b'M' + struct.pack('<H', 3072),
                    struct.pack('<H', 60000) + b'M' + struct.pack('<H', 3072), 1)
  (tmp / 'lie' / 'test_batch').parent.mkdir()
  (tmp / 'lie' / 'test_batch').write_bytes(lie)
  cases['cifar_array_shape_lies'] = ('cifar_batch', tmp / 'lie' / 'test_batch', DE,
                                     r'needs 184320000 bytes, the pickle holds 12288')
  evil = pickle.dumps({b'data': _Evil(marker), b'labels': []}, protocol=2)
  (tmp / 'evil' / 'test_batch').parent.mkdir()
  (tmp / 'evil' / 'test_batch').write_bytes(evil)
  cases['cifar_os_system'] = ('cifar_batch', tmp / 'evil' / 'test_batch', DE,
                              r'refusing to load (os|posix)\.system')
  deep_cifar = P(D((S('data'), chain)))
  (tmp / 'deepc' / 'test_batch').parent.mkdir()
  (tmp / 'deepc' / 'test_batch').write_bytes(deep_cifar)
  cases['cifar_memo_nesting_2000'] = ('cifar_batch', tmp / 'deepc' / 'test_batch', DE,
                                      r'deeper than 200')
  dtype_build = (R(G('numpy', 'dtype'), T(S('f8'), FALSE, FALSE))
                 + T(I(3), S('>'), NONE, NONE, NONE, I(-1), I(-1), I(0)) + b'b')
  (tmp / 'dtype' / 'test_batch').parent.mkdir()
  (tmp / 'dtype' / 'test_batch').write_bytes(P(D((S('data'), dtype_build))))
  cases['cifar_dtype_build_is_inert'] = ('cifar_batch', tmp / 'dtype' / 'test_batch', DE,
                                         r'not a CIFAR batch')

  def tar_gz(name, build):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as tar:
      build(tar)
    path = tmp / name
    path.write_bytes(gzip.compress(buf.getvalue(), 9))
    return path

  def huge_member(tar):
    info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
    info.size = 2**40
    tar.addfile(info)  # the header alone: declares a 1 TiB member

  cases['tar_member_declares_1tib'] = ('cifar_tar', tar_gz('huge.tar.gz', huge_member), DE,
                                       r'would expand the archive beyond')

  def zero_member(tar):
    info = tarfile.TarInfo('cifar-10-batches-py/test_batch')
    info.size = len(zeros)
    tar.addfile(info, io.BytesIO(zeros))

  cases['tar_gzip_bomb'] = ('cifar_tar', tar_gz('bomb.tar.gz', zero_member), DE,
                            r'would expand the archive beyond')

  def many_members(tar):
    for i in range(12_000):
      tar.addfile(tarfile.TarInfo(f'x{i}'), io.BytesIO(b''))

  cases['tar_12k_members'] = ('cifar_tar', tar_gz('many.tar.gz', many_members), DE,
                               r'more than 10000 tar members')

  def idx(name, header_dims, payload, gz=True):
    raw_idx = bytes([0, 0, 8, len(header_dims)]) + struct.pack(f'>{len(header_dims)}I',
                                                               *header_dims) + payload
    path = tmp / name
    path.write_bytes(gzip.compress(raw_idx, 9) if gz else raw_idx)
    return path

  cases['idx_dims_beyond_file'] = ('idx', idx('a-images-idx3-ubyte.gz', (60000, 100000, 100000),
                                              bytes(100)), DE,
                                    r'more than a \d+-byte file can hold')
  cases['idx_gzip_bomb'] = ('idx', idx('b-images-idx3-ubyte.gz', (1024, 256, 256), zeros), DE,
                            r'more than a \d+-byte file can hold')
  cases['idx_plain_dims_lie'] = ('idx', idx('c-images-idx3-ubyte', (10, 28, 28), bytes(100),
                                            gz=False), DE,
                                  r'\(7840 data bytes\) but the file has 100')
  cases['data_npz_header_lies'] = (
      'data_npz', zip_of('lies_data.npz', {'images.npy': _npy((10**6, 32, 32, 3), '|u1', bytes(99)),
                                           'labels.npy': _npy((2,), '|u1', bytes(2))}), DE,
      r"cannot read array 'images'.*header declares shape \(1000000, 32, 32, 3\)")
  return cases


class _Evil:
  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


_IN_PROCESS = {
    'torch': converters.read_state_dict,
    'torch_full': torch_pickle.load,
    'npz': converters.read_state_dict,
    'safetensors': converters.read_state_dict,
    'cifar_batch': data.load_cifar_batch_file,
    'cifar_tar': data.load_cifar_tar,
    'idx': data.read_idx,
    'data_npz': data.load_npz,
}


@pytest.fixture(scope='module')
def crafted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('crafted')
  return tmp, _crafted(tmp)


def _run(reader: str, path: pathlib.Path):
  return _IN_PROCESS[reader](path)


def test_crafted_files_are_refused_quickly_with_the_readers_error(crafted):
  """Each crafted class raises the reader's own error type, with a message naming the problem
  and the file, within MAX_SECONDS of CPU time; no payload ran."""
  tmp, cases = crafted
  assert len(cases) >= 60
  failures = []
  for name, (reader, path, error, match) in sorted(cases.items()):
    t0 = time.process_time()
    try:
      _run(reader, path)
    except error as e:
      seconds = time.process_time() - t0
      message = str(e)
      if not re_search(match, message):
        failures.append(f'{name}: message {message!r} does not match {match!r}')
      elif str(path) not in message:
        failures.append(f'{name}: message does not name the file: {message!r}')
      elif seconds > MAX_SECONDS:
        failures.append(f'{name}: took {seconds:.2f} s')
      continue
    except Exception as e:  # noqa: BLE001
      failures.append(f'{name}: {type(e).__name__} instead of {error.__name__}: {e}')
      continue
    failures.append(f'{name}: loaded without error')
  assert not failures, '\n'.join(failures)
  assert not (tmp / 'PWNED').exists(), 'a payload ran'


def re_search(pattern: str, text: str) -> bool:
  return re.search(pattern, text, re.S) is not None


def test_crafted_files_in_a_memory_limited_child(crafted, tmp_path):
  """All crafted files again, in a child whose address space may grow by at most 512 MiB beyond
  the imported reader modules: each is refused, fast, and peak RSS stays far below that."""
  _, cases = crafted
  names = sorted(cases)
  report = rh.run_readers([(cases[n][0], cases[n][1]) for n in names], mem_bytes=512 << 20,
                          timeout=240, workdir=tmp_path)
  rh.assert_bounded(report, max_seconds=MAX_SECONDS, max_rss_growth=128 << 20, labels=names,
                    expect='error')


def test_shared_references_under_a_non_weight_key_are_never_copied(tmp_path):
  """A ~300-byte optimizer entry with 10**9 paths: the weights load, the entry is not walked."""
  w = _f32(6).reshape(2, 3)
  body = D((S('state_dict'), D((S('fc.weight'), rh.tensor(rh.storage('0', 6, legacy=True), 0,
                                                           (2, 3), (3, 1))))),
           (S('optimizer'), _laughs()))
  path = _torch_file(tmp_path, 'opt.pth', body, {'0': w}, legacy=True)
  assert path.stat().st_size < 1000
  t0 = time.process_time()
  sd = converters.read_state_dict(path)
  assert list(sd) == ['fc.weight']
  np.testing.assert_array_equal(sd['fc.weight'], w)
  # The full tree too: shared sub-lists stay shared, so it is linear in the file.
  full = torch_pickle.load(path)
  assert full['optimizer'][0] is full['optimizer'][1]
  assert time.process_time() - t0 < MAX_SECONDS


def test_dtype_build_never_touches_numpys_own_dtypes(tmp_path):
  """numpy.dtype('f8', copy=False) would hand out NumPy's shared float64 descriptor; a BUILD on it
  could change its byte order for the whole process. The reader builds a private dtype."""
  body = D((S('x'), R(G('numpy', 'dtype'), T(S('f8'), FALSE, FALSE))
            + T(I(3), S('>'), NONE, NONE, NONE, I(-1), I(-1), I(0)) + b'b'))
  path = _torch_file(tmp_path, 'dt.pth', body, {}, legacy=True)
  out = torch_pickle.load(path)
  assert out['x'] == np.dtype('>f8')
  assert np.dtype('f8').byteorder == '=' and np.dtype(np.float64).isnative


# --------------------------------------------------------------------------------------------
# Legitimate files: bit-exact.


torch = pytest.importorskip('torch')
nn = torch.nn


def _random_model(seed: int):
  g = torch.Generator().manual_seed(seed)
  shared = nn.Conv2d(4, 4, 1, bias=False)
  model = nn.Sequential(
      nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU6(),
      nn.Sequential(shared, nn.BatchNorm2d(4), nn.ReLU(), shared),  # a module used twice
      nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Dropout(0.1))
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g))
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(4, generator=g))
        m.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        m.num_batches_tracked.fill_(seed + 7)
  model.register_buffer('not_saved', torch.ones(3), persistent=False)
  model.register_buffer('absent', None)
  return model


def _save(obj, path: pathlib.Path, legacy: bool) -> pathlib.Path:
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
  return path


def _assert_same(got: dict, ref: dict) -> None:
  assert list(got) == list(ref)
  for k, v in ref.items():
    v = v.detach()
    if v.dtype == torch.bfloat16:
      v = v.float()
    v = v.numpy()
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_whole_pickled_module_gives_torchs_state_dict(tmp_path, legacy):
  model = _random_model(1)
  path = _save(model, tmp_path / 'model.pth', legacy)
  ref = model.state_dict()
  assert 'not_saved' not in ref and '3.0.weight' in ref and '3.3.weight' in ref
  _assert_same(torch_pickle.load_weights(path), ref)  # num_batches_tracked included, as torch
  sd = converters.read_state_dict(path)  # normalized: counters dropped
  _assert_same(sd, {k: v for k, v in ref.items() if not k.endswith('num_batches_tracked')})
  # Wrapped with an optimizer and arguments, as training scripts save it.
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  model(torch.randn(2, 3, 8, 8)).sum().backward()
  opt.step()
  ckpt = {'model': model, 'optimizer': opt.state_dict(), 'epoch': 3,
          'args': argparse.Namespace(lr=0.1, arch='seq'), 'best': np.float64(0.5)}
  path = _save(ckpt, tmp_path / 'ckpt.pth', legacy)
  _assert_same(torch_pickle.load_weights(path), model.state_dict())
  full = torch_pickle.load(path)
  assert full['epoch'] == 3 and full['args'] == {'lr': 0.1, 'arch': 'seq'}
  assert full['best'] == 0.5 and isinstance(full['best'], np.float64)
  _assert_same(full['model'], model.state_dict())
  momentum = opt.state_dict()['state'][0]['momentum_buffer'].numpy()
  np.testing.assert_array_equal(full['optimizer']['state'][0]['momentum_buffer'], momentum)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_state_dicts_of_every_dtype_and_view_load_bit_exactly(tmp_path, legacy):
  g = torch.Generator().manual_seed(3)
  base = torch.randn(6, 8, generator=g)
  sd = collections.OrderedDict([
      ('f32', torch.randn(3, 4, 5, generator=g)),
      ('f64', torch.randn(7, generator=g, dtype=torch.float64)),
      ('f16', torch.randn(2, 3, generator=g).half()),
      ('bf16', torch.randn(4, 5, generator=g).bfloat16()),
      ('i64', torch.randint(-2**40, 2**40, (4,), generator=g)),
      ('i32', torch.randint(-9, 9, (2, 2), generator=g, dtype=torch.int32)),
      ('i8', torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8)),
      ('u8', torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8)),
      ('bool', torch.rand(5, generator=g) > 0.5),
      ('scalar', torch.tensor(3.5)),
      ('empty', torch.zeros(0, 3)),
      ('transposed', base.t()),  # non-contiguous views keep their strides in the file
      ('sliced', base[1:5, ::3]),
      ('tied_a', base), ('tied_b', base),  # one storage, two names
      ('one_row_view', base[2:3]),
  ])
  path = _save(sd, tmp_path / 'sd.pth', legacy)
  got = torch_pickle.load_weights(path)
  _assert_same(got, sd)
  assert got['tied_a'] is got['tied_b']  # shared like torch's tensors
  got = converters.read_state_dict(path)
  _assert_same(got, sd)


def test_expanded_tensor_with_zero_stride_is_refused(tmp_path):
  """torch.save keeps an expand()ed tensor's zero strides; such views are refused (issue 13)."""
  path = _save({'w': torch.ones(1, 3).expand(4, 3)}, tmp_path / 'exp.pth', False)
  with pytest.raises(converters.CheckpointError, match=r'stride \(0, 1\): zero or negative'):
    converters.read_state_dict(path)
  # A size-1 dimension's stride is irrelevant, whatever it is.
  path = _save({'w': torch.ones(3, 1).expand(3, 1)}, tmp_path / 'one.pth', False)
  np.testing.assert_array_equal(converters.read_state_dict(path)['w'], np.ones((3, 1), np.float32))


class _EvilModule(nn.Module):
  """Its class is not allow-listed; unpickling it with torch would run __setstate__."""

  marker = None

  def __init__(self):
    super().__init__()
    self.fc = nn.Linear(2, 2)

  def __setstate__(self, state):
    pathlib.Path(state['marker_path']).write_text('ran')
    super().__setstate__(state)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_module_payloads_never_run(tmp_path, legacy):
  marker = tmp_path / 'PWNED'
  model = _random_model(2)
  model.hook = functools.partial(os.system, f'touch {marker}')
  path = _save(model, tmp_path / 'hook.pth', legacy)
  with pytest.raises(converters.UnsafePickleError, match=r'functools\.partial'):
    converters.read_state_dict(path)
  evil = _EvilModule()
  evil.marker_path = str(marker)
  path = _save(evil, tmp_path / 'evil.pth', legacy)
  with pytest.raises(converters.UnsafePickleError, match=r'test_reader_bounds\._EvilModule'):
    converters.read_state_dict(path)
  # Trusting the class's module by name reads its weights as data: __setstate__ still never runs.
  sd = converters.read_state_dict(path, module_prefixes=('test_reader_bounds',))
  np.testing.assert_array_equal(sd['fc.weight'], evil.fc.weight.detach().numpy())
  assert not marker.exists(), 'code from the file ran'
  torch.load(path, weights_only=False)  # torch itself would run it: the payload is live
  assert marker.exists()


@pytest.mark.realdata
def test_real_whole_module_mobilenet_equals_its_state_dict(shared):
  """issue 15: the whole pickled MobileNetV2 (torchvision classes) gives exactly the plain state
  dict's keys and arrays, bitwise, in order, without importing torchvision."""
  module_file = shared / 'weights' / 'mobilenet_v2_pruned.cifar10_224.pth'
  sd_file = shared / 'weights' / 'mobilenet_v2_pruned.cifar10_224.state_dict.pt'
  a, b = converters.read_state_dict(module_file), converters.read_state_dict(sd_file)
  assert list(a) == list(b) and len(a) == 262
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  ref = torch.load(sd_file, map_location='cpu', weights_only=True)
  _assert_same(torch_pickle.load_weights(module_file), ref)  # with num_batches_tracked
  assert a['features.1.conv.0.0.weight'].shape == (11, 1, 3, 3)  # DATA.md's layout
  assert a['classifier.1.weight'].shape == (10, 208)
  code = ('import sys, converters\n'
          f'converters.read_state_dict({str(module_file)!r})\n'
          'assert not any(m.startswith("torchvision") or m == "torch" for m in sys.modules)\n')
  subprocess.run([os.sys.executable, '-c', code], check=True, cwd=rh.ROOT, timeout=120,
                 env=dict(os.environ, PYTHONPATH=str(rh.ROOT)))


@pytest.mark.realdata
def test_every_real_file_loads_bit_exactly(shared):
  for f in sorted((shared / 'weights').iterdir()):
    # torch cannot load the whole-module file without torchvision: its reference is the
    # plain state dict of the same weights (the test above checks that pairing bitwise).
    src = f.with_name(f.name.replace('224.pth', '224.state_dict.pt'))
    ref = torch.load(src, map_location='cpu', weights_only=True)
    ref = ref.get('state_dict', ref)
    _assert_same(torch_pickle.load_weights(f), ref)
  for f in sorted((shared / 'data').glob('*.npz')):
    got = formats.read_npz(f)
    with np.load(f) as ref:
      assert list(got) == list(ref.files)
      for k in ref.files:
        assert got[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(got[k], ref[k])
    ds = data.load_npz(f)
    with np.load(f) as ref:
      np.testing.assert_array_equal(ds.images.reshape(ref['images'].shape), ref['images'])


def test_python2_cifar_batch_and_tar_read_exactly(tmp_path):
  """The layout of the real cifar-10-python files (Python 2 cPickle: py2 str, int dtype args)."""
  rng = np.random.default_rng(5)
  flat = rng.integers(0, 256, (9, 3072), dtype=np.uint8)
  labels = [int(v) for v in rng.integers(0, 10, 9)]
  raw = rh.py2_cifar_pickle(flat, labels, [f'f{i}.png'.encode() for i in range(9)])
  assert pickle.loads(raw, encoding='bytes')[b'labels'] == labels  # it is what Python 2 wrote
  batch = tmp_path / 'cifar-10-batches-py' / 'test_batch'
  batch.parent.mkdir()
  batch.write_bytes(raw)
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w', format=tarfile.PAX_FORMAT) as tar:
    long = tarfile.TarInfo('cifar-10-batches-py/' + 'x' * 150 + '/readme')  # a pax path record
    tar.addfile(long, io.BytesIO(b''))
    tar.add(batch, 'cifar-10-batches-py/test_batch')
  for compress, suffix in ((gzip.compress, '.tar.gz'), (lambda b: b, '.tar')):
    (tmp_path / f'c{suffix}').write_bytes(compress(buf.getvalue()))
    for ds in (data.load_cifar_batch_file(batch), data.load_cifar_tar(tmp_path / f'c{suffix}')):
      np.testing.assert_array_equal(ds.images.transpose(0, 3, 1, 2).reshape(9, -1), flat)
      np.testing.assert_array_equal(ds.labels, labels)


# --------------------------------------------------------------------------------------------
# The pickle machine agrees with pickle.loads on everything it accepts.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_KEYS = st.one_of(st.text(max_size=8), st.integers(-2**60, 2**60), st.binary(max_size=8),
                  st.booleans(), st.none())
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**200, 2**200),
                     st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20),
                     st.complex_numbers(allow_nan=False), st.builds(np.float64, st.floats()),
                     st.builds(np.int64, st.integers(-2**63, 2**63 - 1)),
                     st.builds(np.float16, st.floats(width=16)))
_ARRAYS = hnp.arrays(st.sampled_from([np.uint8, np.int32, np.int64, np.float16, np.float32,
                                      np.float64, np.bool_, np.dtype('>i4'), np.complex64]),
                     hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
_VALUES = st.recursive(
    st.one_of(_SCALARS, _ARRAYS, st.sets(st.text(max_size=4), max_size=4),
              st.frozensets(st.integers(0, 99), max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.tuples(inner, inner),
                            st.dictionaries(_KEYS, inner, max_size=5)),
    max_leaves=12)


def _equal(a, b) -> bool:
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    # NumPy's own unpickling converts big-endian arrays to native order (protocols < 5); the
    # values, bit for bit, are what must agree.
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
      return False
    native = a.dtype.newbyteorder('=')
    return (native == b.dtype.newbyteorder('=') and a.shape == b.shape
            and a.astype(native).tobytes() == b.astype(native).tobytes())
  if isinstance(a, np.generic) or isinstance(b, np.generic):
    return type(a) is type(b) and a.tobytes() == b.tobytes()
  if type(a) is not type(b) and not (isinstance(a, dict) and isinstance(b, dict)):
    return False
  if isinstance(a, float):
    return a == b or (a != a and b != b)
  if isinstance(a, (list, tuple)):
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
  if isinstance(a, dict):
    return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
  return a == b


def _find(table):
  def find(module, name):
    try:
      return table[(module, name)]
    except KeyError:
      raise safe_pickle.PickleRefusedError(f'{module}.{name}') from None
  return find


_TABLE = {**safe_pickle.BASIC_GLOBALS, **safe_pickle.numpy_globals()}


@settings(max_examples=80, derandomize=True, deadline=None, database=None)
@given(_VALUES, st.integers(0, 5))
def test_safe_pickle_matches_pickle_loads(value, protocol):
  """Differential check of every opcode path the pickler emits for data (protocols 0-5, numpy
  arrays and scalars included) against CPython's unpickler."""
  raw = pickle.dumps(value, protocol=protocol)
  got = safe_pickle.rebuild(safe_pickle.loads(raw, find_global=_find(_TABLE)),
                            safe_pickle.resolve_numpy)
  assert _equal(got, pickle.loads(raw)), (got, value)


@pytest.mark.parametrize('protocol', [1, 4])  # protocol 0 files cannot be loaded by torch either
def test_whole_module_with_other_pickle_protocols(tmp_path, protocol):
  """torch.save(model, pickle_protocol=1) creates modules through copyreg._reconstructor."""
  model = _random_model(4)
  path = tmp_path / 'm.pth'
  torch.save(model, path, pickle_protocol=protocol)
  _assert_same(torch_pickle.load_weights(path), model.state_dict())


def test_nesting_through_namespaces_is_bounded_in_total(tmp_path):
  """Namespaces inside deep lists inside namespaces...: the depth bound counts across them."""
  body = b''
  for _ in range(30):  # 30 x (a Namespace holding a 40-deep list) = 1,200 levels in all
    inner = body or NONE
    lists = b']' * 40 + inner + b'a' * 40  # [[[...[inner]...]]]
    body = (G('argparse', 'Namespace') + rh.EMPTY_TUPLE + b'\x81' + D((S('x'), lists)) + b'b')
  path = _torch_file(tmp_path, 'ns.pth', D((S('args'), body)), {}, legacy=True)
  with pytest.raises(converters.CheckpointError, match=r'deeper than 200|more than 50 levels'):
    torch_pickle.load(path)

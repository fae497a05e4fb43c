"""The torch-free checkpoint readers: real files, the CLI, bad and hostile inputs, format readers."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import converters
from converters import formats
from lbyl_jax.cli import convert as convert_cli
from lbyl_jax.core import trees
from lbyl_jax.io import checkpoint
from lbyl_jax.models import archs

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESNET20 = 'resnet20-12fca82f.th'


def _run_without_torch(code: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter in which ``import torch`` raises ImportError."""
  prelude = (
      'import sys\n'
      "sys.modules['torch'] = None  # makes every `import torch` raise ImportError\n"
  )
  epilogue = (
      '\ntry:\n  import torch\nexcept ImportError:\n  pass\nelse:\n  sys.exit("torch was importable")\n'
      "leaked = sorted(m for m in sys.modules if m.startswith('torch') and sys.modules[m] is not None)\n"
      'assert not leaked, leaked\n'
  )
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
             JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-c', prelude + code + epilogue], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)


def convert_main(argv) -> int:
  """Runs ``python -m lbyl_jax.convert`` in process: its exit status (0 when main returns)."""
  try:
    convert_cli.main(argv)
  except SystemExit as e:
    return e.code
  return 0


def _torch_name_to_flax(key: str) -> tuple[str, str]:
  """(collection, '/'-path) of an akamaster state-dict key: an independent re-statement of the
  naming rules for one family, to check the converter's values bitwise."""
  key = key.removeprefix('module.')
  mod, leaf = key.rsplit('.', 1)
  mod = re.sub(r'^layer(\d)\.(\d+)\.', r'layer\1_\2/', mod).replace('linear', 'fc')
  is_bn = mod.rsplit('/', 1)[-1].startswith('bn')
  if leaf in ('running_mean', 'running_var'):
    return 'batch_stats', f'{mod}/{leaf.removeprefix("running_")}'
  if leaf == 'weight':
    return 'params', f'{mod}/{"scale" if is_bn else "kernel"}'
  return 'params', f'{mod}/{leaf}'


def _torch_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


# --------------------------------------------------------------------------------------------
# Real file, torch-free conversion, CLI.


@pytest.mark.realdata
def test_cli_converts_real_file_without_torch_and_reloads(shared, tmp_path):
  """`python -m lbyl_jax.convert` on the real akamaster file with torch unimportable; the checkpoint
  reloads through lbyl_jax.load and every value equals torch.load's, bitwise."""
  src = shared / 'weights' / RESNET20
  out = tmp_path / 'ckpt'
  proc = _run_without_torch(
      'import runpy\n'
      f'sys.argv = ["lbyl_jax.convert", "--arch", "resnet20", "--weights", {str(src)!r},'
      f' "--out", {str(out)!r}, "--json"]\n'
      "runpy.run_module('lbyl_jax.convert', run_name='__main__')\n", tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout)
  assert summary['source_format'] == 'torch-legacy'
  assert summary['sha256_matches_published'] is True
  assert summary['tensors'] == 97  # 19 convs + 19 BNs x 4 + fc kernel and bias
  assert summary['params'] == 269_722  # ResNet-20's published 0.27M parameters

  import lbyl_jax  # pylint: disable=import-outside-toplevel

  loaded = lbyl_jax.load(out)
  assert loaded.spec.name == 'resnet20' and loaded.meta['widths'] is None
  assert loaded.meta['source']['format'] == 'torch-legacy'

  torch = pytest.importorskip('torch')
  sd = torch.load(src, map_location='cpu', weights_only=True)['state_dict']
  flat = trees.flatten(loaded.variables)
  assert len(flat) == len(sd) == 97
  for key, value in sd.items():
    col, path = _torch_name_to_flax(key)
    np.testing.assert_array_equal(flat[f'{col}/{path}'], _torch_layout(value.numpy()), err_msg=key)


@pytest.mark.realdata
@pytest.mark.parametrize('name,arch,n', [
    # stem 5 + 27 blocks x (2 convs + 2 BNs x 4) + 2 shortcuts x 5 + fc 2
    ('nm_resnet56.cifar10.pth.tar', 'resnet56_b', 5 + 27 * 10 + 2 * 5 + 2),
    ('lbyl_lenet_300_100.fashionmnist.pth.tar', 'lenet_300_100', 6),
])
def test_real_files_read_in_process(shared, name, arch, n):
  variables = converters.load_variables(shared / 'weights' / name, archs.get(arch))
  flat = trees.flatten(variables)
  assert len(flat) == n
  assert checkpoint.shape_mismatches(archs.get(arch), variables) == []


def test_cli_json_summary_and_refusals(tmp_path, capsys):
  spec = archs.get('lenet_300_100')
  rng = np.random.default_rng(0)
  sd = {}
  for name, (o, i) in {'ip1': (300, 784), 'ip2': (100, 300), 'ip3': (10, 100)}.items():
    sd[f'{name}.weight'] = rng.standard_normal((o, i)).astype(np.float32)
    sd[f'{name}.bias'] = rng.standard_normal(o).astype(np.float32)
  src = tmp_path / 'lenet.npz'
  np.savez(src, **sd)
  out = tmp_path / 'ck'

  assert convert_main(['--arch', 'lenet_300_100', '--weights', str(src), '--out', str(out), '--json']) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary['source_format'] == 'npz' and summary['widths'] is None
  assert summary['params'] == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
  loaded = checkpoint.load(out)
  np.testing.assert_array_equal(loaded.variables['params']['ip2']['kernel'], sd['ip2.weight'].T)
  assert loaded.spec is spec

  # An existing output is refused without --overwrite and replaced with it.
  assert convert_main(['--arch', 'lenet_300_100', '--weights', str(src), '--out', str(out)]) == 1
  err = capsys.readouterr().err
  assert 'already exists' in err
  assert err.startswith('python -m lbyl_jax.convert: error: ')
  assert len(err.strip().splitlines()) == 1
  assert convert_main(['--arch', 'lenet_300_100', '--weights', str(src), '--out', str(out),
                       '--overwrite']) == 0
  assert 'lenet_300_100' in capsys.readouterr().out

  # The wrong architecture is an error listing the torch names that do not fit.
  assert convert_main(['--arch', 'resnet20', '--weights', str(src), '--out', str(tmp_path / 'x')]) == 1
  err = capsys.readouterr().err
  assert 'ip1.weight' in err and 'missing' in err
  assert not (tmp_path / 'x').exists()


def test_cli_keeps_pruned_widths(tmp_path, capsys):
  rng = np.random.default_rng(1)
  sd = {'ip1.weight': rng.standard_normal((50, 784)), 'ip1.bias': rng.standard_normal(50),
        'ip2.weight': rng.standard_normal((20, 50)), 'ip2.bias': rng.standard_normal(20),
        'ip3.weight': rng.standard_normal((10, 20)), 'ip3.bias': rng.standard_normal(10)}
  src = tmp_path / 'pruned.safetensors'
  _write_safetensors(src, {k: v.astype(np.float32) for k, v in sd.items()})
  assert convert_main(['--arch', 'lenet_300_100', '--weights', str(src), '--out',
                       str(tmp_path / 'ck'), '--json']) == 0
  assert json.loads(capsys.readouterr().out)['widths'] == [50, 20]
  loaded = checkpoint.load(tmp_path / 'ck')
  assert loaded.model.widths == (50, 20)
  x = rng.standard_normal((3, 28, 28, 1)).astype(np.float32)
  h = np.maximum(x.reshape(3, -1) @ sd['ip1.weight'].T + sd['ip1.bias'], 0)
  h = np.maximum(h @ sd['ip2.weight'].T + sd['ip2.bias'], 0)
  ref = h @ sd['ip3.weight'].T + sd['ip3.bias']
  np.testing.assert_allclose(loaded.model.apply(loaded.variables, x), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.fixture(scope='module')
def resnet20_zip(shared, tmp_path_factory):
  """The real resnet20 weights re-saved in torch's zip format."""
  torch = pytest.importorskip('torch')
  path = tmp_path_factory.mktemp('zip') / 'resnet20.pth'
  torch.save(torch.load(shared / 'weights' / RESNET20, map_location='cpu', weights_only=True), path)
  return path


@pytest.mark.realdata
@pytest.mark.parametrize('which', ['legacy', 'zip'])
@pytest.mark.parametrize('fraction', [0.5, 0.999, 0.01])
def test_truncated_checkpoint_is_a_clear_error(shared, resnet20_zip, tmp_path, which, fraction):
  src = shared / 'weights' / RESNET20 if which == 'legacy' else resnet20_zip
  data = src.read_bytes()
  cut = tmp_path / f'cut{src.suffix}'
  cut.write_bytes(data[:int(len(data) * fraction)])
  with pytest.raises(converters.CheckpointError, match=r'truncated|corrupt') as e:
    converters.load_variables(cut, archs.get('resnet20'))
  assert str(cut) in str(e.value)


@pytest.mark.realdata
def test_corrupt_zip_member_is_a_clear_error(resnet20_zip, tmp_path):
  """A flipped byte inside a stored tensor fails the zip CRC check instead of loading silently."""
  data = bytearray(resnet20_zip.read_bytes())
  with zipfile.ZipFile(resnet20_zip) as zf:
    info = next(i for i in zf.infolist() if '/data/' in i.filename and i.file_size > 1000)
  header = 30 + len(info.filename.encode()) + len(info.extra)
  data[info.header_offset + header + 100] ^= 0xFF
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(bytes(data))
  with pytest.raises(converters.CheckpointError, match=r'corrupt|CRC'):
    converters.load_variables(bad, archs.get('resnet20'))


@pytest.mark.parametrize('content', [
    np.random.default_rng(0).bytes(4096),
    b'\x80\x02' + np.random.default_rng(1).bytes(4096),  # looks like a pickle, is not one
    b'this is a text file, not a checkpoint\n' * 20,
    b'',
    b'PK\x03\x04' + bytes(60),  # the start of a zip and nothing else
], ids=['random', 'pickle-header', 'text', 'empty', 'zip-header'])
@pytest.mark.parametrize('suffix', ['.pth', '.th', '.safetensors', '.npz'])
def test_non_checkpoint_file_is_a_clear_error(tmp_path, content, suffix):
  path = tmp_path / f'junk{suffix}'
  path.write_bytes(content)
  with pytest.raises(converters.CheckpointError) as e:
    converters.read_state_dict(path)
  assert str(path) in str(e.value)


def test_missing_file_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError):
    converters.read_state_dict(tmp_path / 'nope.pth')


class _RunsCommand:
  """Unpickling this calls os.system(command): what a hostile checkpoint would do."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _CallsEval:

  def __reduce__(self):
    return eval, ("__import__('os').system('exit 0')",)


def _legacy_file(path: pathlib.Path, obj_pickle: bytes) -> None:
  """A legacy torch file whose object pickle is ``obj_pickle`` (magic, protocol, sys info first)."""
  with open(path, 'wb') as f:
    pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({'protocol_version': 1001, 'little_endian': True,
                 'type_sizes': {'short': 2, 'int': 4, 'long': 4}}, f, protocol=2)
    f.write(obj_pickle)
    pickle.dump([], f, protocol=2)


def _zip_file(path: pathlib.Path, obj_pickle: bytes) -> None:
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr('archive/data.pkl', obj_pickle)
    zf.writestr('archive/byteorder', 'little')
    zf.writestr('archive/version', '3\n')


def _hand_written_system_pickle(command: str) -> bytes:
  """PROTO 2, GLOBAL 'os system', the command string, TUPLE1, REDUCE, STOP, by opcodes."""
  arg = command.encode()
  return (b'\x80\x02' + b'cos\nsystem\n' + b'X' + struct.pack('<I', len(arg)) + arg
          + b'\x85' + b'R' + b'.')


@pytest.mark.parametrize('container', ['bare', 'legacy', 'zip'])
@pytest.mark.parametrize('payload', ['reduce', 'opcodes', 'nested'])
def test_hostile_pickle_is_refused_before_running(tmp_path, container, payload):
  marker = tmp_path / 'PWNED'
  command = f'touch {marker}'
  if payload == 'reduce':
    data = pickle.dumps(_RunsCommand(command), protocol=2)
  elif payload == 'opcodes':
    data = _hand_written_system_pickle(command)
  else:  # hidden inside an otherwise normal state dict
    data = pickle.dumps({'state_dict': {'conv1.weight': [1.0], 'hook': _RunsCommand(command)}},
                        protocol=2)
  path = tmp_path / 'evil.pth'
  if container == 'bare':
    path.write_bytes(data)
  elif container == 'legacy':
    _legacy_file(path, data)
  else:
    _zip_file(path, data)
  with pytest.raises(converters.CheckpointError, match=r'(os|posix)\.system'):
    converters.load_variables(path, archs.get('resnet20'))
  assert not marker.exists(), 'the pickle ran its command'


@pytest.mark.parametrize('protocol', [2, 4])
def test_eval_in_pickle_is_refused(tmp_path, protocol):
  path = tmp_path / 'evil.pth'
  path.write_bytes(pickle.dumps(_CallsEval(), protocol=protocol))
  # protocol 2 spells the module '__builtin__' (Python 2 compatible names)
  with pytest.raises(converters.UnsafePickleError, match=r'(builtins|__builtin__)\.eval'):
    converters.read_state_dict(path)


def test_pickled_module_object_is_refused(tmp_path):
  """torch.save(model) pickles the class itself; only state dicts are accepted."""
  torch = pytest.importorskip('torch')
  import torch_reference as tr  # pylint: disable=import-outside-toplevel

  path = tmp_path / 'model.pth'
  torch.save(tr.LeNet300100(), path)
  with pytest.raises(converters.UnsafePickleError, match=r'torch_reference\.LeNet300100|torch\.nn'):
    converters.read_state_dict(path)


@pytest.mark.realdata
@pytest.mark.parametrize('arch,expect', [
    # 18 absent blocks x (2 kernels + 2 BNs x 4)
    ('resnet56', [r'missing \(180\)', r'batch_stats/layer1_3/bn1/mean']),
    ('lenet_300_100', [r'missing \(6\)', r'unexpected \(97\)', r'conv1\.weight', r'layer1\.0\.bn1\.running_mean']),
    ('resnet20_b', [r'missing \(10\)', r'layer2_0/downsample_conv/kernel', r'layer3_0/downsample_bn']),
    ('resnet18', [r'layer4_0', r'mis-shaped']),
])
def test_wrong_architecture_lists_keys(shared, arch, expect):
  with pytest.raises(converters.CheckpointError) as e:
    converters.load_variables(shared / 'weights' / RESNET20, archs.get(arch))
  message = str(e.value)
  for pattern in expect:
    assert re.search(pattern, message), (pattern, message)


def test_mis_shaped_tensor_is_named(tmp_path):
  rng = np.random.default_rng(0)
  sd = {'ip1.weight': rng.standard_normal((300, 784)), 'ip1.bias': rng.standard_normal(300),
        'ip2.weight': rng.standard_normal((100, 300)), 'ip2.bias': rng.standard_normal(100),
        'ip3.weight': rng.standard_normal((100, 100)), 'ip3.bias': rng.standard_normal(100)}
  path = tmp_path / 'w.npz'
  np.savez(path, **{k: v.astype(np.float32) for k, v in sd.items()})
  with pytest.raises(converters.CheckpointError, match=r'mis-shaped.*ip3\.weight') as e:
    converters.load_variables(path, archs.get('lenet_300_100'))
  assert '(100, 100)' in str(e.value)


# --------------------------------------------------------------------------------------------
# converters.formats: safetensors and npz without the safetensors package.


def _write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  st = pytest.importorskip('safetensors.numpy')
  st.save_file(tensors, str(path), metadata={'format': 'np'})


def test_read_safetensors_matches_reference_reader(tmp_path):
  st = pytest.importorskip('safetensors.numpy')
  rng = np.random.default_rng(0)
  tensors = {
      'f32': rng.standard_normal((3, 4, 5)).astype(np.float32),
      'f64': rng.standard_normal(7),
      'f16': rng.standard_normal((2, 3)).astype(np.float16),
      'i64': rng.integers(-2**40, 2**40, (4,), dtype=np.int64),
      'i32': rng.integers(-2**20, 2**20, (2, 2), dtype=np.int32),
      'i8': rng.integers(-128, 128, (9,), dtype=np.int8),
      'u8': rng.integers(0, 256, (3, 3), dtype=np.uint8),
      'bool': rng.random(5) > 0.5,
      'scalar': np.array(3.5, np.float32),
      'empty': np.zeros((0, 3), np.float32),
      'a.b/c': np.arange(6, dtype=np.float32).reshape(2, 3),
  }
  path = tmp_path / 'x.safetensors'
  st.save_file(tensors, str(path), metadata={'note': 'hello'})
  got = formats.read_safetensors(path)
  ref = st.load_file(str(path))
  assert set(got) == set(ref) == set(tensors)
  for k in tensors:
    assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_read_safetensors_bf16_widens_exactly(tmp_path):
  torch = pytest.importorskip('torch')
  st_torch = pytest.importorskip('safetensors.torch')
  x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
  path = tmp_path / 'bf16.safetensors'
  st_torch.save_file({'w': x}, str(path))
  got = formats.read_safetensors(path)['w']
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, x.float().numpy())


def _raw_safetensors(header: dict, data: bytes) -> bytes:
  h = json.dumps(header).encode()
  return struct.pack('<Q', len(h)) + h + data


@pytest.mark.parametrize('header,data,match', [
    ({'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]}}, bytes(8), 'truncated'),
    ({'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 12]}}, bytes(16), 'needs 16 bytes'),
    ({'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [8, 0]}}, bytes(16), 'invalid data_offsets'),
    ({'w': {'dtype': 'C64', 'shape': [2], 'data_offsets': [0, 16]}}, bytes(16), 'unsupported dtype'),
    ({'w': {'dtype': 'F32', 'shape': [-2], 'data_offsets': [0, 8]}}, bytes(8), 'invalid shape'),
    ({'w': {'dtype': 'F32', 'shape': [2]}}, bytes(8), 'lacks'),
    ({'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
      'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}}, bytes(12), 'overlap'),
    ([1, 2], b'', 'JSON object'),
])
def test_read_safetensors_rejects_inconsistent_headers(tmp_path, header, data, match):
  path = tmp_path / 'bad.safetensors'
  path.write_bytes(_raw_safetensors(header, data))
  with pytest.raises(ValueError, match=match):
    formats.read_safetensors(path)


def test_read_safetensors_truncated_real_file(tmp_path):
  path = tmp_path / 'w.safetensors'
  _write_safetensors(path, {'a': np.ones((64, 64), np.float32), 'b': np.ones(10, np.float32)})
  data = path.read_bytes()
  for n in (4, 20, len(data) // 2, len(data) - 1):
    cut = tmp_path / f'cut{n}.safetensors'
    cut.write_bytes(data[:n])
    with pytest.raises(ValueError, match='truncated|not a safetensors'):
      formats.read_safetensors(cut)
    with pytest.raises(converters.CheckpointError):
      converters.read_state_dict(cut)


def test_read_safetensors_rejects_absurd_header_length(tmp_path):
  path = tmp_path / 'x.safetensors'
  path.write_bytes(struct.pack('<Q', 2**62) + b'{}')
  with pytest.raises(ValueError, match='implausible'):
    formats.read_safetensors(path)


def test_read_npz_keys_as_saved(tmp_path):
  arrays = {'conv1.weight': np.ones((2, 3, 3, 3), np.float32),
            'params/fc/kernel': np.arange(6, dtype=np.float64).reshape(2, 3),
            'u8': np.arange(4, dtype=np.uint8)}
  path = tmp_path / 'a.npz'
  np.savez(path, **arrays)
  got = formats.read_npz(path)
  assert set(got) == set(arrays)
  for k, v in arrays.items():
    assert got[k].dtype == v.dtype
    np.testing.assert_array_equal(got[k], v)


def test_read_npz_refuses_pickles_npy_and_truncation(tmp_path):
  obj = tmp_path / 'obj.npz'
  np.savez(obj, a=np.array([{'x': 1}], dtype=object))
  with pytest.raises(ValueError, match='obj.npz'):
    formats.read_npz(obj)
  npy = tmp_path / 'one.npy'
  np.save(npy, np.ones(3))
  with pytest.raises(ValueError, match='single'):
    formats.read_npz(npy)
  full = tmp_path / 'full.npz'
  np.savez(full, a=np.ones(1000))
  cut = tmp_path / 'cut.npz'
  cut.write_bytes(full.read_bytes()[:500])
  with pytest.raises(ValueError, match='cut.npz'):
    formats.read_npz(cut)

"""lbyl_jax.io.checkpoint: orbax + meta.json round trips, atomic writes, validation on load."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

import lbyl_jax
from lbyl_jax.models import archs
from lbyl_jax.io import checkpoint
from lbyl_jax.quant import uniform as quant
from lbyl_jax.core import trees
from lbyl_jax.core import units


def _random_variables(spec, widths=None, seed=0):
  """Random float32 leaves in the exact shapes of ``spec.build(widths)`` (no model init)."""
  rng = np.random.default_rng(seed)
  abstract = spec.abstract_variables(widths)
  return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def _assert_trees_equal(a, b):
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k  # bitwise, NaN payloads and signed zeros included


def _siblings(path: pathlib.Path) -> list[str]:
  return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope='module')
def resnet20_vars():
  return _random_variables(archs.get('resnet20'), seed=1)


def test_round_trip_is_bitwise(tmp_path, resnet20_vars):
  variables = jax.tree_util.tree_map(np.copy, resnet20_vars)
  # Stored as is, bit for bit: a signed zero, a subnormal, the largest float32.
  variables['params']['fc']['bias'][:3] = [-0.0, np.float32(1e-45), -np.finfo(np.float32).max]
  meta = {'method': 'lbyl', 'config': {'ratio': 0.5, 'layers': ['a', 'b']}, 'top1': 91.25}
  out = checkpoint.save(tmp_path / 'ck', 'resnet20', None, variables, meta=meta)

  assert out == (tmp_path / 'ck').absolute()
  assert sorted(os.listdir(out)) == ['.lbyl_jax.json', 'meta.json', 'variables']
  assert _siblings(out) == ['ck']  # no temporary directory left behind
  stored = json.loads((out / 'meta.json').read_text())
  assert stored['format_version'] == checkpoint.FORMAT_VERSION
  assert (stored['arch'], stored['widths'], stored['format']) == ('resnet20', None, 'float')

  loaded = lbyl_jax.load(out)
  assert isinstance(loaded, checkpoint.Loaded)
  assert loaded.spec is archs.get('resnet20') and loaded.raw is None and loaded.widths is None
  assert loaded.model == archs.get('resnet20').build(None)
  for k, v in meta.items():
    assert loaded.meta[k] == v
  _assert_trees_equal(loaded.variables, variables)
  assert np.signbit(loaded.variables['params']['fc']['bias'][0])


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path, resnet20_vars):
  variables = jax.tree_util.tree_map(np.copy, resnet20_vars)
  variables['params']['fc']['bias'][:2] = [np.nan, np.inf]
  with pytest.raises(ValueError, match=r'non-finite values in params/fc/bias \(2 of 10\)'):
    checkpoint.save(tmp_path / 'ck', 'resnet20', None, variables)
  assert os.listdir(tmp_path) == []


def test_mlp_without_batch_stats_and_jax_arrays(tmp_path):
  spec = archs.get('lenet_300_100')
  variables = spec.init(jax.random.PRNGKey(0))  # jax arrays, params only
  assert 'batch_stats' not in variables
  out = checkpoint.save(tmp_path / 'ck', spec.name, None, variables)
  loaded = checkpoint.load(out)
  assert set(loaded.variables) == {'params'}
  _assert_trees_equal(loaded.variables, jax.tree_util.tree_map(np.asarray, variables))
  x = np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype(np.float32)
  np.testing.assert_array_equal(loaded.model.apply(loaded.variables, x), spec.build().apply(variables, x))


def test_pruned_widths_round_trip(tmp_path):
  spec = archs.get('lenet_300_100')
  widths = (123, 45)
  variables = spec.init(jax.random.PRNGKey(3), widths)
  assert units.widths_of(variables, spec.units) == widths
  out = checkpoint.save(tmp_path / 'ck', spec.name, widths, variables, meta={'ratio': 0.6})
  assert json.loads((out / 'meta.json').read_text())['widths'] == [123, 45]
  loaded = checkpoint.load(out)
  assert loaded.widths == widths and loaded.model.widths == widths
  _assert_trees_equal(loaded.variables, jax.tree_util.tree_map(np.asarray, variables))
  x = np.random.default_rng(1).standard_normal((3, 28, 28, 1)).astype(np.float32)
  np.testing.assert_array_equal(loaded.model.apply(loaded.variables, x),
                                spec.build(widths).apply(variables, x))


def test_pruned_resnet_round_trip(tmp_path):
  spec = archs.get('resnet20')
  widths = (3, 16, 7, 30, 1, 32, 64, 9, 12)
  variables = _random_variables(spec, widths, seed=2)
  out = checkpoint.save(tmp_path / 'ck', 'resnet20', widths, variables)
  loaded = checkpoint.load(out)
  assert loaded.model.widths == widths
  assert units.widths_of(loaded.variables, spec.units) == widths
  _assert_trees_equal(loaded.variables, variables)


def test_original_widths_are_stored_as_null(tmp_path, resnet20_vars):
  spec = archs.get('resnet20')
  out = checkpoint.save(tmp_path / 'ck', 'resnet20', spec.default_widths(), resnet20_vars)
  assert json.loads((out / 'meta.json').read_text())['widths'] is None
  assert checkpoint.load(out).model.widths is None


@pytest.mark.parametrize('bits,symmetric', [(8, True), (4, False)])
def test_quantized_round_trip(tmp_path, resnet20_vars, bits, symmetric):
  qtree, qmeta = quant.quantize_tree(resnet20_vars, bits=bits, symmetric=symmetric)
  out = checkpoint.save(tmp_path / 'q', 'resnet20', None, qtree, meta={'quant': qmeta})
  assert json.loads((out / 'meta.json').read_text())['format'] == 'quantized'

  loaded = checkpoint.load(out)

  q_leaves = [v for k, v in trees.flatten(loaded.raw).items() if k.endswith('/q')]
  assert q_leaves and all(v.dtype == (np.int8 if symmetric and bits > 4 else np.uint8) for v in q_leaves)
  _assert_trees_equal(loaded.raw, qtree)
  _assert_trees_equal(loaded.variables, quant.dequantize_tree(qtree, qmeta))
  assert checkpoint.shape_mismatches(loaded.spec, loaded.variables) == []
  assert loaded.meta['quant'] == json.loads(json.dumps(qmeta))


def test_quantized_needs_its_description(tmp_path, resnet20_vars):
  qtree, _ = quant.quantize_tree(resnet20_vars, bits=8)
  with pytest.raises(ValueError, match="non-float leaves"):
    checkpoint.save(tmp_path / 'a', 'resnet20', None, qtree)
  with pytest.raises(ValueError, match=r"needs meta\['quant'\]"):
    checkpoint.save(tmp_path / 'b', 'resnet20', None, qtree, meta={'format': 'quantized'})
  assert os.listdir(tmp_path) == []


def test_refuses_existing_out_dir_and_overwrites_atomically(tmp_path, resnet20_vars):
  first = checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars, meta={'run': 1})
  with pytest.raises(FileExistsError, match='overwrite=True'):
    checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars, meta={'run': 2})
  assert checkpoint.load(first).meta['run'] == 1

  # Any existing path counts, not only checkpoints.
  (tmp_path / 'afile').write_text('keep me')
  with pytest.raises(FileExistsError):
    checkpoint.save(tmp_path / 'afile', 'resnet20', None, resnet20_vars)
  assert (tmp_path / 'afile').read_text() == 'keep me'

  other = jax.tree_util.tree_map(lambda x: x + 1, resnet20_vars)
  second = checkpoint.save(tmp_path / 'ck', 'resnet20', None, other, meta={'run': 2}, overwrite=True)
  assert second == first
  loaded = checkpoint.load(second)
  assert loaded.meta['run'] == 2
  _assert_trees_equal(loaded.variables, other)
  assert _siblings(second) == ['afile', 'ck']  # old copy and temporary directory both gone


def test_failure_mid_save_leaves_nothing(tmp_path, resnet20_vars, monkeypatch):
  def boom(path, obj):
    raise RuntimeError('disk full')

  monkeypatch.setattr(checkpoint, '_write_json', boom)  # after the orbax arrays are written
  with pytest.raises(RuntimeError, match='disk full'):
    checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars)
  assert os.listdir(tmp_path) == []


def test_failure_mid_overwrite_keeps_the_old_checkpoint(tmp_path, resnet20_vars, monkeypatch):
  checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars, meta={'run': 1})
  real_rename = os.rename

  def failing_publish(src, dst):
    if pathlib.Path(src).name.startswith('.ck.tmp-'):
      raise OSError('rename failed')
    return real_rename(src, dst)

  monkeypatch.setattr(checkpoint.os, 'rename', failing_publish)
  with pytest.raises(OSError, match='rename failed'):
    checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars, meta={'run': 2}, overwrite=True)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ['ck']
  loaded = checkpoint.load(tmp_path / 'ck')
  assert loaded.meta['run'] == 1
  _assert_trees_equal(loaded.variables, resnet20_vars)


def test_failure_in_orbax_write_leaves_nothing(tmp_path, resnet20_vars, monkeypatch):
  def broken(path, tree):
    path.mkdir()
    (path / 'partial').write_bytes(b'x')
    raise OSError('orbax failed')

  monkeypatch.setattr(checkpoint, '_write_orbax', broken)
  with pytest.raises(OSError, match='orbax failed'):
    checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars)
  assert os.listdir(tmp_path) == []


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0,
                    reason='root ignores directory permissions (the OS-refusal case below still runs)')
def test_unwritable_parent_permissions(tmp_path, resnet20_vars):
  parent = tmp_path / 'ro'
  parent.mkdir()
  parent.chmod(0o555)
  try:
    with pytest.raises(PermissionError, match='not writable'):
      checkpoint.save(parent / 'ck', 'resnet20', None, resnet20_vars)
    assert os.listdir(parent) == []
  finally:
    parent.chmod(0o755)


def test_parent_refused_by_the_os(tmp_path, resnet20_vars, monkeypatch):
  """A parent the OS will not write to (read-only mount, ACL): the error surfaces, nothing is left."""
  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied', str(tmp_path))

  monkeypatch.setattr(pathlib.Path, 'mkdir', refuse)
  with pytest.raises(PermissionError):
    checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars)
  assert os.listdir(tmp_path) == []


def test_missing_parent_or_file_parent(tmp_path, resnet20_vars):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.save(tmp_path / 'no' / 'ck', 'resnet20', None, resnet20_vars)
  (tmp_path / 'f').write_text('')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.save(tmp_path / 'f' / 'ck', 'resnet20', None, resnet20_vars)


def test_save_validates_before_writing(tmp_path, resnet20_vars):
  spec = archs.get('resnet20')
  with pytest.raises(ValueError, match='expected 9 widths'):
    checkpoint.save(tmp_path / 'a', 'resnet20', (16,) * 8, resnet20_vars)
  with pytest.raises(ValueError, match=r'mis-shaped: params/layer1_0/conv1/kernel'):
    checkpoint.save(tmp_path / 'b', 'resnet20', (8,) + spec.default_widths()[1:], resnet20_vars)
  with pytest.raises(ValueError, match='unknown architecture'):
    checkpoint.save(tmp_path / 'c', 'resnet21', None, resnet20_vars)
  with pytest.raises(ValueError, match='JSON'):
    checkpoint.save(tmp_path / 'd', 'resnet20', None, resnet20_vars, meta={'x': object()})
  with pytest.raises(ValueError, match='reserved'):
    checkpoint.save(tmp_path / 'e', 'resnet20', None, resnet20_vars, meta={'widths': [1]})
  assert os.listdir(tmp_path) == []


def test_load_validates_shapes(tmp_path, resnet20_vars):
  out = checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars)
  meta_path = out / 'meta.json'
  meta = json.loads(meta_path.read_text())

  meta_path.write_text(json.dumps({**meta, 'widths': [16, 16, 8, 32, 32, 32, 64, 64, 64]}))
  with pytest.raises(ValueError, match=r'mis-shaped: params/layer1_2/conv1/kernel is \(3, 3, 16, 16\), expected \(3, 3, 16, 8\)'):
    checkpoint.load(out)

  meta_path.write_text(json.dumps({**meta, 'arch': 'resnet32'}))
  with pytest.raises(ValueError, match=r'missing: params/layer1_3/conv1/kernel'):
    checkpoint.load(out)

  meta_path.write_text(json.dumps({**meta, 'arch': 'resnet20_b'}))
  with pytest.raises(ValueError, match=r'missing: params/layer2_0/downsample_conv/kernel'):
    checkpoint.load(out)

  meta_path.write_text(json.dumps({**meta, 'arch': 'lenet_300_100'}))
  with pytest.raises(ValueError, match=r'unexpected: batch_stats/bn1/mean'):
    checkpoint.load(out)

  meta_path.write_text(json.dumps(meta))
  assert checkpoint.load(out).spec.name == 'resnet20'


def test_load_rejects_non_checkpoints(tmp_path, resnet20_vars):
  with pytest.raises(FileNotFoundError):
    checkpoint.load(tmp_path / 'nothing')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no meta.json'):
    checkpoint.load(tmp_path / 'empty')
  out = checkpoint.save(tmp_path / 'ck', 'resnet20', None, resnet20_vars)
  meta = json.loads((out / 'meta.json').read_text())
  (out / 'meta.json').write_text(json.dumps({**meta, 'format_version': 99}))
  with pytest.raises(ValueError, match='newer'):
    checkpoint.load(out)
  (out / 'meta.json').write_text('{not json')
  with pytest.raises(ValueError, match='unreadable JSON'):
    checkpoint.load(out)
  (out / 'meta.json').write_text(json.dumps(meta))
  shutil.rmtree(out / 'variables')
  with pytest.raises(ValueError, match='no variables/'):
    checkpoint.load(out)

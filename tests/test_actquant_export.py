"""Activation quantization end to end: the StableHLO / safetensors exports carry it (from the
restore CLI, from a reloaded checkpoint and ``python -m lbyl_jax.evaluate RUN --export``), and
ranges calibrated on user images (``--act-ranges calibration --calib-data``; API
``calib_images=``) are marked not data-free, stored and reloaded."""

from __future__ import annotations

import json
import struct

import jax
import numpy as np
import pytest

import lbyl_jax
from lbyl_jax import pipeline
from lbyl_jax.cli import evaluate as cli_eval
from lbyl_jax.cli import restore as cli
from lbyl_jax.io import export as export_lib
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.quant import actquant

IMAGES = np.random.default_rng(7).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


def _call(path, images=IMAGES) -> np.ndarray:
  return np.asarray(export_lib.load_stablehlo(path.read_bytes()).call(images))


def _st_meta(path) -> dict:
  data = path.read_bytes()
  (n,) = struct.unpack('<Q', data[:8])
  return json.loads(data[8:8 + n])['__metadata__']


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
  """resnet20, random weights, W4A4 (BN ranges), exported as StableHLO and safetensors."""
  out = tmp_path_factory.mktemp('act') / 'run'
  cli.main(['--arch', 'resnet20', '--weights', 'random', '--method', 'prune', '--ratio', '0.3',
            '--weight-bits', '4', '--act-bits', '4', '--export', 'stablehlo', '--export',
            'safetensors', '--out', str(out), '--no-progress', '--no-download'])
  return out


def test_cli_stablehlo_export_carries_act_quant(cli_run):
  loaded = lbyl_jax.load(cli_run)
  assert isinstance(loaded, actquant.ActLoaded)
  got = _call(cli_run / export_lib.STABLEHLO_FILE)
  want = np.asarray(loaded.apply(IMAGES))  # the in-process act-quant forward
  np.testing.assert_array_equal(got, want)
  jitted = jax.jit(lambda v, x: actquant.forward(loaded.model, v,
                                                 archs.normalize_fn(loaded.spec)(x)))
  np.testing.assert_allclose(got, np.asarray(jitted(loaded.act_variables(), IMAGES)),
                             rtol=0, atol=1e-6)
  # the float export of the same weights differs: the quantize / dequantize steps are there
  plain = export_lib.stablehlo(loaded.spec, loaded.widths, loaded.variables)
  float_logits = np.asarray(plain.call(IMAGES))
  np.testing.assert_allclose(float_logits, np.asarray(loaded.model.apply(
      loaded.variables, archs.normalize_fn(loaded.spec)(IMAGES))), rtol=1e-5, atol=1e-4)
  assert np.abs(float_logits - got).max() > 1e-3
  assert 'round' in (cli_run / (export_lib.STABLEHLO_FILE + '.mlir')).read_text()


def test_cli_safetensors_export_states_the_grids(cli_run):
  loaded = lbyl_jax.load(cli_run)
  meta = _st_meta(cli_run / export_lib.SAFETENSORS_FILE)
  act = json.loads(meta['act_quant'])
  assert act['bits'] == 4 and act['source'] == 'bn' and act['data_free'] is True
  names = export_lib.torch_names(loaded.spec, loaded.variables)
  grids = actquant.quant_params(*loaded.act)
  assert set(act['layers']) == {names[p] for p in actquant.act_from_meta(
      loaded.meta['act_quant'])[0].layers}
  assert 'linear' in act['layers'] and 'layer1.0.conv1' in act['layers']  # akamaster's names
  g = grids['layer1_0']['conv1']
  assert act['layers']['layer1.0.conv1'] == dict(scale=float(g['scale']), qmin=0.0, qmax=15.0)
  assert act['layers']['conv1']['qmax'] == 127.0  # the image at 8 bits, symmetric
  assert act['keep_8bit'] == sorted(trace.first_and_last_layers(loaded.spec))


def test_saved_run_exports_with_its_ranges(cli_run, tmp_path, capsys):
  out = tmp_path / 'exp'
  cli_eval.main([str(cli_run), '--export', 'stablehlo', '--out', str(out), '--json'])
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['act_quant'] == dict(bits=4, source='bn', data_free=True)
  loaded = lbyl_jax.load(cli_run)
  got = _call(out / export_lib.STABLEHLO_FILE)
  np.testing.assert_array_equal(got, np.asarray(loaded.apply(IMAGES)))
  np.testing.assert_array_equal(got, _call(cli_run / export_lib.STABLEHLO_FILE))
  desc = json.loads((out / export_lib.EXPORT_FILE).read_text())
  assert desc['arch'] == 'resnet20' and desc['act_quant']['bits'] == 4
  assert desc['widths'] == list(loaded.widths)
  # never overwritten silently; with overwrite the API replaces it
  before = (out / export_lib.STABLEHLO_FILE).read_bytes()
  with pytest.raises(SystemExit) as exc:
    cli_eval.main([str(cli_run), '--export', 'stablehlo', '--out', str(out)])
  assert exc.value.code == 1 and 'already exists' in capsys.readouterr().err
  assert (out / export_lib.STABLEHLO_FILE).read_bytes() == before
  loaded.export(out, ['stablehlo', 'safetensors'], overwrite=True)
  assert (out / export_lib.SAFETENSORS_FILE).is_file()
  for bad, match in ((['--data', 'cifar10'], 'evaluates nothing'), ([], '--out DIR')):
    with pytest.raises(SystemExit):
      cli_eval.main([str(cli_run), '--export', 'stablehlo'] + bad)
    assert match in capsys.readouterr().err


def test_float_run_export_and_api(tmp_path):
  spec = archs.get('resnet20')
  v = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(2)))
  res = pipeline.compress(spec, v, method='prune', ratio=0.3)
  loaded = lbyl_jax.load(res.save(tmp_path / 'run'))
  assert not isinstance(loaded, actquant.ActLoaded)
  out = loaded.export(tmp_path / 'exp', 'stablehlo')
  np.testing.assert_allclose(_call(out / export_lib.STABLEHLO_FILE),
                             np.asarray(loaded.apply(IMAGES)), rtol=1e-5, atol=1e-5)
  assert json.loads((out / export_lib.EXPORT_FILE).read_text())['act_quant'] is None
  with pytest.raises(ValueError, match='unknown export format'):
    loaded.export(tmp_path / 'bad', 'onnx')
  assert not (tmp_path / 'bad').exists()


@pytest.mark.realdata
def test_cli_calibration_ranges_on_real_images(shared, tmp_path, capsys):
  data = str(shared / 'data' / 'cifar10_test.npz')
  weights = str(shared / 'weights' / 'resnet20-12fca82f.th')
  out = tmp_path / 'cal'
  cli.main(['--arch', 'resnet20', '--weights', weights, '--method', 'prune', '--ratio', '0.3',
            '--act-bits', '4', '--act-ranges', 'calibration', '--calib-data', data,
            '--calib-slice', '0:1000', '--calib-n', '64', '--export', 'stablehlo', '--out',
            str(out), '--no-progress', '--no-download', '--json'])
  stdout = capsys.readouterr().out
  report = json.loads(stdout.strip().splitlines()[-1])
  act = report['act_quant']
  assert act['source'] == 'calibration' and act['data_free'] is False
  assert act['calib_data'] == dict(spec=data, n=64, slice=[0, 1000]) and act['info']['n'] == 64
  assert 'NOT data-free: 64 user images' in stdout
  meta = json.loads((out / 'meta.json').read_text())
  assert meta['act_quant']['ranges']['data_free'] is False
  loaded = lbyl_jax.load(out)
  ranges, bits, keep = loaded.act
  images = np.load(data)['images']  # the same order as --calib-data reads them
  want = actquant.calibration_ranges(loaded.spec, loaded.variables, images[:64])
  assert ranges.layers == want.layers and not ranges.data_free and bits == 4
  bn = actquant.bn_ranges(loaded.spec, loaded.variables, bits=4)
  assert ranges.layers != bn.layers
  x = images[64:70]
  got = np.asarray(loaded.apply(x))
  np.testing.assert_array_equal(got, np.asarray(actquant.apply_with_act_quant(
      loaded.model, loaded.variables, archs.normalize_fn(loaded.spec)(x), want, 4, keep)))
  assert not np.array_equal(got, np.asarray(actquant.apply_with_act_quant(
      loaded.model, loaded.variables, archs.normalize_fn(loaded.spec)(x), bn, 4, keep)))
  np.testing.assert_array_equal(_call(out / export_lib.STABLEHLO_FILE, x), got)


@pytest.mark.parametrize('extra,match', [
    (['--act-bits', '4', '--act-ranges', 'calibration'], 'needs --calib-data'),
    (['--calib-data', 'cifar10'], 'nothing reads the images'),
    (['--act-bits', '4', '--calib-data', 'cifar10'], 'nothing reads the images'),
    (['--calib-n', '8'], 'nothing reads the images'),
    (['--calibrate-bn', '8', '--calib-data', 'cifar10', '--calib-n', '8'],
     '--calib-n applies to --act-ranges calibration'),
    (['--act-bits', '4', '--act-ranges', 'calibration', '--calib-data', 'cifar10', '--calib-n',
      '0'], 'positive number'),
])
def test_cli_calibration_flags_refused(tmp_path, capsys, extra, match):
  with pytest.raises(SystemExit) as exc:
    cli.main(['--arch', 'resnet20', '--weights', 'random', '--out', str(tmp_path / 'x'),
              '--no-download'] + extra)
  assert exc.value.code == 1 and match in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()


def test_api_calibration_images():
  spec = archs.get('resnet20')
  v = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(3)))
  images = np.random.default_rng(1).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
  res = lbyl_jax.compress('resnet20', v, method='prune', ratio=0.3, act_bits=6,
                          act_ranges='calibration', calib_images=images)
  assert res.report['act_quant']['data_free'] is False
  assert res.report['act_quant']['source'] == 'calibration'
  ranges, bits, _ = actquant.act_from_meta(res.act_meta)
  assert ranges == actquant.calibration_ranges(spec, res.variables, images) and bits == 6
  with pytest.raises(ValueError, match='needs unlabelled images'):
    lbyl_jax.compress('resnet20', v, method='prune', ratio=0.3, act_bits=6,
                      act_ranges='calibration')
  with pytest.raises(ValueError, match='calib_images'):
    pipeline.compress(spec, v, method='prune', ratio=0.3, act_bits=6, calib_images=images)
  with pytest.raises(ValueError, match='use one of the two'):
    lbyl_jax.compress('resnet20', v, method='prune', ratio=0.3, act_bits=6,
                      act_ranges='calibration', calib_images=images, bn_reestimate='moments')


def test_user_model_act_quant_exports_stablehlo(tmp_path):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(8, (3, 3), padding=1, use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))

  module = Tiny()
  v = jax.tree_util.tree_map(np.asarray, module.init(jax.random.PRNGKey(0),
                                                     jnp.zeros((1, 32, 32, 3))))
  res = lbyl_jax.compress(module, v, (1, 32, 32, 3), method='prune', ratio=0.25, act_bits=4,
                          act_ranges='calibration', calib_images=IMAGES)
  exp = export_lib.load_stablehlo(res.export_files('stablehlo')[export_lib.STABLEHLO_FILE])
  want = np.asarray(res.apply(IMAGES))
  np.testing.assert_array_equal(np.asarray(exp.call(IMAGES)), want)
  with pytest.raises(ValueError, match='no PyTorch naming'):
    res.export_files('safetensors')
  loaded = lbyl_jax.load(res.save(tmp_path / 'run'), module=module)
  out = loaded.export(tmp_path / 'exp', 'stablehlo')
  np.testing.assert_array_equal(_call(out / export_lib.STABLEHLO_FILE), want)

"""Uniform weight quantizer and quantized trees (docs/quantization.md)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lbyl_jax.core import trees
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.quant import uniform as quant


def _ref_symmetric(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """7.2 symmetric per-output-channel quantizer, float64, written out independently."""
  qmax = 2 ** (bits - 1) - 1
  w2 = w.reshape(-1, w.shape[-1])
  delta = np.abs(w2).max(axis=0) / qmax
  delta = np.where(delta == 0, 1.0, delta).astype(np.float32).astype(np.float64)
  q = np.clip(np.round(w2 / delta), -qmax, qmax)
  return q.reshape(w.shape), delta


@pytest.fixture(scope='module')
def resnet20():
  spec = archs.get('resnet20')
  variables = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(0)))
  return spec, variables


@pytest.mark.parametrize('bits', [2, 3, 4, 6, 8])
def test_symmetric_per_channel_matches_reference_and_bound(bits):
  rng = np.random.default_rng(bits)
  w = rng.normal(size=(3, 3, 8, 16)) * rng.uniform(0.1, 3.0, 16)
  qt = quant.quantize(w, bits=bits)
  q_ref, delta_ref = _ref_symmetric(w, bits)
  assert qt.q.dtype == np.int8 and qt.zero_point is None and qt.axis == 3
  np.testing.assert_array_equal(qt.q, q_ref)
  np.testing.assert_array_equal(qt.scale, delta_ref.astype(np.float32))
  err = np.abs(w - quant.dequantize(qt).astype(np.float64)).reshape(-1, 16)
  assert np.all(err <= qt.scale.astype(np.float64) / 2 * (1 + 1e-6) + 1e-12)
  assert np.abs(qt.q).max() == 2 ** (bits - 1) - 1  # the channel maximum hits the top level


def test_round_half_to_even():
  # Delta = 127 / 127 = 1 exactly, so w / Delta hits the .5 ties.
  w = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.0])[:, None]
  qt = quant.quantize(w, bits=8)
  np.testing.assert_array_equal(qt.q[:, 0], [0, 2, 2, 0, -2, -2, 127])


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_asymmetric_bound_and_range(bits):
  rng = np.random.default_rng(10 + bits)
  w = rng.normal(0.3, 1.0, size=(20, 12))
  w[:, 0] = np.abs(w[:, 0]) + 0.5  # an all-positive channel: the range is widened to include 0
  w[:, 1] = 0.0
  w[3, :] = 0.0
  qt = quant.quantize(w, bits=bits, symmetric=False)
  assert qt.q.dtype == np.uint8 and qt.zero_point.dtype == np.int32
  assert qt.q.max() <= 2**bits - 1
  assert np.all((qt.zero_point >= 0) & (qt.zero_point <= 2**bits - 1))
  deq = quant.dequantize(qt).astype(np.float64)
  err = np.abs(w - deq)
  assert np.all(err <= qt.scale.astype(np.float64)[None, :] / 2 * (1 + 1e-6) + 1e-12)
  np.testing.assert_array_equal(deq[:, 1], 0.0)
  assert qt.scale[1] == 1.0  # Delta = 0 guard
  np.testing.assert_array_equal(deq[3], 0.0)  # zero is exactly representable in every channel


def test_asymmetric_matches_formula_when_range_straddles_zero():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(50, 6))
  qt = quant.quantize(w, bits=4, symmetric=False)
  lo, hi = w.min(axis=0), w.max(axis=0)
  delta = ((hi - lo) / 15).astype(np.float32).astype(np.float64)
  z = np.round(-lo / delta)
  q = np.clip(np.round(w / delta) + z, 0, 15)
  np.testing.assert_array_equal(qt.q, q)
  np.testing.assert_array_equal(qt.zero_point, z)


@pytest.mark.parametrize('symmetric', [True, False])
def test_per_tensor_uses_one_step(symmetric):
  rng = np.random.default_rng(4)
  w = rng.normal(size=(3, 3, 4, 5)) * np.arange(1, 6)
  qt = quant.quantize(w, bits=6, per_channel=False, symmetric=symmetric)
  assert qt.scale.shape == (1,)
  expected = (np.abs(w).max() / 31) if symmetric else (w.max() - w.min()) / 63
  np.testing.assert_allclose(qt.scale[0], expected, rtol=1e-6)
  assert np.abs(w - quant.dequantize(qt)).max() <= qt.scale[0] / 2 * (1 + 1e-6)


def test_all_zero_channel_guard():
  w = np.zeros((3, 3, 2, 4))
  w[..., 1] = 0.25
  qt = quant.quantize(w, bits=4)
  assert qt.scale[0] == 1.0 and np.all(qt.q[..., 0] == 0)
  np.testing.assert_array_equal(quant.dequantize(qt), w.astype(np.float32))


@pytest.mark.parametrize('bits', [0, 1, 9, 16, 2.5, True, -4])
def test_bits_out_of_range(bits, resnet20):
  with pytest.raises(ValueError, match='bits'):
    quant.quantize(np.ones((2, 2)), bits=bits)
  with pytest.raises(ValueError, match='bits'):
    quant.quantize_tree(resnet20[1], bits=bits)


def test_bad_arrays():
  with pytest.raises(ValueError, match='non-finite'):
    quant.quantize(np.array([[1.0, np.nan]]), bits=8)
  with pytest.raises(ValueError, match='non-empty'):
    quant.quantize(np.zeros((0, 3)), bits=8)


@pytest.mark.parametrize('n', [0, 1, 2, 7, 8, 101])
@pytest.mark.parametrize('lo,hi,signed', [(-8, 7, True), (0, 15, False), (-1, 1, True),
                                          (-3, 3, True), (0, 3, False)])
def test_pack_unpack_roundtrip(n, lo, hi, signed):
  rng = np.random.default_rng(n * 31 + hi)
  q = rng.integers(lo, hi + 1, size=n).astype(np.int8 if signed else np.uint8)
  packed = quant.pack_int4(q)
  assert packed.dtype == np.uint8 and packed.size == (n + 1) // 2
  out = quant.unpack_int4(packed, n, signed=signed)
  assert out.dtype == (np.int8 if signed else np.uint8)
  np.testing.assert_array_equal(out, q)


def test_pack_rejects_out_of_range():
  with pytest.raises(ValueError, match='values'):
    quant.pack_int4(np.array([-9, 0], np.int8))
  with pytest.raises(ValueError, match='values'):
    quant.pack_int4(np.array([16], np.int16))
  with pytest.raises(ValueError, match='values'):
    quant.pack_int4(np.array([-1, 9], np.int16))  # neither range
  with pytest.raises(ValueError, match='cannot read'):
    quant.unpack_int4(np.zeros(2, np.uint8), 5)


def test_first_and_last_layers():
  expected = {'resnet20': ('conv1', 'fc'), 'resnet50': ('conv1', 'fc'),
              'vgg16_bn_cifar': ('conv0', 'fc2'), 'vgg16_bn': ('conv0', 'fc3'),
              'lenet_300_100': ('ip1', 'ip3')}
  for name, pair in expected.items():
    assert trace.first_and_last_layers(archs.get(name)) == pair, name


def test_trace_layers_pairs_bn_by_dataflow():
  tr = trace.trace_layers(archs.get('resnet20_b'))
  assert tr.order[0] == 'conv1' and tr.order[-1] == 'fc'
  assert tr.bn['layer2_0/downsample_conv'] == 'layer2_0/downsample_bn'
  assert tr.bn['layer3_2/conv2'] == 'layer3_2/bn2' and 'fc' not in tr.bn
  assert trace.trace_layers(archs.get('vgg16_bn_cifar')).bn['fc1'] == 'bn_fc1'


@pytest.mark.parametrize('bits,symmetric', [(8, True), (4, True), (3, False), (6, False)])
def test_quantize_tree_roundtrip(resnet20, bits, symmetric):
  spec, v = resnet20
  first_last = trace.first_and_last_layers(spec)
  qtree, qmeta = quant.quantize_tree(v, bits=bits, symmetric=symmetric, keep_8bit=first_last,
                                     skip=['layer1_0/conv2/kernel'])
  assert qmeta['format'] == 'quantized'
  layers = qmeta['layers']
  assert 'layer1_0/conv2' not in layers
  assert set(layers) == set(quant.kernel_paths(v)) - {'layer1_0/conv2'}
  assert layers['conv1']['bits'] == 8 and layers['fc']['bits'] == 8
  assert layers['layer2_1/conv1']['bits'] == bits
  stored = qtree['params']['layer2_1']['conv1']['kernel']
  expected_dtype = np.uint8 if (bits <= 4 or not symmetric) else np.int8
  assert stored['q'].dtype == expected_dtype
  if bits <= 4:
    assert stored['q'].ndim == 1  # packed
  deq = quant.dequantize_tree(qtree, qmeta)
  assert jax.tree_util.tree_structure(deq) == jax.tree_util.tree_structure(v)
  for path in quant.kernel_paths(v):
    w = trees.get_path(v['params'], path)['kernel']
    got = trees.get_path(deq['params'], path)['kernel']
    assert got.dtype == np.float32 and got.shape == w.shape
    if path == 'layer1_0/conv2':
      np.testing.assert_array_equal(got, w)
    else:
      b = layers[path]['bits']
      np.testing.assert_array_equal(
          got, quant.dequantize(quant.quantize(w, bits=b, symmetric=symmetric)))
  # Biases and BN are untouched.
  np.testing.assert_array_equal(deq['params']['fc']['bias'], v['params']['fc']['bias'])
  np.testing.assert_array_equal(deq['batch_stats']['bn1']['var'], v['batch_stats']['bn1']['var'])
  # The model runs on the dequantized tree.
  out = spec.build().apply(deq, spec.dummy_input(2))
  assert out.shape == (2, 10) and np.all(np.isfinite(out))


def test_integer_form_and_errors(resnet20):
  spec, v = resnet20
  qtree, qmeta = quant.quantize_tree(v, bits=4, symmetric=False)
  deq = quant.dequantize_tree(qtree, qmeta)
  ints = quant.integer_form(qtree, qmeta)
  for path, (q, scale, zp) in ints.items():
    kernel = trees.get_path(deq['params'], path)['kernel']
    assert q.shape == kernel.shape and q.dtype == np.uint8 and q.max() <= 15
    np.testing.assert_allclose(scale * (q.astype(np.float64) - zp), kernel, rtol=1e-6, atol=1e-8)
  errs = quant.layer_errors(v, qtree, qmeta)
  for path, e in errs.items():
    assert e == pytest.approx(qmeta['layers'][path]['rel_error'], rel=1e-9)
    assert 0 < e < 0.25  # 4-bit relative Frobenius error of Gaussian-like kernels
  _, qmeta8 = quant.quantize_tree(v, bits=8)
  assert max(d['rel_error'] for d in qmeta8['layers'].values()) < 0.02


def test_tree_nbytes_4bit_is_about_an_eighth(resnet20):
  _, v = resnet20
  qtree, qmeta = quant.quantize_tree(v, bits=4)
  float_k = sum(trees.get_path(v['params'], p)['kernel'].nbytes for p in qmeta['layers'])
  quant_k = sum(quant.tree_nbytes(trees.get_path(qtree['params'], p)['kernel'])
                for p in qmeta['layers'])
  assert abs(quant_k / float_k - 1 / 8) < 0.02  # plus one float32 scale per channel
  other = quant.tree_nbytes(v) - float_k
  assert quant.tree_nbytes(qtree) == quant_k + other
  qtree8, _ = quant.quantize_tree(v, bits=8)
  assert quant.tree_nbytes(qtree8) - other == pytest.approx(float_k / 4, rel=0.05)


def test_bad_paths_and_meta(resnet20):
  _, v = resnet20
  with pytest.raises(ValueError, match='not a conv/dense layer'):
    quant.quantize_tree(v, bits=4, keep_8bit=['layer9_0/conv1'])
  qtree, qmeta = quant.quantize_tree(v, bits=4)
  with pytest.raises(ValueError, match='not a quantization description'):
    quant.dequantize_tree(qtree, {'layers': {}})

"""OMSE and SQuant (lbyl_jax.quant.omse / .squant) against float64 NumPy references; the
quantizers as plan stages (API, CLI, stored integers, reload)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import lbyl_jax
from lbyl_jax import pipeline
from lbyl_jax.core import units as units_lib
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.plan import Plan
from lbyl_jax.quant import omse
from lbyl_jax.quant import squant
from lbyl_jax.quant import uniform as quant


@pytest.fixture(scope='module')
def resnet20():
  spec = archs.get('resnet20')
  variables = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(0)))
  return spec, variables


def _sq_err(a, step, n):
  """Summed squared error of the symmetric grid with this step, written out (float64)."""
  a = np.abs(np.asarray(a, np.float64))
  return float(np.sum((a - step * np.minimum(np.round(a / step), n)) ** 2))


# --------------------------------------------------------------------------------------------
# OMSE


def _omse_reference(a: np.ndarray, n: int) -> float:
  """Brute force: MSE is piecewise quadratic between the breakpoints a_i / (k + 1/2); evaluate
  it at every breakpoint, at dmax and at every interval's stationary point (loops, float64)."""
  a = np.abs(np.asarray(a, np.float64))
  dmax = a.max() / n
  pts = sorted({dmax} | {ai / (k + 0.5) for ai in a for k in range(n) if 0 < ai / (k + 0.5) < dmax})
  cands = list(pts)
  for lo, hi in zip(pts[:-1], pts[1:]):
    mid = 0.5 * (lo + hi)
    q = np.minimum(np.round(a / mid), n)
    if q @ q > 0:
      cands.append(min(max((a @ q) / (q @ q), lo), hi))
  return min(_sq_err(a, d, n) for d in cands)


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_omse_is_the_exact_minimum(bits):
  rng = np.random.default_rng(bits)
  n = 2 ** (bits - 1) - 1
  rows = np.stack([rng.normal(size=40), rng.standard_t(3, size=40), rng.uniform(-1, 1, 40),
                   np.r_[rng.normal(size=39) * 0.05, 3.0]])
  step, mse, mse_rtn = omse.optimal_steps(rows, bits)
  for r in range(rows.shape[0]):
    a = np.abs(rows[r])
    dmax = a.max() / n
    assert 0 < step[r] <= dmax * (1 + 1e-12)
    np.testing.assert_allclose(mse[r], _sq_err(a, step[r], n), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mse_rtn[r], _sq_err(a, dmax, n), rtol=1e-9, atol=1e-12)
    if bits <= 4:
      np.testing.assert_allclose(mse[r], _omse_reference(a, n), rtol=1e-9, atol=1e-12)
    grid = np.linspace(1e-3, 1.0, 20001) * dmax  # a dense grid never finds anything better
    q = np.minimum(np.round(a[None, :] / grid[:, None]), n)
    dense = np.min(np.sum((a[None, :] - grid[:, None] * q) ** 2, axis=1))
    assert mse[r] <= dense + 1e-12 * np.sum(a * a)


def test_omse_all_zero_row_and_bad_input():
  step, mse, mse_rtn = omse.optimal_steps(np.zeros((2, 5)), 4)
  np.testing.assert_array_equal(step, [1.0, 1.0])
  np.testing.assert_array_equal(mse, [0.0, 0.0])
  np.testing.assert_array_equal(mse_rtn, [0.0, 0.0])
  with pytest.raises(ValueError, match='rows, n'):
    omse.optimal_steps(np.ones(4), 4)
  with pytest.raises(ValueError, match='non-finite'):
    omse.optimal_steps(np.array([[1.0, np.nan]]), 4)
  with pytest.raises(ValueError, match='bits'):
    omse.optimal_steps(np.ones((1, 3)), 9)


@pytest.mark.parametrize('per_channel', [True, False])
@pytest.mark.parametrize('bits', [2, 4, 6, 8])
def test_omse_never_worse_than_rtn(bits, per_channel):
  rng = np.random.default_rng(10 + bits)
  for w in (rng.normal(size=(3, 3, 8, 16)) * rng.uniform(0.1, 3, 16),
            rng.standard_t(2, size=(30, 12)), np.zeros((5, 4))):
    qt, info = omse.quantize_with_info(w, bits=bits, per_channel=per_channel)
    rtn = quant.quantize(w, bits=bits, per_channel=per_channel)
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    err = np.sum((w - quant.dequantize(qt).astype(np.float64)) ** 2, axis=axes)
    err_rtn = np.sum((w - quant.dequantize(rtn).astype(np.float64)) ** 2, axis=axes)
    assert np.all(err <= err_rtn)
    np.testing.assert_allclose(np.atleast_1d(err), info['mse'], rtol=1e-9, atol=1e-15)
    assert qt.q.dtype == np.int8 and qt.scale.dtype == np.float32
    # The integers are those of the stored step: round(w / step) clipped to the grid.
    n = 2 ** (bits - 1) - 1
    d = qt.scale.astype(np.float64) if per_channel else qt.scale.astype(np.float64)[0]
    np.testing.assert_array_equal(qt.q, np.clip(np.round(w / d), -n, n))
    if w.any() and bits <= 4:
      assert np.sum(err) < np.sum(err_rtn)  # at low bits clipping pays off on these tensors


def test_omse_rejects_asymmetric():
  with pytest.raises(ValueError, match='symmetric'):
    omse.quantize(np.ones((3, 3)), bits=4, symmetric=False)
  with pytest.raises(ValueError, match='--asymmetric'):
    Plan.from_options(method='prune', ratio=0.3, quant_method='omse', bits=4, symmetric=False)


# --------------------------------------------------------------------------------------------
# SQuant


def _squant_reference(x, lo, hi, kernel=True, channel=True):
  """SQuant written after the official code's structure (github.com/clevercool/SQuant,
  adaptive_round / SQuant_func): per kernel, orders of up / down candidates by |d|, flip the top
  round(|e|), then set the C-stage priority on the last flipped element (over-squant: undo it)
  or on the next one (under-squant); per channel, flip the top round(|e_c|) priorities. Loops."""
  x = np.clip(np.array(x, np.float64), lo, hi)
  O, I, T = x.shape
  q = np.round(x)
  up_p, dn_p = np.zeros_like(x), np.zeros_like(x)
  if kernel and T > 1:
    for o in range(O):
      for i in range(I):
        e = float(np.sum(q[o, i] - x[o, i]))
        if e == 0:
          continue
        up = e < 0
        cands = [t for t in range(T) if (q[o, i, t] < x[o, i, t] if up else q[o, i, t] > x[o, i, t])]
        order = sorted(cands, key=lambda t: (-abs(q[o, i, t] - x[o, i, t]), t))
        k = int(np.floor(abs(e) + 0.5))
        for t in order[:k]:
          q[o, i, t] += 1 if up else -1
        if k >= abs(e):
          t = order[k - 1]
          (dn_p if up else up_p)[o, i, t] = abs(q[o, i, t] - x[o, i, t])
        elif k < len(order):
          t = order[k]
          (up_p if up else dn_p)[o, i, t] = abs(q[o, i, t] - x[o, i, t])
  else:
    d = q - x
    up_p, dn_p = np.where(d < 0, -d, 0.0), np.where(d > 0, d, 0.0)
  if channel:
    for o in range(O):
      ec = float(np.sum(q[o] - x[o]))
      if ec == 0:
        continue
      up = ec < 0
      pr = up_p[o] if up else dn_p[o]
      ent = sorted((-pr[i, t], i * T + t, i, t) for i in range(I) for t in range(T) if pr[i, t] > 0)
      for _, _, i, t in ent[:int(np.floor(abs(ec) + 0.5))]:
        q[o, i, t] += 1 if up else -1
  return q


def test_squant_matches_loop_reference():
  rng = np.random.default_rng(0)
  for _ in range(120):
    o, i, t = rng.integers(1, 6), rng.integers(1, 7), int(rng.choice([1, 4, 9]))
    bits, sym = int(rng.choice([2, 3, 4, 8])), bool(rng.integers(2))
    lo, hi = quant.qrange(bits, sym)
    x = rng.uniform(lo, hi, size=(o, i, t))
    np.testing.assert_array_equal(squant.flip_rounding(x, lo, hi), _squant_reference(x, lo, hi))
    np.testing.assert_array_equal(squant.flip_rounding(x, lo, hi, channel=False),
                                  _squant_reference(x, lo, hi, channel=False))


@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_squant_invariants_and_grid(bits, symmetric):
  rng = np.random.default_rng(bits + 2 * symmetric)
  for w in (rng.normal(size=(3, 3, 12, 10)), rng.normal(size=(40, 7))):
    rtn = quant.quantize(w, bits=bits, symmetric=symmetric)
    qt = squant.quantize(w, bits=bits, symmetric=symmetric)
    np.testing.assert_array_equal(qt.scale, rtn.scale)
    if not symmetric:
      np.testing.assert_array_equal(qt.zero_point, rtn.zero_point)
    assert qt.q.dtype == rtn.q.dtype
    assert np.max(np.abs(qt.q.astype(int) - rtn.q.astype(int))) <= 1
    assert np.any(qt.q != rtn.q)  # SQuant changed some roundings
    e = squant.accumulated_errors(w, qt)
    assert np.abs(e['channel']).max() <= 0.5 + 1e-9      # SQuant-C
    assert np.abs(e['kernel']).max() < 1.0               # the kernel relaxation to 1
    assert np.abs(e['element']).max() < 1.0
    e0 = squant.accumulated_errors(w, rtn)
    assert np.abs(e0['element']).max() <= 0.5 + 1e-9     # SQuant-E is RTN
    if w.ndim == 4:
      ek = squant.accumulated_errors(w, squant.quantize(w, bits=bits, symmetric=symmetric,
                                                        channel=False))
      assert np.abs(ek['kernel']).max() <= 0.5 + 1e-9    # SQuant-K alone
    np.testing.assert_array_equal(squant.quantize(w, bits=bits, symmetric=symmetric).q, qt.q)


def test_squant_rejects_other_shapes():
  with pytest.raises(ValueError, match='HWIO'):
    squant.quantize(np.ones((2, 3, 4)), bits=4)
  with pytest.raises(ValueError, match='taps'):
    squant.flip_rounding(np.ones((2, 3)), -7, 7)


# --------------------------------------------------------------------------------------------
# Stored format and the quantize_tree hooks


@pytest.mark.parametrize('bits', [4, 6])
def test_stored_format_identical_to_rtn(resnet20, bits):
  spec, v = resnet20
  keep = trace.first_and_last_layers(spec)
  ref_tree, ref_meta = quant.quantize_tree(v, bits=bits, keep_8bit=keep)
  got = [omse.omse(v, bits=bits, keep_8bit=keep), squant.squant(v, bits=bits, keep_8bit=keep)]
  ref_leaves = jax.tree_util.tree_flatten_with_path(ref_tree)[0]
  for (tree, meta, report), name in zip(got, ('omse', 'squant')):
    assert meta['method'] == name and report['method'] == name
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
    for (_, a), (_, b) in zip(leaves, ref_leaves):
      assert np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype
    assert {k: meta[k] for k in ref_meta if k != 'layers'} == \
        {k: ref_meta[k] for k in ref_meta if k != 'layers'}
    for p, info in meta['layers'].items():
      assert {k: x for k, x in info.items() if k != 'rel_error'} == \
          {k: x for k, x in ref_meta['layers'][p].items() if k != 'rel_error'}
    deq = quant.dequantize_tree(tree, meta)
    # Each kernel is exactly the method's own quantization of the float kernel.
    for p in meta['layers']:
      w = np.asarray(trees_get(v, p))
      b = 8 if p in keep else bits
      mod = omse if name == 'omse' else squant
      np.testing.assert_array_equal(trees_get(deq, p), quant.dequantize(mod.quantize(w, bits=b)))
    assert units_lib.widths_of(deq, spec.units) == spec.default_widths()


def trees_get(variables, path):
  node = variables['params']
  for k in path.split('/'):
    node = node[k]
  return node['kernel']


def test_quantize_tree_rejects_a_quantizer_outside_the_format(resnet20):
  _, v = resnet20

  def bad(w, *, bits, per_channel, symmetric, path):
    qt = quant.quantize(w, bits=bits, per_channel=per_channel, symmetric=symmetric)
    return quant.QTensor(qt.q.astype(np.int16), qt.scale, None, bits, qt.axis, qt.shape)

  with pytest.raises(ValueError, match='does not fit the stored format'):
    quant.quantize_tree(v, bits=4, quantizer=bad)
  with pytest.raises(ValueError, match='layer_bits'):
    quant.quantize_tree(v, bits=4, layer_bits={'nope': 2})
  with pytest.raises(ValueError, match=r'layer_bits\[.conv1.\]'):
    quant.quantize_tree(v, bits=4, layer_bits={'conv1': 9})


def test_quantize_tree_layer_bits(resnet20):
  spec, v = resnet20
  path = quant.kernel_paths(v)[1]
  _, meta = quant.quantize_tree(v, bits=4, layer_bits={path: 2}, keep_8bit=[path + '/kernel'])
  assert meta['layers'][path]['bits'] == 8  # keep_8bit wins
  _, meta = quant.quantize_tree(v, bits=4, layer_bits={path: 2})
  assert meta['layers'][path]['bits'] == 2
  assert {d['bits'] for p, d in meta['layers'].items() if p != path} == {4}
  del spec


# --------------------------------------------------------------------------------------------
# As plan stages


@pytest.mark.parametrize('name', ['omse', 'squant'])
def test_pipeline_quantizes_the_pruned_network(resnet20, name):
  spec, v = resnet20
  res = pipeline.compress(spec, v, method='prune', ratio=0.3, quant_method=name, bits=4)
  ref = pipeline.compress(spec, v, method='prune', ratio=0.3)
  assert res.report['quant_method'] == name and res.report['weight_bits'] == 4
  assert res.qmeta['method'] == name
  keep = set(trace.first_and_last_layers(spec))
  mod = omse if name == 'omse' else squant
  for p, info in res.qmeta['layers'].items():
    assert info['bits'] == (8 if p in keep else 4) and info['packed'] == (p not in keep)
    w = np.asarray(trees_get(ref.variables, p))
    np.testing.assert_array_equal(trees_get(res.variables, p),
                                  quant.dequantize(mod.quantize(w, bits=info['bits'])))
  assert res.report['bytes_after'] < res.report['bytes_after_float'] / 3


@pytest.mark.realdata
def test_cli_squant_and_omse_save_reload(shared, tmp_path, capsys):
  from lbyl_jax.cli import restore as cli  # pylint: disable=import-outside-toplevel
  from lbyl_jax import evaluation  # pylint: disable=import-outside-toplevel
  from lbyl_jax.io import data as data_lib  # pylint: disable=import-outside-toplevel
  spec = archs.get('lenet_300_100')
  ds = data_lib.load_dataset(str(shared / 'data' / 'fashion_mnist_test.npz'))
  ev = evaluation.Evaluator(spec, batch_size=2500)
  for name in ('omse', 'squant'):
    out = tmp_path / name
    cli.main(['--arch', 'lenet_300_100', '--weights',
              str(shared / 'weights' / 'lbyl_lenet_300_100.fashionmnist.pth.tar'),
              '--data', str(shared / 'data' / 'fashion_mnist_test.npz'), '--out', str(out),
              '--no-progress', '--no-download', '--method', 'lbyl', '--ratio', '0.5',
              '--weight-bits', '4', '--quant-method', name, '--json'])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report['quant_method'] == name and report['weight_bits'] == 4
    assert report['top1_after'] > 80.0  # LeNet-300-100 keeps most of its 89.8 % at W4
    loaded = lbyl_jax.load(out)
    assert loaded.raw is not None and loaded.meta['quant']['method'] == name
    assert ev.evaluate(loaded.variables, ds, progress=False)['top1'] == report['top1_after']

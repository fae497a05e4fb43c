"""Compensation on the real checkpoints: published numbers that must be reproduced exactly.

* LeNet-300-100 / FashionMNIST in reference-code mode reproduces the LBYL README table
  and the Neuron Merging L1 table (docs/published_results.md) within 0.1 points.
* Plain L2 pruning of the NM ResNet-56 equals the "Prune" row UDFC reports for this very file
  (76.95 / 24.34 at 30 / 50 %, docs/published_results.md), which pins the criterion, the kept
  count and the surgery; compensation beats it at 30 %, and BN-moments stays far above it at 50 %.
* On the akamaster ResNet-20, LBYL and NM beat plain pruning at 30 % with their defaults (bias
  correction on) and, as published (bias correction off), with the data-free moment guard.
* Joint UDFC with the bias correction beats joint UDFC without it at 30 % / W4.
"""

from __future__ import annotations

import functools

import pytest

import converters
from lbyl_jax import evaluation as evaluate_lib
from lbyl_jax import pipeline
from lbyl_jax.io import data as data_lib
from lbyl_jax.models import archs

pytestmark = pytest.mark.realdata

# The reference codes' forms of the method, the raw running variance as BN sigma, rounded kept
# count.
REF = dict(preset='reference_code')
LENET_LBYL_LAM = {0.5: 0.3, 0.6: 0.6, 0.7: 0.3, 0.8: 1e-6}
# (LBYL L2, NM L2, Prune L2) of the LBYL README and (Prune L1, NM L1) of the Neuron Merging paper.
LBYL_TABLE = {0.5: (88.83, None, 87.86), 0.6: (87.75, 88.07, 83.03), 0.7: (83.92, 83.27, 71.21),
              0.8: (78.05, 77.11, 63.9)}
NM_TABLE = {0.5: (88.40, 88.69), 0.6: (85.17, 86.92), 0.7: (71.26, 82.75), 0.8: (66.76, 80.02)}


@functools.cache
def _setup(shared, arch, weights, dataset):
  spec = archs.get(arch)
  variables = converters.load_variables(shared / 'weights' / weights, spec)
  ds = data_lib.load_dataset(str(shared / 'data' / dataset))
  return spec, variables, ds, evaluate_lib.Evaluator(spec, batch_size=1000)


def _top1(shared, arch, weights, dataset, **config):
  spec, variables, ds, ev = _setup(shared, arch, weights, dataset)
  res = pipeline.compress(spec, variables, **config)
  return ev.evaluate(res.variables, ds, widths=res.widths, progress=False)['top1']


def _lenet(shared, **config):
  return _top1(shared, 'lenet_300_100', 'lbyl_lenet_300_100.fashionmnist.pth.tar',
               'fashion_mnist_test.npz', **config)


@pytest.mark.parametrize('ratio', sorted(LBYL_TABLE))
def test_lenet_reference_mode_reproduces_published_tables(shared, ratio):
  lbyl_pub, nm_pub, prune_pub = LBYL_TABLE[ratio]
  prune_l1_pub, nm_l1_pub = NM_TABLE[ratio]
  got = dict(
      lbyl=_lenet(shared, method='lbyl', criterion='l2', ratio=ratio, lambda1=0.0,
                  lambda2=LENET_LBYL_LAM[ratio], **REF),
      prune=_lenet(shared, method='prune', criterion='l2', ratio=ratio, **REF),
      nm_l1=_lenet(shared, method='nm', criterion='l1', ratio=ratio, nm_t=0.45, **REF),
      prune_l1=_lenet(shared, method='prune', criterion='l1', ratio=ratio, **REF),
  )
  assert got['lbyl'] == pytest.approx(lbyl_pub, abs=0.1), got
  assert got['prune'] == pytest.approx(prune_pub, abs=0.1), got
  assert got['nm_l1'] == pytest.approx(nm_l1_pub, abs=0.1), got
  assert got['prune_l1'] == pytest.approx(prune_l1_pub, abs=0.1), got
  if nm_pub is not None:  # the 50 % NM cell of the LBYL table is a copy of its Prune cell
    nm = _lenet(shared, method='nm', criterion='l2', ratio=ratio, nm_t=0.45, **REF)
    assert nm == pytest.approx(nm_pub, abs=0.1)


NM56 = ('resnet56_b', 'nm_resnet56.cifar10.pth.tar', 'cifar10_test.npz')


def test_nm_resnet56_prune_row_and_compensation_at_30(shared):
  prune = _top1(shared, *NM56, method='prune', criterion='l2', ratio=0.3)
  assert prune == pytest.approx(76.95, abs=0.05)
  for method in ('nm', 'lbyl', 'bnm'):
    got = _top1(shared, *NM56, method=method, criterion='l2', ratio=0.3)
    assert got > prune + 5.0, (method, got, prune)


def test_nm_resnet56_bn_moments_at_50(shared):
  prune = _top1(shared, *NM56, method='prune', criterion='l2', ratio=0.5)
  assert prune == pytest.approx(24.34, abs=0.05)
  bnm = _top1(shared, *NM56, method='bnm', criterion='l2', ratio=0.5)
  assert bnm >= 63.25 - 0.5  # the BN-moments prototype's 63.25 (docs/published_results.md)


def test_bn_moments_prototype_lbyl_bias_correction_row_at_50(shared):
  """The BN-moments prototype's "LBYL + bias correction" row (36.00 at 50 %) with the prototype's lambdas
  (1e-2 / 1e-2, found by benchmarks/probes/lbyl_bc_prototype.py) and its all-taps fold."""
  got = _top1(shared, *NM56, method='lbyl', criterion='l2', ratio=0.5, lambda1=1e-2, lambda2=1e-2,
              bias_correction='on', bias_fold='all_taps')
  assert got == pytest.approx(36.00, abs=0.5)


def test_udfc_beats_round_to_nearest_at_w4(shared):
  """4-bit per-channel weights, no pruning (docs/quantization.md, rescale): the rescale must help.

  (With 30 % LBYL pruning, joint UDFC as written does NOT beat LBYL + RTN on this file;
  both with the default bias correction, it does by 0.23 points on this file and not on the
  akamaster ResNet-56 (-0.09); see benchmarks/RESULTS.md. That is reported, not asserted.)
  """
  spec, variables, ds, ev = _setup(shared, *NM56)
  acc, nbytes = {}, {}
  for q in ('rtn', 'udfc'):
    res = pipeline.compress(spec, variables, method='prune', ratio=0.0, quant_method=q, bits=4)
    acc[q] = ev.evaluate(res.variables, ds, widths=res.widths, progress=False)['top1']
    nbytes[q] = res.report['bytes_after']
  assert acc['udfc'] > acc['rtn'], acc
  assert acc['udfc'] > 92.0, acc
  assert nbytes['udfc'] == nbytes['rtn'] < 0.55 * res.report['bytes_before']


R20 = ('resnet20', 'resnet20-12fca82f.th', 'cifar10_test.npz')


def test_guard_makes_lbyl_and_nm_beat_pruning_on_akamaster_resnet20(shared):
  """akamaster ResNet-20 at 30 % (L2): plain LBYL falls below plain pruning here (46.79 vs 64.39,
  benchmarks/RESULTS.md: dead / sign-flipped BN channels). With the data-free moment guard both
  compensations beat pruning (measured 70.60 and 72.52)."""
  prune = _top1(shared, *R20, method='prune', criterion='l2', ratio=0.3)
  assert prune == pytest.approx(64.39, abs=0.05)
  for method in ('lbyl', 'nm'):
    got = _top1(shared, *R20, method=method, criterion='l2', ratio=0.3, guard='moments',
                bias_correction='off')
    assert got > prune + 3.0, (method, got, prune)


def test_default_lbyl_and_nm_beat_pruning_on_akamaster_resnet20(shared):
  """Issue 3's requirement on the checkpoint where the published forms fail it (LBYL 46.79, NM
  63.83 vs prune 64.39 at 30 %): the defaults (bias correction on) measured 77.04 and 67.08."""
  prune = _top1(shared, *R20, method='prune', criterion='l2', ratio=0.3)
  published = _top1(shared, *R20, method='lbyl', criterion='l2', ratio=0.3, bias_correction='off')
  assert published < prune  # the failure the default exists for; if it changes, revisit the default
  for method, margin in (('lbyl', 8.0), ('nm', 1.5)):
    got = _top1(shared, *R20, method=method, criterion='l2', ratio=0.3)
    assert got > prune + margin, (method, got, prune)


def test_joint_udfc_bias_correction_at_30_w4(shared):
  """NM ResNet-56, 30 % L2 + 4-bit weights, first 2000 test images (measured 89.00 vs 85.35)."""
  spec, variables, ds, ev = _setup(shared, *NM56)
  ds = ds.subset(2000)
  acc = {}
  for bc in ('on', 'off'):
    res = pipeline.compress(spec, variables, method='lbyl', criterion='l2', ratio=0.3,
                            bias_correction=bc, quant_method='udfc', bits=4)
    assert res.report['quant_report']['bias_correction'] is (bc == 'on')
    acc[bc] = ev.evaluate(res.variables, ds, widths=res.widths, progress=False)['top1']
  assert acc['on'] > acc['off'] + 2.0, acc

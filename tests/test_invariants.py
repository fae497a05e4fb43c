"""Pinned outputs: restored variables must stay bitwise identical through refactors.

Every configuration below (all methods, criterion families, bias-correction modes and folds, the
guard, the reference-code forms, float64 solves, every quantizer and the joint UDFC path) is
restored from a real checkpoint (or a seeded random one where no real weights exist) and the
SHA-256 of the result (widths, variable names, dtypes, shapes and bytes; the integer tree for a
quantized result) is compared with the value recorded in ``tests/invariant_digests.json`` before
the code was restructured. A few configurations are also evaluated on the first 1,000 CIFAR-10 /
FashionMNIST test images and their top-1 compared.

To record new digests after an INTENDED change of numerics: ``LBYL_JAX_RECORD_INVARIANTS=1 python
-m pytest tests/test_invariants.py`` and say why in the commit message.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from lbyl_jax import pipeline
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan
from lbyl_jax.io import data as data_lib
from lbyl_jax import evaluation as evaluate_lib

pytestmark = pytest.mark.realdata

DIGESTS = pathlib.Path(__file__).with_name('invariant_digests.json')
RECORD = os.environ.get('LBYL_JAX_RECORD_INVARIANTS') == '1'

R20 = ('resnet20', 'resnet20-12fca82f.th')
NM56 = ('resnet56_b', 'nm_resnet56.cifar10.pth.tar')
LENET = ('lenet_300_100', 'lbyl_lenet_300_100.fashionmnist.pth.tar')
VGG = ('vgg16_bn_cifar', None)    # random weights (seed 0): pools and the dense consumer
R50 = ('resnet50', None)          # random weights (seed 0): bottlenecks

REF = dict(preset='reference_code')

# name -> (model, plan options, quantization options or None, evaluate?). The options are those of
# lbyl_jax.plan.Plan.from_options; 'reference_code' sets the reference forms of the method, the raw
# running variance as BN sigma and rounding of the kept count, as four separate options once did.
CASES = {
    'r20-prune-l2-30': (R20, dict(method='prune', criterion='l2', ratio=0.3), None, True),
    'r20-nm-l2-30': (R20, dict(method='nm', criterion='l2', ratio=0.3), None, True),
    'r20-lbyl-l2-30': (R20, dict(method='lbyl', criterion='l2', ratio=0.3), None, True),
    'r20-bnm-l2-30': (R20, dict(method='bnm', criterion='l2', ratio=0.3), None, True),
    'r20-lbyl-l1-50-off': (R20, dict(method='lbyl', criterion='l1', ratio=0.5,
                                     bias_correction='off'), None, False),
    'r20-nm-l2gm-40-off': (R20, dict(method='nm', criterion='l2-gm', ratio=0.4,
                                     bias_correction='off'), None, False),
    'r20-lbyl-random-20': (R20, dict(method='lbyl', criterion='random', ratio=0.2, seed=3),
                           None, False),
    'r20-lbyl-guard': (R20, dict(method='lbyl', criterion='l2', ratio=0.3, guard='moments',
                                 bias_correction='off'), None, False),
    'r20-nm-guard-on': (R20, dict(method='nm', criterion='l2', ratio=0.3, guard='moments'),
                        None, False),
    'r20-lbyl-alltaps': (R20, dict(method='lbyl', criterion='l2', ratio=0.3,
                                   bias_fold='all_taps'), None, False),
    'r20-lbyl-f64': (R20, dict(method='lbyl', criterion='l2', ratio=0.3, dtype='float64'),
                     None, False),
    'r20-lbyl-overrides': (R20, dict(method='lbyl', criterion='l2', ratio=0.2,
                                     ratio_overrides=(('layer3_*/conv1', 0.5),)), None, False),
    'nm56-lbyl-l2-50': (NM56, dict(method='lbyl', criterion='l2', ratio=0.5), None, True),
    'nm56-bnm-auto-30': (NM56, dict(method='bnm', criterion='l2', ratio=0.3,
                                    bias_correction='auto'), None, False),
    'nm56-bnm-blend-40': (NM56, dict(method='bnm', criterion='l2', ratio=0.4,
                                     bias_correction='blend'), None, False),
    'nm56-bnm-on-identity': (NM56, dict(method='bnm', criterion='l2', ratio=0.3,
                                        bias_correction='on', bnm_cov='identity'), None, False),
    'nm56-lbyl-auto': (NM56, dict(method='lbyl', criterion='l2', ratio=0.3,
                                  bias_correction='auto'), None, False),
    'nm56-nm-blend': (NM56, dict(method='nm', criterion='l2', ratio=0.3,
                                 bias_correction='blend'), None, False),
    'nm56-lbyl-ref': (NM56, dict(method='lbyl', criterion='l2', ratio=0.3,
                                 lbyl_mode='reference_code', lambda1=0.3, lambda2=1e-2),
                      None, False),
    'nm56-nm-ref': (NM56, dict(method='nm', criterion='l2', ratio=0.3, nm_mode='reference_code',
                               bn_sigma='variance'), None, False),
    'lenet-lbyl-ref-70': (LENET, dict(method='lbyl', criterion='l2', ratio=0.7, lambda1=0.0,
                                      lambda2=0.3, **REF), None, True),
    'lenet-nm-ref-l1-60': (LENET, dict(method='nm', criterion='l1', ratio=0.6, nm_t=0.45, **REF),
                           None, False),
    'lenet-lbyl-70': (LENET, dict(method='lbyl', criterion='l2', ratio=0.7), None, False),
    'lenet-bnm-50': (LENET, dict(method='bnm', criterion='l2', ratio=0.5), None, False),
    'vgg-lbyl-30': (VGG, dict(method='lbyl', criterion='l2', ratio=0.3), None, False),
    'vgg-nm-30': (VGG, dict(method='nm', criterion='l2', ratio=0.3), None, False),
    'vgg-bnm-30': (VGG, dict(method='bnm', criterion='l2', ratio=0.3), None, False),
    'r50-lbyl-30': (R50, dict(method='lbyl', criterion='l2', ratio=0.3), None, False),
    'r50-nm-30-off': (R50, dict(method='nm', criterion='l1', ratio=0.3,
                                bias_correction='off'), None, False),
    'r20-rtn-w4': (R20, dict(method='lbyl', criterion='l2', ratio=0.3),
                   dict(bits=4, method='rtn'), True),
    'r20-udfc-joint-w4': (R20, dict(method='lbyl', criterion='l2', ratio=0.3),
                          dict(bits=4, method='udfc'), True),
    'r20-udfc-joint-w4-off': (R20, dict(method='lbyl', criterion='l2', ratio=0.3,
                                        bias_correction='off'), dict(bits=4, method='udfc'), False),
    'r20-udfc-after-nm-w6': (R20, dict(method='nm', criterion='l2', ratio=0.3),
                             dict(bits=6, method='udfc'), False),
    'r20-udfc-unpruned-w4': (R20, dict(method='prune', criterion='l2', ratio=0.0),
                             dict(bits=4, method='udfc'), False),
    'r20-dfq-w6': (R20, dict(method='prune', criterion='l2', ratio=0.0),
                   dict(bits=6, method='dfq', per_channel=False), True),
    'r20-rtn-w3-asym-ends': (R20, dict(method='prune', criterion='l2', ratio=0.2),
                             dict(bits=3, method='rtn', symmetric=False, keep_8bit_ends=False),
                             False),
    'lenet-udfc-w4': (LENET, dict(method='lbyl', criterion='l2', ratio=0.5),
                      dict(bits=4, method='udfc'), False),
    # DF-MPC on the presets' plain units (digests recorded with the code before DF-MPC learned
    # MobileNetV2 and user models, commit b9fdfe2).
    'r20-dfmpc-lbyl-w4': (R20, dict(method='lbyl', criterion='l2', ratio=0.3),
                          dict(bits=4, method='dfmpc'), False),
    'lenet-dfmpc-mixed-w3': (LENET, dict(method='lbyl', criterion='l2', ratio=0.5),
                             dict(bits=3, method='dfmpc', dfmpc_high_bits=8), False),
    'vgg-dfmpc-w4': (VGG, dict(method='prune', criterion='l2', ratio=0.3),
                     dict(bits=4, method='dfmpc'), False),
}


def tree_digest(widths, tree) -> str:
  """SHA-256 over the widths and every leaf's path, dtype, shape and bytes (sorted by path)."""
  h = hashlib.sha256(repr(tuple(int(w) for w in widths)).encode())
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  rows = sorted((jax.tree_util.keystr(p), np.ascontiguousarray(np.asarray(v))) for p, v in flat)
  for path, a in rows:
    h.update(f'{path}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


@functools.cache
def _variables(shared, arch, weights):
  spec = archs.get(arch)
  if weights is None:
    return spec, spec.init(0)
  import converters  # pylint: disable=import-outside-toplevel

  return spec, converters.load_variables(shared / 'weights' / weights, spec)


@functools.cache
def _evaluator(shared, arch):
  spec = archs.get(arch)
  name = 'fashion_mnist_test.npz' if spec.dataset == 'fashion_mnist' else 'cifar10_test.npz'
  ds = data_lib.load_dataset(str(shared / 'data' / name), limit=1000)
  return evaluate_lib.Evaluator(spec, batch_size=500), ds


def run_case(shared, name):
  (arch, weights), ropts, qopts, evaluate = CASES[name]
  spec, variables = _variables(shared, arch, weights)
  qopts = {} if qopts is None else {('quant_method' if k == 'method' else k): v
                                    for k, v in qopts.items()}
  result = pipeline.compress(spec, variables, Plan.from_options(**ropts, **qopts))
  tree = result.qtree if result.qtree is not None else result.variables
  out = {'digest': tree_digest(result.widths, tree)}
  if evaluate:
    ev, ds = _evaluator(shared, arch)
    out['top1'] = ev.evaluate(result.variables, ds, widths=result.widths, progress=False)['top1']
  return out


@pytest.fixture(scope='module')
def recorded():
  if RECORD:
    store = {}
    yield store
    DIGESTS.write_text(json.dumps(dict(sorted(store.items())), indent=1) + '\n')
    return
  yield json.loads(DIGESTS.read_text())


def test_every_case_is_recorded(recorded):
  if RECORD:
    pytest.skip('recording')
  assert sorted(recorded) == sorted(CASES)


@pytest.mark.parametrize('name', sorted(CASES))
def test_restore_output_is_unchanged(shared, recorded, name):
  if jax.default_backend() != 'cpu':
    pytest.skip('digests were recorded on the CPU backend')
  got = run_case(shared, name)
  if RECORD:
    recorded[name] = got
    return
  want = recorded[name]
  assert got['digest'] == want['digest'], f'{name}: restored variables changed'
  if 'top1' in want:
    assert got['top1'] == want['top1']


def test_digest_sees_a_one_ulp_change():
  tree = {'params': {'a': {'kernel': np.ones((2, 3), np.float32)}}}
  other = {'params': {'a': {'kernel': np.ones((2, 3), np.float32)}}}
  other['params']['a']['kernel'][1, 2] = np.nextafter(np.float32(1), np.float32(2))
  assert tree_digest((3,), tree) != tree_digest((3,), other)
  assert tree_digest((3,), tree) != tree_digest((4,), tree)
  same = {'params': {'a': {'kernel': np.ones((2, 3), np.float32)}}}
  assert tree_digest((3,), tree) == tree_digest((3,), same)

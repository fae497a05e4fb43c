"""Real weights and real test sets from ../shared: the proof that conversion is exact.

Each figure is the published (and independently reproduced) top-1 on the full test set; a correct
conversion must be within 0.05 points (DATA.md). Loaded models and compiled evaluators are shared
across this module.
"""

from __future__ import annotations

import functools

import pytest

import converters
from lbyl_jax.models import archs
from lbyl_jax.io import data as data_lib
from lbyl_jax import evaluation as evaluate_lib

pytestmark = pytest.mark.realdata

CHECKPOINTS = {
    'resnet20': ('resnet20-12fca82f.th', 'cifar10_test.npz', 91.73),
    'resnet56': ('resnet56-4bfd9763.th', 'cifar10_test.npz', 93.39),
    'resnet56_b': ('nm_resnet56.cifar10.pth.tar', 'cifar10_test.npz', 93.88),
}


@functools.cache
def _variables(shared, arch):
  return converters.load_variables(shared / 'weights' / CHECKPOINTS[arch][0], archs.get(arch))


@functools.cache
def _dataset(shared, name):
  return data_lib.load_dataset(str(shared / 'data' / name))


@functools.cache
def _evaluator(arch):
  return evaluate_lib.Evaluator(archs.get(arch), batch_size=1000)


@pytest.mark.parametrize('arch', sorted(CHECKPOINTS))
def test_cifar_checkpoint_accuracy(shared, arch):
  weights, dataset, expected = CHECKPOINTS[arch]
  ds = _dataset(shared, dataset)
  assert len(ds) == 10000
  report = _evaluator(arch).evaluate(_variables(shared, arch), ds, progress=False)
  assert report['n'] == 10000
  assert abs(report['top1'] - expected) <= 0.05, report
  assert report['top5'] >= report['top1']


def test_lenet_fashion_mnist_from_idx_gz(shared):
  spec = archs.get('lenet_300_100')
  variables = converters.load_variables(
      shared / 'weights' / 'lbyl_lenet_300_100.fashionmnist.pth.tar', spec)
  ds = data_lib.load_dataset(str(shared / 'data' / 'fashion-mnist'))
  assert len(ds) == 10000
  report = evaluate_lib.Evaluator(spec, batch_size=2000).evaluate(variables, ds, progress=False)
  assert abs(report['top1'] - 89.80) <= 0.05, report

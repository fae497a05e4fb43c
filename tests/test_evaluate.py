"""Evaluator: counts against NumPy float64 references, padding, caching, multi-device, CLI."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from lbyl_jax import evaluation as evaluate
from lbyl_jax.cli import evaluate as evaluate_cli
from lbyl_jax.io import data
from lbyl_jax.models import archs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def random_variables(spec: archs.ArchSpec, widths=None, seed: int = 0):
  """He-scaled random NumPy variables with well-conditioned BN statistics (no eager JAX init)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    if name in ('var', 'scale'):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    if name == 'kernel':
      std = np.sqrt(2.0 / np.prod(x.shape[:-1]))
      return (std * rng.standard_normal(x.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, spec.abstract_variables(widths))


def case(n: int = 103, widths: tuple[int, ...] | None = None):
  """A random LeNet-300-100 (maybe pruned) and random grayscale data, the same in any process."""
  spec = archs.get('lenet_300_100')
  variables = random_variables(spec, widths)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, n)
  return spec, variables, data.ArrayDataset(images, labels, name='random')


def mlp_logits64(variables, images: np.ndarray) -> np.ndarray:
  """LeNet forward in float64 NumPy: (x/255 - 0.5)/0.5, flatten, Dense-ReLU-Dense-ReLU-Dense."""
  p = variables['params']
  x = (images.reshape(len(images), -1).astype(np.float64) / 255.0 - 0.5) / 0.5
  for name in ('ip1', 'ip2'):
    x = np.maximum(x @ p[name]['kernel'].astype(np.float64) + p[name]['bias'], 0.0)
  return x @ p['ip3']['kernel'].astype(np.float64) + p['ip3']['bias']


def topk_counts(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
  order = np.argsort(-logits, axis=1, kind='stable')
  top1 = int(np.sum(order[:, 0] == labels))
  top5 = int(np.sum(np.any(order[:, :5] == labels[:, None], axis=1)))
  return top1, top5


@pytest.fixture(scope='module')
def evaluator():
  return evaluate.Evaluator('lenet_300_100', batch_size=32)


@pytest.mark.parametrize('widths', [None, (200, 50)])
def test_counts_match_numpy(evaluator, widths):
  spec, variables, ds = case(widths=widths)
  logits = mlp_logits64(variables, ds.images)
  # Examples whose rank-1/2 or rank-5/6 logits nearly tie may rank differently in float32: they
  # are left out of the exact comparison.
  srt = np.sort(logits, axis=1)
  near = (srt[:, -1] - srt[:, -2] < 1e-3) | (srt[:, -5] - srt[:, -6] < 1e-3)
  assert near.sum() <= 3
  safe = data.ArrayDataset(ds.images[~near], ds.labels[~near], name='safe')
  n = len(safe)
  assert n % 32 != 0  # the last batch is padded
  top1, top5 = topk_counts(logits[~near], ds.labels[~near])
  assert 0 < top1 < top5 < n  # a test of ranking, not of a degenerate model
  r = evaluator.evaluate(variables, safe, progress=False)
  assert r['n'] == n
  assert r['top1'] == pytest.approx(100 * top1 / n, abs=1e-9)
  assert r['top5'] == pytest.approx(100 * top5 / n, abs=1e-9)
  assert r['seconds'] > 0


def test_compiled_once_per_widths():
  spec, full, ds = case()
  _, pruned, _ = case(widths=(120, 30))
  ev = evaluate.Evaluator(spec, batch_size=32)
  r1 = ev.evaluate(pruned, ds, progress=False)
  assert r1['compile_seconds'] > 0 and len(ev._compiled) == 1  # pylint: disable=protected-access
  r2 = ev.evaluate(pruned, ds, widths=(120, 30), progress=False)
  assert r2['compile_seconds'] == 0.0 and (r1['top1'], r1['top5']) == (r2['top1'], r2['top5'])
  r3 = ev.evaluate(full, ds.subset(50), progress=True)
  assert r3['compile_seconds'] > 0 and len(ev._compiled) == 2  # pylint: disable=protected-access
  # Original widths given explicitly, or new values of the same shapes (a sweep): no recompile.
  assert ev.evaluate(full, ds, widths=(300, 100), progress=False)['compile_seconds'] == 0.0
  other = jax.tree_util.tree_map(lambda x: -x, full)
  r5 = ev.evaluate(other, ds, progress=False)
  assert r5['compile_seconds'] == 0.0 and len(ev._compiled) == 2  # pylint: disable=protected-access
  assert set(ev.compile_seconds) == {None, (120, 30)}
  assert ev.widths_key(full) is None and ev.widths_key(pruned) == (120, 30)


def test_padded_rows_are_masked():
  spec, variables, _ = case()
  variables['params']['ip3']['bias'] = np.asarray([1e4] + [0.0] * 9, np.float32)  # always class 0
  one = data.ArrayDataset(np.zeros((1, 28, 28), np.uint8), np.asarray([7]), name='one')
  ev = evaluate.Evaluator(spec, batch_size=64)
  r = ev.evaluate(variables, one, progress=False)
  assert r['n'] == 1 and r['top1'] == 0.0  # 63 padded rows of label 0 would all be "correct"
  zeros = data.ArrayDataset(np.zeros((3, 28, 28), np.uint8), np.zeros(3, int), name='zeros')
  assert ev.evaluate(variables, zeros, progress=False)['top1'] == 100.0


def test_conv_model_matches_direct_apply():
  spec = archs.get('resnet20')
  variables = random_variables(spec, seed=1)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 20)
  x = (images / 255.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
  logits = np.asarray(jax.jit(spec.build().apply)(variables, x.astype(np.float32)), np.float64)
  top1, top5 = topk_counts(logits, labels)
  r = evaluate.Evaluator(spec, batch_size=8).evaluate(
      variables, data.ArrayDataset(images, labels, name='r'), progress=False)
  assert (r['top1'], r['top5']) == pytest.approx((100 * top1 / 20, 100 * top5 / 20), abs=1e-9)


def test_errors(evaluator):
  spec, variables, _ = case()
  rgb = data.ArrayDataset(np.zeros((2, 28, 28, 3), np.uint8), np.zeros(2, int), name='rgb')
  with pytest.raises(ValueError, match=r'\(28, 28, 3\), lenet_300_100 expects \(28, 28, 1\)'):
    evaluator.evaluate(variables, rgb, progress=False)
  with pytest.raises(ValueError, match='expected 2 widths'):
    evaluator.evaluate(variables, case(n=2)[2], widths=(300,), progress=False)
  with pytest.raises(ValueError, match='batch_size'):
    evaluate.Evaluator(spec, batch_size=0)

  with pytest.raises(ValueError, match='empty'):
    evaluator.predictions(variables, case(n=0)[2], progress=False)


@pytest.mark.parametrize('widths', [None, (200, 50)])
def test_predictions_match_numpy_and_evaluate(evaluator, widths):
  spec, variables, ds = case(widths=widths)
  logits = mlp_logits64(variables, ds.images)
  srt = np.sort(logits, axis=1)
  near = srt[:, -1] - srt[:, -2] < 1e-3  # float32 may order a near tie differently
  assert near.sum() <= 3
  r = evaluator.predictions(variables, ds, progress=False)
  assert r['pred'].shape == r['labels'].shape == r['correct'].shape == (len(ds),)
  np.testing.assert_array_equal(r['pred'][~near], np.argmax(logits, axis=1)[~near])
  np.testing.assert_array_equal(r['labels'], ds.labels)  # the dataset's order, padding dropped
  np.testing.assert_array_equal(r['correct'], r['pred'] == ds.labels)
  acc = evaluator.evaluate(variables, ds, progress=False)
  assert 100.0 * r['correct'].mean() == pytest.approx(acc['top1'], abs=1e-9)
  assert len(ds) % evaluator.batch_size != 0  # the padded tail was exercised


def test_paired_comparison_against_reference():
  import scipy.stats

  rng = np.random.default_rng(3)
  n = 1000
  a = rng.random(n) < 0.8
  b = np.where(rng.random(n) < 0.1, ~a, a)  # 10 % of the examples flipped
  c = evaluate.paired_comparison(a, b)
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
  assert (c['only_a'], c['only_b'], c['n']) == (only_a, only_b, n) and only_a + only_b > 50
  assert c['diff'] == pytest.approx(100 * (a.mean() - b.mean()), abs=1e-12)
  assert (c['top1_a'], c['top1_b']) == pytest.approx((100 * a.mean(), 100 * b.mean()))
  assert c['mcnemar_p'] == pytest.approx(
      scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-12)
  d = a.astype(np.float64) - b  # the per-example differences
  half = 196.0 * d.std(ddof=1) / np.sqrt(n)
  assert c['ci95'] == pytest.approx((c['diff'] - half, c['diff'] + half), rel=1e-12)
  # Hand cases: ten discordant examples all for A give p = 2 / 2^10; nothing discordant, p = 1.
  a10 = np.r_[np.ones(10, bool), np.zeros(90, bool)]
  assert evaluate.paired_comparison(a10, np.zeros(100, bool))['mcnemar_p'] == pytest.approx(2 / 1024)
  same = evaluate.paired_comparison(a, a)
  assert (same['diff'], same['mcnemar_p'], same['ci95']) == (0.0, 1.0, (0.0, 0.0))
  swapped = evaluate.paired_comparison(b, a)
  assert swapped['diff'] == -c['diff'] and swapped['mcnemar_p'] == pytest.approx(c['mcnemar_p'])


def test_paired_comparison_errors():
  with pytest.raises(ValueError, match=r'equal length, got shapes \(3,\) and \(2,\)'):
    evaluate.paired_comparison(np.ones(3, bool), np.ones(2, bool))
  with pytest.raises(ValueError, match='non-empty'):
    evaluate.paired_comparison(np.ones(0, bool), np.ones(0, bool))
  with pytest.raises(ValueError, match='1-D'):
    evaluate.paired_comparison(np.ones((2, 2), bool), np.ones((2, 2), bool))


_MULTI = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
from lbyl_jax import evaluation as evaluate
import test_evaluate as t
spec, variables, ds = t.case()
ev = evaluate.Evaluator(spec, batch_size=30)
r = ev.evaluate(variables, ds, progress=False)
exe = next(iter(ev._compiled.values()))
r.update(devices=ev.num_devices, batch_size=ev.batch_size,
         image_devices=len(exe.input_shardings[0][1].device_set))
print(json.dumps(r))
"""


@pytest.mark.slow
def test_four_devices_equal_one():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run([sys.executable, '-c', _MULTI.format(tests=str(ROOT / 'tests'))], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  multi = json.loads(out.stdout.strip().splitlines()[-1])
  assert multi['devices'] == 4 and multi['image_devices'] == 4
  assert multi['batch_size'] == 32  # 30 rounded up to a multiple of 4; 103 is not a multiple
  spec, variables, ds = case()
  single = evaluate.Evaluator(spec, batch_size=30).evaluate(variables, ds, progress=False)
  assert (multi['n'], multi['top1'], multi['top5']) == (single['n'], single['top1'], single['top5'])


# --------------------------------------------------------------------------------------------
# Real weights and data


@pytest.mark.realdata
def test_resnet20_cifar10_accuracy(shared):
  converters = pytest.importorskip('converters')
  spec = archs.get('resnet20')
  variables = converters.load_variables(shared / 'weights' / 'resnet20-12fca82f.th', spec)
  ds = data.load_dataset(str(shared / 'data' / 'cifar10_test.npz'), arch=spec)
  r = evaluate.Evaluator(spec, batch_size=500).evaluate(variables, ds, progress=False)
  assert r['n'] == 10000
  assert abs(r['top1'] - 91.73) <= 0.05, r


@pytest.mark.realdata
def test_cli_lenet_fashion_mnist(shared, capsys):
  """The CLI end to end; every prediction checked against a float64 NumPy forward pass."""
  converters = pytest.importorskip('converters')
  evaluate_cli.main(['--arch', 'lenet_300_100', '--weights', str(shared / 'weights'),
                 '--data', str(shared / 'data' / 'fashion-mnist'), '--batch-size', '1000',
                 '--json', '--no-progress', '--no-download'])
  lines = capsys.readouterr().out.strip().splitlines()
  report = json.loads(lines[-1])
  assert 'top-1' in lines[0] + lines[1]
  assert set(report) >= {'arch', 'weights', 'data', 'n', 'top1', 'top5', 'seconds'}
  assert report['arch'] == 'lenet_300_100' and report['n'] == 10000
  assert report['weights'] == str(shared / 'weights' / 'lbyl_lenet_300_100.fashionmnist.pth.tar')
  assert abs(report['top1'] - 89.80) <= 0.05
  spec = archs.get('lenet_300_100')
  variables = converters.load_variables(report['weights'], spec)
  ds = data.load_dataset(str(shared / 'data' / 'fashion-mnist'))
  top1, top5 = topk_counts(mlp_logits64(variables, ds.images), ds.labels)
  assert round(report['top1'] * 100) == top1 and round(report['top5'] * 100) == top5


PROG = 'python -m lbyl_jax.evaluate'


def cli_error(capsys, argv, match, code=1):
  """Runs the evaluate CLI expecting an error: exit ``code`` (1: expected error, one line
  '<prog>: error: ...' on stderr; 2: usage error) and a message matching ``match``."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exc:
    evaluate_cli.main(argv)
  assert exc.value.code == code
  err = capsys.readouterr().err
  if code == 1:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'{PROG}: error: '), err
  assert re.search(match, err), err


def test_cli_errors(tmp_path, capsys):
  cli_error(capsys, ['--arch', 'resnet20', '--weights', str(tmp_path / 'nope.th'),
                     '--no-download'], 'does not exist')
  cli_error(capsys, ['--arch', 'no_such_arch'], "invalid choice: 'no_such_arch'", code=2)
  cli_error(capsys, ['--arch', 'lenet_300_100', '--weights', str(tmp_path)],
            'directory without lbyl_lenet_300_100')
  cli_error(capsys, [str(tmp_path), '--no-download'], 'not an lbyl_jax checkpoint directory')


def test_cli_compare(tmp_path, capsys):
  """--compare: two saved checkpoints (one pruned) on the same examples, against the API."""
  from lbyl_jax.io import checkpoint

  spec, full, ds = case(n=157)
  _, pruned, _ = case(widths=(120, 30))
  run_a = checkpoint.save(tmp_path / 'a', spec.name, None, full)
  run_b = checkpoint.save(tmp_path / 'b', spec.name, (120, 30), pruned, meta={'ratio': 0.6})
  npz = tmp_path / 'd.npz'
  np.savez(npz, images=ds.images, labels=ds.labels)
  evaluate_cli.main(['--compare', str(run_a), str(run_b), '--data', str(npz), '--batch-size', '64',
                 '--json', '--no-progress', '--no-download'])
  lines = capsys.readouterr().out.strip().splitlines()
  report = json.loads(lines[-1])
  ev = evaluate.Evaluator(spec, batch_size=64)
  ca = ev.predictions(full, ds, progress=False)['correct']
  cb = ev.predictions(pruned, ds, widths=(120, 30), progress=False)['correct']
  expected = evaluate.paired_comparison(ca, cb)
  assert report['n'] == 157 and report['arch'] == 'lenet_300_100'
  assert report['only_a'] + report['only_b'] > 0  # two different models: a non-trivial test
  for k in ('top1_a', 'top1_b', 'diff', 'only_a', 'only_b', 'mcnemar_p'):
    assert report[k] == pytest.approx(expected[k], abs=1e-12), k
  assert report['ci95'] == pytest.approx(list(expected['ci95']), abs=1e-12)
  assert report['a'] == str(run_a) and 'McNemar' in lines[-2]
  # A saved run as the positional RUN_DIR: its own architecture and widths, the same accuracy.
  evaluate_cli.main([str(run_b), '--data', str(npz), '--batch-size', '64', '--json',
                     '--no-progress', '--no-download'])
  single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert single['arch'] == 'lenet_300_100' and single['n'] == 157
  assert single['top1'] == pytest.approx(100.0 * cb.mean(), abs=1e-9)


def test_cli_compare_errors(tmp_path, capsys):
  from lbyl_jax.io import checkpoint

  # Neither a run, nor --arch, nor --compare.
  cli_error(capsys, ['--no-download'], 'give a checkpoint directory, or --arch ARCH')
  spec, full, _ = case(n=2)
  run_a = checkpoint.save(tmp_path / 'a', spec.name, None, full)
  r20 = checkpoint.save(tmp_path / 'r', 'resnet20', None, random_variables(archs.get('resnet20')))
  cli_error(capsys, ['--compare', str(run_a), str(r20), '--no-download'],
            'one architecture, got lenet_300_100 .* and resnet20')
  cli_error(capsys, ['--compare', str(run_a), str(tmp_path), '--no-download'],
            'not an lbyl_jax checkpoint')
  cli_error(capsys, ['--compare', str(run_a), str(run_a), '--arch', 'resnet20', '--no-download'],
            '--arch resnet20 does not match')
  cli_error(capsys, [str(run_a), '--compare', str(run_a), str(run_a), '--no-download'],
            '--compare takes the two runs')

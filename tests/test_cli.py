"""End-to-end tests of ``python -m lbyl_jax.restore`` on the real LeNet-300-100 / FashionMNIST files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lbyl_jax
from lbyl_jax import evaluation as evaluate_lib
from lbyl_jax import pipeline
from lbyl_jax.cli import restore as cli
from lbyl_jax.io import data as data_lib
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan

pytestmark = pytest.mark.realdata

LENET = 'lbyl_lenet_300_100.fashionmnist.pth.tar'


def _args(shared, out, *extra):
  return ['--arch', 'lenet_300_100', '--weights', str(shared / 'weights' / LENET),
          '--data', str(shared / 'data' / 'fashion_mnist_test.npz'), '--out', str(out),
          '--no-progress', '--no-download', *extra]


def _dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope='module')
def lenet_eval(shared):
  spec = archs.get('lenet_300_100')
  ds = data_lib.load_dataset(str(shared / 'data' / 'fashion_mnist_test.npz'))
  return spec, ds, evaluate_lib.Evaluator(spec, batch_size=2500)


def test_restore_cli_report_and_reload(shared, tmp_path, lenet_eval, capsys):
  spec, ds, ev = lenet_eval
  out = tmp_path / 'run'
  cli.main(_args(shared, out, '--method', 'lbyl', '--ratio', '0.5', '--json'))
  stdout = capsys.readouterr().out
  report = json.loads(stdout.strip().splitlines()[-1])
  for key in ('arch', 'method', 'criterion', 'ratio', 'params_before', 'params_after', 'flops_before',
              'flops_after', 'top1_before', 'top1_after', 'solve_seconds', 'compile_seconds', 'layers'):
    assert key in report, key
  assert report['top1_before'] == pytest.approx(89.80, abs=0.05)
  assert report['params_after'] < report['params_before']
  assert [l['width_after'] for l in report['layers']] == [150, 50]
  assert 'ip1' in stdout and 'top-1' in stdout  # the width table and the summary were printed
  on_disk = json.loads((out / 'report.json').read_text())
  assert on_disk['top1_after'] == report['top1_after']

  loaded = lbyl_jax.load(out)
  assert loaded.meta['arch'] == 'lenet_300_100' and tuple(loaded.meta['widths']) == (150, 50)
  again = ev.evaluate(loaded.variables, ds, progress=False)
  assert again['top1'] == report['top1_after']


def test_existing_out_is_refused_and_untouched(shared, tmp_path, capsys):
  out = tmp_path / 'run'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(SystemExit) as exc:
    cli.main(_args(shared, out, '--ratio', '0.5'))
  assert exc.value.code == 1
  assert (out / 'keep.txt').read_text() == 'mine'
  # A directory this tool did not write is never replaced, not even with --overwrite.
  with pytest.raises(SystemExit) as exc:
    cli.main(_args(shared, out, '--ratio', '0.5', '--overwrite'))
  assert exc.value.code == 1
  err = capsys.readouterr().err
  assert 'not a directory this tool wrote' in err
  # Expected errors are one line: 'python -m lbyl_jax.restore: error: ...'.
  errors = [ln for ln in err.splitlines() if ln.startswith('python -m lbyl_jax.restore: error: ')]
  assert len(errors) == 2 and 'Traceback' not in err
  assert sorted(p.name for p in out.iterdir()) == ['keep.txt']
  # An earlier result of ours is replaced with --overwrite.
  run = tmp_path / 'ours'
  cli.main(_args(shared, run, '--ratio', '0.5'))
  first = json.loads((run / 'report.json').read_text())
  cli.main(_args(shared, run, '--ratio', '0.6', '--overwrite'))
  second = json.loads((run / 'report.json').read_text())
  assert (first['ratio'], second['ratio']) == (0.5, 0.6)


@pytest.mark.parametrize('bad,code', [(['--ratio', '1.0'], 1), (['--ratio', '-0.1'], 1),
                                      (['--method', 'magic'], 2), (['--criterion', 'l3'], 2),
                                      (['--weight-bits', '9'], 1),
                                      (['--method', 'lbyl', '--nm-t', '0.2'], 1)])
def test_bad_arguments_fail_before_writing(shared, tmp_path, bad, code):
  out = tmp_path / 'run'
  with pytest.raises(SystemExit) as exc:
    cli.main(_args(shared, out, *bad))
  assert exc.value.code == code  # 1: expected error, 2: usage error found by the parser
  assert not out.exists()
  assert not list(tmp_path.iterdir())


def test_quantized_checkpoint_is_smaller_and_reloads(shared, tmp_path, lenet_eval, capsys):
  spec, ds, ev = lenet_eval
  float_out, q_out = tmp_path / 'f', tmp_path / 'q'
  cli.main(_args(shared, float_out, '--method', 'lbyl', '--ratio', '0.5'))
  cli.main(_args(shared, q_out, '--method', 'lbyl', '--ratio', '0.5', '--weight-bits', '4',
                 '--quant-method', 'rtn', '--json'))
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['weight_bits'] == 4 and report['quant_method'] == 'rtn'
  assert report['bytes_after'] < report['bytes_after_float'] / 3
  # The files on disk shrink too (int4 packed two per byte; first/last layer at 8 bits).
  assert _dir_bytes(q_out / 'variables') < 0.45 * _dir_bytes(float_out / 'variables')
  loaded = lbyl_jax.load(q_out)
  assert loaded.raw is not None
  again = ev.evaluate(loaded.variables, ds, progress=False)
  assert again['top1'] == report['top1_after']


def test_sweep_writes_table_json_and_plot(shared, tmp_path, capsys):
  out = tmp_path / 'sweep'
  cli.main(_args(shared, out, '--sweep', '--methods', 'prune,lbyl', '--ratios', '0.5,0.7', '--json'))
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = summary['rows']
  assert len(rows) == 4
  assert {(r['method'], r['ratio']) for r in rows} == {('prune', 0.5), ('prune', 0.7), ('lbyl', 0.5), ('lbyl', 0.7)}
  for name in ('sweep.json', 'sweep.md', 'sweep.png'):
    assert (out / name).stat().st_size > 0
  by = {(r['method'], r['ratio']): r['top1_after'] for r in rows}
  assert by[('lbyl', 0.7)] > by[('prune', 0.7)] + 5  # compensation matters at 70 %


def test_entry_point_json_last_line(shared, tmp_path):
  out = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-m', 'lbyl_jax.restore', *_args(shared, out, '--ratio', '0.6', '--json')],
                        capture_output=True, text=True, timeout=300, check=True)
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['ratio'] == 0.6 and report['top1_after'] is not None
  assert report['method'] == 'lbyl' and report['bias_correction'] == 'on'  # the default for lbyl


def test_compress_is_pure(shared):
  import converters

  spec = archs.get('lenet_300_100')
  variables = converters.load_variables(shared / 'weights' / LENET, spec)
  before = {k: np.array(v['kernel']) for k, v in variables['params'].items()}
  plan = Plan.from_options(method='lbyl', ratio=0.5, quant_method='rtn', bits=6)
  a = pipeline.compress(spec, variables, plan)
  b = pipeline.compress(spec, variables, plan)
  for k, v in before.items():
    np.testing.assert_array_equal(v, variables['params'][k]['kernel'])
  for k in a.variables['params']:
    np.testing.assert_array_equal(a.variables['params'][k]['kernel'], b.variables['params'][k]['kernel'])


def test_joint_udfc_bias_correction_follows_the_config(shared):
  import converters

  spec = archs.get('lenet_300_100')
  variables = converters.load_variables(shared / 'weights' / LENET, spec)
  q = dict(quant_method='udfc', bits=4)
  for extra, flag in ((dict(bias_correction='auto'), '--bias-correction auto'),
                      (dict(guard='moments'), '--guard'), (dict(lambda2=0.1), '--lambda2'),
                      (dict(lbyl_mode='reference_code'), '--lbyl-mode reference_code')):
    with pytest.raises(ValueError, match=f'--quant-method udfc with --method lbyl computes its own'
                       f' pruning delivery .* so {flag} would do nothing there'):
      pipeline.compress(spec, variables, method='lbyl', ratio=0.5, **extra, **q)
  for bc, want in ((None, True), ('on', True), ('off', False)):
    res = pipeline.compress(spec, variables, method='lbyl', ratio=0.5, bias_correction=bc, **q)
    assert res.report['bias_correction'] == ('on' if want else 'off')
    assert res.report['quant_report']['bias_correction'] is want
    unit = res.report['quant_report']['units']['ip1']
    assert ('mean_shift' in unit) is want


def test_guard_and_bias_flags_reach_the_report(shared, tmp_path, capsys):
  out = tmp_path / 'guarded'
  cli.main(_args(shared, out, '--method', 'nm', '--ratio', '0.6', '--guard', 'moments',
                 '--bias-correction', 'on', '--bias-fold', 'all_taps', '--json'))
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['options']['guard'] == 'moments' and report['options']['bias_fold'] == 'all_taps'
  for layer in report['layers']:
    d = layer['diagnostics']
    assert d['guard'] == 'moments' and 0.0 <= d['guard_t_mean'] <= 1.0
    assert d['guard_pred_error'] <= min(d['guard_pred_error_method'], 1.0) + 1e-9
  assert 10.0 < report['top1_after'] <= 100.0

"""The benchmark scripts' --quick modes run end to end (their numbers live in benchmarks/)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=900):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=True)


def test_solver_speed_quick(tmp_path):
  out = tmp_path / 'solver.json'
  proc = _run('benchmarks/solver_speed.py', '--quick', '--out', str(out))
  run = json.loads(out.read_text())
  assert [r['arch'] for r in run['results']] == ['resnet18', 'resnet50']
  for r in run['results']:
    assert r['batched_f32']['warm_s'] > 0 and r['batched_f32']['compiles'] >= 1
    assert r['numpy_per_filter']['extrapolated'] is True
    lay = r['per_layer']
    assert len(lay) == r['units'] and all(x['unbatched_f32_s'] > 0 for x in lay)
    measured = [x for x in lay if 'numpy_per_filter_s' in x]
    assert 0 < len(measured) == r['numpy_per_filter']['measured_units'] < len(lay)
  assert '| resnet50 | 0.3 |' in proc.stdout
  assert 'unbatched f32 per layer' in proc.stdout
  compare = _run('benchmarks/solver_speed.py', '--compare', str(out), str(out))
  assert 'resnet50' in compare.stdout


@pytest.mark.realdata
def test_reproduce_quick_and_render(shared, tmp_path):
  res = tmp_path / 'results'
  md = tmp_path / 'RESULTS.md'
  _run('benchmarks/reproduce.py', '--quick', '--results-dir', str(res), '--render', '--results-md', str(md),
       '--suite', 'restore', '--suite', 'lenet')
  rows = [json.loads(l) for f in res.glob('*.jsonl') for l in f.read_text().splitlines()]
  assert any(r['method'] == 'lbyl' and r['arch'] == 'resnet20' for r in rows)
  assert all(r['n'] == 500 for r in rows)
  text = md.read_text()
  assert '### resnet20' in text and (tmp_path / 'plots' / 'resnet20_l2.png').stat().st_size > 0
  # Resuming skips rows already computed.
  before = sum(1 for _ in res.glob('*.jsonl') for _ in _.read_text().splitlines())
  _run('benchmarks/reproduce.py', '--quick', '--results-dir', str(res), '--suite', 'restore')
  after = sum(1 for _ in res.glob('*.jsonl') for _ in _.read_text().splitlines())
  assert after == before


def test_throughput_quick(tmp_path):
  out = tmp_path / 't.json'
  _run('benchmarks/throughput.py', '--quick', '--out', str(out))
  run = json.loads(out.read_text())
  assert [r['ratio'] for r in run['results']] == [0.0, 0.5]
  assert run['results'][1]['flops'] < run['results'][0]['flops']


def test_significance_section(tmp_path):
  """RESULTS.md's table of paired comparisons, and its plot, from the probe's summary file."""
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import report
  from lbyl_jax import evaluation as evaluate

  res, plots = tmp_path / 'results', tmp_path / 'plots'
  res.mkdir()
  assert 'not run yet' in '\n'.join(report.significance_section(res, plots))
  a = np.r_[np.ones(60, bool), np.zeros(40, bool)]
  b = np.r_[np.ones(50, bool), np.zeros(50, bool)]
  summary = {'x vs y': evaluate.paired_comparison(a, b), 'y vs x': evaluate.paired_comparison(b, a)}
  (res / 'paired_significance.json').write_text(json.dumps(summary))
  lines = report.significance_section(res, plots)
  assert '| x vs y | 60.00 | 50.00 | +10.00 |' in '\n'.join(lines)
  assert '| 10 | 0 | 0.00195 |' in lines[-5] and '| -10.00 |' in lines[-4]
  assert (plots / 'paired_significance.png').stat().st_size > 0

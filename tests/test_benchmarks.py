"""The benchmark scripts run as modules of the `benchmarks` package: their --quick modes end to
end, the sweep jobs' translation to plans, the probes' main guards, and RESULTS.md as a rendering
of the committed results (their numbers live in benchmarks/)."""

from __future__ import annotations

import importlib
import json
import pathlib
import pkgutil
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import probes
from benchmarks import report
from benchmarks import reproduce
from benchmarks import verify_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=900):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=True)


def test_solver_speed_quick(tmp_path):
  out = tmp_path / 'solver.json'
  proc = _run('benchmarks.solver_speed', '--quick', '--out', str(out))
  run = json.loads(out.read_text())
  assert run['command'].startswith('python -m benchmarks.solver_speed --quick')
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
  compare = _run('benchmarks.solver_speed', '--compare', str(out), str(out))
  assert 'resnet50' in compare.stdout


@pytest.mark.realdata
def test_reproduce_quick_and_render(shared, tmp_path):
  res = tmp_path / 'results'
  md = tmp_path / 'RESULTS.md'
  _run('benchmarks.reproduce', '--quick', '--results-dir', str(res), '--render', '--results-md',
       str(md), '--suite', 'restore', '--suite', 'lenet')
  rows = [json.loads(l) for f in res.glob('*.jsonl') for l in f.read_text().splitlines()]
  assert any(r['method'] == 'lbyl' and r['arch'] == 'resnet20' for r in rows)
  assert all(r['n'] == 500 for r in rows)
  # The LeNet reference-code job ran through preset='reference_code'.
  assert any(r['arch'] == 'lenet_300_100' and r.get('tag') == 'reference' and r['method'] == 'lbyl'
             for r in rows)
  text = md.read_text()
  assert text.startswith('# Results') and '## Headline' in text
  assert '### resnet20' in text and (tmp_path / 'plots' / 'resnet20_l2.png').stat().st_size > 0
  # Resuming skips rows already computed.
  before = sum(1 for _ in res.glob('*.jsonl') for _ in _.read_text().splitlines())
  _run('benchmarks.reproduce', '--quick', '--results-dir', str(res), '--suite', 'restore')
  after = sum(1 for _ in res.glob('*.jsonl') for _ in _.read_text().splitlines())
  assert after == before


def test_throughput_quick(tmp_path):
  out = tmp_path / 't.json'
  _run('benchmarks.throughput', '--quick', '--out', str(out))
  run = json.loads(out.read_text())
  assert run['command'].startswith('python -m benchmarks.throughput --quick')
  assert [r['ratio'] for r in run['results']] == [0.0, 0.5]
  assert run['results'][1]['flops'] < run['results'][0]['flops']


def test_stored_rows_keep_their_keys_and_translate_to_plans():
  """Every committed row is found again by its job's key, every suite job is a committed row,
  and every job's options become a valid plan (an unused option would be an error)."""
  rows = {k: r for k, r in reproduce.stored_rows().items() if r['method'] != 'baseline'}
  assert len(rows) > 400
  for key, row in rows.items():
    assert verify_rows.job_of(row).key() == key
  jobs = {j.key(): j for suite in reproduce.SUITES.values() for j in suite(False)}
  assert set(jobs) == set(rows)
  for job in jobs.values():
    plan = reproduce.job_plan(job)
    assert (plan.method.name, plan.selection.criterion, plan.selection.ratio) == (
        job.method, job.criterion, job.ratio)
    assert (None if plan.quantizer is None else (plan.quantizer.name, plan.quantizer.bits)) == (
        None if job.bits is None else (job.quant_method, job.bits))
    opts = dict(job.options)
    if 'bias_correction' in opts:
      assert plan.bias_correction == opts['bias_correction']


def test_reference_jobs_become_the_preset():
  ref = [j for j in reproduce.lenet_jobs(False) if j.tag == 'reference']
  assert {j.method for j in ref} == {'prune', 'lbyl', 'nm'}
  for job in ref:
    opts = reproduce.plan_options(job)
    assert opts['preset'] == 'reference_code'
    assert not set(opts) & {'lbyl_mode', 'nm_mode', 'bn_sigma', 'keep_rounding'}
    plan = reproduce.job_plan(job)
    assert (plan.selection.bn_sigma, plan.selection.keep_rounding) == ('variance', 'round')
    if job.method == 'lbyl':
      assert plan.method.lbyl_mode == 'reference_code' and plan.bias_correction == 'off'
      assert plan.method.lambda2 == reproduce.LENET_LBYL_LAM[job.ratio]
    if job.method == 'nm':
      assert plan.method.nm_mode == 'reference_code' and plan.method.nm_t == 0.45
  # A job with only some of the reference options keeps them as options.
  partial = reproduce.Job('resnet20', 'lbyl', 'l2', 0.3, (('lbyl_mode', 'reference_code'),))
  assert reproduce.plan_options(partial)['preset'] is None
  with pytest.raises(ValueError, match='nm_mode'):
    reproduce.job_plan(reproduce.Job('resnet20', 'lbyl', 'l2', 0.3, (('nm_mode', 'exact'),)))


def test_probes_run_nothing_at_import(capsys):
  names = [m.name for m in pkgutil.iter_modules(probes.__path__)]
  assert len(names) >= 11
  for name in names:
    module = importlib.import_module(f'benchmarks.probes.{name}')
    assert callable(module.main), name
  assert capsys.readouterr() == ('', '')


def test_no_path_hacks():
  for path in (ROOT / 'benchmarks').rglob('*.py'):
    assert 'sys.path' not in path.read_text(), path


def test_results_md_is_the_rendering_of_the_committed_results(tmp_path):
  """RESULTS.md opens with the headline, has no internal labels, and equals what --render makes
  of benchmarks/results now (the plots are written to a temporary directory)."""
  committed = (ROOT / 'benchmarks' / 'RESULTS.md').read_text()
  machine = re.search(r'scripts in `benchmarks/` on (.*?) \(CPU only\)', committed).group(1)
  out = tmp_path / 'RESULTS.md'
  report.render(ROOT / 'benchmarks' / 'results', out, machine)
  assert out.read_text() == committed
  headings = [l for l in committed.splitlines() if l.startswith('#')]
  assert headings[:5] == ['# Results', '## Headline',
                          '### Accuracy after pruning, no fine-tuning (L2 criterion, the full '
                          '10,000-image test set)',
                          "### Solve time against the official code's per-filter solves",
                          '## Conclusions']
  assert not re.search(r'(?i)\bissues? \d|\bsession \d', committed)
  assert 'NOTES.md' in committed and 'How the defaults were chosen' not in committed


def test_significance_section(tmp_path):
  """RESULTS.md's table of paired comparisons, and its plot, from the probe's summary file."""
  from lbyl_jax import evaluation

  res, plots = tmp_path / 'results', tmp_path / 'plots'
  res.mkdir()
  assert 'not run yet' in '\n'.join(report.significance_section(res, plots))
  a = np.r_[np.ones(60, bool), np.zeros(40, bool)]
  b = np.r_[np.ones(50, bool), np.zeros(50, bool)]
  summary = {'x vs y': evaluation.paired_comparison(a, b),
             'y vs x': evaluation.paired_comparison(b, a)}
  (res / 'paired_significance.json').write_text(json.dumps(summary))
  lines = report.significance_section(res, plots)
  assert '| x vs y | 60.00 | 50.00 | +10.00 |' in '\n'.join(lines)
  assert '| 10 | 0 | 0.00195 |' in lines[-5] and '| -10.00 |' in lines[-4]
  assert (plots / 'paired_significance.png').stat().st_size > 0


def test_quant_methods_rows_plans_and_table():
  """benchmarks.quant_methods: each row's plan, the cache key, the held-out label, the table."""
  from benchmarks import quant_methods as qm
  from lbyl_jax.plan import Plan

  plan = Plan.from_options(**qm.plan_options(0.0, 4, 'dfmpc'))
  assert plan.method.name == 'prune' and plan.selection.ratio == 0.0
  assert plan.quantizer.name == 'dfmpc' and plan.quantizer.bits == 4
  plan = Plan.from_options(**qm.plan_options(0.3, None, None))
  assert plan.method.name == 'lbyl' and plan.quantizer is None
  rows = [dict(key=qm.row_key('resnet20', 0.3, 4, 'omse', '5000:10000'), arch='resnet20',
               split='5000:10000', top1=12.345, n=5000),
          dict(key=qm.row_key('resnet20', 0.3, None, None, '5000:10000'), arch='resnet20',
               split='5000:10000', top1=77.5, n=5000)]
  table = qm.render(rows, ['resnet20'], [0.3], [4], '5000:10000')
  assert '(held-out split), n = 5000 images per row' in table
  assert '| resnet20 | 30% | 4 | 77.50 | - | 12.35 | - | - | - | - |' in table
  assert 'NOT the held-out split' in qm.render(rows, ['resnet20'], [0.3], [4], '0:5000')
  stored = json.loads((ROOT / 'benchmarks' / 'results' / 'quant_methods_heldout.json').read_text())
  assert stored['rows'] and all(r['split'] == '5000:10000' for r in stored['rows'])
  assert all(r['n'] == 5000 if qm.measured(r) else r['error'] for r in stored['rows'])
  # The per-image sidecar agrees with every row's top-1 it has bits for.
  packed = qm.load_correct(qm.correct_path(ROOT / 'benchmarks' / 'results'
                                           / 'quant_methods_heldout.json'))
  with_bits = [r for r in stored['rows'] if r['key'] in packed]
  assert with_bits and all(qm.same_count(100.0 * qm.unpack(packed, r).mean(), r['top1'], r['n'])
                           for r in with_bits)


def test_bn_reestimate_rows_plans_table_and_summary():
  """benchmarks.bn_reestimate: the file per checkpoint, each row's plan, LeNet's refusal, and the
  table / summary line derived from the stored rows (a loss is reported at its ratio)."""
  from benchmarks import bn_reestimate as bn
  from lbyl_jax.plan import Plan

  res_dir = ROOT / 'benchmarks' / 'results'
  assert bn.out_path('resnet56_b') == res_dir / 'bn_reestimate_heldout.json'
  assert bn.out_path('resnet20') == res_dir / 'bn_reestimate_heldout_resnet20.json'
  with pytest.raises(ValueError, match='no BatchNorm'):
    bn.out_path('lenet_300_100')
  with pytest.raises(ValueError, match="--arch 'vgg16'"):
    bn.load_results(res_dir / 'absent.json', 'vgg16')
  plan = Plan.from_options(**bn.plan_options('lbyl', 0.4, 'udfc', 4))
  assert plan.method.name == 'lbyl' and plan.quantizer.name == 'udfc' and plan.quantizer.bits == 4
  assert Plan.from_options(**bn.plan_options('nm', 0.2, None, None)).quantizer is None
  n = 16
  ok = np.ones(n, bool)

  def row(method, ratio, recipe, wrong, quant=None):
    c = ok.copy()
    c[:wrong] = False
    return dict(method=method, ratio=ratio, recipe=recipe, quant_method=quant,
                bits=None if quant is None else 4, top1=100.0 * c.mean(), n=n,
                correct=bn.pack_correct(c), bn_seconds=None if recipe == 'none' else 1.0)

  results = dict(arch='resnet20', data_slice=[5000, 10000], recipe='d64x50a',
                 original=dict(top1=91.0), distill_runs=[dict(seconds=2.0)], rows={})
  for m, r, q, none_wrong, re_wrong in [('lbyl', 0.1, None, 1, 3), ('lbyl', 0.5, None, 8, 2),
                                        ('prune', 0.5, None, 9, 2), ('lbyl', 0.3, 'rtn', 4, 4)]:
    results['rows'][bn._key(m, r, 'none', q, 4)] = row(m, r, 'none', none_wrong, q)
    results['rows'][bn._key(m, r, 'd64x50a', q, 4)] = row(m, r, 'd64x50a', re_wrong, q)
  results['rows']['prune-r0.2-none'] = row('prune', 0.2, 'none', 0)  # no pair: not rendered
  text = bn.table(results)
  body = [l for l in text.splitlines() if l.startswith('| ') and not l.startswith('| method')]
  assert [l.split(' | ')[:2] for l in body] == [['| lbyl', '10%'], ['| lbyl', '50%'],
                                                ['| prune', '50%'], ['| lbyl+rtn4', '30%']]
  assert body[0].startswith('| lbyl | 10% | 93.75 | 81.25 | -12.50 |') and body[0].endswith(' 1.0 |')
  assert ('difference from -12.50 (at 10 %) to +37.50 (at 50 %); re-estimation loses at 10 % (McNemar p = 0.5).'
          in text)
  assert len([l for l in bn.table(results, ['prune']).splitlines() if l.startswith('| prune')]) == 1
  stored = bn.load_results(bn.out_path('resnet56_b'), 'resnet56_b')
  for m in ('lbyl', 'prune', 'bnm'):   # the first nine rows, kept when the script was generalized
    for r in (0.3, 0.4, 0.5):
      assert {bn._key(m, r, 'none'), bn._key(m, r, 'd64x50a')} <= set(stored['rows'])


def test_quant_methods_paired_tests_bytes_and_refusals(tmp_path):
  """benchmarks.quant_methods on synthetic rows: the per-image sidecar round trip, the pairs of a
  line (best vs runner-up, the UDFC paper's orderings), bold only where McNemar p < 0.05, the
  verdicts of the paper summary, refused rows, and the bytes table naming an odd quantizer."""
  from benchmarks import quant_methods as qm

  split, n = '5000:10000', 100

  def row(q, bits, right, nbytes=1000, ratio=0.0):
    key = qm.row_key('resnet20', ratio, bits, q, split)
    c = np.zeros(n, bool)
    c[:right] = True
    return dict(key=key, arch='resnet20', ratio=ratio, bits=bits, act_bits=None,
                quantizer=q or 'float', split=split, top1=float(right), n=n,
                bytes_after=nbytes), c

  made = [row(None, None, 70, 4000), row('squant', 4, 60), row('dfq', 4, 58), row('rtn', 4, 50),
          row('udfc', 4, 50), row('dfmpc', 4, 10, 1500), row('squant', 6, 60), row('rtn', 6, 50),
          row('squant', 8, 100), row('rtn', 8, 70)]
  rows = [r for r, _ in made]
  rows.append(dict(key=qm.row_key('resnet20', 0.0, 4, 'omse', split), arch='resnet20', ratio=0.0,
                   bits=4, act_bits=None, quantizer='omse', split=split, top1=None, n=0,
                   error='ValueError: no'))
  path = qm.correct_path(tmp_path / 'quant_methods_heldout.json')
  assert path.name == 'quant_methods_correct.npz'
  qm.save_correct(path, {r['key']: np.packbits(c) for r, c in made})
  packed = qm.load_correct(path)
  assert all(np.array_equal(qm.unpack(packed, r), c) for r, c in made)

  by = {r['key']: r for r in rows}
  pairs = {k: (a['quantizer'], b['quantizer'])
           for k, a, b in qm.line_pairs(by, 'resnet20', 0.0, 4, split, False)}
  assert pairs == {'best': ('squant', 'dfq'), 'squant': ('squant', 'dfq'),
                   'udfc': ('udfc', 'dfq'), 'udfc-squant': ('udfc', 'squant')}
  assert set(qm.paired_keys(rows, ['resnet20'], [0.0], [4], split)) == {
      qm.row_key('resnet20', 0.0, 4, q, split) for q in ('squant', 'dfq', 'udfc')}

  table = qm.render(rows, ['resnet20'], [0.0], [4, 6], split, packed=packed)
  # W4: squant 60 vs dfq 58 (2 discordant, p = 0.5): not bold; omse refused.
  assert '| resnet20 | 0% | 4 | 70.00 | 50.00 | refused | 60.00 | 58.00 | 50.00 | 10.00 |' in table
  # W6: squant 60 vs rtn 50 (10 discordant, all for squant: p = 2 / 2**10): bold.
  assert '| resnet20 | 0% | 6 | 70.00 | 50.00 | - | **60.00** | - | - | - |' in table
  assert '**' not in qm.render(rows, ['resnet20'], [0.0], [4, 6], split)  # no bits, no bold

  tables = qm.paired_tables(rows, packed, ['resnet20'], [0.0], [4, 6, 8], split)
  assert '| resnet20 | 0% | W4 | squant 60.00 | dfq 58.00 | +2.00 | 2 | 0 | 0.5 |' in tables
  assert '| resnet20 | 0% | W6 | squant 60.00 | rtn 50.00 | +10.00 | 10 | 0 | 0.002 |' in tables
  assert '| W8 | squant 100.00 | rtn 70.00 | +30.00 | 30 | 0 | < 1e-4 |' in tables  # p = 2**-29
  assert ('| resnet20 | 0% | W4 | 58.00 | 60.00 | 50.00 | +2.00 | 0.5 | -8.00 | 0.0078 | '
          '-10.00 | 0.002 |') in tables
  assert qm.n_tests(rows, packed, ['resnet20'], [0.0], [4, 6, 8], split) == 6
  assert qm.n_tests(rows, {}, ['resnet20'], [0.0], [4, 6, 8], split) == 0
  summ = qm.paper_summary(rows, packed, ['resnet20'], [0.0], [4, 6], split)
  assert summ['squant'] == dict(above=[], below=[], unresolved=['resnet20 0% W4'], untested=[])
  assert summ['udfc']['below'] == ['resnet20 0% W4']
  assert summ['udfc-squant']['below'] == ['resnet20 0% W4']
  assert qm.refusals(rows, ['resnet20']) == {'ValueError: no': [rows[-1]['key']]}
  assert qm.same_count(91.66, 91.66000000000001, 5000) and not qm.same_count(91.66, 91.64, 5000)

  btable = qm.bytes_table(rows, ['resnet20'], [0.0], [4, 6], split)
  assert '| resnet20 | 0% | 3.9 | 1.0 (dfmpc: 1.5) | 1.0 |' in btable

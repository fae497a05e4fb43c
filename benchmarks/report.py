"""Renders benchmarks/results (the sweep rows of :mod:`benchmarks.reproduce`, the solver,
throughput and paired-comparison JSON) into benchmarks/RESULTS.md and benchmarks/plots/*.png.

RESULTS.md opens with the headline (accuracy of plain pruning, the published NM and LBYL and the
default LBYL at 30 % and 50 %, and solve time against the official code's solve pattern), then
the conclusions, each computed from the stored rows, then the detailed tables. Only measured rows
are printed; a configuration that has not been run shows '-'. Published numbers
(docs/published_results.md) are printed beside ours where they exist. The reasoning behind the
defaults and the findings is in benchmarks/NOTES.md, which RESULTS.md links to.

  python -m benchmarks.reproduce --render
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex

from benchmarks import bn_reestimate as bn_heldout
from benchmarks import command_speed
from benchmarks import quant_methods
from benchmarks import rule_goals

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
LENET_RATIOS = (0.5, 0.6, 0.7, 0.8)
CIFAR = ('resnet20', 'resnet56', 'resnet56_b')
CRITERIA = ('l2', 'l1', 'l2-gm')
SPLIT = 'the full 10,000-image test set'

NAMES = {
    'resnet20': 'ResNet-20 (akamaster), CIFAR-10',
    'resnet56': 'ResNet-56 (akamaster), CIFAR-10',
    'resnet56_b': 'ResNet-56 (Neuron Merging checkpoint), CIFAR-10',
    'lenet_300_100': 'LeNet-300-100 (LBYL checkpoint), FashionMNIST',
}

# docs/published_results.md: LeNet-300-100 FashionMNIST, L2 criterion, LBYL / NM / Prune (LBYL README).
LENET_LBYL_TABLE = {0.5: (88.83, 87.86, 87.86), 0.6: (87.75, 88.07, 83.03),
                    0.7: (83.92, 83.27, 71.21), 0.8: (78.05, 77.11, 63.9)}
# docs/published_results.md: NM's own table, L1 criterion, Prune / Merge (NM README).
LENET_NM_TABLE = {0.5: (88.40, 88.69), 0.6: (85.17, 86.92), 0.7: (71.26, 82.75), 0.8: (66.76, 80.02)}
# docs/published_results.md: UDFC paper on the NM ResNet-56, L2 criterion: Prune, NM, UDFC W4.
UDFC_TABLE = {0.3: (76.95, 85.22, 90.33), 0.4: (46.44, 76.56, 86.99), 0.5: (24.34, 56.18, 81.90)}
# docs/published_results.md: the BN-moments prototype, NM ResNet-56, L2.
BNM_TABLE = {
    'prune': (92.21, 87.42, 76.95, 46.44, 24.34),
    'LBYL consistent, best of a lambda grid': (91.97, 89.57, 87.98, 79.22, 41.32),
    'LBYL + bias correction': (93.31, 92.25, 89.62, 78.37, 36.00),
    'bn-moments, diag Sx, with bias correction': (93.21, 92.28, 87.48, 64.30, 24.34),
    'bn-moments, diag Sx, no intercept': (93.11, 91.85, 88.07, 79.46, 63.25),
    'bn-moments, identity Sx, no intercept': (93.00, 91.78, 88.01, 79.10, 61.88),
}
# The reference-code LeNet rows (benchmarks.reproduce.REFERENCE_CODE, as a dict) and the LBYL
# README lambdas.
REF = {'lbyl_mode': 'reference_code', 'nm_mode': 'reference_code', 'bn_sigma': 'variance',
       'keep_rounding': 'round'}
LENET_LAM = {0.5: 0.3, 0.6: 0.6, 0.7: 0.3, 0.8: 1e-6}

OFF = {'bias_correction': 'off'}   # the published LBYL / NM
ON = {'bias_correction': 'on'}     # the lbyl / nm default
GUARD = {'guard': 'moments', 'bias_correction': 'off'}
DIAG = {'bnm_cov': 'diag'}         # bnm's default, named


def _load(results_dir: pathlib.Path) -> list[dict]:
  rows = []
  for path in sorted(results_dir.glob('*.jsonl')):
    for line in path.read_text().splitlines():
      if line.strip():
        rows.append(json.loads(line))
  return rows


def _opts(row) -> dict:
  return {k: v for k, v in (row.get('options') or [])}


def _find(rows, **want):
  """The first row matching ``want`` (float rows unless ``bits`` is given) and exactly ``options``."""
  opts = want.pop('options', {})
  want.setdefault('bits', None)
  for r in rows:
    if all(r.get(k) == v for k, v in want.items()) and _opts(r) == opts:
      return r
  return None


def _top1(rows, **want) -> float | None:
  row = _find(rows, **want)
  return None if row is None else row['top1']


def _cell(row) -> str:
  return '-' if row is None else f"{row['top1']:.2f}"


def _num(v: float | None) -> str:
  return '-' if v is None else f'{v:.2f}'


def _pct(r: float) -> str:
  return f'{round(r * 100)} %'


def _module_command(text: str) -> str:
  """``python benchmarks/x.py ...`` (as older result files recorded it) as the equivalent
  ``python -m benchmarks.x ...``."""
  return re.sub(r'(?:python )?benchmarks/([\w/]+)\.py',
                lambda m: 'python -m benchmarks.' + m.group(1).replace('/', '.'), text)


def _l2_series(rows, arch, method, options=None) -> list[tuple[float, float | None]]:
  """(ratio, top-1 or None) over RATIOS for one L2 column: the points of one plotted line."""
  return [(r, _top1(rows, arch=arch, method=method, criterion='l2', ratio=r, options=options or {}))
          for r in RATIOS]


def _baseline(rows, arch):
  for r in rows:
    if r.get('method') == 'baseline' and r['arch'] == arch and r['n'] == 10000:
      return r['top1']
  return None


def _plot(path: pathlib.Path, title: str, series, baseline=None):
  from lbyl_jax import report  # pylint: disable=import-outside-toplevel

  report.plot_series(series, path, title=title, baseline=baseline)


# --------------------------------------------------------------------------------------------
# Headline.


def _solver_runs(results_dir: pathlib.Path) -> list[tuple[pathlib.Path, dict]]:
  return [(f, json.loads(f.read_text())) for f in sorted(results_dir.glob('solver_*.json'))]


def _versus_official(results_dir: pathlib.Path) -> list[dict]:
  """Solver rows that time both the batched JAX solve and the official code's per-filter loop."""
  return [dict(r, file=f.name) for f, run in _solver_runs(results_dir) for r in run['results']
          if 'numpy_per_filter' in r and 'batched_f32' in r]


def headline(rows, results_dir: pathlib.Path) -> list[str]:
  out = ['## Headline', '',
         f'### Accuracy after pruning, no fine-tuning (L2 criterion, {SPLIT})', '',
         'Top-1 %. Plain prune = drop the channels; NM / LBYL as published = Neuron Merging and '
         'Leave Before You Leave without the bias correction (`--bias-correction off`); ours = '
         'the package default, LBYL with the data-free bias correction (`--method lbyl`). The '
         'ratio is the fraction of channels removed from every prunable layer.', '',
         '| checkpoint | unpruned | ratio | plain prune | NM as published | LBYL as published '
         '| ours: LBYL + bias correction |', '|---|---|---|---|---|---|---|']
  for arch in CIFAR:
    for r in (0.3, 0.5):
      cells = [_top1(rows, arch=arch, method='prune', criterion='l2', ratio=r),
               _top1(rows, arch=arch, method='nm', criterion='l2', ratio=r, options=OFF),
               _top1(rows, arch=arch, method='lbyl', criterion='l2', ratio=r, options=OFF),
               _top1(rows, arch=arch, method='lbyl', criterion='l2', ratio=r, options=ON)]
      out.append(f'| {NAMES[arch]} | {_num(_baseline(rows, arch))} | {_pct(r)} | '
                 + ' | '.join(_num(c) for c in cells) + ' |')
  le = 'lenet_300_100'
  cells = [_top1(rows, arch=le, method='prune', criterion='l2', ratio=0.5),
           _top1(rows, arch=le, method='nm', criterion='l2', ratio=0.5, options={**REF, 'nm_t': 0.45}),
           _top1(rows, arch=le, method='lbyl', criterion='l2', ratio=0.5,
                 options={**REF, 'lambda1': 0.0, 'lambda2': LENET_LAM[0.5]}),
           _top1(rows, arch=le, method='lbyl', criterion='l2', ratio=0.5, options=ON)]
  out.append(f'| {NAMES[le]} | {_num(_baseline(rows, le))} | 50 % | '
             + ' | '.join(_num(c) for c in cells) + ' |')
  p = UDFC_TABLE
  out += ['',
          '- CIFAR ResNets: NM as published = its exact BN algebra with t = 0.1, lam = 0.85 (the '
          'official ResNet-56 script\'s values); LBYL as published = its consistent closed form '
          'with lambda1 = 1e-5, lambda2 = 1e-3, the package\'s lambdas for every model and ratio '
          '(docs/lbyl.md; how they were chosen: [NOTES.md](NOTES.md)). Only the first convolution '
          'of each residual block is pruned.',
          '- The papers\' own figures on the Neuron Merging ResNet-56 (UDFC paper, Table 2, '
          f'docs/published_results.md): plain prune {p[0.3][0]} / {p[0.5][0]}, NM {p[0.3][1]} / '
          f'{p[0.5][1]} at 30 / 50 %.',
          '- LeNet-300-100: NM and LBYL as published are the official codes\' forms '
          '(`--preset reference_code`) with the lambdas / threshold of their READMEs, which '
          'reproduce the READMEs\' tables (see "LeNet-300-100" below); the published tables start '
          f'at 50 %, so 30 % was not run. Their 50 % figures: prune {LENET_LBYL_TABLE[0.5][2]}, '
          f'LBYL {LENET_LBYL_TABLE[0.5][0]}, NM {LENET_LBYL_TABLE[0.5][1]} (equal to its prune '
          'cell, probably a copy error in the README).', '']
  out += _solve_headline(results_dir)
  return out


def _solve_headline(results_dir: pathlib.Path) -> list[str]:
  vs = _versus_official(results_dir)
  out = ['### Solve time against the official code\'s per-filter solves', '']
  if not vs:
    return out + ['(not measured yet: `python -m benchmarks.solver_speed --modes '
                  'batched_f32,numpy_per_filter`)', '']
  files = sorted({r['file'] for r in vs})
  out += ['The official LBYL code solves one m x m system per pruned filter (docs/lbyl.md, '
          'reference-code form). It was not run here (it needs PyTorch and its own scripts); '
          '`benchmarks/solver_speed.py` times a loop of that shape instead (one SciPy '
          'positive-definite solve per pruned filter, the Gram matrix formed for each, float64; '
          'the official code solves in float32) on the same systems as ours '
          '(all layers of a network batched into one compiled JAX call, float32). Random weights '
          'in the real shapes, idle 2-core CPU, compile time excluded and listed separately; * = '
          'the per-filter loop timed on evenly spaced layers and scaled to all of them. Source: '
          + ', '.join(f'`results/{f}`' for f in files) + ' (detailed table under "Solver speed").',
          '', '| network | ratio | pruned filters | ours: batched solve s | compile s, once | '
          'per-filter loop (official pattern) s | speed-up |', '|---|---|---|---|---|---|---|']
  for r in vs:
    npf = r['numpy_per_filter']
    out.append(f"| {r['arch']} | {_pct(r['ratio'])} | {r['pruned_filters']} | "
               f"{r['batched_f32']['warm_s']:.3f} | {r['batched_f32']['compile_s']:.1f} | "
               f"{npf['warm_s']:.1f}{'*' if npf['extrapolated'] else ''} | "
               f"{r['speedup_batched_f32_vs_numpy']:.0f}x |")
  return out + ['']


# --------------------------------------------------------------------------------------------
# Conclusions, computed from the rows.


def _compare(rows, cells, a, b):
  """Cells where config ``a`` is above / equal / below config ``b``; a and b map a cell
  (arch, criterion, ratio) to a row (or None); returns (above, equal, below list, measured)."""
  above = equal = 0
  below, measured = [], 0
  for cell in cells:
    ra, rb = a(*cell), b(*cell)
    if ra is None or rb is None:
      continue
    measured += 1
    if ra['top1'] > rb['top1']:
      above += 1
    elif ra['top1'] == rb['top1']:
      equal += 1
    else:
      below.append((cell, ra['top1'], rb['top1']))
  return above, equal, below, measured


def _cell_name(cell) -> str:
  arch, crit, r = cell
  return f'{arch} {crit} {_pct(r)}'


def _below_text(below) -> str:
  return '; '.join(f'{_cell_name(c)}: {x:.2f} vs {y:.2f}' for c, x, y in below)


def _cifar_cells(min_ratio: float = 0.0):
  return [(a, c, r) for a in CIFAR for c in CRITERIA for r in RATIOS if r >= min_ratio]


def _method(rows, method, options):
  return lambda arch, crit, r: _find(rows, arch=arch, method=method, criterion=crit, ratio=r,
                                     options=options)


def conclusions(rows, results_dir: pathlib.Path) -> list[str]:
  out = ['## Conclusions', '',
         'Counts over the measured cells of the tables below (top-1 on the full test sets; '
         '"above" means strictly higher). The reasoning and the history of each choice are in '
         '[NOTES.md](NOTES.md).', '']
  cells = _cifar_cells()
  lenet = [('lenet_300_100', 'l2', r) for r in LENET_RATIOS]
  lbyl_on, lbyl_off = _method(rows, 'lbyl', ON), _method(rows, 'lbyl', OFF)
  nm_on, nm_off = _method(rows, 'nm', ON), _method(rows, 'nm', OFF)
  prune = _method(rows, 'prune', {})
  a, e, below, n = _compare(rows, cells, lbyl_on, lbyl_off)
  la, le_, lbelow, ln = _compare(rows, lenet, lbyl_on, lbyl_off)
  out.append(f'- **Ours (LBYL + bias correction) against LBYL as published**: above in {a} of {n} '
             f'CIFAR cells (3 ResNets x 3 criteria x 5 ratios)'
             + (f', equal in {e}' if e else '') + (f', below in {len(below)} ({_below_text(below)})'
                                                   if below else '')
             + f'; on LeNet-300-100 (L2, consistent form) above in {la} of {ln}'
             + (f', below in {len(lbelow)} ({_below_text(lbelow)})' if lbelow else '') + '.')
  a, e, below, n = _compare(rows, cells, nm_on, nm_off)
  out.append(f'- NM + bias correction (the `nm` default) against NM as published: above in {a}, '
             f'equal in {e}, below in {len(below)} of {n} CIFAR cells'
             + (f' ({_below_text(below)})' if below else '') + '.')
  a, e, below, n = _compare(rows, cells, lbyl_on, nm_on)
  out.append(f'- Ours against NM + bias correction: above in {a} of {n} CIFAR cells'
             + (f', equal in {e}' if e else '')
             + (f', below in {len(below)} ({_below_text(below)})' if below else '') + '.')
  checks = []
  for label, fn in (('LBYL + bias correction', lbyl_on), ('NM + bias correction', nm_on),
                    ('LBYL as published', lbyl_off), ('NM as published', nm_off),
                    ('LBYL + guard', _method(rows, 'lbyl', GUARD)),
                    ('NM + guard', _method(rows, 'nm', GUARD))):
    a, _, below, n = _compare(rows, _cifar_cells(0.3), fn, prune)
    if n:
      checks.append(f'{label} {a} of {n}')
  out.append('- Compensation strictly above plain pruning at every ratio >= 30 % (CIFAR ResNets, '
             'measured cells of all criteria): ' + '; '.join(checks) + ' cells. The failing '
             'cells are listed under each table of "Pruning + compensation".')
  out += _reproduction_conclusions(rows)
  out += _quant_conclusions(rows, results_dir)
  out += _rule_conclusions(rows)
  out += _speed_conclusions(results_dir)
  return out + ['']


def _reproduction_conclusions(rows) -> list[str]:
  le = 'lenet_300_100'
  equal = total = 0
  for r in LENET_RATIOS:
    lb = _top1(rows, arch=le, method='lbyl', criterion='l2', ratio=r,
               options={**REF, 'lambda1': 0.0, 'lambda2': LENET_LAM[r]})
    mine = [(lb, LENET_LBYL_TABLE[r][0]),
            (_top1(rows, arch=le, method='prune', criterion='l2', ratio=r, options=REF),
             LENET_LBYL_TABLE[r][2]),
            (_top1(rows, arch=le, method='nm', criterion='l1', ratio=r, options={**REF, 'nm_t': 0.45}),
             LENET_NM_TABLE[r][1]),
            (_top1(rows, arch=le, method='prune', criterion='l1', ratio=r, options=REF),
             LENET_NM_TABLE[r][0])]
    if r != 0.5:  # the 50 % NM cell of the LBYL README equals its prune cell (copy error)
      mine.append((_top1(rows, arch=le, method='nm', criterion='l2', ratio=r,
                         options={**REF, 'nm_t': 0.45}), LENET_LBYL_TABLE[r][1]))
    for ours, paper in mine:
      if ours is not None:
        total += 1
        equal += round(ours, 2) == round(paper, 2)
  pr = [(_top1(rows, arch='resnet56_b', method='prune', criterion='l2', ratio=r), BNM_TABLE['prune'][i])
        for i, r in enumerate(RATIOS)]
  pr = [(x, y) for x, y in pr if x is not None]
  same = sum(round(x, 2) == round(y, 2) for x, y in pr)
  return [f'- Published numbers reproduced exactly: {equal} of {total} LeNet-300-100 cells of the '
          'LBYL and NM READMEs (reference-code forms; the 50 % NM cell of the LBYL README, equal to '
          'its prune cell, is left out), and plain L2 pruning of the Neuron Merging ResNet-56 '
          f'equals the UDFC paper\'s / BN-moments prototype\'s prune row in {same} of {len(pr)} '
          'ratios.']


def _quant_conclusions(rows, results_dir: pathlib.Path) -> list[str]:
  out = []
  wins = total = 0
  for arch in ('resnet56', 'resnet56_b'):
    for bits in (8, 6, 4):
      u = _top1(rows, arch=arch, method='prune', ratio=0.0, bits=bits, quant_method='udfc')
      t = _top1(rows, arch=arch, method='prune', ratio=0.0, bits=bits, quant_method='rtn')
      if u is not None and t is not None:
        total += 1
        wins += u > t
  jw = jt = 0
  for arch in ('resnet56', 'resnet56_b'):
    for r in (0.3, 0.4, 0.5):
      for bits in (6, 4):
        u = _top1(rows, arch=arch, method='lbyl', ratio=r, bits=bits, quant_method='udfc', options=ON)
        t = _top1(rows, arch=arch, method='lbyl', ratio=r, bits=bits, quant_method='rtn', options=ON)
        if u is not None and t is not None:
          jt += 1
          jw += u > t
  out.append(f'- Weight quantization, UDFC-style against round-to-nearest: above in {wins} of '
             f'{total} unpruned cells (both ResNet-56s, W8 / W6 / W4); with pruning (joint UDFC + '
             f'bias correction against LBYL + bias correction, then RTN) above in {jw} of {jt}.')
  f = results_dir / 'paired_significance.json'
  if f.exists():
    summary = json.loads(f.read_text())
    quant = {k: c for k, c in summary.items() if ' bnm ' not in k}
    up = [k for k, c in quant.items() if c['mcnemar_p'] < 0.05 and c['diff'] > 0]
    down = [k for k, c in quant.items() if c['mcnemar_p'] < 0.05 and c['diff'] < 0]
    out.append(f'  Paired on the same images, {len(quant)} pairs: UDFC resolved better (McNemar '
               f'p < 0.05) in {len(up)} ({"; ".join(k.split(":")[0] for k in up)}), resolved worse '
               f'in {len(down)} ({"; ".join(k.split(":")[0] for k in down)}); the other '
               f'{len(quant) - len(up) - len(down)} differences are not resolved by the test set '
               '("Which margins the test set resolves").')
  ud = [_top1(rows, arch='resnet56_b', method='lbyl', ratio=r, bits=4, quant_method='udfc', options=ON)
        for r in (0.3, 0.4, 0.5)]
  if all(x is not None for x in ud):
    out.append('- The UDFC paper\'s W4 figures on the Neuron Merging ResNet-56 (30 / 40 / 50 %: '
               + ' / '.join(f'{UDFC_TABLE[r][2]:.2f}' for r in (0.3, 0.4, 0.5))
               + ') are not reached: joint UDFC + bias correction gives '
               + ' / '.join(f'{x:.2f}' for x in ud) + '.')
  return out


def _rule_conclusions(rows) -> list[str]:
  parts = []
  for mode in ('auto', 'blend'):
    met = n = 0
    models = []
    for arch in CIFAR + ('lenet_300_100',):
      ratios = LENET_RATIOS if arch == 'lenet_300_100' else RATIOS
      for r in ratios:
        res = _rule_cell(rows, arch, r, mode)
        if res is not None:
          n += 1
          met += res[0] >= res[1]
          if arch not in models:
            models.append(arch)
    if n:
      parts.append(f'`{mode}` in {met} of {n} ({", ".join(models)})')
  if not parts:
    return []
  return ['- Data-free per-layer rules that decide bnm\'s bias correction per layer, against the '
          'better of bnm with and without it (chosen after seeing both), L2: at least as good in '
          + ' and '.join(parts) + ' ratio cells. Neither is a default.']


def _speed_conclusions(results_dir: pathlib.Path) -> list[str]:
  out = []
  vs = _versus_official(results_dir)
  if vs:
    sp = [r['speedup_batched_f32_vs_numpy'] for r in vs]
    out.append(f'- Solve time: the batched JAX solve is {min(sp):.0f}x to {max(sp):.0f}x faster than '
               'a per-filter solve loop of the official code\'s pattern at 30 % '
               f'({", ".join(r["arch"] for r in vs)}; CPU, compile excluded).')
  f = results_dir / 'throughput.json'
  if f.exists():
    run = json.loads(f.read_text())
    sp = [f"{r['arch']} {_pct(r['ratio'])} {r['speedup']:.2f}x" for r in run['results'] if r['ratio'] > 0]
    out.append('- Inference of the physically pruned models (the same model class with smaller '
               'widths), images/s against the unpruned model: ' + ', '.join(sp) + ' (CPU).')
  return out


# --------------------------------------------------------------------------------------------
# Detailed tables.


def restore_section(rows, plots_dir) -> list[str]:
  out = ['## Pruning + compensation on the CIFAR-10 checkpoints', '',
         f'Top-1 % on {SPLIT} of CIFAR-10. LBYL = consistent closed form (docs/lbyl.md) with the '
         'package defaults lambda1 = 1e-5, lambda2 = 1e-3; NM = exact BN algebra with t = 0.1, '
         'lam = 0.85 (the official ResNet-56 script values). Only conv1 of each block is pruned. '
         '"nm" and "lbyl" are the package defaults, which add the data-free BN-mean bias '
         'correction (`--bias-correction on`: the pruned channels\' modelled mean activation, '
         'less what the delivery carries, folded into the consumer; docs/bias_correction.md); '
         '"published" = `--bias-correction off`, the algorithms as published. "+ guard" = '
         '`--guard moments --bias-correction off`: each delivery row scaled by its least-squares '
         'factor in [0, 1] under the BN-moments model (data-free, no tuning; see NOTES.md). '
         'bnm = BN-moments compensation (docs/bn_moments.md).', '']
  for arch in CIFAR:
    base = _baseline(rows, arch)
    out.append(f'### {arch}: {NAMES[arch]} (unpruned {_num(base)})')
    out.append('')
    out.append('| criterion | ratio | prune | nm | lbyl | nm published | lbyl published | bnm '
               '| nm + guard | lbyl + guard |')
    out.append('|---|---|---|---|---|---|---|---|---|---|')
    any_row = False
    for crit in CRITERIA:
      for r in RATIOS:
        cells = [_find(rows, arch=arch, method=m, criterion=crit, ratio=r, options=o)
                 for m, o in (('prune', {}), ('nm', ON), ('lbyl', ON), ('nm', OFF), ('lbyl', OFF))]
        bnm = _find(rows, arch=arch, method='bnm', criterion=crit, ratio=r, options=DIAG)
        guarded = [_find(rows, arch=arch, method=m, criterion=crit, ratio=r, options=GUARD)
                   for m in ('nm', 'lbyl')]
        if all(c is None for c in cells):
          continue
        any_row = True
        out.append(f"| {crit} | {r} | " + ' | '.join(_cell(c) for c in cells + [bnm] + guarded) + ' |')
    if not any_row:
      out.append('| (not run) | | | | | | | | | |')
    out += [''] + _beats_prune_summary(rows, arch)
    series = {'prune': _l2_series(rows, arch, 'prune')}
    for m in ('nm', 'lbyl'):
      series[m] = _l2_series(rows, arch, m, ON)
      series[f'{m} published'] = _l2_series(rows, arch, m, OFF)
    series['bnm'] = _l2_series(rows, arch, 'bnm', DIAG)
    for m in ('nm', 'lbyl'):  # labels without any measured point are not drawn
      series[f'{m} + guard'] = _l2_series(rows, arch, m, GUARD)
    png = plots_dir / f'{arch}_l2.png'
    _plot(png, f'{arch}, L2 criterion, no fine-tuning', series, base)
    out += ['', f'![{arch}](plots/{png.name})', '']
  return out


def _beats_prune_summary(rows, arch) -> list[str]:
  """The acceptance check, cell by cell: compensation strictly above plain pruning at ratio >= 0.3."""
  lines = []
  for label, opts in ((' (default, bias correction on)', ON), (' published', OFF), (' + guard', GUARD)):
    for m in ('nm', 'lbyl'):
      fails, checked = [], 0
      for crit in CRITERIA:
        for r in (x for x in RATIOS if x >= 0.3):
          p = _find(rows, arch=arch, method='prune', criterion=crit, ratio=r)
          c = _find(rows, arch=arch, method=m, criterion=crit, ratio=r, options=opts)
          if p is None or c is None:
            continue
          checked += 1
          if c['top1'] <= p['top1']:
            fails.append(f"{crit} {r}: {c['top1']:.2f} vs {p['top1']:.2f}")
      if checked:
        verdict = 'above prune in all' if not fails else f"NOT above prune in {len(fails)} of"
        lines.append(f"- {m}{label} at ratio >= 0.3: {verdict} {checked} measured cells"
                     + (f" ({'; '.join(fails)})" if fails else ''))
  return lines


def lenet_section(rows) -> list[str]:
  out = ['## LeNet-300-100 on FashionMNIST', '',
         f'Top-1 % on {SPLIT} of FashionMNIST. "ours" = `--preset reference_code` (the official '
         'codes\' forms: `--lbyl-mode reference_code --nm-mode reference_code --bn-sigma variance '
         '--keep-rounding round`), LBYL lambdas of the LBYL README (0.3 / 0.6 / 0.3 / 1e-6), NM '
         't = 0.45. Paper = the READMEs\' tables (docs/published_results.md: L2 from the LBYL '
         'README, L1 from the NM README). The last column is the package\'s consistent forms '
         '(bias correction off).', '',
         '| ratio | LBYL L2 ours / paper | NM L2 ours / paper | Prune L2 ours / paper | NM L1 ours / paper | Prune L1 ours / paper | consistent: LBYL / NM / BNM (L2) |',
         '|---|---|---|---|---|---|---|']
  le = 'lenet_300_100'
  for r in LENET_RATIOS:
    lb = _find(rows, arch=le, method='lbyl', criterion='l2', ratio=r,
               options={**REF, 'lambda1': 0.0, 'lambda2': LENET_LAM[r]})
    nm2 = _find(rows, arch=le, method='nm', criterion='l2', ratio=r, options={**REF, 'nm_t': 0.45})
    pr2 = _find(rows, arch=le, method='prune', criterion='l2', ratio=r, options=REF)
    nm1 = _find(rows, arch=le, method='nm', criterion='l1', ratio=r, options={**REF, 'nm_t': 0.45})
    pr1 = _find(rows, arch=le, method='prune', criterion='l1', ratio=r, options=REF)
    cons = [_find(rows, arch=le, method=m, criterion='l2', ratio=r, tag='consistent',
                  options=o) for m, o in (('lbyl', OFF), ('nm', OFF), ('bnm', {}))]
    p = LENET_LBYL_TABLE[r]
    q = LENET_NM_TABLE[r]
    out.append(f'| {_pct(r)} | {_cell(lb)} / {p[0]:.2f} | {_cell(nm2)} / {p[1]:.2f} | '
               f'{_cell(pr2)} / {p[2]:.2f} | {_cell(nm1)} / {q[1]:.2f} | {_cell(pr1)} / {q[0]:.2f} | '
               + ' / '.join(_cell(c) for c in cons) + ' |')
  out += ['', 'The 50 % NM cell of the LBYL README (87.86) equals its Prune cell, probably a copy '
          'error; NM\'s own README gives 88.69 for L1 at 50 %.', '']
  return out


def _col_name(method: str, options: dict) -> str:
  if options.get('guard') == 'moments':
    return f'{method} + guard'
  if 'bnm_cov' in options:
    return f"{method} {options['bnm_cov']}"
  if options.get('bias_correction') == 'off':
    return method if method == 'bnm' else f'{method} published'
  if 'bias_correction' in options:
    bc = options['bias_correction']
    name = f"{method} {'+bc' if bc == 'on' else bc}"
    return name + (' (all taps)' if options.get('bias_fold') == 'all_taps' else '')
  return method


def _rule_cell(rows, arch, r, mode):
  """(rule top-1, best of bnm off / on) at one ratio, or None where a row is missing."""
  off = (_find(rows, arch=arch, method='bnm', criterion='l2', ratio=r, options=DIAG)
         or _find(rows, arch=arch, method='bnm', criterion='l2', ratio=r, options={}))
  on = _find(rows, arch=arch, method='bnm', criterion='l2', ratio=r, options=ON)
  rule = _find(rows, arch=arch, method='bnm', criterion='l2', ratio=r, options={'bias_correction': mode})
  if off is None or on is None or rule is None:
    return None
  return rule['top1'], max(off['top1'], on['top1'])


def bnm_section(rows, plots_dir) -> list[str]:
  out = ['## BN-moments compensation and the bias correction', '',
         f'L2 criterion, top-1 % on {SPLIT} of each model. `bnm` = the BN-moments uncentred fit '
         '(docs/bn_moments.md; default `--bnm-cov diag`); `+bc` = `--bias-correction on` '
         '(constant folded padding-aware, the default); `(all taps)` = `--bias-fold all_taps`, the '
         'BN-moments prototype\'s fold; `auto` / `blend` = the data-free per-layer rules '
         '(`--bias-correction auto|blend`, experimental).', '']
  for arch in ('resnet56_b', 'resnet20', 'resnet56', 'lenet_300_100'):
    ratios = LENET_RATIOS if arch == 'lenet_300_100' else RATIOS
    base = _baseline(rows, arch)
    cols = [('prune', {}), ('nm', OFF), ('lbyl', OFF), ('bnm', DIAG),
            ('bnm', {'bnm_cov': 'identity'}), ('nm', ON), ('lbyl', ON), ('bnm', ON),
            ('bnm', {'bias_correction': 'auto'}), ('bnm', {'bias_correction': 'blend'})]
    if arch == 'resnet56_b':
      taps = {'bias_correction': 'on', 'bias_fold': 'all_taps'}
      cols += [('lbyl', taps), ('bnm', taps)]
    if arch == 'lenet_300_100':
      cols = [('prune', {}), ('nm', OFF), ('lbyl', OFF), ('bnm', {}), ('nm', ON),
              ('nm', {'bias_correction': 'auto'}), ('lbyl', ON),
              ('lbyl', {'bias_correction': 'auto'}), ('bnm', ON),
              ('bnm', {'bias_correction': 'auto'}), ('nm', GUARD), ('lbyl', GUARD)]
    names = [_col_name(m, o) for m, o in cols]
    out += [f'### {arch}: {NAMES[arch]} (unpruned {_num(base)})', '',
            '| ratio | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(cols)]
    for r in ratios:
      cells = []
      for m, o in cols:
        row = _find(rows, arch=arch, method=m, criterion='l2', ratio=r, options=o)
        if row is None and not o:
          row = _find(rows, arch=arch, method=m, criterion='l2', ratio=r, tag='', options={})
        cells.append(_cell(row))
      out.append(f'| {r} | ' + ' | '.join(cells) + ' |')
    out.append('')
    out += _goal_summary(rows, arch, ratios)
    if arch == 'resnet56_b':
      out += ['The BN-moments prototype\'s numbers on the same checkpoint (docs/published_results.md), '
              'for comparison:', '',
              '| method | 10% | 20% | 30% | 40% | 50% |', '|---|---|---|---|---|---|']
      for name, vals in BNM_TABLE.items():
        out.append(f'| {name} | ' + ' | '.join(f'{v:.2f}' for v in vals) + ' |')
      out.append('')
      series = {}
      for (m, o), name in zip(cols, names):
        series[name] = _l2_series(rows, arch, m, o)
      png = plots_dir / 'resnet56_b_bnm.png'
      _plot(png, 'NM ResNet-56: BN-moments vs LBYL / NM / prune', series, base)
      out += [f'![bnm](plots/{png.name})', '']
    auto = [r for r in rows if r['arch'] == arch and _opts(r).get('bias_correction') == 'auto']
    if auto:
      out.append(f'Layers where `auto` applied the bias correction ({arch}):')
      out.append('')
      for r in sorted(auto, key=lambda x: (x['method'], x['ratio'])):
        n = len(r.get('auto_bias_layers') or [])
        out.append(f"- {r['method']} r={r['ratio']}: {n} layers"
                   + (f": {', '.join(r['auto_bias_layers'][:6])}{' ...' if n > 6 else ''}" if n else ''))
      out.append('')
  return out


def _goal_summary(rows, arch, ratios) -> list[str]:
  """The rules' goal per ratio: at least as good as the better of bnm without ('off' =
  `--bnm-cov diag`) and with the bias correction ('on')."""
  lines = []
  for mode in ('auto', 'blend'):
    misses, checked = [], 0
    for r in ratios:
      res = _rule_cell(rows, arch, r, mode)
      if res is None:
        continue
      checked += 1
      if res[0] < res[1]:
        misses.append(f'{r}: {res[0]:.2f} vs {res[1]:.2f}')
    if checked:
      lines.append(f'- bnm {mode} >= best of off / on: '
                   + (f'at all {checked} ratios' if not misses else
                      f"missed at {len(misses)} of {checked} ({'; '.join(misses)})"))
  return lines + [''] if lines else []


def mobilenet_section(rows) -> list[str]:
  """MobileNetV2 CIFAR-10 (benchmarks/probes/mobilenet_v2.py, its rows in
  benchmarks/results/probes/, apart from the suites' rows): the dev-selected settings per method
  on the held-out split and the full set; nothing before the probe has written its selection."""
  arch = 'mobilenet_v2_cifar10'
  mine = [r for r in rows if r.get('arch') == arch]
  sel = [r for r in mine if r.get('method') == 'selection']
  base = next((r for r in mine if r.get('method') == 'unpruned' and r.get('split') == 'full'), None)
  if not sel or base is None:
    return []
  chosen = sel[-1]['chosen']

  def row(method, ratio, options):
    want = [list(p) for p in sorted(options.items())]
    return next((r for r in mine if r.get('method') == method and r.get('ratio') == ratio
                 and r.get('split') == 'full' and r.get('options') == want), None)

  out = ['## MobileNetV2 on CIFAR-10', '',
         'The channel-pruned torchvision-layout MobileNetV2 of ../shared (224x224 inputs upsampled '
         f'from 32x32; unpruned {base["top1"]:.2f} on the full set, {base["top1_heldout"]:.2f} on '
         'the held-out split). The expanded channels of all 16 inverted residuals are pruned (L2 '
         'on the expansion filters; the depthwise channel and its BNs go with them) and compensated '
         'into the projection with the forms derived in docs/mobilenet_v2.md. Each method\'s '
         'options were chosen on the development split (test images 0-1999, mean of ratios '
         f'{sel[-1]["select_ratios"]}); cells: top-1 % on the held-out split (images 5000-9999) / '
         'the full set. `python -m benchmarks.probes.mobilenet_v2`.', '',
         '| method | options (chosen on dev) | ' + ' | '.join(f'{r:.0%}' for r in RATIOS) + ' |',
         '|---|---|' + '---|' * len(RATIOS)]
  shown = [(m, chosen[m], m) for m in ('prune', 'nm', 'lbyl', 'bnm')]
  shown.append(('prune', {'bias_correction': 'off'}, 'prune as published (S_P = 0, no constant)'))
  for method, options, label in shown:
    cells = []
    for r in RATIOS:
      x = row(method, r, options)
      cells.append('-' if x is None else f"{x['top1_heldout']:.2f} / {x['top1']:.2f}")
    opts = ', '.join(f'{k}={v}' for k, v in sorted(options.items()))
    out.append(f'| {label} | {opts} | ' + ' | '.join(cells) + ' |')
  return out + ['']


def quant_section(rows) -> list[str]:
  out = ['## Weight quantization', '',
         f'Top-1 % on {SPLIT} of CIFAR-10. Weights only, per-channel symmetric (A8), first conv '
         'and classifier kept at 8 bits. rtn = round to nearest; dfq = BN fold + cross-layer '
         'equalization + bias correction; udfc = the UDFC-style compensation with a1 = 0.01, '
         'a2 = 0.008 (docs/quantization.md). Bytes = what the checkpoint stores. "+bc" = the '
         'default `--bias-correction on`: for rtn the restore\'s constant, for joint udfc that '
         'constant plus the kept-channel mean match (`lbyl_jax/quant/udfc.py`).', '']
  for arch in ('resnet56', 'resnet56_b'):
    base = _baseline(rows, arch)
    out += [f'### {arch}: {NAMES[arch]} (float {_num(base)}), no pruning', '',
            '| bits | rtn | dfq | udfc | bytes (udfc) |', '|---|---|---|---|---|']
    for bits in (8, 6, 4):
      cells = [_find(rows, arch=arch, method='prune', ratio=0.0, bits=bits, quant_method=q)
               for q in ('rtn', 'dfq', 'udfc')]
      nb = cells[2]['bytes_after'] if cells[2] else None
      out.append(f'| W{bits} | ' + ' | '.join(_cell(c) for c in cells) + f" | {nb if nb else '-'} |")
    out += ['', f'### {arch}, pruning (L2) + quantization', '',
            '| ratio | bits | lbyl published + rtn | lbyl + udfc (joint) | lbyl (default, +bc) + rtn '
            '| lbyl + udfc (joint, +bc) | bnm + rtn | bnm + udfc | UDFC paper (W4) |',
            '|---|---|---|---|---|---|---|---|---|']
    for r in (0.3, 0.4, 0.5):
      for bits in (6, 4):
        cells = [_find(rows, arch=arch, method='lbyl', ratio=r, bits=bits, quant_method='rtn', options=OFF),
                 _find(rows, arch=arch, method='lbyl', ratio=r, bits=bits, quant_method='udfc', options=OFF),
                 _find(rows, arch=arch, method='lbyl', ratio=r, bits=bits, quant_method='rtn', options=ON),
                 _find(rows, arch=arch, method='lbyl', ratio=r, bits=bits, quant_method='udfc', options=ON),
                 _find(rows, arch=arch, method='bnm', ratio=r, bits=bits, quant_method='rtn'),
                 _find(rows, arch=arch, method='bnm', ratio=r, bits=bits, quant_method='udfc')]
        if all(c is None for c in cells):
          continue
        paper = f'{UDFC_TABLE[r][2]:.2f}' if (arch == 'resnet56_b' and bits == 4) else '-'
        out.append(f'| {r} | W{bits} | ' + ' | '.join(_cell(c) for c in cells) + f' | {paper} |')
    out.append('')
  return out


def solver_section(results_dir: pathlib.Path) -> list[str]:
  from benchmarks.solver_speed import markdown, per_layer_markdown  # pylint: disable=import-outside-toplevel

  runs = _solver_runs(results_dir)
  out = ['## Solver speed', '']
  if not runs:
    return out + ['(no solver benchmark results yet)', '']
  out += ['Random weights in the real shapes (no data; timings do not depend on the values). '
          '"whole restore" = one warm whole compression: selection, solves, surgery, statistics '
          '(the package\'s `restore()` when these files were written; `lbyl_jax.pipeline.compress` '
          'in the current script).', '']
  for f, run in runs:
    out += [f'`{_module_command(run["command"])}` ({f.name})', '']
    out += [_module_command(run[k]) for k in ('command_vgg16_bn', 'note') if k in run]
    out += ['', markdown(run['results'], run['env']), '']
    if any('unbatched_f32_s' in x or 'numpy_per_filter_s' in x
           for r in run['results'] for x in r.get('per_layer', [])):
      out += ['Per layer:', '', per_layer_markdown(run['results']), '']
  return out


def throughput_section(results_dir: pathlib.Path) -> list[str]:
  f = results_dir / 'throughput.json'
  out = ['## Inference throughput of physically pruned models', '']
  if not f.exists():
    return out + ['(not run yet)', '']
  run = json.loads(f.read_text())
  out += [f"`{_module_command(run['command'])}` on {run['machine']}. Random weights in the real "
          f"shapes, compile excluded. {run.get('note', '')}", '',
          '| arch | ratio | params | GFLOPs | images/s | speed-up |', '|---|---|---|---|---|---|']
  for r in run['results']:
    out.append(f"| {r['arch']} | {r['ratio']} | {r['params']} | {r['flops'] / 1e9:.3f} | "
               f"{r['images_per_s']:.0f} | {r['speedup']:.2f}x |")
  return out + ['']


def _forest_plot(path: pathlib.Path, panels: list[tuple[str, list[str]]], summary: dict) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  panels = [(t, labels) for t, labels in panels if labels]
  heights = [len(labels) for _, labels in panels]
  fig, axes = plt.subplots(len(panels), 1, figsize=(9, 0.3 * sum(heights) + 1.6 * len(panels)),
                           gridspec_kw=dict(height_ratios=heights), squeeze=False)
  for ax, (title, labels) in zip(axes[:, 0], panels):
    y = list(range(len(labels)))[::-1]
    for yi, k in zip(y, labels):
      c = summary[k]
      color = 'tab:red' if c['mcnemar_p'] < 0.05 else 'tab:gray'
      ax.errorbar(c['diff'], yi, xerr=[[c['diff'] - c['ci95'][0]], [c['ci95'][1] - c['diff']]],
                  fmt='o', color=color, capsize=2, ms=3)
    ax.axvline(0.0, color='k', lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_title(title, fontsize=9)
  axes[-1, 0].set_xlabel('A - B, top-1 points (95 % interval; red: McNemar p < 0.05)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def significance_section(results_dir: pathlib.Path, plots_dir: pathlib.Path) -> list[str]:
  """The paired comparisons of `benchmarks.probes.paired_significance`."""
  f = results_dir / 'paired_significance.json'
  out = ['## Which margins the test set resolves', '']
  if not f.exists():
    return out + ['(not run yet: `python -m benchmarks.probes.paired_significance`)', '']
  summary = json.loads(f.read_text())
  quant = [k for k in summary if ' bnm ' not in k]
  rules = [k for k in summary if ' bnm ' in k]
  summary = {k: summary[k] for k in quant + rules}
  out += ['`python -m benchmarks.probes.paired_significance`: both models of each row evaluated on '
          f'the same images ({SPLIT} of CIFAR-10). "only A" / "only B": images exactly one of them '
          'gets right; p: exact two-sided McNemar test; the interval is the 95 % normal interval of '
          'the paired difference. For the bnm rows B is whichever of bias correction off / on '
          'scored higher, chosen after seeing both, so the p-values there are optimistic for B. '
          'The plot leaves out the "on vs off" rows (context for the table).',
          '', '| A vs B | A | B | A - B | 95 % interval | only A | only B | p |',
          '|---|---|---|---|---|---|---|---|']
  for label, c in summary.items():
    lo, hi = c['ci95']
    out.append(f"| {label} | {c['top1_a']:.2f} | {c['top1_b']:.2f} | {c['diff']:+.2f} | "
               f"{lo:+.2f} to {hi:+.2f} | {c['only_a']} | {c['only_b']} | {c['mcnemar_p']:.3g} |")
  plots_dir.mkdir(exist_ok=True)
  _forest_plot(plots_dir / 'paired_significance.png',
               [('joint UDFC (A) vs round-to-nearest (B)', quant),
                ('bias rule (A) vs the better of bias correction off / on (B)',
                 [k for k in rules if not k.endswith('on vs off')])], summary)
  return out + ['', '![paired differences](plots/paired_significance.png)', '']


def moments_route_lines(results_dir: pathlib.Path) -> list[str]:
  """The moments route of BN re-estimation: its development-split rows next to the held-out ones
  (only cells stored on both), and the cells the development split would switch on."""
  dev, held = [], []
  for arch in bn_heldout.ARCHS:
    d, h = (bn_heldout.out_path(arch, results_dir, split=s) for s in ('dev', 'held-out'))
    if d.exists() and h.exists():
      dev.append(bn_heldout.load_results(d, arch, 'dev'))
      held.append(bn_heldout.load_results(h, arch))
  if not dev:
    return []
  rule = bn_heldout.dev_rule(dev)
  on = sorted({(v, r) for (v, r), g in rule.items() if g > bn_heldout.RULE_MIN_GAIN},
              key=lambda k: (k[0], k[1]))
  by_variant: dict[str, list[str]] = {}
  for v, r in on:
    by_variant.setdefault(v, []).append(f'{100 * r:.0f}')
  picked = '; '.join(f'`{v}` at {", ".join(rs)} %' for v, rs in by_variant.items()) or 'nothing'
  conf = bn_heldout.heldout_confirmation(dev, held)
  every = sorted(k for k, c in conf.items() if c['confirms'] and not c['contradicts']
                 and not c['unresolved'])
  against = sorted(k for k, c in conf.items() if c['contradicts'])
  n_ckpt = len(held)
  cost = ''
  speed = results_dir / 'command_speed_moments.json'
  if speed.exists():
    warm = json.loads(speed.read_text())['rows'][0]['warm']
    cost = (f' (warm median {warm["phases"]["bn_reestimate"]:.2f} s of a '
            f'{warm["command_wall"]["median"]:.2f} s command, {warm["ratio_wall"]["median"]:.2f}x '
            'the import against the 3x target)')
  confirmation = (
      'Rule 3 (a development win confirmed by a paired held-out test) on those cells: the '
      'held-out split confirms the gain (re-estimated above none at McNemar p < 0.05) on every '
      'checkpoint that has the cell for ' + '; '.join(
          f'`{v}` at {100 * r:.0f} % (' + (f'all {n_ckpt}' if len(conf[(v, r)]['confirms']) == n_ckpt
                                            else ', '.join(conf[(v, r)]['confirms']) + ' only')
          + ')' for v, r in every) + '; it contradicts it (below at p < 0.05) on at least one checkpoint '
      'for ' + ('; '.join(f'`{v}` at {100 * r:.0f} % ({", ".join(conf[(v, r)]["contradicts"])})'
                          for v, r in against) or 'no cell')
      + '; the other cells are unresolved on at least one checkpoint. So for the default method, '
      'lbyl, the evidence would allow it at 30-50 %. It stays opt-in, not a default, for three '
      'reasons: it does not reach the 4-bit part of the target (above, and already on the '
      'development split: NM ResNet-56, `lbyl+rtn4` / `lbyl+udfc4` rows); on a ResNet-50 command '
      f'it would break that command\'s speed target{cost}, "Whole-command speed and memory"; and '
      'switching it on would change the output of the main command at 30-50 % and of every stored '
      'row made with the default.') if against or every else ''
  return ['#### The moments route (`--bn-reestimate moments`)', '',
          'The BN-moments model propagated through the compressed network (recipe `'
          + bn_heldout.MOMENTS + '`: positions shared, anchored; no inputs, no optimization). '
          'Development-split rows (`python -m benchmarks.bn_reestimate --arch ARCH --recipe '
          'moments --split dev`, files `bn_reestimate_dev_<arch>.json`) next to the held-out ones '
          '(`--recipe moments`, the same files as above); `mean dev gain` is the mean over the '
          'checkpoints of re-estimated minus none on the development split, what a rule "re-estimate '
          'where it gains on the development split" reads. On the development split that rule '
          f'switches it on for {picked}. ' + confirmation,
          '', bn_heldout.moments_table(dev, held), '']


def heldout_section(results_dir: pathlib.Path) -> list[str]:
  """The measurements made on the held-out split (test images 5,000-9,999) with choices made on
  the development split (0-4,999), each from its committed results file."""
  lines = ['## Held-out split', '',
           'The tables under "Detailed tables" are on the full test sets, which also served to make '
           'the choices described in [NOTES.md](NOTES.md). The measurements in this section follow '
           'the protocol of `../shared/DATA.md`: every choice was made on the development split '
           '(test images 0-4,999) and the figures are on the held-out split (5,000-9,999), never '
           'used for a choice. The earlier comparisons on the held-out split alone are not '
           're-measured yet.', '']
  stored = [(arch, bn_heldout.out_path(arch, results_dir)) for arch in bn_heldout.ARCHS]
  stored = [(arch, path) for arch, path in stored if path.exists()]
  if stored:
    lines += ['### Data-free BN re-estimation after compression (`--bn-reestimate distilled`)', '',
              'The recipe (64 inputs distilled from the original checkpoint in 50 Adam steps, '
              'anchored, layer by layer) was chosen on the development split; it is opt-in, not a '
              'default. One table per checkpoint, every stored row; `diff` is re-estimated minus '
              'none on the same 5,000 held-out images (paired, exact McNemar test). '
              '`python -m benchmarks.bn_reestimate --arch ARCH` (add `--methods lbyl '
              '--quant-methods rtn,udfc --ratios 0.3,0.4,0.5` for the 4-bit rows); method and '
              'choice: [docs/bn_reestimate.md](../docs/bn_reestimate.md). '
              + ' '.join(bn_heldout.NO_BN.values()), '']
    for arch, path in stored:
      lines += [bn_heldout.table(bn_heldout.load_results(path, arch)), '']
    target = bn_heldout.out_path(bn_heldout.TARGET_ARCH, results_dir)
    if target.exists():
      lines += ['#### Against the accuracy target for high ratios', '',
                'NM ResNet-56, held-out split, data-free, one default: top-1 (distance to the '
                'target). The default stays without re-estimation: the distilled recipe is not '
                'made a default (its distillation costs 30-50 s per network on this CPU for a '
                'CIFAR ResNet-56 and would grow with the input size and the depth, e.g. for a '
                '224 x 224 ResNet-50 on a CPU, against the whole-command speed targets of the '
                'default command, "Whole-command speed and memory" below), so the target is met only with the opt-in flag, and there '
                'not at 10 % (the one loss below). The cheap moments route (last column; next '
                'section) meets the float part and the no-loss condition, not the 4-bit part. The '
                'default that results is the unchanged one: no re-estimation, so it adds 0 s; the '
                'opt-in routes\' costs are in the tables (`re-est. s`, the distillation per run) '
                'and, for a ResNet-50 command, under "Whole-command speed and memory".', '',
                bn_heldout.target_table(bn_heldout.load_results(target, bn_heldout.TARGET_ARCH)),
                '']
    lines += moments_route_lines(results_dir)
  path = results_dir / rule_goals.OUT.name
  if path.exists():
    goals = rule_goals.load(path)
    lines += ['### The rule goals on the development / held-out split', '']
    lines += rule_goals.bias_lines(goals) + rule_goals.udfc_lines(goals)
  path = results_dir / 'quant_methods_heldout.json'
  if path.exists():
    lines += quant_methods_section(path)
  return lines


def _names(items: list[str]) -> str:
  return ', '.join(items) if items else 'no line'


def _refusal_lines(rows: list[dict], archs: list[str]) -> list[str]:
  """One bullet per distinct refusal: the quantizers and configurations, and the message."""
  out = []
  for err, keys in quant_methods.refusals(rows, archs).items():
    mine = [r for r in rows if r['key'] in keys]
    qs = list(dict.fromkeys(q for q in quant_methods.QUANTIZERS
                            for r in mine if r['quantizer'] == q))
    where = sorted({(r['arch'], r['ratio'], r['bits'], r.get('act_bits') or 0) for r in mine})
    per: dict[str, dict[str, list[str]]] = {}  # arch -> ratio -> configurations
    for a, r, b, ab in where:
      per.setdefault(a, {}).setdefault(f'{r:.0%}', []).append(f'W{b}A{ab}' if ab else f'W{b}')
    cfg = []
    for a, by_ratio in per.items():
      groups: dict[tuple[str, ...], list[str]] = {}
      for r, labels in by_ratio.items():
        groups.setdefault(tuple(labels), []).append(r)
      cfg += [f"{a} {' and '.join(rs)} ({', '.join(labels)})" for labels, rs in groups.items()]
    out.append(f"- {', '.join(qs)} on {'; '.join(cfg)}: `{err}`")
  return out


def quant_methods_section(path: pathlib.Path) -> list[str]:
  """The quantizers side by side (`benchmarks.quant_methods`): top-1 tables with the significant
  best cells in bold, the refusals, the paired tests, the UDFC paper's orderings and model bytes,
  all from the rows file and its per-image correctness sidecar."""
  rows = json.loads(path.read_text())['rows']
  packed = quant_methods.load_correct(quant_methods.correct_path(path))
  split, ratios, bits = quant_methods.HELD_OUT, [0.0, 0.3], [4, 6, 8]
  archs = [a for a in quant_methods.ARCHS if any(r['arch'] == a for r in rows)]
  cifar = ','.join(a for a in archs if a != 'mobilenet_v2')
  reruns = [r for r in rows if 'rerun_top1' in r]
  same = [r for r in reruns if quant_methods.same_count(r['rerun_top1'], r['top1'], r['n'])]
  lines = ['### Quantizers side by side', '',
           'Round-to-nearest, OMSE, SQuant, DFQ, UDFC-style and DF-MPC (`--quant-method`), '
           'per-channel symmetric weights, first and last layer at 8 bits; "30 %" is the default '
           'LBYL pruning at ratio 0.3 before quantization (UDFC takes its joint path there). '
           'The hyper-parameters of DF-MPC were chosen on the development split '
           '([docs/quantization.md](../docs/quantization.md)). `mobilenet_v2` is the shared '
           'CIFAR-10 MobileNetV2 (preset `mobilenet_v2_cifar10`, images upsampled to 224 x 224). '
           f'**Bold**: the best quantizer of a line is above the runner-up at p < '
           f'{quant_methods.ALPHA:g} (exact two-sided McNemar test on the same 5,000 images, '
           'tables below); "refused": the package refuses the configuration (messages below). '
           f'`python -m benchmarks.quant_methods --archs {cifar} --bits 4,6,8`, '
           '`python -m benchmarks.quant_methods --archs mobilenet_v2 --bits 4,6,8`; the paired '
           'tests need `--paired` for rows stored without per-image correctness.', '',
           quant_methods.render(rows, archs, ratios, bits, split, packed=packed), '']
  act_archs = [a for a in archs if any(r['arch'] == a and r.get('act_bits') for r in rows)]
  if act_archs:
    lines += ['Weights and activations at the same bits (WnAn, `--act-bits n`): every conv / dense '
              'input fake-quantized per tensor (unsigned after a ReLU), ranges from the BN '
              "statistics (DFQ's rule, mean + k sigma, k = n; the development-split choice); "
              'first-layer and classifier inputs at 8 bits. DFQ folds the BNs into the layers; '
              'the rule then reads the folded layers\' output statistics that DFQ tracked. '
              '`python -m benchmarks.quant_methods --archs '
              f"{','.join(act_archs)} --act-bits same`.", '',
              quant_methods.render(rows, act_archs, ratios, bits, split, act=True, packed=packed),
              '']
  refused = _refusal_lines(rows, archs)
  if refused:
    lines += ['Refused configurations (the stored error of each; nothing was worked around):', '']
    lines += refused + ['']
  lines += ['#### Paired tests', '',
            'Per-image top-1 correctness of every row is kept bit-packed in '
            '`benchmarks/results/quant_methods_correct.npz` (keyed by row). Each test pairs two '
            'rows on the same 5,000 held-out images: "only X" counts the images exactly one of '
            'them gets right; p is the exact two-sided McNemar test (binomial test of the '
            'discordant pairs, `lbyl_jax.evaluation.paired_comparison`); the best and the '
            'runner-up are chosen after seeing the accuracies, so p there is optimistic for the '
            'best. Rows measured before the correctness file existed were rerun '
            f'(`python -m benchmarks.quant_methods --archs {cifar} --paired`): '
            f'{len(same)} of {len(reruns)} reruns reproduced the stored top-1 exactly. The '
            f'tables hold {quant_methods.n_tests(rows, packed, archs, ratios, bits, split)} tests '
            'without a correction for multiple comparisons, so a p just under 0.05 is weak '
            'evidence on its own.', '',
            quant_methods.paired_tables(rows, packed, archs, ratios, bits, split), '']
  lines += _paper_lines(rows, packed, archs, ratios, bits, split)
  lines += ['#### Model bytes', '',
            'KiB stored by `save` (`bytes_after`): weights of 5-8 bits in int8 containers, of '
            'at most 4 bits packed two per byte, scales, biases and BatchNorm in float32 (so W6 '
            'takes as many bytes as W8); the float column is the float32 model (pruned at 30 %). '
            'A quantizer whose bytes differ from the others is named with its own; DF-MPC here '
            'runs at uniform bits (its mixed-precision mode, `--dfmpc-high-bits`, is not in '
            'these rows).', '', quant_methods.bytes_table(rows, archs, ratios, bits, split), '']
  return lines


def _paper_lines(rows, packed, archs, ratios, bits, split) -> list[str]:
  """The UDFC paper's Table 1 orderings against our paired tests, and the float-to-quantized
  loss per model (MobileNetV2 is the paper's hard case)."""
  summ = quant_methods.paper_summary(rows, packed, archs, ratios, bits, split)
  names = dict(squant='SQuant above DFQ', udfc='UDFC-style above DFQ',
               **{'udfc-squant': 'UDFC-style above SQuant'})
  out = ['#### Against the UDFC paper\'s ordering', '',
         "The UDFC paper's Table 1 (ImageNet, no significance tests) has SQuant and UDFC above DFQ "
         'at W6A6 (ResNet-18: 70.74 and 72.76 against 66.30), UDFC above SQuant at W6A6 '
         '(ResNet-18, ResNet-50) and W4A4 (ResNet-50), and MobileNetV2 as the hard case (UDFC at '
         'W6A6 1.16 points under its float 73.03, ResNet-50 0.15). The orderings are tested on '
         'the weight-only and the WnAn lines (DFQ\'s activation ranges come from the output '
         'statistics it tracked through the BN fold). Per ordering, the lines '
         f'where our paired test agrees (A above B, p < {quant_methods.ALPHA:g}), contradicts '
         '(A below B, p < 0.05), and the number it leaves unresolved:', '']
  for kind, label in names.items():
    s = summ[kind]
    tested = len(s['above']) + len(s['below']) + len(s['unresolved'])
    out.append(f"- {label}: agrees on {_names(s['above'])}; contradicts on "
               f"{_names(s['below'])}; unresolved on {len(s['unresolved'])} of {tested} tested "
               'lines' + (f"; {len(s['untested'])} lines without per-image rows"
                          if s['untested'] else '') + '.')
  by = {r['key']: r for r in rows}
  drops = []
  for a in archs:
    fl = by.get(quant_methods.row_key(a, 0.0, None, None, split))
    for b in bits:
      got = quant_methods.line_rows(by, a, 0.0, b, split, False)
      if quant_methods.measured(fl) and got:
        q = max(got, key=lambda k: (got[k]['top1'], -quant_methods.QUANTIZERS.index(k)))
        drops.append((fl['top1'] - got[q]['top1'], f'{a} W{b}', q))
  if drops:
    worst = max(drops)
    out += ['', "Float top-1 minus the best quantizer's, unpruned, weight-only (points): "
            + '; '.join(f'{w} {d:.2f} ({q})' for d, w, q in drops)
            + f'. The largest loss is {worst[1]}.']
  refused = {}
  for r in rows:
    if r['arch'] in archs and r.get('error') and not r.get('act_bits'):
      refused.setdefault(r['arch'], set()).add(r['quantizer'])
  for a, qs in refused.items():
    qs = [q for q in quant_methods.QUANTIZERS if q in qs]
    out.append(f"{a}: {', '.join(qs)} refuse it (refusals listed above), so the orderings that "
               'need them are not tested on it.')
  return out + ['']


def command_speed_section(results_dir: pathlib.Path) -> list[str]:
  """Whole-command wall time, CPU time, peak RSS and phases, paired with the import baseline."""
  lines = ['## Whole-command speed and memory', '']
  for name in ('command_speed.json', 'command_speed_resnet152.json',
               'command_speed_moments.json', 'command_speed_allocator.json',
               'command_speed_threads.json'):
    path = results_dir / name
    if not path.exists():
      continue
    res = json.loads(path.read_text())
    if 'argv' in res:  # as invoked
      cmd = 'python -m benchmarks.command_speed ' + shlex.join(res['argv'])
    else:
      cmd = 'python -m benchmarks.command_speed' + ('' if name == 'command_speed.json' else
                                                    f' --out benchmarks/results/{name}')
      archs = ','.join(dict.fromkeys(r['arch'] for r in res['rows']))
      cmd += f" --archs {archs} --repeats {len(res['rows'][0]['warm']['runs'])}"
    lines += [f"`{cmd}` ({res['started']}, {res['cpus']} "
              f"CPUs; the load column is the 1-minute load average around the runs: other jobs "
              f"shared the machine where it is above ~1). The command: `{res['command']}`; the "
              f"baseline: `{res['import_baseline']}`. Seconds; phases are medians of the runs."
              + (f" Bytecode: {res['bytecode']}, the state of an installed package "
                 f"(benchmarks/command_speed.py)." if res.get('bytecode') else ''), '',
              command_speed.table(res['rows']), '']
    lines += [f'- {key}: ' + '; '.join(t) for key, t in res['targets'].items()]
    lines.append('')
  return lines if len(lines) > 2 else []


def render(results_dir: pathlib.Path, out_md: pathlib.Path, machine: str) -> None:
  rows = _load(results_dir)
  plots = out_md.parent / 'plots'
  plots.mkdir(exist_ok=True)
  lines = ['# Results', '',
           f'Data-free pruning and quantization of pretrained CNNs, no fine-tuning. Accuracies are '
           f'top-1 % on {SPLIT} of each model (CIFAR-10 or FashionMNIST). Produced by the committed '
           f'scripts in `benchmarks/` on {machine} (CPU only); raw rows are in `benchmarks/results/`. '
           'Regenerate with `python -m benchmarks.reproduce --suite SUITE`, then '
           '`python -m benchmarks.reproduce --render` (benchmarks/README.md); '
           '`python -m benchmarks.verify_rows` re-runs stored rows and checks they reproduce. '
           'Solver and throughput timings were taken with the accuracy sweeps paused (an otherwise '
           'idle CPU); accuracies do not depend on load. Why the defaults are what they are, and '
           'what each finding rests on: [NOTES.md](NOTES.md).', '']
  lines += headline(rows, results_dir)
  lines += conclusions(rows, results_dir)
  lines += heldout_section(results_dir)
  lines += ['# Detailed tables', '']
  lines += restore_section(rows, plots)
  lines += lenet_section(rows)
  lines += bnm_section(rows, plots)
  lines += mobilenet_section(_load(results_dir / 'probes'))
  lines += quant_section(rows)
  lines += significance_section(results_dir, plots)
  lines += solver_section(results_dir)
  lines += throughput_section(results_dir)
  lines += command_speed_section(results_dir)
  out_md.write_text('\n'.join(lines).rstrip('\n') + '\n')

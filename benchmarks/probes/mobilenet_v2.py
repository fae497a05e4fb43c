"""MobileNetV2 (CIFAR-10, 224x224): prune / NM / LBYL / BN-moments on the expanded channels of all
16 inverted residuals, L2 criterion, ratios 0.1-0.5 (docs/mobilenet_v2.md).

Protocol (../shared/DATA.md):
1. selection on the DEVELOPMENT split only (its first 2,000 images, test indices 0-1999, to fit
   the 2-core CPU budget; candidates differ by several points at these ratios), at ratios 0.2 and
   0.4: per method, the candidate with the highest mean development top-1 (ties: the earlier
   candidate, defaults first). Candidates: prune with / without the mean constant; NM lam in {0.85, 0.5, 1.0}; LBYL
   (lambda1, lambda2) in {1e-5, 1e-2} x {1e-4, 1e-3, 1e-2, 1e-1}; each with bias correction 'on'
   (the project default), then 'off' at the chosen hyper-parameters; bnm spatial model in
   {calibrated, independent, constant} x bias correction {off, on};
2. the chosen settings at ratios 0.1-0.5 and the unpruned network on the FULL set; the HELD-OUT
   split (images 5000-9999) and the development split are read off the same per-example
   predictions. Paired comparisons (exact McNemar) on the held-out split.

Every evaluated row is cached in benchmarks/results/probes/mobilenet_v2.jsonl (a re-run recomputes
nothing it has); the log goes to benchmarks/results/probe_mobilenet_v2.log.

  nice -n 10 python -m benchmarks.probes.mobilenet_v2 [--phase select|final|diagnostics|all]
                                                      [--batch-size 50]

Reads ../shared (or $LBYL_JAX_SHARED).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import platform
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]

ARCH = 'mobilenet_v2_cifar10'
WEIGHTS = 'mobilenet_v2_pruned.cifar10_224.state_dict.pt'
RESULTS = ROOT / 'benchmarks' / 'results'
# The probe's rows are not a suite's (benchmarks/reproduce.py reads results/*.jsonl only).
ROWS = RESULTS / 'probes' / 'mobilenet_v2.jsonl'
LOG = RESULTS / 'probe_mobilenet_v2.log'
DEV = slice(0, 5000)
HELDOUT = slice(5000, 10000)
SELECT_N = 2000  # selection images: the first SELECT_N of the development split
SELECT_RATIOS = (0.2, 0.4)
FINAL_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


def shared_dir() -> pathlib.Path:
  env = os.environ.get('LBYL_JAX_SHARED')
  return pathlib.Path(env) if env else ROOT.parent / 'shared'


def log(msg: str) -> None:
  print(msg, flush=True)
  with open(LOG, 'a') as f:
    f.write(msg + '\n')


def _key(method: str, ratio: float | None, options: dict, split: str) -> str:
  return json.dumps(dict(method=method, ratio=ratio, options=options, split=split), sort_keys=True)


def load_rows() -> dict[str, dict]:
  rows = {}
  if ROWS.exists():
    for line in ROWS.read_text().splitlines():
      if line.strip():
        row = json.loads(line)
        rows[row['key']] = row
  return rows


def _plan_options(options: dict) -> dict:
  """The row's options as :func:`lbyl_jax.pipeline.compress` options (the rows name bnm's spatial
  model 'spatial', the option is ``bnm_spatial``)."""
  return {('bnm_spatial' if k == 'spatial' else k): v for k, v in options.items()}


class Runner:
  """Compress + evaluate with a cache of rows; one compiled evaluator per widths."""

  def __init__(self, batch_size: int):
    import converters  # pylint: disable=import-outside-toplevel  (the probe imports nothing at import)
    from lbyl_jax.evaluation import Evaluator  # pylint: disable=import-outside-toplevel
    from lbyl_jax.io import data as data_lib  # pylint: disable=import-outside-toplevel
    from lbyl_jax.models import archs  # pylint: disable=import-outside-toplevel

    self.spec = archs.get(ARCH)
    self.variables = converters.load_variables(shared_dir() / 'weights' / WEIGHTS, self.spec)
    full = data_lib.load_dataset(str(shared_dir() / 'data' / 'cifar10_test.npz'), arch=self.spec)
    self.full = full
    self.select = full.subset(SELECT_N)
    self.evaluator = Evaluator(self.spec, batch_size=batch_size)
    self.rows = load_rows()

  def run(self, method: str | None, ratio: float | None, options: dict, split: str) -> dict:
    key = _key(method, ratio, options, split)
    if key in self.rows:
      return self.rows[key]
    t0 = time.perf_counter()
    report = None
    if method is None:  # the unpruned network
      widths, variables = None, self.variables
      solve_s = 0.0
    else:
      from lbyl_jax import pipeline  # pylint: disable=import-outside-toplevel

      res = pipeline.compress(self.spec, self.variables, method=method, criterion='l2',
                              ratio=ratio, **_plan_options(options))
      widths, variables, report = res.widths, res.variables, res.report
      solve_s = time.perf_counter() - t0
    ds = {'full': self.full, 'dev2000': self.select}[split]
    pred = self.evaluator.predictions(variables, ds, widths=widths, progress=False)
    correct = pred['correct']
    # options as sorted (name, value) pairs, the convention of the other result files
    row = dict(key=key, arch=ARCH, method=method or 'unpruned', ratio=ratio, criterion='l2',
               options=sorted(options.items()), split=split, n=int(correct.size),
               top1=float(100.0 * correct.mean()), restore_seconds=solve_s,
               eval_seconds=pred['seconds'], machine=platform.node(),
               cpu_count=os.cpu_count())
    if report is not None:
      row.update(widths=list(widths), macs_before=report['macs_before'],
                 macs_after=report['macs_after'], params_after=report['params_after'],
                 bias_correction=report['bias_correction'],
                 omega=[l['diagnostics'].get('omega') for l in report['layers']],
                 merged=[l['diagnostics'].get('merged') for l in report['layers']],
                 coef_max_abs_mean=float(np.mean(
                     [l['diagnostics'].get('coef_max_abs', 0.0) for l in report['layers']])))
    if split == 'full':
      row.update(top1_dev=float(100.0 * correct[DEV].mean()),
                 top1_heldout=float(100.0 * correct[HELDOUT].mean()),
                 correct_b64=base64.b64encode(np.packbits(correct).tobytes()).decode())
    ROWS.parent.mkdir(parents=True, exist_ok=True)
    with open(ROWS, 'a') as f:
      f.write(json.dumps(row) + '\n')
    self.rows[key] = row
    extra = (f" heldout {row['top1_heldout']:.2f} dev {row['top1_dev']:.2f}"
             if split == 'full' else '')
    log(f'{split:4s} {row["method"]:8s} r={ratio} {json.dumps(options, sort_keys=True)}: '
        f'top1 {row["top1"]:.2f}{extra} (restore {solve_s:.1f} s, eval {pred["seconds"]:.1f} s)')
    return row


def correct_of(row: dict) -> np.ndarray:
  bits = np.frombuffer(base64.b64decode(row['correct_b64']), np.uint8)
  return np.unpackbits(bits)[:row['n']].astype(bool)


# --------------------------------------------------------------------------------------------
# Phase 1: selection on the development split.

PLAIN_PRUNE = dict(bias_correction='off')
LBYL_GRID = [dict(lambda1=l1, lambda2=l2) for l1 in (1e-5, 1e-2) for l2 in (1e-4, 1e-3, 1e-2, 1e-1)]
NM_GRID = [dict(nm_lam=lam) for lam in (0.85, 0.5, 1.0)]


def _mean_dev(runner: Runner, method: str, options: dict) -> float:
  return float(np.mean([runner.run(method, r, options, 'dev2000')['top1'] for r in SELECT_RATIOS]))


def _best(runner: Runner, method: str, candidates: list[dict]) -> tuple[dict, list]:
  scores = [(_mean_dev(runner, method, c), i, c) for i, c in enumerate(candidates)]
  best = max(scores, key=lambda s: (s[0], -s[1]))
  return best[2], [(c, s) for s, _, c in scores]


def select(runner: Runner) -> dict[str, dict]:
  """The chosen options per method (development split only)."""
  chosen = {}
  chosen['prune'], table = _best(runner, 'prune', [dict(bias_correction='off'),
                                                   dict(bias_correction='on')])
  log(f'select prune: {table} -> {chosen["prune"]}')
  for method, grid in (('nm', NM_GRID), ('lbyl', LBYL_GRID)):
    best_on, table = _best(runner, method, [dict(c, bias_correction='on') for c in grid])
    off = dict(best_on, bias_correction='off')
    chosen[method], table2 = _best(runner, method, [best_on, off])
    log(f'select {method}: {table} ; bias: {table2} -> {chosen[method]}')
  bnm_grid = [dict(spatial=s, bias_correction=b) for b in ('off', 'on')
              for s in ('calibrated', 'independent', 'constant')]
  chosen['bnm'], table = _best(runner, 'bnm', bnm_grid)
  log(f'select bnm: {table} -> {chosen["bnm"]}')
  row = dict(key='selection', arch=ARCH, method='selection', split='dev2000',
             select_ratios=list(SELECT_RATIOS), chosen=chosen)
  if runner.rows.get('selection', {}).get('chosen') != chosen:
    with open(ROWS, 'a') as f:
      f.write(json.dumps(row) + '\n')
    runner.rows['selection'] = row
  return chosen


# --------------------------------------------------------------------------------------------
# Phase 2: the chosen settings on the full set (held-out and full reported).


def final(runner: Runner, chosen: dict[str, dict]) -> list[dict]:
  base = runner.run(None, None, {}, 'full')
  rows = [base]
  for ratio in FINAL_RATIOS:
    for method in ('prune', 'nm', 'lbyl', 'bnm'):
      rows.append(runner.run(method, ratio, chosen[method], 'full'))
  # Reference: plain pruning as published (S_P = 0 and no constant), whatever the selection says.
  for ratio in FINAL_RATIOS:
    rows.append(runner.run('prune', ratio, PLAIN_PRUNE, 'full'))
  return rows


def table(rows: list[dict], chosen: dict[str, dict]) -> str:
  base = rows[0]
  lines = [
      f'MobileNetV2 CIFAR-10 (224x224, expanded channels of 16 blocks, L2), unpruned: held-out '
      f'{base["top1_heldout"]:.2f}, full {base["top1"]:.2f}, dev {base["top1_dev"]:.2f}',
      '', '| method (options chosen on dev) | split | ' + ' | '.join(f'{r:.0%}' for r in FINAL_RATIOS)
      + ' |', '|---|---|' + '---|' * len(FINAL_RATIOS)]
  def by(method, ratio, options):
    want = sorted(options.items())
    return next(r for r in rows[1:] if r['method'] == method and r['ratio'] == ratio
                and [tuple(p) for p in r['options']] == want)

  shown = [(m, chosen[m]) for m in ('prune', 'nm', 'lbyl', 'bnm')] + [('prune', PLAIN_PRUNE)]
  for method, options in shown:
    opts = json.dumps(options, sort_keys=True)
    for split, field in (('held-out', 'top1_heldout'), ('full', 'top1')):
      cells = ' | '.join(f'{by(method, r, options)[field]:.2f}' for r in FINAL_RATIOS)
      lines.append(f'| {method} {opts} | {split} | {cells} |')
  return '\n'.join(lines)


def paired(rows: list[dict], chosen: dict[str, dict]) -> str:
  from lbyl_jax.evaluation import paired_comparison  # pylint: disable=import-outside-toplevel

  by = {(r['method'], r['ratio']): r for r in rows[1:]
        if [tuple(p) for p in r['options']] == sorted(chosen[r['method']].items())}
  out = ['', 'Paired on the held-out split (bnm vs the best other method at each ratio; exact McNemar):']
  for ratio in FINAL_RATIOS:
    others = [m for m in ('prune', 'nm', 'lbyl')]
    best = max(others, key=lambda m: by[(m, ratio)]['top1_heldout'])
    a = correct_of(by[('bnm', ratio)])[HELDOUT]
    b = correct_of(by[(best, ratio)])[HELDOUT]
    pc = paired_comparison(a, b)
    out.append(f'  r={ratio}: bnm {pc["top1_a"]:.2f} vs {best} {pc["top1_b"]:.2f}: diff '
               f'{pc["diff"]:+.2f} (95% {pc["ci95"][0]:+.2f}..{pc["ci95"][1]:+.2f}), only bnm '
               f'{pc["only_a"]}, only {best} {pc["only_b"]}, p = {pc["mcnemar_p"]:.3g}')
  return '\n'.join(out)


def diagnostics(runner: Runner) -> None:
  """Per block: the calibrated omega, the log-variance error of the model's Var(z) against BN2's
  running variances at omega and at omega = 0, and the model's E[z] against BN2's running mean
  (data-free quantities; docs/mobilenet_v2.md 6.2)."""
  # pylint: disable=import-outside-toplevel
  from lbyl_jax.plan import Plan
  from lbyl_jax.pruning import depthwise as mc
  from lbyl_jax.pruning import moments as moments_lib
  from lbyl_jax.pruning import selection as selection_lib

  plan = Plan.from_options(method='bnm', ratio=0.3)
  inputs = moments_lib.propagate(runner.spec, runner.variables)
  log('block | N | omega | log-var rmse at omega | at omega=0 | corr(E z model, BN2 mean)')
  for p in selection_lib.build_problems(runner.spec, runner.variables, plan.selection):
    tm = mc.block_terms(runner.spec, runner.variables, p)
    model = mc.unit_moments(tm, input_var=inputs[p.unit.name].var, spatial='calibrated')
    corr = float(np.corrcoef(model['z_mean'], tm.mu2)[0, 1])
    log(f'{p.unit.name.split("/")[0]} | {tm.n} | {model["omega"]:.3f} | {model["log_rmse"]:.3f} '
        f'| {model["log_rmse_independent"]:.3f} | {corr:.3f}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--phase', choices=('select', 'final', 'diagnostics', 'all'), default='all')
  parser.add_argument('--batch-size', type=int, default=50)
  args = parser.parse_args(argv)
  RESULTS.mkdir(parents=True, exist_ok=True)
  log(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} phase={args.phase} machine={platform.node()} '
      f'cpus={os.cpu_count()}')
  runner = Runner(args.batch_size)
  if args.phase in ('diagnostics', 'all'):
    diagnostics(runner)
    if args.phase == 'diagnostics':
      return
  chosen = select(runner)
  if args.phase == 'select':
    return
  rows = final(runner, chosen)
  log(table(rows, chosen))
  log(paired(rows, chosen))


if __name__ == '__main__':
  main()

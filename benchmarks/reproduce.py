"""Accuracy sweeps on the real checkpoints in ../shared, rendered to benchmarks/RESULTS.md.

Every row is one (model, method, criterion, ratio, quantization) configuration, compressed with
:func:`lbyl_jax.pipeline.compress` (the job's options become a :class:`lbyl_jax.plan.Plan`,
:func:`job_plan`) and evaluated on the FULL test set (``--limit`` for less). Rows are appended to
``benchmarks/results/<suite>.jsonl`` as they finish; a rerun skips rows already there (by job
key), so a long sweep can be interrupted and resumed. ``--render`` turns all result files into
``benchmarks/RESULTS.md`` (:mod:`benchmarks.report`) and PNG plots of top-1 versus ratio.

Run from the repository root:

  python -m benchmarks.reproduce --suite restore     # methods x criteria x ratios, 3 CIFAR models
  python -m benchmarks.reproduce --suite lenet       # LeNet-300-100 FashionMNIST, reference + consistent
  python -m benchmarks.reproduce --suite quant       # W8/W6/W4 x rtn/dfq/udfc, pruning + quantization
  python -m benchmarks.reproduce --suite bnm         # BN-moments vs LBYL/NM/prune, bias correction
  python -m benchmarks.reproduce --suite guard       # LBYL / NM with the moment guard
  python -m benchmarks.reproduce --render
  python -m benchmarks.reproduce --quick --results-dir /tmp/q   # smoke run: few rows, 500 images
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
LENET_RATIOS = (0.5, 0.6, 0.7, 0.8)

MODELS = {
    'resnet20': ('resnet20-12fca82f.th', 'cifar10_test.npz'),
    'resnet56': ('resnet56-4bfd9763.th', 'cifar10_test.npz'),
    'resnet56_b': ('nm_resnet56.cifar10.pth.tar', 'cifar10_test.npz'),
    'lenet_300_100': ('lbyl_lenet_300_100.fashionmnist.pth.tar', 'fashion_mnist_test.npz'),
}

# LeNet lambdas of the LBYL README (docs/lbyl.md#lambdas), reference-code scale, L2 criterion.
LENET_LBYL_LAM = {0.5: 0.3, 0.6: 0.6, 0.7: 0.3, 0.8: 1e-6}
# The official codes' forms, as the LeNet 'reference' jobs spell them (the job keys hash this
# tuple, so it must not change); :func:`plan_options` turns it into preset='reference_code'.
REFERENCE_CODE = (('lbyl_mode', 'reference_code'), ('nm_mode', 'reference_code'),
                  ('bn_sigma', 'variance'), ('keep_rounding', 'round'))


def shared_dir() -> pathlib.Path:
  env = os.environ.get('LBYL_JAX_SHARED')
  return pathlib.Path(env) if env else ROOT.parent / 'shared'


@dataclasses.dataclass(frozen=True)
class Job:
  """One sweep row's configuration. Its :meth:`key` (a hash of every field) names the stored row,
  so the fields and their spelling are frozen: results/*.jsonl rows are found by it."""

  arch: str
  method: str
  criterion: str = 'l2'
  ratio: float = 0.0
  options: tuple[tuple[str, object], ...] = ()   # flat plan options (Plan.from_options)
  bits: int | None = None
  quant_method: str | None = None
  tag: str = ''

  def __post_init__(self):
    object.__setattr__(self, 'options', pin_bias_correction(self.method, self.options))

  def key(self) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


PUBLISHED_MODE = {'lbyl': ('lbyl_mode', 'consistent'), 'nm': ('nm_mode', 'exact')}


def pin_bias_correction(method: str, options) -> tuple[tuple[str, object], ...]:
  """Every LBYL / NM row names its bias correction: a row without one is the published form
  ('off'), as it was before 'on' became the default for lbyl / nm."""
  options = tuple(tuple(o) for o in options)
  if method in PUBLISHED_MODE and 'bias_correction' not in dict(options):
    key, published = PUBLISHED_MODE[method]
    if dict(options).get(key, published) == published:
      options += (('bias_correction', 'off'),)
  return options


BC_ON = (('bias_correction', 'on'),)   # the lbyl / nm default
# bnm's four bias-correction settings ('off' is bnm's default, diag covariance), as job options.
BNM_MODES = {'off': (('bnm_cov', 'diag'),), 'on': BC_ON, 'auto': (('bias_correction', 'auto'),),
             'blend': (('bias_correction', 'blend'),)}


def restore_jobs(quick: bool) -> list[Job]:
  if quick:
    return [Job('resnet20', m, 'l2', 0.3) for m in ('prune', 'nm', 'lbyl')] + [
        Job('resnet20', 'lbyl', 'l2', 0.3, BC_ON)]
  jobs = []
  for arch in ('resnet20', 'resnet56', 'resnet56_b'):
    for r in RATIOS:
      for m in ('prune', 'nm', 'lbyl'):
        jobs.append(Job(arch, m, 'l2', r))
  for arch in ('resnet20', 'resnet56_b', 'resnet56'):
    for crit in ('l1', 'l2-gm'):
      for r in RATIOS:
        for m in ('prune', 'nm', 'lbyl'):
          jobs.append(Job(arch, m, crit, r))
  # The defaults of lbyl / nm (bias correction on); rows measured by the bnm suite are reused.
  for arch in ('resnet20', 'resnet56', 'resnet56_b'):
    for crit in ('l2', 'l1', 'l2-gm'):
      for r in RATIOS:
        for m in ('nm', 'lbyl'):
          jobs.append(Job(arch, m, crit, r, BC_ON))
  return jobs


def lenet_jobs(quick: bool) -> list[Job]:
  ratios = (0.5,) if quick else LENET_RATIOS
  ref = REFERENCE_CODE
  jobs = []
  for r in ratios:
    jobs.append(Job('lenet_300_100', 'prune', 'l2', r, ref, tag='reference'))
    jobs.append(Job('lenet_300_100', 'lbyl', 'l2', r,
                    ref + (('lambda1', 0.0), ('lambda2', LENET_LBYL_LAM[r])), tag='reference'))
    jobs.append(Job('lenet_300_100', 'prune', 'l1', r, ref, tag='reference'))
    jobs.append(Job('lenet_300_100', 'nm', 'l1', r, ref + (('nm_t', 0.45),), tag='reference'))
    jobs.append(Job('lenet_300_100', 'nm', 'l2', r, ref + (('nm_t', 0.45),), tag='reference'))
    if not quick:
      for m in ('lbyl', 'nm', 'bnm'):
        jobs.append(Job('lenet_300_100', m, 'l2', r, tag='consistent'))
  return jobs


def quant_jobs(quick: bool) -> list[Job]:
  if quick:
    return [Job('resnet20', 'prune', 'l2', 0.0, bits=4, quant_method=q) for q in ('rtn', 'udfc')]
  jobs = []
  for bits in (8, 6, 4):
    for q in ('rtn', 'dfq', 'udfc'):
      jobs.append(Job('resnet56_b', 'prune', 'l2', 0.0, bits=bits, quant_method=q))
  for r in (0.3, 0.4, 0.5):
    jobs.append(Job('resnet56_b', 'lbyl', 'l2', r, bits=4, quant_method='rtn'))
    jobs.append(Job('resnet56_b', 'lbyl', 'l2', r, bits=4, quant_method='udfc'))
  jobs.append(Job('resnet56_b', 'lbyl', 'l2', 0.3, bits=6, quant_method='rtn'))
  jobs.append(Job('resnet56_b', 'lbyl', 'l2', 0.3, bits=6, quant_method='udfc'))
  for r in (0.3, 0.4, 0.5):
    jobs.append(Job('resnet56_b', 'bnm', 'l2', r, bits=4, quant_method='udfc'))
    jobs.append(Job('resnet56_b', 'bnm', 'l2', r, bits=4, quant_method='rtn'))
  for q in ('rtn', 'dfq', 'udfc'):
    jobs.append(Job('resnet56', 'prune', 'l2', 0.0, bits=4, quant_method=q))
  jobs.append(Job('resnet56', 'lbyl', 'l2', 0.3, bits=4, quant_method='rtn'))
  jobs.append(Job('resnet56', 'lbyl', 'l2', 0.3, bits=4, quant_method='udfc'))
  for bits in (8, 6):
    for q in ('rtn', 'dfq', 'udfc'):
      jobs.append(Job('resnet56', 'prune', 'l2', 0.0, bits=bits, quant_method=q))
  jobs.append(Job('resnet56', 'lbyl', 'l2', 0.3, bits=6, quant_method='rtn'))
  jobs.append(Job('resnet56', 'lbyl', 'l2', 0.3, bits=6, quant_method='udfc'))
  # The default lbyl (bias correction on) before round-to-nearest, and joint UDFC with the same
  # bias correction (udfc.udfc(bias_correction=True): pruned constant + kept-channel mean match).
  for arch, r, bits in (('resnet56_b', 0.3, 4), ('resnet56_b', 0.4, 4), ('resnet56_b', 0.5, 4),
                        ('resnet56_b', 0.3, 6), ('resnet56', 0.3, 4), ('resnet56', 0.3, 6)):
    jobs.append(Job(arch, 'lbyl', 'l2', r, BC_ON, bits=bits, quant_method='rtn'))
    jobs.append(Job(arch, 'lbyl', 'l2', r, BC_ON, bits=bits, quant_method='udfc'))
  return jobs


def bnm_jobs(quick: bool) -> list[Job]:
  if quick:
    return [Job('resnet20', 'bnm', 'l2', 0.3)]
  diag, ident = (('bnm_cov', 'diag'),), (('bnm_cov', 'identity'),)
  bc_on, bc_auto = (('bias_correction', 'on'),), (('bias_correction', 'auto'),)
  jobs = []
  # Most decisive first (a CPU-bound run may be cut short): the NM ResNet-56 of the BN-moments
  # prototype (docs/published_results.md).
  for r in RATIOS:
    for opts in (diag, bc_on, bc_auto):
      jobs.append(Job('resnet56_b', 'bnm', 'l2', r, opts))
    jobs.append(Job('resnet56_b', 'lbyl', 'l2', r, bc_on))
  for r in LENET_RATIOS:
    for m in ('prune', 'nm', 'lbyl', 'bnm'):
      jobs.append(Job('lenet_300_100', m, 'l2', r))
    for m in ('bnm', 'lbyl', 'nm'):
      jobs.append(Job('lenet_300_100', m, 'l2', r, bc_on))
      jobs.append(Job('lenet_300_100', m, 'l2', r, bc_auto))
  for r in RATIOS:
    for opts in (diag, bc_on, bc_auto):
      jobs.append(Job('resnet20', 'bnm', 'l2', r, opts))
    jobs.append(Job('resnet20', 'lbyl', 'l2', r, bc_on))
  for r in RATIOS:
    jobs.append(Job('resnet56', 'bnm', 'l2', r, diag))
  for r in RATIOS:
    jobs.append(Job('resnet56_b', 'bnm', 'l2', r, ident))
  # Bias correction on the akamaster ResNet-56 and NM with bias correction everywhere.
  for r in RATIOS:
    for opts in (bc_on, bc_auto):
      jobs.append(Job('resnet56', 'bnm', 'l2', r, opts))
    jobs.append(Job('resnet56', 'lbyl', 'l2', r, bc_on))
  for arch in ('resnet56', 'resnet20', 'resnet56_b'):
    for r in RATIOS:
      jobs.append(Job(arch, 'nm', 'l2', r, bc_on))
  # The BN-moments prototype's fold of the constant (every tap, padding ignored).
  taps = bc_on + (('bias_fold', 'all_taps'),)
  for r in RATIOS:
    for m in ('bnm', 'lbyl'):
      jobs.append(Job('resnet56_b', m, 'l2', r, taps))
  # 'blend': the rule's weight in [0, 1] per unit instead of auto's 0 / 1 (bnm, L2).
  for arch in ('resnet56_b', 'resnet56', 'resnet20'):
    for r in RATIOS:
      jobs.append(Job(arch, 'bnm', 'l2', r, (('bias_correction', 'blend'),)))
  # LBYL and NM with bias correction under the other two criteria, all three CIFAR models.
  for arch in ('resnet20', 'resnet56', 'resnet56_b'):
    for crit in ('l1', 'l2-gm'):
      for r in RATIOS:
        for m in ('lbyl', 'nm'):
          jobs.append(Job(arch, m, crit, r, bc_on))
  return jobs


def guard_jobs(quick: bool) -> list[Job]:
  """LBYL and NM with the data-free moment guard (option guard='moments')."""
  g = (('guard', 'moments'),)
  if quick:
    return [Job('resnet20', 'lbyl', 'l2', 0.3, g)]
  jobs = []
  for arch in ('resnet20', 'resnet56', 'resnet56_b'):
    for r in RATIOS:
      for m in ('lbyl', 'nm'):
        jobs.append(Job(arch, m, 'l2', r, g))
  for r in LENET_RATIOS:
    for m in ('lbyl', 'nm'):
      jobs.append(Job('lenet_300_100', m, 'l2', r, g))
  for crit in ('l1', 'l2-gm'):  # other criteria: ResNet-20 only (CPU budget)
    for r in RATIOS:
      for m in ('lbyl', 'nm'):
        jobs.append(Job('resnet20', m, crit, r, g))
  return jobs


SUITES = {'restore': restore_jobs, 'lenet': lenet_jobs, 'quant': quant_jobs, 'bnm': bnm_jobs,
          'guard': guard_jobs}


@functools.cache
def _loaded(arch: str):
  import converters
  from lbyl_jax.models import archs
  from lbyl_jax.io import data
  from lbyl_jax import evaluation

  spec = archs.get(arch)
  wfile, dfile = MODELS[arch]
  variables = converters.load_variables(shared_dir() / 'weights' / wfile, spec)
  ds = data.load_dataset(str(shared_dir() / 'data' / dfile))
  return spec, variables, ds, evaluation.Evaluator(spec, batch_size=1000)


def plan_options(job: Job) -> dict:
  """The flat :meth:`lbyl_jax.plan.Plan.from_options` arguments of a job.

  The LeNet 'reference' jobs carry all four reference-code options (:data:`REFERENCE_CODE`);
  they become ``preset='reference_code'``, which sets exactly those values for the job's method
  (a method's own form only where it has one: prune has neither LBYL's nor NM's mode).
  """
  options = dict(job.options)
  preset = None
  if all(options.get(k) == v for k, v in REFERENCE_CODE):
    preset = 'reference_code'
    for k, _ in REFERENCE_CODE:
      del options[k]
  quant = {} if job.bits is None else dict(quant_method=job.quant_method, bits=job.bits)
  return dict(method=job.method, preset=preset, criterion=job.criterion, ratio=job.ratio,
              **quant, **options)


def job_plan(job: Job):
  """The job's :class:`lbyl_jax.plan.Plan` (an option its stages do not use is an error)."""
  from lbyl_jax.plan import Plan

  return Plan.from_options(**plan_options(job))


def compress_job(job: Job):
  """``pipeline.compress`` of the job's plan on its loaded checkpoint."""
  from lbyl_jax import pipeline

  spec, variables, _, _ = _loaded(job.arch)
  return pipeline.compress(spec, variables, job_plan(job))


def run_job(job: Job, limit: int | None) -> dict:
  _, _, ds, ev = _loaded(job.arch)
  if limit:
    ds = ds.subset(limit)
  t = time.perf_counter()
  res = compress_job(job)
  t_restore = time.perf_counter() - t
  acc = ev.evaluate(res.variables, ds, widths=res.widths, progress=False)
  rep = res.report
  row = dict(dataclasses.asdict(job), key=job.key(), top1=acc['top1'], top5=acc['top5'], n=acc['n'],
             params_after=rep['params_after'], flops_after=rep['flops_after'],
             bytes_after=rep['bytes_after'], params_before=rep['params_before'],
             flops_before=rep['flops_before'], bytes_before=rep['bytes_before'],
             restore_seconds=t_restore, solve_seconds=rep.get('solve_seconds'),
             lambdas=[rep['layers'][0]['diagnostics'].get('lam1'), rep['layers'][0]['diagnostics'].get('lam2')]
             if rep.get('layers') else None)
  if job.options and dict(job.options).get('bias_correction') == 'auto':
    row['auto_bias_layers'] = [l['name'] for l in rep['layers']
                               if l['diagnostics'].get('bias_correction')]
  if job.options and dict(job.options).get('bias_correction') == 'blend':
    row['blend_weights'] = {l['name']: l['diagnostics'].get('bias_weight') for l in rep['layers']}
  return row


def baseline_row(arch: str, limit: int | None) -> dict:
  spec, variables, ds, ev = _loaded(arch)
  if limit:
    ds = ds.subset(limit)
  acc = ev.evaluate(variables, ds, progress=False)
  return dict(arch=arch, method='baseline', key=f'baseline-{arch}-{limit}', top1=acc['top1'],
              top5=acc['top5'], n=acc['n'])


def stored_rows(results_dir: pathlib.Path | None = None) -> dict[str, dict]:
  """Every measured row of every suite, by job key."""
  rows = {}
  for path in sorted((results_dir or ROOT / 'benchmarks' / 'results').glob('*.jsonl')):
    for line in path.read_text().splitlines():
      if line.strip():
        row = json.loads(line)
        rows[row['key']] = row
  return rows


def run_suite(name: str, results_dir: pathlib.Path, *, quick: bool, limit: int | None) -> list[dict]:
  from tqdm import tqdm

  path = results_dir / f'{name}.jsonl'
  done = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        row = json.loads(line)
        done[row['key']] = row
  jobs = SUITES[name](quick)
  todo = [j for j in jobs if j.key() not in done]
  archs_needed = sorted({j.arch for j in jobs})
  known_baselines, elsewhere = {}, {}
  for other in results_dir.glob('*.jsonl'):  # the unpruned accuracy is the same in every suite
    for row in (json.loads(line) for line in other.read_text().splitlines() if line.strip()):
      if row.get('method') == 'baseline':
        known_baselines[row['key']] = row
      elif other != path:
        elsewhere[row['key']] = row
  with open(path, 'a') as f:
    for job in [j for j in todo if j.key() in elsewhere]:  # same configuration, another suite
      f.write(json.dumps(elsewhere[job.key()]) + '\n')
      done[job.key()] = elsewhere[job.key()]
    todo = [j for j in todo if j.key() not in done]
    for arch in archs_needed:
      key = f'baseline-{arch}-{limit}'
      if key not in done and key in known_baselines:
        done[key] = known_baselines[key]
        f.write(json.dumps(known_baselines[key]) + '\n')
      if key not in done:
        row = baseline_row(arch, limit)
        f.write(json.dumps(row) + '\n')
        f.flush()
        done[key] = row
    for job in tqdm(todo, desc=name, unit='config', file=sys.stderr):
      row = run_job(job, limit)
      f.write(json.dumps(row) + '\n')
      f.flush()
      done[job.key()] = row
      print(f"{job.arch} {job.method} {job.criterion} r={job.ratio} {dict(job.options)} "
            f"bits={job.bits} {job.quant_method}: top1 {row['top1']:.2f}", file=sys.stderr, flush=True)
  return list(done.values())


def machine() -> str:
  import jax

  return (f'{platform.machine()} {os.cpu_count()} cores, {jax.default_backend()} '
          f'({jax.devices()[0].device_kind}), JAX {jax.__version__}, Python {platform.python_version()}')


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--suite', action='append', choices=sorted(SUITES), help='repeatable')
  p.add_argument('--quick', action='store_true', help='a few rows on a 500-image subset (smoke test)')
  p.add_argument('--limit', type=int, help='evaluate on the first N test images')
  p.add_argument('--results-dir', default=str(ROOT / 'benchmarks' / 'results'))
  p.add_argument('--render', action='store_true', help='write RESULTS.md tables and plots')
  p.add_argument('--results-md', default=str(ROOT / 'benchmarks' / 'RESULTS.md'))
  args = p.parse_args(argv)
  results_dir = pathlib.Path(args.results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  limit = args.limit or (500 if args.quick else None)
  suites = args.suite or ([] if args.render else sorted(SUITES))
  t0 = time.perf_counter()
  for s in suites:
    run_suite(s, results_dir, quick=args.quick, limit=limit)
  if suites:
    print(f'suites {suites} done in {time.perf_counter() - t0:.0f} s on {machine()}', file=sys.stderr)
  if args.render:
    from benchmarks import report  # pylint: disable=import-outside-toplevel

    report.render(results_dir, pathlib.Path(args.results_md), machine())


if __name__ == '__main__':
  main()

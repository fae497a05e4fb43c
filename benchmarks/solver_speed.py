"""Compensation solve time: batched JAX (float32 / float64), unbatched JAX, and NumPy per filter.

For each architecture (random weights in the real shapes; no data needed) and pruning ratio, the
LBYL consistent-form systems (docs/lbyl.md#consistent-closed-form) of every prunable unit are
solved with:

* ``batched_f32`` / ``batched_f64``: :func:`lbyl_jax.pruning.solvers.solve` on all units at once
  (shape buckets, one compiled executable per bucket);
* ``unbatched_f32``: the same solver called once per layer (one executable per layer shape);
* ``numpy_per_filter``: the official LBYL code's solve pattern (docs/lbyl.md#reference-code-form:
  one system per pruned filter), one ``scipy.linalg.solve`` per pruned filter with the Gram
  matrix formed again for each filter, float64 on the host. The official code itself is not run
  (it needs PyTorch and its own training scripts); this emulates its loop on the same systems.

Compile time (first call of a fresh process-level cache) is reported separately from warm time
(median over ``--repeats`` runs after a warm-up). The whole :func:`lbyl_jax.pipeline.compress`
(selection, solves, surgery, statistics) is timed too. Per layer, the JSON's ``per_layer`` rows hold each system's
shape, its own warm unbatched JAX time and (for the measured layers) its NumPy per-filter time.
Results: JSON (``--out``) and two Markdown tables on stdout (whole network, per layer).

  python -m benchmarks.solver_speed --quick
  python -m benchmarks.solver_speed --archs resnet50,resnet101 --ratios 0.3 --out benchmarks/results/solver_cpu.json
  python -m benchmarks.solver_speed --compare benchmarks/results/solver_cpu.json benchmarks/results/solver_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ALL_ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'vgg16_bn')
LAM1, LAM2 = 1e-5, 1e-3


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def numpy_per_filter(problems, lam1: float, lam2: float) -> None:
  """One SciPy SPD solve per pruned filter, rebuilding A each time (as the reference codes do)."""
  import numpy as np
  import scipy.linalg

  for p in problems:
    alpha, b = p.bn['alpha'], p.bn['b']
    F = alpha[p.keep, None] * p.W[p.keep]
    bK = b[p.keep]
    for j in p.prune:
      A = F @ F.T + lam1 * np.outer(bK, bK) + lam2 * np.eye(F.shape[0])
      r = F @ (alpha[j] * p.W[j]) + lam1 * b[j] * bK
      scipy.linalg.solve(A, r, assume_a='pos')


def bench_arch(arch: str, ratio: float, *, repeats: int, modes: list[str], ref_limit: int | None):
  from lbyl_jax import pipeline
  from lbyl_jax.models import archs
  from lbyl_jax.plan import Plan
  from lbyl_jax.pruning import selection
  from lbyl_jax.pruning import solvers
  from lbyl_jax.pruning.methods import lbyl

  spec = archs.get(arch)
  variables = spec.init(0)
  # The solver's cost: bias correction off, as when the recorded tables were measured (its own
  # cost is timed separately by benchmarks/probes/bias_correction_cost.py).
  plan = Plan.from_options(method='lbyl', ratio=ratio, lambda1=LAM1, lambda2=LAM2,
                           bias_correction='off')
  problems = selection.build_problems(spec, variables, plan.selection)
  row = dict(arch=arch, ratio=ratio, units=len(problems),
             pruned_filters=int(sum(p.prune.size for p in problems)))
  # Per-layer rows: the system's shape (N filters, m kept, |P| pruned, D = filter length).
  per_layer = [dict(name=p.unit.name, n=p.n, m=p.m, pruned=int(p.prune.size), d=int(p.W.shape[1]))
               for p in problems]
  row['per_layer'] = per_layer
  for mode in modes:
    if mode.startswith('batched') or mode.startswith('unbatched'):
      dtype = 'float64' if mode.endswith('f64') else 'float32'
      solvers.clear_cache()
      traces0 = solvers.trace_count()
      if mode.startswith('batched'):
        fn = lambda: lbyl.solve_problems(problems, lam1=LAM1, lam2=LAM2, dtype=dtype, with_cond=False)  # noqa: E731
      else:
        fn = lambda: [lbyl.solve_problems([p], lam1=LAM1, lam2=LAM2, dtype=dtype, with_cond=False)  # noqa: E731
                      for p in problems]
      t = time.perf_counter()
      fn()
      first = time.perf_counter() - t
      warm = _median_time(fn, repeats)
      row[mode] = dict(first_call_s=first, warm_s=warm, compile_s=max(first - warm, 0.0),
                       compiles=solvers.trace_count() - traces0)
      if mode == 'unbatched_f32':
        # Per layer: each unit's own warm call (its executable is cached by the runs above).
        for p, lay in zip(problems, per_layer):
          lay['unbatched_f32_s'] = _median_time(
              lambda p=p: lbyl.solve_problems([p], lam1=LAM1, lam2=LAM2, dtype=dtype, with_cond=False),
              repeats)
    elif mode == 'numpy_per_filter':
      # Evenly spaced units (every stage represented), scaled up by the unit count.
      step = 1 if ref_limit is None else max(1, -(-len(problems) // ref_limit))
      measured = range(0, len(problems), step)
      el = 0.0
      for i in measured:
        t = time.perf_counter()
        numpy_per_filter([problems[i]], LAM1, LAM2)
        per_layer[i]['numpy_per_filter_s'] = time.perf_counter() - t
        el += per_layer[i]['numpy_per_filter_s']
      row[mode] = dict(warm_s=el * len(problems) / len(measured), measured_units=len(measured),
                       extrapolated=len(measured) < len(problems))
    else:
      raise ValueError(f'unknown mode {mode!r}')
  # Whole compression (selection + solve + surgery + stats), warm (solver executables cached).
  pipeline.compress(spec, variables, plan)
  row['restore_total_s'] = _median_time(lambda: pipeline.compress(spec, variables, plan),
                                        max(1, repeats // 2))
  if 'numpy_per_filter' in row and 'batched_f32' in row:
    row['speedup_batched_f32_vs_numpy'] = row['numpy_per_filter']['warm_s'] / row['batched_f32']['warm_s']
  return row


def environment() -> dict:
  import jax
  import jaxlib

  dev = jax.devices()[0]
  return dict(backend=jax.default_backend(), device=str(dev.device_kind), n_devices=jax.device_count(),
              jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version(),
              machine=platform.machine(), cpu_count=os.cpu_count(),
              loadavg_1_5_15=list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
              gram_precision='HIGHEST', float32_jitter='1e-6 * trace(A) / m',
              lambdas=dict(lambda1=LAM1, lambda2=LAM2))


def markdown(results: list[dict], env: dict) -> str:
  head = (f"Backend {env['backend']} ({env['device']}), JAX {env['jax']}. Warm times are medians; "
          'compile time = first call - warm.\n\n'
          '| arch | ratio | units | pruned filters | batched f32 warm s | compile s (#) | batched f64 warm s |'
          ' unbatched f32 warm s | NumPy per filter s | speed-up vs NumPy | whole restore s |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|')
  lines = [head]
  for r in results:
    def g(mode, key='warm_s'):
      return f"{r[mode][key]:.4f}" if mode in r else '-'

    comp = (f"{r['batched_f32']['compile_s']:.2f} ({r['batched_f32']['compiles']})"
            if 'batched_f32' in r else '-')
    npf = r.get('numpy_per_filter')
    npf_s = '-' if npf is None else f"{npf['warm_s']:.3f}" + ('*' if npf['extrapolated'] else '')
    sp = r.get('speedup_batched_f32_vs_numpy')
    lines.append(f"| {r['arch']} | {r['ratio']} | {r['units']} | {r['pruned_filters']} | {g('batched_f32')}"
                 f" | {comp} | {g('batched_f64')} | {g('unbatched_f32')} | {npf_s}"
                 f" | {'-' if sp is None else f'{sp:.0f}x'} | {r['restore_total_s']:.3f} |")
  return '\n'.join(lines)


def per_layer_markdown(results: list[dict]) -> str:
  """Per-layer solve times: for each (arch, ratio), the distribution over layers and the slowest
  layers (unbatched JAX float32, one warm call per layer; NumPy per filter where measured)."""
  lines = ['| arch | ratio | layers | unbatched f32 per layer: median / max s | slowest layer (N, m, D) |'
           ' NumPy per filter per layer: median / max s (layers measured) |',
           '|---|---|---|---|---|---|']
  for r in results:
    lay = r.get('per_layer', [])
    ub = [x for x in lay if 'unbatched_f32_s' in x]
    npf = [x['numpy_per_filter_s'] for x in lay if 'numpy_per_filter_s' in x]
    if ub:
      ts = [x['unbatched_f32_s'] for x in ub]
      worst = max(ub, key=lambda x: x['unbatched_f32_s'])
      ub_cell = f'{statistics.median(ts):.5f} / {max(ts):.5f}'
      worst_cell = f"{worst['name']} ({worst['n']}, {worst['m']}, {worst['d']})"
    else:
      ub_cell = worst_cell = '-'
    np_cell = f'{statistics.median(npf):.4f} / {max(npf):.4f} ({len(npf)})' if npf else '-'
    lines.append(f"| {r['arch']} | {r['ratio']} | {len(lay)} | {ub_cell} | {worst_cell} | {np_cell} |")
  return '\n'.join(lines)


def compare(paths: list[str]) -> str:
  """Side-by-side batched-f32 warm times of several result files (one per accelerator)."""
  runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
  keys = sorted({(r['arch'], r['ratio']) for run in runs for r in run['results']})
  head = '| arch | ratio | ' + ' | '.join(f"{run['env']['backend']} {run['env']['device']}" for run in runs) + ' |'
  lines = [head, '|---|---|' + '---|' * len(runs)]
  for arch, ratio in keys:
    cells = []
    for run in runs:
      hit = [r for r in run['results'] if (r['arch'], r['ratio']) == (arch, ratio)]
      cells.append(f"{hit[0]['batched_f32']['warm_s']:.4f}" if hit and 'batched_f32' in hit[0] else '-')
    lines.append(f'| {arch} | {ratio} | ' + ' | '.join(cells) + ' |')
  return 'batched float32 warm solve seconds\n\n' + '\n'.join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--archs', default=','.join(ALL_ARCHS))
  p.add_argument('--ratios', default='0.1,0.2,0.3,0.4,0.5')
  p.add_argument('--modes', default='batched_f32,batched_f64,unbatched_f32,numpy_per_filter')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--ref-limit', type=int, default=None,
                 help='time the NumPy reference on about N evenly spaced units and extrapolate')
  p.add_argument('--backend', choices=('cpu', 'gpu', 'tpu'), help='JAX platform to use')
  p.add_argument('--quick', action='store_true',
                 help='resnet18 + resnet50 at ratio 0.3, 2 repeats, NumPy reference on 4 units')
  p.add_argument('--out', help='write JSON here')
  p.add_argument('--compare', nargs='+', help='print several result JSON files side by side')
  args = p.parse_args(argv)
  if args.compare:
    print(compare(args.compare))
    return
  if args.backend:
    os.environ['JAX_PLATFORMS'] = args.backend
  if args.quick:
    args.archs, args.ratios, args.repeats, args.ref_limit = 'resnet18,resnet50', '0.3', 2, 4
  env = environment()
  results = []
  for arch in args.archs.split(','):
    for ratio in (float(r) for r in args.ratios.split(',')):
      row = bench_arch(arch, ratio, repeats=args.repeats, modes=args.modes.split(','),
                       ref_limit=args.ref_limit)
      results.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  print(markdown(results, env))
  print()
  print(per_layer_markdown(results))
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = 'python -m benchmarks.solver_speed ' + ' '.join(sys.argv[1:] if argv is None else argv)
    out.write_text(json.dumps(dict(env=env, command=command, results=results), indent=2) + '\n')


if __name__ == '__main__':
  main()

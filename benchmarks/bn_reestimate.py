"""Held-out measurement of data-free BN re-estimation after compression (issue 17).

The recipe was chosen on the DEVELOPMENT split (CIFAR-10 test images 0-4999) by the sweep of
branch h-bnre (``benchmarks/probes/bn_reestimate_sweep.py`` there): ``d64x50a`` = 64 inputs
distilled from the ORIGINAL checkpoint's BN statistics in 50 Adam steps (lr 0.1, seed 0),
statistics gathered layer by layer ('sequential'), anchored (original statistics + the change
measured between the original and the compressed network on the same inputs); these are the
defaults of ``--bn-reestimate distilled`` (:class:`lbyl_jax.experimental.bn_reestimate.BNReestimation`).
Nothing here is tuned: this script only measures that fixed recipe on the HELD-OUT split
(images 5000-9999), against no re-estimation, on the Neuron Merging ResNet-56 (preset
``resnet56_b``, ``../shared/weights/nm_resnet56.cifar10.pth.tar``), L2 criterion, the methods'
defaults (lbyl with the data-free bias correction, prune and bnm without), 30 / 40 / 50 %.

Every pair is compared on the same 5,000 images with
:func:`lbyl_jax.evaluation.paired_comparison` (difference d64x50a - none in points, its 95 %
interval, the exact McNemar p-value). Cost: the seconds of the re-estimation of that network plus
the (one, shared) distillation, on the machine that ran it (a loaded 2-core CPU for the committed
file). Rows are stored with their packed per-example correctness in
``benchmarks/results/bn_reestimate_heldout.json`` as they finish; a rerun skips stored rows.

  python -m benchmarks.bn_reestimate                      # every row (resumable)
  python -m benchmarks.bn_reestimate --methods lbyl --ratios 0.5
  python -m benchmarks.bn_reestimate --table              # the table from stored rows only
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

from lbyl_jax import evaluation
from lbyl_jax import pipeline
from lbyl_jax.experimental import bn_reestimate as bn_lib
from lbyl_jax.io import data as data_lib
from lbyl_jax.io import weights as weights_lib
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / 'benchmarks' / 'results' / 'bn_reestimate_heldout.json'
ARCH = 'resnet56_b'
WEIGHTS = 'weights/nm_resnet56.cifar10.pth.tar'
DATA = 'data/cifar10_test.npz'
HELD_OUT = (5000, 10000)
METHODS = ('lbyl', 'prune', 'bnm')
RATIOS = (0.3, 0.4, 0.5)
RECIPE = bn_lib.BNReestimation(bn_reestimate='distilled')   # d64x50a: the defaults


def shared_dir() -> pathlib.Path:
  env = os.environ.get('LBYL_JAX_SHARED')
  return pathlib.Path(env) if env else ROOT.parent / 'shared'


def _pack(correct: np.ndarray) -> str:
  return base64.b64encode(np.packbits(correct.astype(bool)).tobytes()).decode()


def _unpack(text: str, n: int) -> np.ndarray:
  return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


def _key(method: str, ratio: float, recipe: str) -> str:
  return f'{method}-r{ratio:g}-{recipe}'


def load_results(path: pathlib.Path) -> dict:
  if path.exists():
    return json.loads(path.read_text())
  return dict(arch=ARCH, weights=WEIGHTS, split='held-out', data_slice=list(HELD_OUT),
              recipe=RECIPE.recipe, recipe_options=RECIPE.describe(), rows={})


def save_results(path: pathlib.Path, results: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + '\n')
  tmp.replace(path)


def run(methods, ratios, path: pathlib.Path) -> dict:
  results = load_results(path)
  rows = results['rows']
  todo = [(m, r) for m in methods for r in ratios
          if _key(m, r, 'none') not in rows or _key(m, r, RECIPE.recipe) not in rows]
  if not todo:
    return results
  shared = shared_dir()
  spec = archs.get(ARCH)
  variables, source = weights_lib.load_weights(spec, str(shared / WEIGHTS), download=False,
                                               progress=False)
  dataset = data_lib.load_dataset(str(shared / DATA), arch=spec, slice_=HELD_OUT, download=False,
                                  progress=False)
  evaluator = evaluation.Evaluator(spec, batch_size=500)
  results['machine'] = dict(platform=platform.platform(), cpus=os.cpu_count())
  if 'original' not in results:
    pred = evaluator.predictions(variables, dataset, progress=False)
    results['original'] = dict(top1=100.0 * float(pred['correct'].mean()), n=len(dataset),
                               correct=_pack(pred['correct']))
    save_results(path, results)
  _, info = bn_lib.distilled_inputs(spec, variables, RECIPE)
  if not info['memoized']:
    results.setdefault('distill_runs', []).append(
        dict(seconds=info['seconds'], loss_start=info['loss_start'], loss_end=info['loss_end']))
  for m, r in todo:
    plan = Plan.from_options(method=m, ratio=r)
    t0 = time.perf_counter()
    res = pipeline.compress(spec, variables, plan)
    compress_s = time.perf_counter() - t0
    for name, net in (('none', res), (RECIPE.recipe, None)):
      key = _key(m, r, name)
      if key in rows:
        continue
      bn_rep = None
      if net is None:
        net = bn_lib.reestimate_compressed(res, variables, RECIPE)
        bn_rep = net.report['bn_reestimate']
      pred = evaluator.predictions(net.variables, dataset, widths=net.widths, progress=False)
      rows[key] = dict(
          method=m, ratio=r, recipe=name, bias_correction=res.report['bias_correction'],
          top1=100.0 * float(pred['correct'].mean()), n=len(dataset),
          compress_seconds=compress_s, correct=_pack(pred['correct']),
          bn_seconds=None if bn_rep is None else bn_rep['seconds'] - bn_rep['seconds_distill'],
          bn_data_free=None if bn_rep is None else bn_rep['data_free'],
          distill_loss_end=None if bn_rep is None else bn_rep['distill_loss_end'])
      save_results(path, results)
      print(f'{key}: top-1 {rows[key]["top1"]:.2f} (held-out)', flush=True)
  results['weights_source'] = str(source)
  save_results(path, results)
  return results


def table(results: dict, methods, ratios) -> str:
  rows = results['rows']
  distill_s = min((d['seconds'] for d in results.get('distill_runs', [])), default=float('nan'))
  rec = results['recipe']
  lines = [
      f"NM ResNet-56 (`{results['arch']}`), L2, held-out split (CIFAR-10 test images "
      f"{results['data_slice'][0]}-{results['data_slice'][1] - 1}); original network: "
      f"{results['original']['top1']:.2f}. `{rec}`: data-free; cost = re-estimation seconds + "
      f'the shared distillation ({distill_s:.1f} s); the first re-estimation of a set of widths '
      'includes compiling its statistics pass (the lbyl rows ran first; prune and bnm share their widths).',
      '',
      f'| method | ratio | none | {rec} | diff | 95 % CI | McNemar p | cost s |',
      '|---|---|---|---|---|---|---|---|']
  for m in methods:
    for r in ratios:
      a, b = rows.get(_key(m, r, rec)), rows.get(_key(m, r, 'none'))
      if a is None or b is None:
        continue
      pc = evaluation.paired_comparison(_unpack(a['correct'], a['n']), _unpack(b['correct'], b['n']))
      lo, hi = pc['ci95']
      p = '< 1e-300' if pc['mcnemar_p'] == 0.0 else f"{pc['mcnemar_p']:.2g}"
      lines.append(f"| {m} | {100 * r:.0f}% | {b['top1']:.2f} | {a['top1']:.2f} | "
                   f"{pc['diff']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {p} | "
                   f"{a['bn_seconds'] + distill_s:.1f} |")
  return '\n'.join(lines)


def main() -> None:
  p = argparse.ArgumentParser(prog='python -m benchmarks.bn_reestimate', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--ratios', default=','.join(str(r) for r in RATIOS))
  p.add_argument('--out', type=pathlib.Path, default=OUT)
  p.add_argument('--table', action='store_true', help='print the table from stored rows only')
  args = p.parse_args()
  methods = [m for m in args.methods.split(',') if m]
  ratios = [float(r) for r in args.ratios.split(',') if r]
  results = load_results(args.out) if args.table else run(methods, ratios, args.out)
  if 'original' not in results:
    raise SystemExit(f'{args.out}: no stored rows')
  print(table(results, methods, ratios))


if __name__ == '__main__':
  main()

"""Issue 17, item 2 (UDFC-style W4 above round-to-nearest with pruning at 30-50 %): the UDFC
weights a1 / a2 on the DEVELOPMENT split (CIFAR-10 test images 0-4999), NM ResNet-56, L2, LBYL
at 30 / 40 / 50 % followed by 4-bit weights (UDFC through its joint path, the default plan
otherwise: bias correction on, first and last layer at 8 bits), no BN re-estimation.

Rows: RTN, and UDFC over a grid of (a1, a2) around the default (0.01, 0.008), extended with
``--grid 1:0.0008,10:0.0008,100:0.0008,100:0.008,10:0.00008,100:0.00008`` (larger a2 lost
everywhere). Cached in the JSON (``--out``); a rerun computes only missing rows.

Result (2026-11-26). Development split (benchmarks/results/udfc_a1a2_dev.json): no setting beats
RTN at all three ratios. The rule "the largest smallest margin over the ratios" picks a1 = 10,
a2 = 0.008: -0.14 / +0.40 / +8.60 points against RTN at 30 / 40 / 50 %, where the default
(0.01 / 0.008) gives +0.02 / -1.20 / -2.96. Held-out split, that setting only
(benchmarks/results/udfc_a1a2_heldout.json): RTN 89.20 / 81.38 / 49.28, UDFC a1 = 10
89.94 / 82.66 / 58.70, default UDFC 89.64 / 79.98 / 46.44. No paired test is stored, the other
checkpoints were not run, and the default is unchanged.

  nice -n 10 python -m benchmarks.probes.udfc_a1a2_dev [--out PATH]
  # the setting chosen on the development split, then on the held-out split (a separate file):
  python -m benchmarks.probes.udfc_a1a2_dev --split held-out --grid A1:A2 \
      --out benchmarks/results/udfc_a1a2_heldout.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from benchmarks import bn_reestimate as bnr
from lbyl_jax import pipeline
from lbyl_jax.plan import Plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'udfc_a1a2_dev.json'
ARCH = 'resnet56_b'
RATIOS = (0.3, 0.4, 0.5)
A1 = (0.01, 0.1, 1.0, 10.0)
A2 = (0.008, 0.08, 0.8)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  p.add_argument('--split', choices=tuple(bnr.SPLITS), default='dev')
  p.add_argument('--grid', help='A1:A2[,A1:A2...] instead of the default grid')
  args = p.parse_args()
  grid = ([tuple(float(x) for x in item.split(':')) for item in args.grid.split(',')]
          if args.grid else [(a1, a2) for a1 in A1 for a2 in A2])
  rows = json.loads(args.out.read_text())['top1'] if args.out.exists() else {}
  spec, v, _, ds, ev = bnr.loaded(ARCH, args.split)
  configs = [('rtn', {})] + [(f'udfc a1={a1:g} a2={a2:g}', dict(a1=a1, a2=a2))
                             for a1, a2 in grid]
  for ratio in RATIOS:
    for name, opts in configs:
      key = f'{name} r{ratio:g}'
      if key in rows:
        continue
      t0 = time.perf_counter()
      q = 'rtn' if name == 'rtn' else 'udfc'
      res = pipeline.compress(spec, v, Plan.from_options(method='lbyl', ratio=ratio,
                                                         quant_method=q, bits=4, **opts))
      rows[key] = bnr.top1(ev, ds, res)
      print(f'{key}: {rows[key]:.2f} ({time.perf_counter() - t0:.0f} s)', flush=True)
      args.out.parent.mkdir(parents=True, exist_ok=True)
      args.out.write_text(json.dumps(dict(arch=ARCH, split=args.split,
                                          images=list(bnr.SPLITS[args.split]), top1=rows),
                                     indent=1) + '\n')
  for ratio in RATIOS:
    rtn = rows[f'rtn r{ratio:g}']
    best = max((k for k in rows if k.startswith('udfc') and k.endswith(f'r{ratio:g}')),
               key=rows.get)
    print(f'{ratio:.0%}: RTN {rtn:.2f}, best UDFC {best.rsplit(" ", 1)[0]} {rows[best]:.2f}')


if __name__ == '__main__':
  main()

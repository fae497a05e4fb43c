"""Discovery on every preset: time, what it finds, and agreement with the hand-written units.

For each preset of :mod:`lbyl_jax.archs`, :func:`lbyl_jax.graph.discover` runs on the abstract
variables (shapes only, nothing computed) at the preset's input size, batch 1. Reported per
preset: the wall time of the first call (tracing included) and the median of ``--repeats``
further calls, the number of units, of units excluded by the default policy, of coupled groups
and of unprunable producers, and whether the units equal :mod:`lbyl_jax.units`' list (same
producers, BNs, consumers, kinds, flatten, pool, order). Markdown on stdout, JSON to ``--out``.

  python -m benchmarks.discovery --out benchmarks/results/discovery_presets.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def run(names: list[str], repeats: int) -> list[dict]:
  from lbyl_jax import archs  # pylint: disable=import-outside-toplevel
  from lbyl_jax import graph  # pylint: disable=import-outside-toplevel

  rows = []
  for name in names:
    spec = archs.get(name)
    v = spec.abstract_variables()
    shape = (1, *spec.input_shape)
    t = time.perf_counter()
    d = graph.discover(spec.model, v, shape)
    first = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
      t = time.perf_counter()
      graph.discover(spec.model, v, shape)
      warm.append(time.perf_counter() - t)
    try:
      same = d.as_preset_units() == spec.units
    except ValueError:
      same = False
    rows.append(dict(
        arch=name, first_s=round(first, 3), warm_s=round(statistics.median(warm), 3) if warm else None,
        units=len(d.units), hand_written=len(spec.units), equal=bool(same),
        excluded=[e.unit.name for e in d.excluded], couplings=len(d.couplings),
        blocked=[b.producer for b in d.blocked],
        compensation={c: sum(u.compensation == c for u in d.units) for c in graph.COMPENSATIONS},
        macs=d.macs(v)))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--archs', default='', help='comma-separated presets (default: all)')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--out', default='', help='JSON output path')
  args = parser.parse_args(argv)
  from lbyl_jax import archs  # pylint: disable=import-outside-toplevel

  names = [a for a in args.archs.split(',') if a] or archs.names()
  rows = run(names, args.repeats)
  print('| preset | units | = units.py | exact / maxpool_approx | excluded | coupled groups |'
        ' unprunable | first call s | warm s |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    c = r['compensation']
    print(f"| {r['arch']} | {r['units']} | {'yes' if r['equal'] else 'NO'} |"
          f" {c['exact']} / {c['maxpool_approx']} | {', '.join(r['excluded']) or '-'} |"
          f" {r['couplings']} | {', '.join(r['blocked'])} | {r['first_s']:.2f} | {r['warm_s']:.2f} |")
  if args.out:
    meta = dict(machine=platform.platform(), processor=platform.processor(),
                python=platform.python_version())
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
  if not all(r['equal'] for r in rows):
    raise SystemExit('discovery differs from the hand-written units for: '
                     + ', '.join(r['arch'] for r in rows if not r['equal']))


if __name__ == '__main__':
  main()

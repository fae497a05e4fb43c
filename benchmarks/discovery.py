"""Discovery on every preset: time and what it finds.

For each preset of :mod:`lbyl_jax.models.archs`, :func:`lbyl_jax.models.discover.discover` runs on
the abstract variables (shapes only, nothing computed) at the preset's input size, batch 1.
Reported per preset: the wall time of the first call (tracing included) and the median of
``--repeats`` further calls, the number of units, of units excluded by the default policy, of
coupled groups and of unprunable producers. (That the units are the papers' is a test:
tests/test_discover_presets.py.) Markdown on stdout, JSON to ``--out``.

  python -m benchmarks.discovery --out benchmarks/results/discovery_presets.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from lbyl_jax.core import units as units_lib
from lbyl_jax.models import archs
from lbyl_jax.models import discover as discover_lib


def run(names: list[str], repeats: int) -> list[dict]:
  rows = []
  for name in names:
    spec = archs.get(name)
    v = spec.abstract_variables()
    shape = (1, *spec.input_shape)
    t = time.perf_counter()
    d = discover_lib.discover(spec.model, v, shape)
    first = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
      t = time.perf_counter()
      discover_lib.discover(spec.model, v, shape)
      warm.append(time.perf_counter() - t)
    rows.append(dict(
        arch=name, first_s=round(first, 3), warm_s=round(statistics.median(warm), 3) if warm else None,
        units=len(d.units),
        excluded=[e.unit.name for e in d.excluded], couplings=len(d.couplings),
        blocked=[b.producer for b in d.blocked],
        compensation={c: sum(u.compensation == c for u in d.units) for c in units_lib.COMPENSATIONS},
        macs=d.macs(v)))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--archs', default='', help='comma-separated presets (default: all)')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--out', default='', help='JSON output path')
  args = parser.parse_args(argv)
  names = [a for a in args.archs.split(',') if a] or archs.names()
  rows = run(names, args.repeats)
  print('| preset | units | exact / maxpool_approx | excluded | coupled groups |'
        ' unprunable | first call s | warm s |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    c = r['compensation']
    print(f"| {r['arch']} | {r['units']} |"
          f" {c['exact']} / {c['maxpool_approx']} | {', '.join(r['excluded']) or '-'} |"
          f" {r['couplings']} | {', '.join(r['blocked'])} | {r['first_s']:.2f} | {r['warm_s']:.2f} |")
  if args.out:
    meta = dict(machine=platform.platform(), processor=platform.processor(),
                python=platform.python_version())
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == '__main__':
  main()

"""What the default bias correction adds to a whole compression with LBYL at ratio 0.3 (random
weights, torchvision / CIFAR shapes): median wall time of :func:`lbyl_jax.pipeline.compress` with
``bias_correction`` 'off' and 'on' after one warm-up each (JIT compile excluded), per
architecture. Log: ``benchmarks/results/probe_bias_correction_cost.log``.

  python -m benchmarks.probes.bias_correction_cost [--archs resnet50,resnet101,vgg16_bn,resnet56]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv=None) -> None:
  from lbyl_jax import pipeline
  from lbyl_jax.models import archs
  from lbyl_jax.plan import Plan

  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--archs', default='resnet56,resnet50,resnet101,vgg16_bn')
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args(argv)
  print(f"{'arch':10s} {'off (s)':>8s} {'on (s)':>8s} {'added (s)':>9s}  load {os.getloadavg()[0]:.2f}")
  for arch in args.archs.split(','):
    spec = archs.get(arch)
    variables = spec.init(0)
    med = {}
    for bc in ('off', 'on'):
      plan = Plan.from_options(method='lbyl', ratio=0.3, bias_correction=bc)
      pipeline.compress(spec, variables, plan)  # warm-up: compiles
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        pipeline.compress(spec, variables, plan)
        times.append(time.perf_counter() - t)
      med[bc] = statistics.median(times)
    print(f"{arch:10s} {med['off']:8.2f} {med['on']:8.2f} {med['on'] - med['off']:9.2f}", flush=True)


if __name__ == '__main__':
  main()

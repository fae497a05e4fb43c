"""What the default bias correction adds to a whole ``restore()`` of LBYL at ratio 0.3 (random
weights, torchvision / CIFAR shapes): median wall time with ``bias_correction`` 'off' and 'on'
after one warm-up each (JIT compile excluded), per architecture.

  python benchmarks/probes/bias_correction_cost.py [--archs resnet50,resnet101,vgg16_bn,resnet56]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from lbyl_jax.models import archs
from lbyl_jax.compress import restore  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--archs', default='resnet56,resnet50,resnet101,vgg16_bn')
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args()
  print(f"{'arch':10s} {'off (s)':>8s} {'on (s)':>8s} {'added (s)':>9s}  load {os.getloadavg()[0]:.2f}")
  for arch in args.archs.split(','):
    spec = archs.get(arch)
    variables = spec.init(0)
    med = {}
    for bc in ('off', 'on'):
      cfg = restore.RestoreConfig(method='lbyl', ratio=0.3, bias_correction=bc)
      restore.restore(spec, variables, cfg)  # warm-up: compiles
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        restore.restore(spec, variables, cfg)
        times.append(time.perf_counter() - t)
      med[bc] = statistics.median(times)
    print(f"{arch:10s} {med['off']:8.2f} {med['on']:8.2f} {med['on'] - med['off']:9.2f}", flush=True)


if __name__ == '__main__':
  main()

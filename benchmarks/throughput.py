"""Inference throughput of physically pruned models versus the unpruned one.

Random weights in the real shapes (throughput does not depend on the values); each model is the
same class with smaller widths, jit-compiled once (compile excluded), then timed as the median of
``--repeats`` passes over ``--n`` images in batches of ``--batch-size``.

  python -m benchmarks.throughput --archs resnet56,resnet50 --ratios 0,0.3,0.5 --out benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time


def measure(arch: str, ratio: float, *, n: int, batch_size: int, repeats: int) -> dict:
  import jax
  import numpy as np

  from lbyl_jax import pipeline
  from lbyl_jax.models import archs
  from lbyl_jax.pruning import stats

  spec = archs.get(arch)
  variables = spec.init(0)
  if ratio > 0:
    res = pipeline.compress(spec, variables, method='prune', ratio=ratio)
    widths, variables = res.widths, res.variables
  else:
    widths = spec.default_widths()
  model = spec.build(widths)
  fwd = jax.jit(model.apply)
  x = jax.device_put(np.random.default_rng(0).standard_normal((batch_size, *spec.input_shape)).astype(np.float32))
  variables = jax.device_put(variables)
  t = time.perf_counter()
  fwd(variables, x).block_until_ready()
  compile_s = time.perf_counter() - t
  steps = max(1, n // batch_size)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      out = fwd(variables, x)
    out.block_until_ready()
    times.append(time.perf_counter() - t)
  s = stats.summary(spec, variables)
  return dict(arch=arch, ratio=ratio, widths=list(widths), params=s['params'], flops=s['flops'],
              images=steps * batch_size, seconds=statistics.median(times),
              images_per_s=steps * batch_size / statistics.median(times), compile_s=compile_s)


def main(argv=None) -> None:
  import jax

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--archs', default='resnet56,resnet50')
  p.add_argument('--ratios', default='0,0.3,0.5')
  p.add_argument('--n', type=int, default=2000, help='images per timed pass (CIFAR); /10 for 224x224')
  p.add_argument('--batch-size', type=int, default=250)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--quick', action='store_true', help='resnet20 at ratios 0 and 0.5, 500 images')
  p.add_argument('--out')
  args = p.parse_args(argv)
  if args.quick:
    args.archs, args.ratios, args.n, args.repeats = 'resnet20', '0,0.5', 500, 1
  results = []
  for arch in args.archs.split(','):
    big = arch.startswith(('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'vgg16_bn')) \
        and arch != 'vgg16_bn_cifar'
    n, bs = (max(args.n // 10, 1), max(args.batch_size // 10, 1)) if big else (args.n, args.batch_size)
    base = None
    for ratio in (float(r) for r in args.ratios.split(',')):
      row = measure(arch, ratio, n=n, batch_size=bs, repeats=args.repeats)
      base = base or row['images_per_s']
      row['speedup'] = row['images_per_s'] / base
      results.append(row)
      print(f"{arch} ratio {ratio}: {row['images_per_s']:.0f} images/s ({row['speedup']:.2f}x), "
            f"{row['flops'] / 1e9:.3f} GFLOPs", flush=True)
  machine = (f'{platform.machine()} CPU, {jax.default_backend()} ({jax.devices()[0].device_kind}), '
             f'JAX {jax.__version__}')
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = 'python -m benchmarks.throughput ' + ' '.join(sys.argv[1:] if argv is None else argv)
    out.write_text(json.dumps(dict(command=command, machine=machine,
                                   results=results), indent=2) + '\n')


if __name__ == '__main__':
  main()

"""Choose the bias correction per network by output agreement on BN-distilled inputs.

Rule, fixed before it was run: per model and ratio, among bias correction 'off' and 'on', take
the one whose compressed network has the smaller mean KL(original || compressed) on 64 inputs
distilled from the original checkpoint's BatchNorm statistics (`lbyl_jax.experimental.distill`, 300 Adam
steps, lr 0.1, seed 0); a tie goes to 'off'. No image and no label is used. The accuracies
printed beside each choice are the stored full-test-set rows of `benchmarks.reproduce` (same job keys);
the script recomputes none of them. `auto` and `blend` are listed with their KL for comparison.

Diagnostic, not part of the rule: with `--real N` the same KL is also computed on the first N
CIFAR-10 test images (their labels are never read), to tell whether a miss comes from the
distilled inputs or from output agreement itself.

  python -m benchmarks.probes.distilled_selection [--arch resnet56_b ...] [--steps 300] [--real N]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import reproduce
from benchmarks.reproduce import BNM_MODES, RATIOS, Job

MODES = {
    'bnm': BNM_MODES,
    'lbyl': {'off': (('bias_correction', 'off'),), 'on': (('bias_correction', 'on'),)},
    'nm': {'off': (('bias_correction', 'off'),), 'on': (('bias_correction', 'on'),)},
}


def main(argv=None) -> None:
  from lbyl_jax.experimental import distill

  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--arch', action='append', help='default: resnet56_b, resnet56, resnet20')
  ap.add_argument('--steps', type=int, default=300)
  ap.add_argument('--n', type=int, default=64)
  ap.add_argument('--real', type=int, default=0, help='also the KL on the first N test images')
  args = ap.parse_args(argv)
  stored = reproduce.stored_rows()
  hits = misses = 0
  for arch in args.arch or ['resnet56_b', 'resnet56', 'resnet20']:
    spec, variables, ds, _ = reproduce._loaded(arch)  # pylint: disable=protected-access
    real = None
    if args.real:
      from lbyl_jax.models import archs  # pylint: disable=import-outside-toplevel

      real = np.asarray(archs.normalize_fn(spec)(ds.subset(args.real).images))
      real_ref = distill.logits(spec, variables, real)
    t = time.perf_counter()
    inputs, info = distill.distill(spec, variables, n=args.n, steps=args.steps)
    ref = distill.logits(spec, variables, inputs)
    print(f'{arch}: distilled {args.n} inputs in {time.perf_counter() - t:.0f} s, BN-matching loss '
          f'{info["loss_start"]:.4f} -> {info["loss_end"]:.4f}', flush=True)
    for method, modes in MODES.items():
      for r in RATIOS:
        kl, acc, kl_real = {}, {}, {}
        for name, opts in modes.items():
          job = Job(arch, method, 'l2', r, opts)
          res = reproduce.compress_job(job)
          kl[name] = distill.output_kl(ref, distill.logits(spec, res.variables, inputs, res.widths))
          if real is not None:
            kl_real[name] = distill.output_kl(real_ref, distill.logits(spec, res.variables, real,
                                                                       res.widths))
          row = stored.get(job.key())
          acc[name] = None if row is None else row['top1']
        pick = 'on' if kl['on'] < kl['off'] else 'off'
        best = None
        if acc['on'] is not None and acc['off'] is not None:
          best = max(acc['on'], acc['off'])
          ok = acc[pick] >= best
          hits, misses = hits + ok, misses + (not ok)
        cells = '  '.join(f'{k}: KL {kl[k]:.4f} top-1 {acc[k] if acc[k] is None else f"{acc[k]:.2f}"}'
                          for k in modes)
        verdict = '' if best is None else (' = best' if acc[pick] >= best else
                                           f' MISSES best {best:.2f} by {best - acc[pick]:.2f}')
        print(f'  {method} {r:.0%}: {cells}  -> picks {pick}{verdict}', flush=True)
        if real is not None:
          real_pick = 'on' if kl_real['on'] < kl_real['off'] else 'off'
          print(f'    KL on {args.real} test images: ' + '  '.join(
              f'{k} {v:.4f}' for k, v in kl_real.items()) + f'  -> would pick {real_pick}', flush=True)
  print(f'picked the better of off / on in {hits} of {hits + misses} cells', flush=True)


if __name__ == '__main__':
  main()

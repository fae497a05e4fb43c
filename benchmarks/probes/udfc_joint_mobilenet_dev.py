"""UDFC-style joint with LBYL on MobileNetV2: the mean terms on / off on the development split
(docs/quantization.md, "UDFC-style on MobileNetV2 joint with LBYL").

Rows (the shared MobileNetV2 CIFAR-10 checkpoint, LBYL 30 % with its defaults, UDFC's joint path:
the depthwise composite delivery on the deployed kept channels, per-channel symmetric weights,
first and last layer at 8 bits, float activations), on the DEVELOPMENT split (test images
0-4999): the pipeline with ``--bias-correction on`` (lbyl's default: the pruned channels' constant
and the kept channels' mean match through ReLU6) and ``off``; and alternatives of ``udfc()`` with
the bias correction on: the delivery with the kept depthwise filters s_k d_k before rounding
(``float_dw_in_delivery``, the default chosen here) or as stored, Q(s_k d_k)
(``quantized_dw_in_delivery``); the constant without the kept channels' mean match
(``no_kept_mean_match``, with either depthwise filter); and,
as a diagnostic of where the loss against round-to-nearest comes from, the joint path with the
rescale s_k pinned to 1 (``no_rescale``: a1 = 0, a2 = 1e12 in the rescale, the delivery's lambdas
(0.01, 0.008) unchanged); at W4 and W6. Rows are cached in the JSON (``--out``).

  nice -n 10 python -m benchmarks.probes.udfc_joint_mobilenet_dev [--out PATH] [--bits 4,6]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from benchmarks import quant_methods as qm

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'udfc_joint_mobilenet_dev.json'
SPLIT = (0, 5000)
RATIO = 0.3


def joint_row(loaded, bits: int, bias_correction: str) -> dict:
  from lbyl_jax import pipeline  # pylint: disable=import-outside-toplevel
  from lbyl_jax.plan import Plan  # pylint: disable=import-outside-toplevel

  t = time.perf_counter()
  plan = Plan.from_options(method='lbyl', ratio=RATIO, quant_method='udfc', bits=bits,
                           bias_correction=bias_correction)
  assert plan.joint
  res = pipeline.compress(loaded.spec, loaded.variables, plan)
  t_c = time.perf_counter() - t
  pred = loaded.ev.predictions(res.eval_variables(), loaded.ds, widths=res.widths, progress=False)
  correct = np.asarray(pred['correct'], bool)
  units = res.report['quant_report']['units']
  return dict(top1=100.0 * float(correct.mean()), n=int(correct.size), compress_seconds=t_c,
              eval_seconds=pred['seconds'],
              depthwise_composite_units=sum(u.get('delivery') == 'depthwise_composite'
                                            for u in units.values()),
              mean_match_skipped=sum(u.get('mean_match_skipped', 0) for u in units.values()),
              kept=sum(u['kept'] for u in units.values()))


def variant_row(loaded, bits: int, **options) -> dict:
  """The joint path (bias correction on) with one of udfc()'s development-split alternatives."""
  from lbyl_jax.core import units as units_lib  # pylint: disable=import-outside-toplevel
  from lbyl_jax.models import trace  # pylint: disable=import-outside-toplevel
  from lbyl_jax.pruning import selection as selection_lib  # pylint: disable=import-outside-toplevel
  from lbyl_jax.quant import udfc as udfc_lib  # pylint: disable=import-outside-toplevel
  from lbyl_jax.quant import uniform  # pylint: disable=import-outside-toplevel

  spec = loaded.spec
  t = time.perf_counter()
  _, qtree, qmeta, report = udfc_lib.udfc(
      spec, loaded.variables, bits=bits, selection=selection_lib.Selection(ratio=RATIO),
      keep_8bit=trace.first_and_last_layers(spec), bias_correction=True, **options)
  deq = uniform.dequantize_tree(qtree, qmeta)
  t_c = time.perf_counter() - t
  pred = loaded.ev.predictions(deq, loaded.ds, widths=units_lib.widths_of(deq, spec.units),
                               progress=False)
  correct = np.asarray(pred['correct'], bool)
  return dict(top1=100.0 * float(correct.mean()), n=int(correct.size), compress_seconds=t_c,
              eval_seconds=pred['seconds'],
              depthwise_composite_units=sum(u.get('delivery') == 'depthwise_composite'
                                            for u in report['units'].values()))


# udfc()'s options per variant; the first three rows were made while 'quantized' was the default
# of depthwise_kernel, which they name explicitly.
VARIANTS = {'quantized_dw_in_delivery': dict(depthwise_kernel='quantized'),
            'float_dw_in_delivery': dict(depthwise_kernel='float'),
            'no_kept_mean_match': dict(kept_mean_match=False, depthwise_kernel='quantized'),
            'no_kept_mean_match_float_dw': dict(kept_mean_match=False, depthwise_kernel='float'),
            # a diagnostic, not an alternative: s_k = 1 (a2 -> infinity in the rescale), the
            # delivery's lambdas kept at (a1, a2) = (0.01, 0.008)
            'no_rescale': dict(a1=0.0, a2=1e12, delivery_lambdas=(0.01, 0.008),
                               depthwise_kernel='quantized')}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default=str(DEFAULT_OUT))
  p.add_argument('--bits', default='4,6')
  p.add_argument('--modes', default='on,off,' + ','.join(VARIANTS),
                 help='bias-correction modes of the pipeline (on, off) and udfc() variants')
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  rows = json.loads(out.read_text()) if out.exists() else {}
  loaded = qm.Loaded('mobilenet_v2', *SPLIT)
  for b in [int(x) for x in args.bits.split(',')]:
    for mode in args.modes.split(','):
      key = f'udfc_joint/bc_{mode}/W{b}'
      if key in rows:
        print(f'{key}: {rows[key]["top1"]:.2f} (cached)', flush=True)
        continue
      row = (variant_row(loaded, b, **VARIANTS[mode]) if mode in VARIANTS
             else joint_row(loaded, b, mode))
      rows[key] = dict(row, split=f'{SPLIT[0]}:{SPLIT[1]}', bits=b, ratio=RATIO,
                       bias_correction=mode)
      qm.save_probe_rows(out, rows)
      print(qm.probe_row_line(key, row), flush=True)


if __name__ == '__main__':
  main()

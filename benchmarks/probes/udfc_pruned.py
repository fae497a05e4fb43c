"""Ablation behind the finding "joint UDFC loses to LBYL + RTN with pruning" (NM ResNet-56, L2,
4-bit weights, full CIFAR-10 test set; benchmarks/NOTES.md). Reads ../shared or $LBYL_JAX_SHARED.
Log: ``benchmarks/results/probe_udfc_pruned_resnet56_b.log``.

Separates the two parts of the UDFC-style compensation (docs/quantization.md): the delivery's
lambdas (UDFC's a1/a2 = 0.01/0.008 versus LBYL's 1e-5/1e-3) and the per-channel quantization
rescale (on / off), with the same pruning everywhere. LBYL runs in its published form (bias
correction off), as when the log was written.

  python -m benchmarks.probes.udfc_pruned [--ratios 0.3 0.4 0.5] [--bits 4] [--limit N]
"""

from __future__ import annotations

import argparse

from benchmarks import reproduce


def main(argv=None) -> None:
  from lbyl_jax import pipeline
  from lbyl_jax.models import trace
  from lbyl_jax.pruning.methods import lbyl
  from lbyl_jax.pruning.selection import Selection
  from lbyl_jax.quant import udfc
  from lbyl_jax.quant import uniform

  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--ratios', type=float, nargs='+', default=[0.3])
  p.add_argument('--bits', type=int, default=4)
  p.add_argument('--limit', type=int, help='first N test images')
  a = p.parse_args(argv)
  spec, v, ds, ev = reproduce._loaded('resnet56_b')  # pylint: disable=protected-access
  if a.limit:
    ds = ds.subset(a.limit)
  keep8 = trace.first_and_last_layers(spec)
  lam = (lbyl.DEFAULT_LAMBDA1, lbyl.DEFAULT_LAMBDA2)

  def top1(widths, variables):
    return ev.evaluate(variables, ds, widths=widths, progress=False)['top1']

  for r in a.ratios:
    rows = []
    # Joint UDFC, delivery with a1/a2 (the spec) and with LBYL's lambdas.
    for name, dl in (('joint udfc, delivery a1/a2', None), ('joint udfc, delivery LBYL lambdas', lam)):
      w, qt, qm, _ = udfc.udfc(spec, v, bits=a.bits, selection=Selection(ratio=r), keep_8bit=keep8,
                               delivery_lambdas=dl)
      rows.append((name, top1(w, uniform.dequantize_tree(qt, qm))))
    # LBYL (its lambdas, published form), then the quantizer: RTN, or UDFC's rescale alone.
    restored = pipeline.compress(spec, v, method='lbyl', ratio=r, bias_correction='off')
    qt, qm = uniform.quantize_tree(restored.variables, bits=a.bits, keep_8bit=keep8)
    rows.append(('lbyl + rtn', top1(restored.widths, uniform.dequantize_tree(qt, qm))))
    w, qt, qm, _ = udfc.udfc(spec, restored.variables, bits=a.bits, keep_8bit=keep8)
    rows.append(('lbyl + udfc rescale only', top1(w, uniform.dequantize_tree(qt, qm))))
    # Float LBYL with UDFC's a1/a2 as lambdas (no quantization): the delivery's share of the gap.
    res = pipeline.compress(spec, v, method='lbyl', ratio=r, lambda1=0.01, lambda2=0.008,
                            bias_correction='off')
    rows.append(('lbyl float, lambdas 0.01/0.008', top1(res.widths, res.variables)))
    for q in ('rtn', 'udfc'):
      res = pipeline.compress(spec, v, method='bnm', ratio=r, quant_method=q, bits=a.bits)
      rows.append((f'bnm + {q}', top1(res.widths, res.variables)))
    for name, acc in rows:
      print(f'ratio {r}  W{a.bits}  {name:40s} {acc:.2f}', flush=True)


if __name__ == '__main__':
  main()

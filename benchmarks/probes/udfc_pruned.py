"""Ablation behind the issue-4 finding "joint UDFC loses to LBYL + RTN with pruning" (NM ResNet-56,
L2, 4-bit weights, full CIFAR-10 test set; benchmarks/NOTES.md). Reads ../shared or $LBYL_JAX_SHARED.

Separates the two parts of 6.2: the delivery's lambdas (UDFC's a1/a2 = 0.01/0.008 versus LBYL's
1e-5/1e-3) and the per-channel quantization rescale (on / off), with the same pruning everywhere.

  python benchmarks/probes/udfc_pruned.py [--ratios 0.3 0.4 0.5] [--bits 4]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import converters  # noqa: E402
from lbyl_jax import pipeline
from lbyl_jax.models import archs
from lbyl_jax.io import data
from lbyl_jax import evaluation as evaluate
from lbyl_jax.quant import uniform as quant
from lbyl_jax.compress import restore
from lbyl_jax.quant import udfc  # noqa: E402

SHARED = os.environ.get('LBYL_JAX_SHARED', os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared'))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--ratios', type=float, nargs='+', default=[0.3])
  p.add_argument('--bits', type=int, default=4)
  p.add_argument('--limit', type=int)
  a = p.parse_args()
  spec = archs.get('resnet56_b')
  v = converters.load_variables(os.path.join(SHARED, 'weights', 'nm_resnet56.cifar10.pth.tar'), spec)
  ds = data.load_dataset(os.path.join(SHARED, 'data', 'cifar10_test.npz'), limit=a.limit)
  ev = evaluate.Evaluator(spec, batch_size=1000)
  keep8 = quant.first_and_last_layers(spec)
  lam = (restore.DEFAULT_LAMBDA1, restore.DEFAULT_LAMBDA2)

  def top1(widths, variables):
    return ev.evaluate(variables, ds, widths=widths, progress=False)['top1']

  for r in a.ratios:
    rows = []
    # Joint UDFC (6.2), delivery with a1/a2 (spec) and with LBYL's lambdas.
    for name, dl in (('joint udfc, delivery a1/a2', None), ('joint udfc, delivery LBYL lambdas', lam)):
      w, qt, qm, _ = udfc.udfc(spec, v, bits=a.bits, ratio=r, keep_8bit=keep8, delivery_lambdas=dl)
      rows.append((name, top1(w, quant.dequantize_tree(qt, qm))))
    # LBYL restore (its lambdas), then the quantizer: RTN, or UDFC's rescale (ratio 0).
    for name, qm_ in (('lbyl + rtn', 'rtn'), ('lbyl + udfc rescale only', 'udfc-rescale')):
      w, nv, _ = restore.restore(spec, v, restore.RestoreConfig(method='lbyl', ratio=r))
      if qm_ == 'rtn':
        qt, qm = quant.quantize_tree(nv, bits=a.bits, keep_8bit=keep8)
      else:
        w, qt, qm, _ = udfc.udfc(spec, nv, bits=a.bits, ratio=0.0, keep_8bit=keep8)
      rows.append((name, top1(w, quant.dequantize_tree(qt, qm))))
    # Float LBYL with UDFC's a1/a2 as lambdas (no quantization): the delivery's share of the gap.
    w, nv, _ = restore.restore(spec, v, restore.RestoreConfig(method='lbyl', ratio=r, lambda1=0.01,
                                                              lambda2=0.008))
    rows.append(('lbyl float, lambdas 0.01/0.008', top1(w, nv)))
    for m in ('bnm',):
      for qm_ in ('rtn', 'udfc'):
        res = pipeline.compress(spec, v, restore.RestoreConfig(method=m, ratio=r),
                                pipeline.QuantConfig(bits=a.bits, method=qm_))
        rows.append((f'{m} + {qm_}', top1(res.widths, res.variables)))
    for name, acc in rows:
      print(f'ratio {r}  W{a.bits}  {name:40s} {acc:.2f}', flush=True)


if __name__ == '__main__':
  main()

"""UDFC with the bias correction on the FIRST 2,000 CIFAR-10 test images (the quick look taken
before the full-test-set rows of ``python -m benchmarks.reproduce --suite quant``;
benchmarks/NOTES.md): NM ResNet-56, L2 30 %, 4-bit weights. Joint UDFC with / without the
correction, LBYL + RTN with / without it, and joint UDFC + correction with the per-channel rescale
forced to 1 (a1 = 1e12; the delivery keeps a1 / a2 = 0.01 / 0.008). Reads ../shared or
$LBYL_JAX_SHARED. Log: ``benchmarks/results/probe_udfc_bc_subset.log``.

  python -m benchmarks.probes.udfc_bc_subset
"""

from __future__ import annotations

from benchmarks import reproduce


def main() -> None:
  from lbyl_jax import pipeline
  from lbyl_jax.models import trace
  from lbyl_jax.pruning.selection import Selection
  from lbyl_jax.quant import udfc
  from lbyl_jax.quant import uniform

  spec, variables, ds, ev = reproduce._loaded('resnet56_b')  # pylint: disable=protected-access
  ds = ds.subset(2000)
  for name, bc, q in (('joint UDFC + bc', 'on', 'udfc'), ('joint UDFC (6.2)', 'off', 'udfc'),
                      ('LBYL + bc + RTN', 'on', 'rtn'), ('LBYL + RTN', 'off', 'rtn')):
    res = pipeline.compress(spec, variables, method='lbyl', ratio=0.3, bias_correction=bc,
                            quant_method=q, bits=4)
    top1 = ev.evaluate(res.variables, ds, widths=res.widths, progress=False)['top1']
    print(f'{name}: top-1 {top1:.2f} (first 2000 images)', flush=True)
  w, qt, qm, _ = udfc.udfc(spec, variables, bits=4, selection=Selection(ratio=0.3), a1=1e12,
                           delivery_lambdas=(0.01, 0.008), bias_correction=True,
                           keep_8bit=trace.first_and_last_layers(spec))
  top1 = ev.evaluate(uniform.dequantize_tree(qt, qm), ds, widths=w, progress=False)['top1']
  print(f'joint UDFC + bc, s_k = 1: top-1 {top1:.2f} (first 2000 images)', flush=True)


if __name__ == '__main__':
  main()

"""UDFC with the bias correction on the FIRST 2,000 CIFAR-10 test images (the quick look taken
before the full-test-set rows of `reproduce.py --suite quant`; benchmarks/NOTES.md): NM ResNet-56,
L2 30 %, 4-bit weights. Joint UDFC with / without the correction, LBYL + RTN with / without it,
and joint UDFC + correction with the per-channel rescale forced to 1 (a1 = 1e12; the delivery keeps
a1 / a2 = 0.01 / 0.008). Reads ../shared or $LBYL_JAX_SHARED.

  python benchmarks/probes/udfc_bc_subset.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
import reproduce  # noqa: E402
from lbyl_jax import pipeline
from lbyl_jax.quant import uniform as quant
from lbyl_jax.compress import restore
from lbyl_jax.quant import udfc  # noqa: E402

spec, variables, ds, ev = reproduce._loaded('resnet56_b')  # pylint: disable=protected-access
ds = ds.subset(2000)
for name, bc, q in (('joint UDFC + bc', 'on', 'udfc'), ('joint UDFC (6.2)', 'off', 'udfc'),
                    ('LBYL + bc + RTN', 'on', 'rtn'), ('LBYL + RTN', 'off', 'rtn')):
  cfg = restore.RestoreConfig(method='lbyl', ratio=0.3, bias_correction=bc)
  res = pipeline.compress(spec, variables, cfg, pipeline.QuantConfig(bits=4, method=q))
  top1 = ev.evaluate(res.variables, ds, widths=res.widths, progress=False)['top1']
  print(f'{name}: top-1 {top1:.2f} (first 2000 images)', flush=True)
w, qt, qm, _ = udfc.udfc(spec, variables, bits=4, ratio=0.3, a1=1e12, delivery_lambdas=(0.01, 0.008),
                         bias_correction=True, keep_8bit=quant.first_and_last_layers(spec))
top1 = ev.evaluate(quant.dequantize_tree(qt, qm), ds, widths=w, progress=False)['top1']
print(f'joint UDFC + bc, s_k = 1: top-1 {top1:.2f} (first 2000 images)', flush=True)

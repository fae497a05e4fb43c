"""Probe used once to fix the LBYL lambdas (benchmarks/NOTES.md): prune / nm / lbyl over a
lambda grid on the first N test images. Output: benchmarks/results/probe_lambda_grid_resnet56_b.log.

  python benchmarks/probes/lambda_grid.py resnet56_b ../shared/weights/nm_resnet56.cifar10.pth.tar 1000
"""
import sys
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..'))
import os
import converters
SHARED = os.environ.get('LBYL_JAX_SHARED', os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared'))
from lbyl_jax.models import archs
from lbyl_jax.compress import restore
from lbyl_jax import evaluation as evaluate
from lbyl_jax.io import data
arch = sys.argv[1]; wfile = sys.argv[2]; n = int(sys.argv[3])
spec = archs.get(arch)
v = converters.load_variables(wfile, spec)
ds = data.load_dataset(os.path.join(SHARED, 'data', 'cifar10_test.npz'), limit=n)
ev = evaluate.Evaluator(spec, batch_size=500)
res = []
for ratio in [0.3, 0.5]:
    for m, l1, l2 in [('prune',0,0),('nm',0,0)] + [('lbyl',a,b) for a in [0, 1e-4, 1e-2] for b in [1e-4, 1e-3, 1e-2, 1e-1, 1]]:
        cfg = restore.RestoreConfig(method=m, ratio=ratio, lambda1=l1, lambda2=l2)
        w, nv, rep = restore.restore(spec, v, cfg)
        r = ev.evaluate(nv, ds, widths=w, progress=False)
        print(ratio, m, l1, l2, r['top1'], flush=True)

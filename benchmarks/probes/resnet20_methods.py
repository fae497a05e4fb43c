"""Probe of methods / lambdas on the akamaster ResNet-20, first 1000 test images
(benchmarks/NOTES.md). Reads ../shared or $LBYL_JAX_SHARED.

  python benchmarks/probes/resnet20_methods.py
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..'))
import os
import converters
SHARED = os.environ.get('LBYL_JAX_SHARED', os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared'))
from lbyl_jax.models import archs
from lbyl_jax.compress import restore
from lbyl_jax import evaluation as evaluate
from lbyl_jax.io import data
spec = archs.get('resnet20')
v = converters.load_variables(os.path.join(SHARED, 'weights', 'resnet20-12fca82f.th'), spec)
ds = data.load_dataset(os.path.join(SHARED, 'data', 'cifar10_test.npz'), limit=1000)
ev = evaluate.Evaluator(spec, batch_size=500)
for ratio in [0.1, 0.3]:
    for m, kw in [('prune',{}),('lbyl',dict(lambda2=1e-2)),('lbyl',dict(lambda2=1e-1)),('lbyl',dict(lambda2=1.0)),('lbyl',dict(lambda2=10.0)),('lbyl',dict(lambda1=1.0, lambda2=1e-1)),('bnm',{}),('nm',dict(nm_mode='reference_code'))]:
        try:
            w, nv, rep = restore.restore(spec, v, restore.RestoreConfig(method=m, ratio=ratio, **kw))
            r = ev.evaluate(nv, ds, widths=w, progress=False)
            cm = np.mean([l['diagnostics'].get('coef_max_abs', 0) for l in rep['layers']])
            print(ratio, m, kw, r['top1'], 'mean max|coef|', round(cm,3), flush=True)
        except Exception as e:
            print(ratio, m, kw, 'ERR', type(e).__name__, str(e)[:200], flush=True)

"""The rejected data-free lambda rule: mean predicted relative activation error of LBYL under
the BN-moments model, per lambda2 (benchmarks/NOTES.md).

  python benchmarks/probes/lambda_proxy.py
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..'))
import os
import converters
SHARED = os.environ.get('LBYL_JAX_SHARED', os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared'))
from lbyl_jax.models import archs
from lbyl_jax.compress import restore
from lbyl_jax.compress.methods import bnm
from lbyl_jax.compress.methods import lbyl
for arch, f in [('resnet20','resnet20-12fca82f.th'),('resnet56_b','nm_resnet56.cifar10.pth.tar')]:
    spec = archs.get(arch); v = converters.load_variables(os.path.join(SHARED, 'weights', f), spec)
    for ratio in [0.1, 0.3, 0.5]:
        cfg = restore.RestoreConfig(method='lbyl', ratio=ratio)
        probs = restore.build_problems(spec, v, cfg)
        prep = bnm._prepare(spec, v, probs, "diag", None)[0]
        M2 = bnm.second_moments(prep)
        out=[]
        for lam2 in [1e-4,1e-3,1e-2,1e-1,1,10]:
            sols = lbyl.solve_problems(probs, lam1=0.0, lam2=lam2, with_cond=False)
            rel=[]
            for p,s,(E,M) in zip(probs, sols, M2):
                K,P=p.keep,p.prune
                r = bnm._residual(s.S_P[None], M[np.ix_(P,P)][None], M[np.ix_(P,K)][None], M[np.ix_(K,K)][None])[0]
                rel.append(r/np.trace(M[np.ix_(P,P)]))
            out.append((lam2, round(float(np.mean(rel)),4)))
        print(arch, ratio, out, flush=True)

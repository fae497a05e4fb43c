"""DF-MPC on the shared MobileNetV2 on the DEVELOPMENT split: the choice of compensating the
depthwise convs too (``lbyl_jax.quant.dfmpc.DEPTHWISE_UNIFORM``).

Rows (unpruned, weight-only, first and last layer at 8 bits, as the package's defaults): RTN,
DF-MPC with the expansion units only (``depthwise=False``), DF-MPC with the depthwise convs
compensated in the projections as well (``depthwise=True``), both at the ridge ``lam = 1``
(``DEFAULT_LAM``), at each ``--bits``; plus the float
model; ``--lams`` adds DF-MPC rows (with the depthwise convs) at other ridge weights
``--dfmpc-lam`` than the default (variant ``dfmpc_depthwise@LAM``). Every row is
:func:`lbyl_jax.pipeline.compress` with the plan of ``benchmarks.quant_methods``
(``method='prune', ratio=0``); the depthwise variant is selected by setting ``DEPTHWISE_UNIFORM``
for the call. CIFAR-10 test images 0-4999 only (the development split of ../shared/DATA.md: this
script refuses a slice reaching past image 4999), evaluated at 224 x 224. Rows are cached in
``--out`` by configuration.

  nice -n 10 python -m benchmarks.dfmpc_mobilenet --bits 4,6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import time

import numpy as np

from benchmarks import quant_methods as qm

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'dfmpc_mobilenet_dev.json'
VARIANTS = ('float', 'rtn', 'dfmpc_expansion', 'dfmpc_depthwise', 'dfmpc_default')


@contextlib.contextmanager
def _depthwise(flag: bool):
  from lbyl_jax.quant import dfmpc  # pylint: disable=import-outside-toplevel
  old = dfmpc.DEPTHWISE_UNIFORM, dfmpc.DEPTHWISE_PRUNED
  dfmpc.DEPTHWISE_UNIFORM = dfmpc.DEPTHWISE_PRUNED = flag
  try:
    yield
  finally:
    dfmpc.DEPTHWISE_UNIFORM, dfmpc.DEPTHWISE_PRUNED = old


def run(loaded: qm.Loaded, variant: str, bits: int | None, ratio: float = 0.0) -> dict:
  from lbyl_jax import pipeline  # pylint: disable=import-outside-toplevel
  from lbyl_jax.plan import Plan  # pylint: disable=import-outside-toplevel
  from lbyl_jax.quant import dfmpc as dfmpc_lib  # pylint: disable=import-outside-toplevel

  base, _, lam = variant.partition('@')
  quantizer = None if base == 'float' else ('rtn' if base == 'rtn' else 'dfmpc')
  opts = qm.plan_options(ratio, bits, quantizer)
  if quantizer == 'dfmpc' and base != 'dfmpc_default':
    # explicit ridge: the unsuffixed variants are at DEFAULT_LAM (1)
    opts['dfmpc_lam'] = float(lam) if lam else dfmpc_lib.DEFAULT_LAM
  t = time.perf_counter()
  ctx = (contextlib.nullcontext() if base == 'dfmpc_default'
         else _depthwise(base != 'dfmpc_expansion'))
  with ctx:
    res = pipeline.compress(loaded.spec, loaded.variables, Plan.from_options(**opts))
  t_c = time.perf_counter() - t
  pred = loaded.ev.predictions(res.eval_variables(), loaded.ds, widths=res.widths, progress=False)
  correct = np.asarray(pred['correct'], bool)
  row = dict(variant=variant, bits=bits, ratio=ratio, top1=100.0 * float(correct.mean()), n=int(correct.size),
             compress_seconds=t_c, eval_seconds=pred['seconds'])
  rep = res.report.get('quant_report') or {}
  units = rep.get('units', {})
  if units:
    row['mean_rel_error_before'] = float(np.mean([u['rel_error_before'] for u in units.values()]))
    row['mean_rel_error_after'] = float(np.mean([u['rel_error_after'] for u in units.values()]))
    row['units'] = len(units)
  return row


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--bits', default='4,6')
  ap.add_argument('--variants', default=','.join(VARIANTS))
  ap.add_argument('--ratios', default='0', help='comma-separated pruning ratios (LBYL above 0)')
  ap.add_argument('--lams', default='', help='comma-separated extra DF-MPC ridge weights')
  ap.add_argument('--data-slice', default='0:5000')
  ap.add_argument('--out', default=str(DEFAULT_OUT))
  args = ap.parse_args(argv)
  start, stop = qm.parse_slice(args.data_slice)
  if stop > qm.DEV_STOP:
    raise SystemExit(f'--data-slice {args.data_slice}: this script measures on the development '
                     f'split only (images 0-{qm.DEV_STOP - 1})')
  variants = args.variants.split(',')
  bad = [v for v in variants if v not in VARIANTS]
  variants += [f'dfmpc_depthwise@{float(x):g}' for x in args.lams.split(',') if x]
  if bad:
    raise SystemExit(f'--variants: {bad} not among {", ".join(VARIANTS)}')
  out = pathlib.Path(args.out)
  rows = json.loads(out.read_text()) if out.exists() else {}
  loaded = qm.Loaded('mobilenet_v2', start, stop)
  split = f'{start}:{stop}'
  for ratio in [float(r) for r in args.ratios.split(',')]:
    for bits in [int(b) for b in args.bits.split(',')]:
      for variant in variants:
        row_bits = None if variant == 'float' else bits
        key = f'{variant}|{row_bits}|{split}' + (f'|r{ratio:g}' if ratio else '')
        if key not in rows:
          rows[key] = dict(run(loaded, variant, row_bits, ratio), split=split)
          qm.save_probe_rows(out, rows)
        r = rows[key]
        print(f'r{ratio:g} {variant:16s} W{r["bits"] or 32:<3} top1 {r["top1"]:.2f} % '
              f'(n={r["n"]}, split {r["split"]}) model err {r.get("mean_rel_error_before", float("nan")):.4g} -> '
              f'{r.get("mean_rel_error_after", float("nan")):.4g}', flush=True)


if __name__ == '__main__':
  main()

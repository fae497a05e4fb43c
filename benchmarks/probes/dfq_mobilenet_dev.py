"""DFQ / UDFC-style on MobileNetV2: the development-split choice (docs/quantization.md, "DFQ and
UDFC-style on MobileNetV2").

Rows (the shared MobileNetV2 CIFAR-10 checkpoint, unpruned, per-channel symmetric weights, first
and last layer at 8 bits, float activations), on the DEVELOPMENT split (test images 0-4999):
float, and the float network after equalization across the ReLU6 (``float_relu6_cle``, what that
approximation alone costs); RTN, UDFC-style (the pipeline's defaults); DFQ as the package runs it (no equalization
across ReLU6, bias correction through the depthwise conv: ``relu6_cle=False``) and the
alternative that equalizes the depthwise units' pairs across the ReLU6 as if it were a ReLU
(``relu6_cle=True``, not exact), at W4 and W6. Rows are cached in the JSON (``--out``).

  nice -n 10 python -m benchmarks.probes.dfq_mobilenet_dev [--out PATH] [--bits 4,6]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from benchmarks import quant_methods as qm

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'dfq_mobilenet_dev.json'
SPLIT = (0, 5000)


def dfq_row(loaded, bits: int, relu6_cle: bool) -> dict:
  from lbyl_jax.core import units as units_lib  # pylint: disable=import-outside-toplevel
  from lbyl_jax.models import trace  # pylint: disable=import-outside-toplevel
  from lbyl_jax.quant import dfq as dfq_lib  # pylint: disable=import-outside-toplevel
  from lbyl_jax.quant import uniform  # pylint: disable=import-outside-toplevel

  spec = loaded.spec
  t = time.perf_counter()
  qtree, qmeta, report = dfq_lib.dfq(spec, loaded.variables, bits=bits, per_channel=True,
                                     symmetric=True, keep_8bit=trace.first_and_last_layers(spec),
                                     relu6_cle=relu6_cle)
  deq = uniform.dequantize_tree(qtree, qmeta)
  t_c = time.perf_counter() - t
  pred = loaded.ev.predictions(deq, loaded.ds, widths=units_lib.widths_of(deq, spec.units),
                               progress=False)
  correct = np.asarray(pred['correct'], bool)
  corrected = sum(v == 'corrected' for v in report['bias_correction_status'].values())
  return dict(top1=100.0 * float(correct.mean()), n=int(correct.size), compress_seconds=t_c,
              eval_seconds=pred['seconds'], bias_corrected_layers=int(corrected),
              cle_iterations=report['cle']['iterations'])


def cle_float_row(loaded) -> dict:
  """The float network after the BN fold and equalization across the ReLU6 (no quantization): how
  much the inexact equalization alone costs."""
  from lbyl_jax.core import units as units_lib  # pylint: disable=import-outside-toplevel
  from lbyl_jax.models import trace  # pylint: disable=import-outside-toplevel
  from lbyl_jax.quant import dfq as dfq_lib  # pylint: disable=import-outside-toplevel

  spec = loaded.spec
  t = time.perf_counter()
  bn_of = trace.trace_layers(spec).bn
  folded, stats = dfq_lib.fold_bn(spec, loaded.variables, bn_of=bn_of)
  pairs = tuple(u for u in dfq_lib.cle_pairs(spec) if not u.through)
  eq, info = dfq_lib.equalize(spec, folded, stats=stats, bn_of=bn_of,
                              pairs=pairs + dfq_lib.through_pairs(spec, bn_of))
  t_c = time.perf_counter() - t
  pred = loaded.ev.predictions(eq, loaded.ds, widths=units_lib.widths_of(eq, spec.units),
                               progress=False)
  correct = np.asarray(pred['correct'], bool)
  return dict(top1=100.0 * float(correct.mean()), n=int(correct.size), compress_seconds=t_c,
              eval_seconds=pred['seconds'], scale_range=list(info['scale_range']))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default=str(DEFAULT_OUT))
  p.add_argument('--bits', default='4,6')
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  rows = json.loads(out.read_text()) if out.exists() else {}
  loaded = qm.Loaded('mobilenet_v2', *SPLIT)
  todo = [('float', None), ('float_relu6_cle', None)]
  for b in [int(x) for x in args.bits.split(',')]:
    todo += [('rtn', b), ('dfq', b), ('dfq_relu6_cle', b), ('udfc', b)]
  for name, bits in todo:
    key = f'{name}/W{bits}' if bits else name
    if key in rows:
      print(f'{key}: {rows[key]["top1"]:.2f} (cached)', flush=True)
      continue
    if name == 'float_relu6_cle':
      row = cle_float_row(loaded)
    elif name == 'dfq':
      row = dfq_row(loaded, bits, relu6_cle=False)
    elif name == 'dfq_relu6_cle':
      row = dfq_row(loaded, bits, relu6_cle=True)
    else:
      fields, _ = qm.evaluate_row(loaded, 0.0, bits, None if name == 'float' else name)
      row = dict(fields)
    rows[key] = dict(row, split=f'{SPLIT[0]}:{SPLIT[1]}', bits=bits, quantizer=name)
    qm.save_probe_rows(out, rows)
    print(qm.probe_row_line(key, row), flush=True)


if __name__ == '__main__':
  main()

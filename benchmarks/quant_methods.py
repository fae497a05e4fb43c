"""Weight quantizers side by side on the HELD-OUT split: RTN, OMSE, SQuant, DFQ, UDFC-style, DF-MPC.

Every row is one (model, pruning ratio, weight bits, quantizer) configuration compressed with
:func:`lbyl_jax.pipeline.compress` and evaluated on CIFAR-10 test images 5000-9999 (the held-out
split of ../shared/DATA.md; ``--data-slice`` to change it, recorded in every row). Unpruned rows
use ``method='prune', ratio=0`` (nothing removed); pruned rows use the default method (LBYL with
its defaults) at the given ratio. The quantizers run with their defaults: per-channel symmetric
grids, first and last layer at 8 bits; DF-MPC with the development-split choices of h-quant's
probe (diag, lam = 1, RTN rounding; benchmarks/results/quant_methods_dev.log); UDFC with LBYL is
its joint path. Nothing here is tuned: the hyper-parameters are the package defaults.

Rows are cached in the JSON file (``--out``) by configuration, so a rerun only computes missing
rows. The Markdown table (top-1 %, one column per quantizer) is printed at the end.

Run from the repository root:

  nice -n 10 python -m benchmarks.quant_methods                       # resnet20, W4/W6/W8
  nice -n 10 python -m benchmarks.quant_methods --archs resnet20,resnet56,resnet56_b --bits 4
  nice -n 10 python -m benchmarks.quant_methods --archs resnet20,resnet56_b --act-bits same   # WnAn
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

from benchmarks.reproduce import MODELS, shared_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'quant_methods_heldout.json'
QUANTIZERS = ('rtn', 'omse', 'squant', 'dfq', 'udfc', 'dfmpc')
HELD_OUT = '5000:10000'
DEV_STOP = 5000  # images 0-4999 are the development split


def row_key(arch: str, ratio: float, bits: int | None, quantizer: str | None, split: str,
            act_bits: int | None = None) -> str:
  return f'{arch}|r{ratio:g}|w{bits}|{quantizer}|{split}' + (f'|a{act_bits}' if act_bits else '')


def parse_slice(text: str) -> tuple[int, int]:
  try:
    start, stop = (int(x) for x in text.split(':'))
  except ValueError:
    raise SystemExit(f'--data-slice must be START:STOP, got {text!r}') from None
  return start, stop


def plan_options(ratio: float, bits: int | None, quantizer: str | None,
                 act_bits: int | None = None) -> dict:
  """Flat :meth:`lbyl_jax.plan.Plan.from_options` options of one row."""
  opts = dict(method='lbyl', ratio=ratio) if ratio > 0 else dict(method='prune', ratio=0.0)
  if quantizer is not None:
    opts.update(quant_method=quantizer, bits=bits)
  if act_bits:
    opts.update(act_bits=act_bits)  # ranges: the BN rule (the default)
  return opts


class Loaded:
  """The checkpoint, the evaluation split and a shared evaluator of one architecture."""

  def __init__(self, arch: str, start: int, stop: int):
    import converters  # pylint: disable=import-outside-toplevel
    from lbyl_jax import evaluation  # pylint: disable=import-outside-toplevel
    from lbyl_jax.io import data  # pylint: disable=import-outside-toplevel
    from lbyl_jax.models import archs  # pylint: disable=import-outside-toplevel
    from lbyl_jax.quant import actquant  # pylint: disable=import-outside-toplevel

    wfile, dfile = MODELS[arch]
    self.spec = archs.get(arch)
    self.variables = converters.load_variables(shared_dir() / 'weights' / wfile, self.spec)
    self.ds = data.load_dataset(str(shared_dir() / 'data' / dfile)).slice(start, stop)
    self.ev = evaluation.Evaluator(self.spec, batch_size=1000, forward=actquant.forward)


def run_row(loaded: Loaded, arch: str, ratio: float, bits: int | None, quantizer: str | None,
            split: str, act_bits: int | None = None) -> dict:
  from lbyl_jax import pipeline  # pylint: disable=import-outside-toplevel
  from lbyl_jax.plan import Plan  # pylint: disable=import-outside-toplevel

  t = time.perf_counter()
  res = pipeline.compress(loaded.spec, loaded.variables,
                          Plan.from_options(**plan_options(ratio, bits, quantizer, act_bits)))
  t_compress = time.perf_counter() - t
  acc = loaded.ev.evaluate(res.eval_variables(), loaded.ds, widths=res.widths, progress=False)
  rep = res.report
  return dict(key=row_key(arch, ratio, bits, quantizer, split, act_bits), arch=arch, ratio=ratio,
              bits=bits, act_bits=act_bits, quantizer=quantizer or 'float', split=split,
              method=plan_options(ratio, bits, quantizer)['method'], top1=acc['top1'],
              top5=acc['top5'], n=acc['n'], bytes_after=rep['bytes_after'],
              compress_seconds=t_compress, eval_seconds=acc['seconds'])


def render(rows: list[dict], archs: list[str], ratios: list[float], bits: list[int],
           split: str, *, act: bool = False) -> str:
  """Markdown table: one line per (arch, ratio, bits), one top-1 column per quantizer; with
  ``act`` the rows whose activations are quantized to the weights' bits (WnAn)."""
  by = {r['key']: r for r in rows}
  head = ['model', 'pruned', 'WA' if act else 'W', 'float'] + list(QUANTIZERS)
  start = int(split.split(':')[0])
  which = 'held-out split' if start >= DEV_STOP else 'NOT the held-out split'
  shown = [r for r in rows if r['split'] == split and r['arch'] in archs
           and bool(r.get('act_bits')) == act]
  lines = [f'Top-1 % on CIFAR-10 test images {split} ({which}), {by_n(shown)}',
           '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for arch in archs:
    for ratio in ratios:
      fl = by.get(row_key(arch, ratio, None, None, split))
      for b in bits:
        cells = [arch, f'{ratio:.0%}', f'W{b}A{b}' if act else str(b),
                 f'{fl["top1"]:.2f}' if fl else '-']
        for q in QUANTIZERS:
          r = by.get(row_key(arch, ratio, b, q, split, b if act else None))
          cells.append(f'{r["top1"]:.2f}' if r else '-')
        lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def by_n(rows: list[dict]) -> str:
  ns = sorted({r['n'] for r in rows})
  return 'n = ' + (', '.join(str(n) for n in ns) or '0') + ' images per row'


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--archs', default='resnet20', help='comma-separated presets (CIFAR ResNets)')
  p.add_argument('--bits', default='4,6,8', help='comma-separated weight bit widths')
  p.add_argument('--ratios', default='0,0.3', help='comma-separated pruning ratios (0: unpruned)')
  p.add_argument('--quantizers', default=','.join(QUANTIZERS))
  p.add_argument('--data-slice', default=HELD_OUT,
                 help='test images START:STOP (default: the held-out split 5000:10000)')
  p.add_argument('--out', default=str(DEFAULT_OUT), help='JSON file of rows (read and extended)')
  p.add_argument('--act-bits', choices=('none', 'same'), default='none',
                 help='same: also quantize activations to the weight bits (WnAn; BN-rule ranges; '
                      'DFQ folds the BNs away and is left out of these rows)')
  p.add_argument('--render-only', action='store_true', help='print the table of stored rows')
  args = p.parse_args(argv)
  archs = [a for a in args.archs.split(',') if a]
  bad = [a for a in archs if a not in MODELS or a == 'lenet_300_100']
  if bad:
    raise SystemExit(f'--archs: {", ".join(bad)} not among the CIFAR ResNets '
                     f'{", ".join(m for m in MODELS if m != "lenet_300_100")}')
  bits = [int(b) for b in args.bits.split(',') if b]
  ratios = [float(r) for r in args.ratios.split(',') if r]
  quantizers = [q for q in args.quantizers.split(',') if q]
  unknown = [q for q in quantizers if q not in QUANTIZERS]
  if unknown:
    raise SystemExit(f'--quantizers: unknown {", ".join(unknown)}; known: {", ".join(QUANTIZERS)}')
  start, stop = parse_slice(args.data_slice)
  split = f'{start}:{stop}'
  if start < DEV_STOP:
    print(f'warning: --data-slice {split} overlaps the development split 0:{DEV_STOP}; these rows '
          'are not held-out numbers')
  out = pathlib.Path(args.out)
  stored = json.loads(out.read_text()) if out.exists() else dict(rows=[])
  rows = {r['key']: r for r in stored['rows']}
  if not args.render_only:
    for arch in archs:
      loaded = None
      configs = [(ratio, None, None) for ratio in ratios]
      act = args.act_bits == 'same'
      configs += [(ratio, b, q) for ratio in ratios for b in bits for q in quantizers
                  if not (act and q == 'dfq')]
      for ratio, b, q in configs:
        a = b if act and q is not None else None
        key = row_key(arch, ratio, b, q, split, a)
        if key in rows:
          continue
        loaded = loaded or Loaded(arch, start, stop)
        row = run_row(loaded, arch, ratio, b, q, split, a)
        rows[key] = row
        print(f'{key}: top-1 {row["top1"]:.2f} (compress {row["compress_seconds"]:.1f} s, '
              f'eval {row["eval_seconds"]:.1f} s)', flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix('.tmp')
        tmp.write_text(json.dumps(dict(
            command='python -m benchmarks.quant_methods', machine=platform.platform(),
            split_rule='CIFAR-10 test images 5000-9999 are the held-out split (../shared/DATA.md)',
            rows=sorted(rows.values(), key=lambda r: r['key'])), indent=1))
        tmp.replace(out)
  print(render(list(rows.values()), archs, ratios, bits, split, act=args.act_bits == 'same'))


if __name__ == '__main__':
  main()

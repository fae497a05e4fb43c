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
rows. Each row's per-image top-1 correctness (:meth:`lbyl_jax.evaluation.Evaluator.predictions`,
bit-packed with ``np.packbits``) goes to a sidecar npz keyed by the row key
(``quant_methods_correct.npz`` next to ``--out``), so paired tests need no rerun: per table line
(model, pruned, W or WnAn) the best quantizer against the runner-up, and UDFC-style and SQuant
against DFQ (the UDFC paper's comparison), each an exact McNemar test
(:func:`lbyl_jax.evaluation.paired_comparison`). ``--paired`` recomputes those rows of the table
that have no stored correctness (rows made before the sidecar existed): the rerun's top-1 is
checked against the stored one and kept in the row (``rerun_top1``). Rows evaluated per image
have ``top5 = null`` (one forward pass per row). A configuration the package refuses (an
exception from :func:`lbyl_jax.pipeline.compress`) is stored as a row with its ``error`` and no
accuracy, and shown as "refused" in the table.

MobileNetV2 (``--archs mobilenet_v2``) is the shared CIFAR-10 checkpoint of the
``mobilenet_v2_cifar10`` preset (images upsampled to 224 x 224; ../shared/DATA.md), evaluated in
batches of 100.

Run from the repository root:

  nice -n 10 python -m benchmarks.quant_methods                       # resnet20, W4/W6/W8
  nice -n 10 python -m benchmarks.quant_methods --archs resnet20,resnet56,resnet56_b --bits 4
  nice -n 10 python -m benchmarks.quant_methods --archs resnet20,resnet56_b --act-bits same   # WnAn
  nice -n 10 python -m benchmarks.quant_methods --archs resnet20,resnet56,resnet56_b --paired
  nice -n 10 python -m benchmarks.quant_methods --archs mobilenet_v2 --bits 4,6,8 [--act-bits same]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np

from benchmarks.reproduce import MODELS, shared_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'quant_methods_heldout.json'
QUANTIZERS = ('rtn', 'omse', 'squant', 'dfq', 'udfc', 'dfmpc')
HELD_OUT = '5000:10000'
DEV_STOP = 5000  # images 0-4999 are the development split
# Row name -> (preset, weights file, data file, evaluation batch size); table order.
ARCHS = {a: (a, *MODELS[a], 1000) for a in ('resnet20', 'resnet56', 'resnet56_b')}
ARCHS['mobilenet_v2'] = ('mobilenet_v2_cifar10', 'mobilenet_v2_pruned.cifar10_224.state_dict.pt',
                         'cifar10_test.npz', 100)
ALPHA = 0.05  # significance level of the paired tests
# The UDFC paper's Table 1 orderings (ImageNet; SQuant and UDFC above DFQ, UDFC above SQuant):
# (label, A, B) tested as A against B.
PAPER_PAIRS = (('squant', 'squant', 'dfq'), ('udfc', 'udfc', 'dfq'),
               ('udfc-squant', 'udfc', 'squant'))


def correct_path(out: pathlib.Path) -> pathlib.Path:
  """The per-image correctness sidecar of a rows file."""
  return out.with_name(out.stem.replace('_heldout', '') + '_correct.npz')


def load_correct(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Row key -> bit-packed (``np.packbits``) per-image top-1 correctness; {} when absent."""
  if not path.exists():
    return {}
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def save_correct(path: pathlib.Path, packed: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp.npz')
  np.savez_compressed(tmp, **dict(sorted(packed.items())))
  os.replace(tmp, path)


def unpack(packed: dict[str, np.ndarray], row: dict) -> np.ndarray:
  """The row's per-image correctness (bool, length ``row['n']``)."""
  return np.unpackbits(packed[row['key']], count=row['n']).astype(bool)


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

    preset, wfile, dfile, batch = ARCHS[arch]
    self.spec = archs.get(preset)
    self.variables = converters.load_variables(shared_dir() / 'weights' / wfile, self.spec)
    self.ds = data.load_dataset(str(shared_dir() / 'data' / dfile),
                                arch=self.spec).slice(start, stop)
    self.ev = evaluation.Evaluator(self.spec, batch_size=batch, forward=actquant.forward)


def evaluate_row(loaded: Loaded, ratio: float, bits: int | None, quantizer: str | None,
                 act_bits: int | None = None) -> tuple[dict, np.ndarray]:
  """Compresses one configuration and evaluates it per image.

  Returns:
    (fields, correct): the row's measured fields (top1, n, bytes_after, compress_seconds,
    eval_seconds) and the bool per-image top-1 correctness in the split's order.

  Raises:
    Whatever :func:`lbyl_jax.pipeline.compress` raises for a configuration it refuses.
  """
  from lbyl_jax import pipeline  # pylint: disable=import-outside-toplevel
  from lbyl_jax.plan import Plan  # pylint: disable=import-outside-toplevel

  t = time.perf_counter()
  res = pipeline.compress(loaded.spec, loaded.variables,
                          Plan.from_options(**plan_options(ratio, bits, quantizer, act_bits)))
  t_compress = time.perf_counter() - t
  pred = loaded.ev.predictions(res.eval_variables(), loaded.ds, widths=res.widths, progress=False)
  correct = np.asarray(pred['correct'], bool)
  return dict(top1=100.0 * float(correct.mean()), n=int(correct.size),
              bytes_after=res.report['bytes_after'], compress_seconds=t_compress,
              eval_seconds=pred['seconds']), correct


def run_row(loaded: Loaded, arch: str, ratio: float, bits: int | None, quantizer: str | None,
            split: str, act_bits: int | None = None) -> tuple[dict, np.ndarray | None]:
  """One row (``top5`` null: one per-image pass) and its per-image correctness; a configuration
  that :func:`lbyl_jax.pipeline.compress` refuses gives a row with its ``error`` and None."""
  row = dict(key=row_key(arch, ratio, bits, quantizer, split, act_bits), arch=arch, ratio=ratio,
             bits=bits, act_bits=act_bits, quantizer=quantizer or 'float', split=split,
             method=plan_options(ratio, bits, quantizer)['method'])
  try:
    fields, correct = evaluate_row(loaded, ratio, bits, quantizer, act_bits)
  except (ValueError, NotImplementedError) as e:
    return dict(row, top1=None, n=0, error=f'{type(e).__name__}: {e}'), None
  return dict(row, top1=fields['top1'], top5=None, n=fields['n'],
              bytes_after=fields['bytes_after'], compress_seconds=fields['compress_seconds'],
              eval_seconds=fields['eval_seconds']), correct


def measured(row: dict | None) -> bool:
  return row is not None and row.get('top1') is not None


def _cell(row: dict | None, bold: bool = False) -> str:
  if row is None:
    return '-'
  if not measured(row):
    return 'refused'
  return f'**{row["top1"]:.2f}**' if bold else f'{row["top1"]:.2f}'


def line_rows(by: dict[str, dict], arch: str, ratio: float, bits: int, split: str,
              act: bool) -> dict[str, dict]:
  """Quantizer -> measured row of one table line (WnAn with ``act``)."""
  got = {q: by.get(row_key(arch, ratio, bits, q, split, bits if act else None))
         for q in QUANTIZERS}
  return {q: r for q, r in got.items() if measured(r)}


def line_pairs(by: dict[str, dict], arch: str, ratio: float, bits: int, split: str,
               act: bool) -> list[tuple[str, dict, dict]]:
  """The paired comparisons of one table line: ('best', best, runner-up) (highest top-1 first,
  ties in :data:`QUANTIZERS` order) where two quantizers are measured, and the UDFC paper's
  orderings (its Table 1): ('squant', SQuant, DFQ) and ('udfc', UDFC-style, DFQ) where DFQ is
  measured, ('udfc-squant', UDFC-style, SQuant)."""
  got = line_rows(by, arch, ratio, bits, split, act)
  pairs = []
  if len(got) >= 2:
    order = sorted(got, key=lambda q: (-got[q]['top1'], QUANTIZERS.index(q)))
    pairs.append(('best', got[order[0]], got[order[1]]))
  for kind, a, b in PAPER_PAIRS:
    if a in got and b in got:
      pairs.append((kind, got[a], got[b]))
  return pairs


def lines_of(archs: list[str], ratios: list[float], bits: list[int]):
  return [(a, r, b, act) for a in archs for r in ratios for b in bits for act in (False, True)]


def paired_keys(rows: list[dict], archs: list[str], ratios: list[float], bits: list[int],
                split: str) -> list[str]:
  """Keys of every row that one of the tables' paired comparisons needs, in table order."""
  by = {r['key']: r for r in rows}
  keys = []
  for a, r, b, act in lines_of(archs, ratios, bits):
    for _, ra, rb in line_pairs(by, a, r, b, split, act):
      keys += [k for k in (ra['key'], rb['key']) if k not in keys]
  return keys


def compare(packed: dict[str, np.ndarray], ra: dict, rb: dict) -> dict | None:
  """:func:`lbyl_jax.evaluation.paired_comparison` of two rows' stored per-image correctness
  (None when either is not stored)."""
  from lbyl_jax import evaluation  # pylint: disable=import-outside-toplevel

  if ra['key'] not in packed or rb['key'] not in packed:
    return None
  return evaluation.paired_comparison(unpack(packed, ra), unpack(packed, rb))


def render(rows: list[dict], archs: list[str], ratios: list[float], bits: list[int],
           split: str, *, act: bool = False, packed: dict[str, np.ndarray] | None = None) -> str:
  """Markdown table: one line per (arch, ratio, bits), one top-1 column per quantizer; with
  ``act`` the rows whose activations are quantized to the weights' bits (WnAn). With ``packed``
  (per-image correctness) the best cell of a line is bold when it is above the runner-up at
  p < :data:`ALPHA` (exact McNemar); "refused": the package refused the configuration."""
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
        if fl is None and not any(row_key(arch, ratio, b, q, split, b if act else None) in by
                                  for q in QUANTIZERS):
          continue  # nothing measured on this line
        bold = None
        for kind, ra, rb in line_pairs(by, arch, ratio, b, split, act):
          c = compare(packed or {}, ra, rb) if kind == 'best' else None
          if c is not None and c['mcnemar_p'] < ALPHA and c['diff'] > 0:
            bold = ra['key']
        cells = [arch, f'{ratio:.0%}', f'W{b}A{b}' if act else str(b), _cell(fl)]
        for q in QUANTIZERS:
          r = by.get(row_key(arch, ratio, b, q, split, b if act else None))
          cells.append(_cell(r, bold is not None and r is not None and r['key'] == bold))
        lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _p(c: dict | None) -> str:
  if c is None:
    return '-'
  return f"{c['mcnemar_p']:.2g}" if c['mcnemar_p'] >= 1e-4 else '< 1e-4'


def paired_tables(rows: list[dict], packed: dict[str, np.ndarray], archs: list[str],
                  ratios: list[float], bits: list[int], split: str) -> str:
  """Two Markdown tables of exact McNemar tests on stored per-image correctness: per line the
  best quantizer against the runner-up, and the UDFC paper's orderings (:data:`PAPER_PAIRS`).
  A comparison whose rows have no stored correctness shows '-' (``--paired`` computes it)."""
  by = {r['key']: r for r in rows}
  best = ['| model | pruned | bits | best | runner-up | best - runner-up | only best | '
          'only runner-up | p |', '|---|---|---|---|---|---|---|---|---|']
  paper = ['| model | pruned | bits | DFQ | SQuant | UDFC-style | SQuant - DFQ | p | '
           'UDFC-style - DFQ | p | UDFC-style - SQuant | p |', '|' + '---|' * 12]
  for a, r, b, act in lines_of(archs, ratios, bits):
    pairs = line_pairs(by, a, r, b, split, act)
    where = [a, f'{r:.0%}', f'W{b}A{b}' if act else f'W{b}']
    for kind, ra, rb in pairs:
      if kind != 'best':
        continue
      c = compare(packed, ra, rb)
      counts = ['-', '-'] if c is None else [str(c['only_a']), str(c['only_b'])]
      best.append('| ' + ' | '.join(where + [f"{ra['quantizer']} {ra['top1']:.2f}",
                                             f"{rb['quantizer']} {rb['top1']:.2f}",
                                             f"{ra['top1'] - rb['top1']:+.2f}"]
                                    + counts + [_p(c)]) + ' |')
    others = {kind: (ra, rb) for kind, ra, rb in pairs if kind != 'best'}
    if others:
      got = line_rows(by, a, r, b, split, act)
      cells = where + [_cell(got.get(q)) for q in ('dfq', 'squant', 'udfc')]
      for kind, _, _ in PAPER_PAIRS:
        if kind in others:
          ra, rb = others[kind]
          cells += [f"{ra['top1'] - rb['top1']:+.2f}", _p(compare(packed, ra, rb))]
        else:
          cells += ['-', '-']
      paper.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(best + [''] + paper)


def paper_summary(rows: list[dict], packed: dict[str, np.ndarray], archs: list[str],
                  ratios: list[float], bits: list[int], split: str) -> dict[str, dict]:
  """Per UDFC-paper ordering (:data:`PAPER_PAIRS` label): the lines ('model pruned bits') where
  A is above B at p < :data:`ALPHA` ('above'), below ('below'), not resolved ('unresolved'), and
  without stored correctness ('untested')."""
  by = {r['key']: r for r in rows}
  out = {kind: dict(above=[], below=[], unresolved=[], untested=[]) for kind, _, _ in PAPER_PAIRS}
  for a, r, b, act in lines_of(archs, ratios, bits):
    name = f"{a} {r:.0%} {f'W{b}A{b}' if act else f'W{b}'}"
    for kind, ra, rb in line_pairs(by, a, r, b, split, act):
      if kind == 'best':
        continue
      c = compare(packed, ra, rb)
      verdict = ('untested' if c is None else 'unresolved' if c['mcnemar_p'] >= ALPHA
                 else 'above' if c['diff'] > 0 else 'below')
      out[kind][verdict].append(name)
  return out


def n_tests(rows: list[dict], packed: dict[str, np.ndarray], archs: list[str],
            ratios: list[float], bits: list[int], split: str) -> int:
  """How many paired comparisons of the tables have stored correctness (are tested)."""
  by = {r['key']: r for r in rows}
  return sum(compare(packed, ra, rb) is not None for a, r, b, act in lines_of(archs, ratios, bits)
             for _, ra, rb in line_pairs(by, a, r, b, split, act))


def bytes_table(rows: list[dict], archs: list[str], ratios: list[float], bits: list[int],
                split: str) -> str:
  """Markdown table of stored model bytes (KiB, ``bytes_after`` of the weight-only rows): the
  float model, and per bit width the bytes shared by the quantizers; a quantizer whose bytes
  differ from the others' (e.g. DF-MPC in mixed precision) is named with its own bytes."""
  by = {r['key']: r for r in rows}
  kib = lambda n: f'{n / 1024:.1f}'  # noqa: E731
  lines = ['| model | pruned | float | ' + ' | '.join(f'W{b}' for b in bits) + ' |',
           '|' + '---|' * (3 + len(bits))]
  for a in archs:
    for r in ratios:
      fl = by.get(row_key(a, r, None, None, split))
      if fl is None and not any(line_rows(by, a, r, b, split, False) for b in bits):
        continue
      cells = [a, f'{r:.0%}', kib(fl['bytes_after']) if measured(fl) else '-']
      for b in bits:
        got = line_rows(by, a, r, b, split, False)
        sizes = [got[q]['bytes_after'] for q in got]
        if not sizes:
          cells.append('-')
          continue
        common = max(sorted(set(sizes)), key=sizes.count)
        odd = [f"{q}: {kib(got[q]['bytes_after'])}" for q in got
               if got[q]['bytes_after'] != common]
        cells.append(kib(common) + (f" ({', '.join(odd)})" if odd else ''))
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def refusals(rows: list[dict], archs: list[str]) -> dict[str, list[str]]:
  """Error message -> the keys of the stored rows the package refused with it."""
  out: dict[str, list[str]] = {}
  for r in rows:
    if r['arch'] in archs and r.get('error'):
      out.setdefault(r['error'], []).append(r['key'])
  return out


def by_n(rows: list[dict]) -> str:
  ns = sorted({r['n'] for r in rows if measured(r)})
  return 'n = ' + (', '.join(str(n) for n in ns) or '0') + ' images per row'


def same_count(top1_a: float, top1_b: float, n: int) -> bool:
  """Whether two top-1 % of n images are the same number of correct images."""
  return round(top1_a * n / 100.0) == round(top1_b * n / 100.0)


def save_probe_rows(out: pathlib.Path, rows: dict[str, dict]) -> None:
  """Writes a development probe's cached rows (key -> row) as sorted JSON (the probes re-read it
  and compute only missing keys)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rows, indent=1, sort_keys=True) + '\n')


def probe_row_line(key: str, row: dict) -> str:
  """One progress line of a development probe's row."""
  return (f'{key}: top-1 {row["top1"]:.2f} % on {row["n"]} images (compress '
          f'{row["compress_seconds"]:.1f} s, eval {row["eval_seconds"]:.1f} s)')


def _save_rows(out: pathlib.Path, rows: dict[str, dict]) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix('.tmp')
  tmp.write_text(json.dumps(dict(
      command='python -m benchmarks.quant_methods', machine=platform.platform(),
      split_rule='CIFAR-10 test images 5000-9999 are the held-out split (../shared/DATA.md)',
      rows=sorted(rows.values(), key=lambda r: r['key'])), indent=1))
  tmp.replace(out)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--archs', default='resnet20',
                 help=f'comma-separated models among {", ".join(ARCHS)}')
  p.add_argument('--bits', default='4,6,8', help='comma-separated weight bit widths')
  p.add_argument('--ratios', default='0,0.3', help='comma-separated pruning ratios (0: unpruned)')
  p.add_argument('--quantizers', default=','.join(QUANTIZERS))
  p.add_argument('--data-slice', default=HELD_OUT,
                 help='test images START:STOP (default: the held-out split 5000:10000)')
  p.add_argument('--out', default=str(DEFAULT_OUT), help='JSON file of rows (read and extended)')
  p.add_argument('--act-bits', choices=('none', 'same'), default='none',
                 help='same: also quantize activations to the weight bits (WnAn; BN-rule ranges, '
                      "for DFQ's folded network from the statistics it tracked)")
  p.add_argument('--paired', action='store_true',
                 help='compute nothing new; rerun the stored rows that the paired tests of the '
                      'tables of --archs / --ratios / --bits need and that have no stored '
                      'per-image correctness (their top-1 must reproduce)')
  p.add_argument('--render-only', action='store_true', help='print the table of stored rows')
  args = p.parse_args(argv)
  archs = [a for a in args.archs.split(',') if a]
  bad = [a for a in archs if a not in ARCHS]
  if bad:
    raise SystemExit(f'--archs: {", ".join(bad)} not among {", ".join(ARCHS)}')
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
  cpath = correct_path(out)
  stored = json.loads(out.read_text()) if out.exists() else dict(rows=[])
  rows = {r['key']: r for r in stored['rows']}
  packed = load_correct(cpath)
  if args.paired and not args.render_only:
    todo = [k for k in paired_keys(list(rows.values()), archs, ratios, bits, split)
            if k not in packed]
    print(f'{len(todo)} stored rows to rerun for the paired tests', flush=True)
    loaded = {}
    for key in todo:
      row = rows[key]
      arch = row['arch']
      loaded[arch] = loaded.get(arch) or Loaded(arch, start, stop)
      q = None if row['quantizer'] == 'float' else row['quantizer']
      fields, correct = evaluate_row(loaded[arch], row['ratio'], row['bits'], q,
                                     row.get('act_bits'))
      same = same_count(fields['top1'], row['top1'], row['n']) and fields['n'] == row['n']
      row['rerun_top1'] = fields['top1']
      packed[key] = np.packbits(correct)
      save_correct(cpath, packed)
      _save_rows(out, rows)
      print(f'{key}: rerun top-1 {fields["top1"]:.2f}, stored {row["top1"]:.2f} '
            f'({"reproduced" if same else "DIFFERS"}; compress {fields["compress_seconds"]:.1f} s, '
            f'eval {fields["eval_seconds"]:.1f} s)', flush=True)
  elif not args.render_only:
    act = args.act_bits == 'same'
    for arch in archs:
      loaded = None
      configs = [(ratio, None, None) for ratio in ratios]
      configs += [(ratio, b, q) for ratio in ratios for b in bits for q in quantizers]
      for ratio, b, q in configs:
        a = b if act and q is not None else None
        key = row_key(arch, ratio, b, q, split, a)
        if key in rows:
          continue
        loaded = loaded or Loaded(arch, start, stop)
        row, correct = run_row(loaded, arch, ratio, b, q, split, a)
        rows[key] = row
        if correct is None:
          print(f'{key}: refused: {row["error"]}', flush=True)
        else:
          packed[key] = np.packbits(correct)
          save_correct(cpath, packed)
          print(f'{key}: top-1 {row["top1"]:.2f} (compress {row["compress_seconds"]:.1f} s, '
                f'eval {row["eval_seconds"]:.1f} s)', flush=True)
        _save_rows(out, rows)
  print(render(list(rows.values()), archs, ratios, bits, split, act=args.act_bits == 'same',
               packed=packed))
  print()
  print(paired_tables(list(rows.values()), packed, archs, ratios, bits, split))


if __name__ == '__main__':
  main()

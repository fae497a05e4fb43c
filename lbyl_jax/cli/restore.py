"""``python -m lbyl_jax.restore``: flags -> :mod:`lbyl_jax.pipeline` -> files and a summary.

Single run: loads the weights, restores (and quantizes), evaluates before/after when ``--data`` is
given, saves an orbax checkpoint plus ``report.json`` in ``--out`` (atomically; an existing
directory is refused unless ``--overwrite``), prints the per-layer width table and a summary.

``--sweep``: every combination of ``--methods`` x ``--criteria`` x ``--ratios`` (x ``--bits``),
reusing the loaded model and the compiled evaluators; writes ``sweep.json``, ``sweep.md`` and
``sweep.png`` in ``--out`` (``--save-models`` also saves each model under ``models/``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from lbyl_jax.models import archs
from lbyl_jax import pipeline
from lbyl_jax.compress import restore as restore_lib
from lbyl_jax.io import publish


def _floats(text: str) -> list[float]:
  try:
    return [float(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None


def _names(text: str) -> list[str]:
  return [x.strip() for x in text.split(',') if x.strip()]


def _override(text: str) -> tuple[str, float]:
  pattern, sep, value = text.rpartition('=')
  if not sep or not pattern:
    raise argparse.ArgumentTypeError(f'expected PATTERN=RATIO, got {text!r}')
  try:
    return pattern, float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f'bad ratio in {text!r}') from None


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m lbyl_jax.restore',
      description='Data-free pruning with closed-form compensation (LBYL, Neuron Merging, '
                  'BN-moments) and optional weight quantization (RTN, UDFC, DFQ).')
  p.add_argument('--arch', required=True, help=f'one of: {", ".join(archs.names())}')
  p.add_argument('--weights', help='checkpoint file (.pth/.pt/.th/.pth.tar/.safetensors/.npz); '
                 'default: $LBYL_JAX_WEIGHTS, caches, then download')
  p.add_argument('--no-download', action='store_true', help='never use the network')
  p.add_argument('--method', default='lbyl', help='prune | nm | lbyl | bnm')
  p.add_argument('--criterion', default='l2', help='l1 | l2 | l2-gm | random')
  p.add_argument('--ratio', type=float, default=0.3, help='pruning ratio per unit, in [0, 1)')
  p.add_argument('--ratio-override', type=_override, action='append', default=[],
                 metavar='PATTERN=RATIO', help="per-unit ratio, e.g. 'layer3_*/conv1=0.5' (repeatable)")
  p.add_argument('--lambda1', type=float, help='LBYL BN-error weight (default per arch)')
  p.add_argument('--lambda2', type=float, help='LBYL ridge weight (default per arch)')
  p.add_argument('--nm-t', type=float, help='Neuron Merging threshold t')
  p.add_argument('--nm-lam', type=float, help='Neuron Merging score weight lam')
  p.add_argument('--lbyl-mode', default='consistent', choices=('consistent', 'reference_code'))
  p.add_argument('--nm-mode', default='exact', choices=('exact', 'reference_code'))
  p.add_argument('--bn-sigma', default='std', choices=('std', 'variance'))
  p.add_argument('--keep-rounding', choices=('floor', 'round'))
  p.add_argument('--dtype', default='float32', choices=('float32', 'float64'), help='solver precision')
  p.add_argument('--seed', type=int, default=0, help='seed of the random criterion')
  p.add_argument('--bias-correction', choices=('off', 'on', 'auto', 'blend'),
                 help="fold the pruned channels' BN-modelled mean activation into the consumer bias;"
                      " default: 'on' for lbyl and nm (consistent / exact forms), 'off' otherwise"
                      " ('off' gives the published LBYL / NM exactly)")
  p.add_argument('--bnm-cov', default='diag', choices=('identity', 'diag'))
  p.add_argument('--bias-fold', default='padding_aware', choices=('padding_aware', 'all_taps'),
                 help='how --bias-correction constants meet zero padding (all_taps: the prototype)')
  p.add_argument('--guard', default='off', choices=('off', 'moments'),
                 help="'moments': shrink each delivery row by its least-squares factor in [0, 1] under"
                      ' the BN-moments model (data-free; 0 = plain pruning of that channel)')
  q = p.add_argument_group('quantization')
  q.add_argument('--weight-bits', type=int, help='quantize weights to N bits (2-8)')
  q.add_argument('--quant-method', default='rtn', choices=pipeline.QUANT_METHODS)
  q.add_argument('--per-tensor', action='store_true', help='one range per tensor (default per channel)')
  q.add_argument('--asymmetric', action='store_true', help='asymmetric ranges (default symmetric)')
  q.add_argument('--quantize-ends', action='store_true',
                 help='also quantize the first layer and the classifier to N bits (default: 8 bits)')
  q.add_argument('--a1', type=float, default=0.01, help='UDFC a1')
  q.add_argument('--a2', type=float, default=0.008, help='UDFC a2')
  e = p.add_argument_group('evaluation')
  e.add_argument('--data', help='cifar10 | fashion_mnist | path (npz, CIFAR batches dir/tar.gz, IDX '
                 'dir, ImageNet folder) | tfds:NAME[:SPLIT]')
  e.add_argument('--limit', type=int, help='evaluate on the first N examples only')
  e.add_argument('--batch-size', type=int, default=500)
  s = p.add_argument_group('sweep')
  s.add_argument('--sweep', action='store_true', help='run every combination of the lists below')
  s.add_argument('--methods', type=_names, help='comma list (default: --method)')
  s.add_argument('--criteria', type=_names, help='comma list (default: --criterion)')
  s.add_argument('--ratios', type=_floats, help='comma list (default: --ratio)')
  s.add_argument('--bits', type=_names, help="comma list of weight bits, 'none' for float")
  s.add_argument('--save-models', action='store_true', help='sweep: also save every model')
  o = p.add_argument_group('output')
  o.add_argument('--out', required=True, help='output directory (must not exist)')
  o.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  o.add_argument('--json', action='store_true', help='print the report as one JSON line at the end')
  o.add_argument('--no-progress', action='store_true')
  return p


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _restore_config(args, method, criterion, ratio) -> restore_lib.RestoreConfig:
  return restore_lib.RestoreConfig(
      method=method, criterion=criterion, ratio=ratio, ratio_overrides=tuple(args.ratio_override),
      lambda1=args.lambda1, lambda2=args.lambda2, nm_t=args.nm_t, nm_lam=args.nm_lam,
      lbyl_mode=args.lbyl_mode, nm_mode=args.nm_mode, bn_sigma=args.bn_sigma,
      keep_rounding=args.keep_rounding, dtype=args.dtype, seed=args.seed,
      bias_correction=args.bias_correction, bnm_cov=args.bnm_cov,
      guard=args.guard, bias_fold=args.bias_fold)


def _quant_config(args, bits) -> pipeline.QuantConfig | None:
  if bits is None:
    return None
  return pipeline.QuantConfig(
      bits=bits, method=args.quant_method, per_channel=not args.per_tensor,
      symmetric=not args.asymmetric, keep_8bit_ends=not args.quantize_ends, a1=args.a1, a2=args.a2)


def _save(out: pathlib.Path, spec, result: pipeline.Compressed, report, *, overwrite: bool) -> None:
  from lbyl_jax.io import checkpoint  # pylint: disable=import-outside-toplevel

  meta = dict(method=report['method'], criterion=report['criterion'], ratio=report['ratio'],
              top1=report.get('top1_after'))
  tree = result.variables
  if result.qtree is not None:
    meta['quant'] = result.qmeta
    tree = result.qtree
  files = {'report.json': json.dumps(pipeline.jsonable(report), indent=2) + '\n'}
  checkpoint.save(out, spec.name, result.widths, tree, meta=pipeline.jsonable(meta),
                  overwrite=overwrite, files=files)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Executes the parsed command line; returns the report (single) or sweep summary."""
  import converters  # pylint: disable=import-outside-toplevel
  from lbyl_jax.io import weights as weights_lib  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  spec = archs.get(args.arch)
  publish.recover(publish.resolve_out(args.out))  # a swap left half done by a killed run
  out = publish.check_target(args.out, overwrite=args.overwrite)
  progress = not args.no_progress
  path = weights_lib.resolve_weights(spec, args.weights, download=not args.no_download)
  _log(f'weights: {path}')
  variables = converters.load_variables(path, spec)

  dataset = evaluator = baseline = None
  if args.data:
    from lbyl_jax.io import data as data_lib  # pylint: disable=import-outside-toplevel
    from lbyl_jax import evaluation as evaluate_lib  # pylint: disable=import-outside-toplevel

    dataset = data_lib.load_dataset(args.data, arch=spec, limit=args.limit,
                                    download=not args.no_download, progress=progress)
    evaluator = evaluate_lib.Evaluator(spec, batch_size=args.batch_size)
    _log(f'evaluating the original model on {dataset.name} (n={len(dataset)})')
    baseline = evaluator.evaluate(variables, dataset, progress=progress)

  bits_list: list[int | None]
  if args.sweep:
    methods = args.methods or [args.method]
    crits = args.criteria or [args.criterion]
    ratios = args.ratios or [args.ratio]
    bits_list = [None if b.lower() in ('none', 'float', '32') else int(b)
                 for b in (args.bits or ['none' if args.weight_bits is None else str(args.weight_bits)])]
  else:
    methods, crits, ratios, bits_list = [args.method], [args.criterion], [args.ratio], [args.weight_bits]
  # Validate every configuration before any work is done.
  grid = [(m, c, r, b, _restore_config(args, m, c, r), _quant_config(args, b))
          for m, c, r, b in itertools.product(methods, crits, ratios, bits_list)]

  rows = []
  it = grid
  if args.sweep and progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    it = tqdm(grid, desc='sweep', unit='config', file=sys.stderr)
  results = []
  for m, c, r, b, rcfg, qcfg in it:
    _log(f'restoring: method={m} criterion={c} ratio={r}' + (f' bits={b}' if b else ''))
    result = pipeline.compress(spec, variables, rcfg, qcfg)
    report = result.report
    report['weights'] = str(path)
    report['data'] = args.data
    for k in ('top1_before', 'top5_before', 'top1_after', 'top5_after', 'n_eval'):
      report[k] = None
    if evaluator is not None:
      after = evaluator.evaluate(result.variables, dataset, widths=result.widths, progress=progress)
      report.update(top1_before=baseline['top1'], top5_before=baseline['top5'],
                    top1_after=after['top1'], top5_after=after['top5'], n_eval=after['n'],
                    eval_seconds=after['seconds'])
    rows.append(report)
    results.append(result)
    if not args.sweep:
      print(pipeline.layer_table(report))
      print(pipeline.summary_text(report))

  if not args.sweep:
    report = rows[0]
    _save(out, spec, results[0], report, overwrite=args.overwrite)
    print(f'saved: {out}  (reload with lbyl_jax.load({str(out)!r}))')
    final = report
  else:
    final = _write_sweep(out, spec, rows, results if args.save_models else None, baseline, args)
  final['total_seconds'] = time.perf_counter() - t0
  if args.json:
    print(json.dumps(pipeline.jsonable(final)))
  return final


def _write_sweep(out, spec, rows, results, baseline, args) -> dict[str, Any]:
  with publish.staging_dir(out, kind='sweep', overwrite=args.overwrite) as tmp:
    slim = [{k: v for k, v in r.items() if k not in ('layers', 'quant_report', 'quant_errors')}
            for r in rows]
    summary = dict(arch=spec.name, baseline=baseline, rows=slim)
    (tmp / 'sweep.json').write_text(json.dumps(pipeline.jsonable(summary), indent=2) + '\n')
    (tmp / 'sweep_full.json').write_text(json.dumps(pipeline.jsonable(rows), indent=2) + '\n')
    md = pipeline.sweep_markdown(rows)
    (tmp / 'sweep.md').write_text(md + '\n')
    print(md)
    if any(r.get('top1_after') is not None for r in rows):
      pipeline.plot_sweep(rows, tmp / 'sweep.png', title=f'{spec.name} (no fine-tuning)',
                          baseline=None if baseline is None else baseline['top1'])
    if results is not None:
      (tmp / 'models').mkdir()
      for r, res in zip(rows, results):
        tag = f"{r['method']}_{r['criterion']}_r{r['ratio']:.2f}" + (
            f"_w{r['weight_bits']}{r['quant_method']}" if r.get('weight_bits') else '')
        _save(tmp / 'models' / tag, spec, res, r, overwrite=False)
  print(f'saved: {out}/sweep.json, sweep.md' + (', sweep.png' if (out / 'sweep.png').exists() else ''))
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  args = parser().parse_args(argv)
  try:
    run(args)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    raise SystemExit(2) from None

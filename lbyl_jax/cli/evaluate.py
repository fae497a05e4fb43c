"""``python -m lbyl_jax.evaluate``: top-1 / top-5 of a checkpoint, or a paired comparison of two.

  python -m lbyl_jax.evaluate runs/resnet20-lbyl-r0.3 --data cifar10       # a saved run
  python -m lbyl_jax.evaluate --arch resnet20 [--weights FILE|DIR] [--data SPEC]
  python -m lbyl_jax.evaluate --compare RUN_A RUN_B [--data SPEC]
  python -m lbyl_jax.evaluate RUN_DIR --export stablehlo --out DIR   # export, no evaluation

A saved run (or the converter's output) carries its architecture in ``meta.json``; ``--arch`` is
needed only for a weights file. ``--compare`` evaluates two saved checkpoints of the same
architecture on the same examples and reports the paired comparison (exact McNemar test).
``--export FMT --out DIR`` writes a saved run's exports (with its activation quantization, if it
has one) into a new directory instead of evaluating.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from lbyl_jax import evaluation
from lbyl_jax.cli import common
from lbyl_jax.core import distributed
from lbyl_jax.core import trees
from lbyl_jax.io import checkpoint
from lbyl_jax.io import data as data_lib
from lbyl_jax.io import export as export_lib
from lbyl_jax.io import weights as weights_lib
from lbyl_jax.models import archs
from lbyl_jax.quant import actquant

PROG = 'python -m lbyl_jax.evaluate'


def _slice(text: str) -> tuple[int, int]:
  try:
    return data_lib.parse_slice(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def parser(show_advanced: bool = False) -> argparse.ArgumentParser:
  del show_advanced  # no research options here
  p = argparse.ArgumentParser(
      prog=PROG, description='Top-1/top-5 accuracy of a saved run, a converted checkpoint or a '
      "preset's weights, or a paired comparison of two saved runs on the same examples.")
  p.add_argument('run', nargs='?', metavar='RUN_DIR',
                 help='a checkpoint directory (lbyl_jax.restore --out, or the converter\'s output)')
  p.add_argument('--arch', choices=archs.names(), metavar='ARCH',
                 help='preset, for a weights file (a checkpoint directory names its own)')
  p.add_argument('--weights', metavar='PATH|DIR|random',
                 help='checkpoint file or directory (default: the caches, then a verified download)')
  p.add_argument('--compare', nargs=2, metavar=('RUN_A', 'RUN_B'),
                 help='two checkpoint directories of one architecture: accuracies, examples only '
                      'one gets right, exact McNemar p-value, 95%% interval of A - B')
  p.add_argument('--data', help="dataset name, path or tfds:NAME[:SPLIT] (default: the preset's)")
  p.add_argument('--data-slice', type=_slice, metavar='START:STOP',
                 help='evaluate on examples START..STOP-1 only (0:5000 development, '
                      '5000:10000 held-out)')
  p.add_argument('--limit', type=int, help='evaluate only the first N examples')
  p.add_argument('--batch-size', type=int, default=500, help='evaluation batch (default: 500)')
  p.add_argument('--no-download', action='store_true', help='never use the network')
  p.add_argument('--no-progress', action='store_true', help='no progress bars')
  p.add_argument('--json', action='store_true',
                 help='print the report as one JSON object on the last line of stdout')
  p.add_argument('--per-example', metavar='FILE.npz',
                 help='also write the per-example top-1 predictions, labels and correctness in'
                      ' dataset order (with --compare: of both runs)')
  x = p.add_argument_group('export a saved run (instead of evaluating)')
  x.add_argument('--export', action='append', choices=export_lib.FORMATS, default=[],
                 help='write RUN_DIR as a StableHLO artifact (with its activation quantization) '
                      'or PyTorch-named safetensors (activation grids in the metadata) into --out;'
                      ' repeatable')
  x.add_argument('--out', metavar='DIR', help='--export: the new directory to write')
  x.add_argument('--overwrite', action='store_true',
                 help='--export: replace an existing --out that this tool wrote')
  common.add_common(p)
  common.add_distributed(p)
  return p


def _dataset(args, spec):
  return data_lib.load_dataset(args.data, arch=spec, limit=args.limit, slice_=args.data_slice,
                              download=not args.no_download, progress=not args.no_progress)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Resolves the checkpoint and the data, evaluates, returns the report."""
  if args.per_example is not None and pathlib.Path(args.per_example).suffix != '.npz':
    raise ValueError(f'--per-example: expected a .npz file name, got {args.per_example!r}')
  if args.export:
    return run_export(args)
  if args.out is not None or args.overwrite:
    raise ValueError('--out / --overwrite apply to --export')
  if args.compare:
    if args.run or args.weights:
      raise ValueError('--compare takes the two runs; give no RUN_DIR or --weights with it')
    return run_compare(args)
  with common.all_or_none(args, 'loading the model and the data'):
    spec, variables, widths, where, dataset = _model_and_data(args)
  distributed.same_text(trees.digest(variables), 'the evaluated variables (digest)')
  evaluator = evaluation.Evaluator(spec, batch_size=args.batch_size, forward=actquant.forward)
  result = evaluator.evaluate(variables, dataset, widths=widths, progress=not args.no_progress)
  if args.per_example:
    per = evaluator.predictions(variables, dataset, widths=widths, progress=not args.no_progress)
    _write_per_example(args, pred=per['pred'], labels=per['labels'], correct=per['correct'])
  return dict(arch=spec.name, weights=where, data=dataset.source or dataset.name,
              data_slice=None if args.data_slice is None else list(args.data_slice),
              n=result['n'], top1=result['top1'], top5=result['top5'],
              seconds=result['seconds'], compile_seconds=result['compile_seconds'],
              devices=evaluator.num_devices, processes=evaluator.num_processes,
              batch_size=evaluator.batch_size)


def run_export(args: argparse.Namespace) -> dict[str, Any]:
  """Writes the exports of the saved run ``args.run`` into ``args.out`` (a new directory)."""
  extra = [f for f, v in (('--compare', args.compare), ('--weights', args.weights),
                          ('--arch', args.arch), ('--data', args.data),
                          ('--data-slice', args.data_slice), ('--limit', args.limit),
                          ('--per-example', args.per_example)) if v]
  if extra:
    raise ValueError(f'--export writes a saved run and evaluates nothing; drop {", ".join(extra)}')
  if args.run is None or not checkpoint.is_checkpoint(args.run):
    raise ValueError(f'--export needs a saved run directory (RUN_DIR with meta.json), got '
                     f'{args.run!r}')
  if args.out is None:
    raise ValueError('--export needs --out DIR (a new directory)')
  loaded = actquant.restore(checkpoint.load(args.run))
  out = None
  with common.all_or_none(args, f'exporting to {args.out}'):
    if common.is_primary(args):
      out = loaded.export(args.out, args.export, overwrite=args.overwrite)
  act = isinstance(loaded, actquant.ActLoaded)
  return dict(arch=loaded.spec.name, run=str(pathlib.Path(args.run).absolute()),
              out=None if out is None else str(out), formats=list(args.export),
              act_quant=(dict(bits=loaded.act[1], source=loaded.act[0].source,
                              data_free=loaded.act[0].data_free) if act else None))


def _model_and_data(args: argparse.Namespace):
  source = args.run or args.weights
  if source is not None and checkpoint.is_checkpoint(source):
    loaded = actquant.restore(checkpoint.load(source))
    if args.arch and args.arch != loaded.spec.name:
      raise ValueError(f'--arch {args.arch} does not match {source} ({loaded.spec.name})')
    variables = (loaded.act_variables() if isinstance(loaded, actquant.ActLoaded)
                 else loaded.variables)
    spec, widths, where = loaded.spec, loaded.widths, str(pathlib.Path(source).absolute())
  else:
    if args.run is not None:
      raise ValueError(f'{args.run}: not an lbyl_jax checkpoint directory (no meta.json); pass a '
                       'weights file with --arch ARCH --weights FILE')
    if not args.arch:
      raise ValueError('give a checkpoint directory, or --arch ARCH (with --weights FILE or the '
                       "preset's cached weights)")
    spec = archs.get(args.arch)
    variables, where = weights_lib.load_weights(spec, args.weights, download=not args.no_download,
                                                progress=not args.no_progress)
    widths = None
  return spec, variables, widths, where, _dataset(args, spec)


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
  """Loads two saved checkpoints, evaluates both on the same examples, returns the comparison."""
  with common.all_or_none(args, 'loading the runs and the data'):
    run_a, run_b = (actquant.restore(checkpoint.load(d)) for d in args.compare)
    if run_a.spec.name != run_b.spec.name:
      raise ValueError(f'--compare needs two checkpoints of one architecture, got '
                       f'{run_a.spec.name} ({args.compare[0]}) and {run_b.spec.name} '
                       f'({args.compare[1]})')
    if args.arch and archs.get(args.arch).name != run_a.spec.name:
      raise ValueError(f'--arch {args.arch} does not match the checkpoints ({run_a.spec.name})')
    spec = run_a.spec
    dataset = _dataset(args, spec)
  for r in (run_a, run_b):
    distributed.same_text(trees.digest(r.variables), f'the variables of {r.meta["arch"]} runs')
  evaluator = evaluation.Evaluator(spec, batch_size=args.batch_size, forward=actquant.forward)
  per = [evaluator.predictions(r.act_variables() if isinstance(r, actquant.ActLoaded)
                               else r.variables, dataset, widths=r.meta['widths'],
                               progress=not args.no_progress) for r in (run_a, run_b)]
  correct = [x['correct'] for x in per]
  if args.per_example:
    _write_per_example(args, pred_a=per[0]['pred'], pred_b=per[1]['pred'],
                       labels=per[0]['labels'], correct_a=correct[0], correct_b=correct[1])
  return dict(arch=spec.name, a=str(pathlib.Path(args.compare[0]).absolute()),
              b=str(pathlib.Path(args.compare[1]).absolute()),
              data=dataset.source or dataset.name, **evaluation.paired_comparison(*correct))


def _write_per_example(args: argparse.Namespace, **arrays) -> None:
  """The per-example arrays as an .npz (process 0 only; every process waits for it)."""
  with common.all_or_none(args, f'writing {args.per_example}'):
    if common.is_primary(args):
      np.savez(pathlib.Path(args.per_example), **arrays)


def _print(args, report) -> None:
  if args.export:
    act = report['act_quant']
    print(f'exported {report["run"]} ({report["arch"]}) as {", ".join(report["formats"])} to '
          f'{report["out"]}' + ('' if act is None else
                                f' with {act["bits"]}-bit activations ({act["source"]} ranges, '
                                f'{"data-free" if act["data_free"] else "NOT data-free"})'))
  elif args.compare:
    lo, hi = report['ci95']
    print(f'{report["arch"]} on {report["data"]} ({report["n"]} examples):')
    print(f'  A {report["a"]}: top-1 {report["top1_a"]:.2f}%')
    print(f'  B {report["b"]}: top-1 {report["top1_b"]:.2f}%')
    print(f'  A - B {report["diff"]:+.2f} points (95% interval {lo:+.2f} to {hi:+.2f}); '
          f'only A right {report["only_a"]}, only B right {report["only_b"]}; '
          f'exact McNemar p = {report["mcnemar_p"]:.3g}')
  else:
    print(f'{report["arch"]} on {report["data"]} ({report["n"]} images, '
          f'weights {report["weights"]}):')
    procs = f' of {report["processes"]} processes' if report.get('processes', 1) > 1 else ''
    print(f'  top-1 {report["top1"]:.2f}%  top-5 {report["top5"]:.2f}%  '
          f'({report["seconds"]:.1f} s on {report["devices"]} device(s){procs}, '
          f'compile {report["compile_seconds"]:.1f} s)')
  if args.json:
    print(json.dumps(report))


def main(argv: Sequence[str] | None = None) -> None:
  """Console entry point (returns None: console scripts pass the return value to sys.exit)."""

  def go(args):
    report = run(args)
    if common.is_primary(args):  # with several processes, process 0 reports
      _print(args, report)
    return report

  common.run_main(PROG, parser, go, argv)
  sys.stdout.flush()

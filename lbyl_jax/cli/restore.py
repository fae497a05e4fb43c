"""``python -m lbyl_jax.restore``: compress a preset, evaluate it, save it.

  python -m lbyl_jax.restore --arch resnet50                      # defaults: LBYL, L2, 30 %
  python -m lbyl_jax.restore --arch resnet20 --weights random     # whole pipeline, no file

Phases (each announced on stderr, timed in ``report.json``): validate the configuration and the
output, load the weights, load the data and evaluate the original (with ``--data``), compress,
evaluate the compressed network, save. Every configuration of a run or sweep is checked before
any weights or data are loaded.

Single run: an orbax checkpoint plus ``report.json`` in ``--out`` (default
``runs/<arch>-<method>-r<ratio>[-w<bits><quant>]``, never an existing directory: a new name is
chosen), the per-layer width table and a summary. ``--sweep``: every combination of
``--methods`` x ``--criteria`` x ``--ratios`` (x ``--bits``), reusing the loaded model and the
compiled evaluators; ``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax

from lbyl_jax import evaluation
from lbyl_jax import pipeline
from lbyl_jax import plan as plan_lib
from lbyl_jax import report as report_lib
from lbyl_jax.cli import common
from lbyl_jax.core import distributed
from lbyl_jax.core import trees
from lbyl_jax.experimental import bn_reestimate as bn_lib
from lbyl_jax.pruning import methods
from lbyl_jax.pruning.selection import Selection
from lbyl_jax.io import data as data_lib
from lbyl_jax.io import export as export_lib
from lbyl_jax.io import publish
from lbyl_jax.io import weights as weights_lib
from lbyl_jax.models import archs
from lbyl_jax.models import custom
from lbyl_jax import quant
from lbyl_jax.quant import actquant

PROG = 'python -m lbyl_jax.restore'
DEFAULT_CALIB_N = 1000


def _floats(text: str) -> list[float]:
  try:
    return [float(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None


def _slice(text: str) -> tuple[int, int]:
  try:
    return data_lib.parse_slice(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _ints(text: str) -> list[int]:
  try:
    return [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None


def _names(text: str) -> list[str]:
  return [x.strip() for x in text.split(',') if x.strip()]


def _stage_classes() -> list:
  return [Selection, plan_lib.Corrections, actquant.ActQuant] + [
      methods.get(n) for n in methods.names()] + [quant.get(n) for n in quant.names()]


def parser(show_advanced: bool = False) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
      description='Data-free pruning of a pretrained CNN with closed-form compensation (LBYL, '
                  'Neuron Merging, BN-moments), optional weight quantization, evaluation and '
                  'saving.',
      epilog='Methods: ' + '; '.join(f'{n}: {methods.get(n).summary}' for n in methods.names())
             + '.\nQuantizers: ' + '; '.join(f'{n}: {quant.get(n).summary}' for n in quant.names())
             + '.\n--help-all lists the research and reproduction options too.')
  m = p.add_argument_group('model')
  which = m.add_mutually_exclusive_group(required=True)
  which.add_argument('--arch', choices=archs.names(), metavar='ARCH',
                     help=f'preset: {", ".join(archs.names())}')
  which.add_argument('--model', metavar='PKG.MODULE:FACTORY',
                     help='your own flax.linen model: FACTORY() returns the module, (module, '
                          'variables) or (module, {checkpoint key: Flax path}); its prunable units '
                          'are discovered by tracing (needs --input-shape)')
  m.add_argument('--input-shape', metavar='H,W,C', type=_ints,
                 help='--model: the input shape of one example, e.g. 32,32,3')
  m.add_argument('--input-mean', metavar='M[,M...]', type=_floats,
                 help='--model with --data: per-channel mean after /255 (default: 0)')
  m.add_argument('--input-std', metavar='S[,S...]', type=_floats,
                 help='--model with --data: per-channel std after /255 (default: 1)')
  m.add_argument('--weights', metavar='PATH|random',
                 help="checkpoint file (.pth/.pt/.th/.pth.tar/.safetensors/.npz), an lbyl_jax "
                      "checkpoint directory, or 'random' (seeded random weights: runs the whole "
                      "pipeline, accuracy meaningless); default: $LBYL_JAX_WEIGHTS, the caches, "
                      "then a verified download")
  m.add_argument('--init-seed', type=int, default=0, help='seed of --weights random (default: 0)')
  m.add_argument('--no-download', action='store_true', help='never use the network')

  c = p.add_argument_group('compression')
  c.add_argument('--method', default='lbyl', choices=methods.names(),
                 help='delivery method (default: lbyl)')
  seen: set[str] = set()
  common.add_options(c, [Selection, plan_lib.Corrections], advanced=False,
                     show_advanced=show_advanced, seen=seen)
  common.add_options(c, [methods.get(n) for n in methods.names()], advanced=False,
                     show_advanced=show_advanced, seen=seen)

  q = p.add_argument_group('weight quantization')
  q.add_argument('--quant-method', choices=quant.names(),
                 help='quantizer (default: rtn when --weight-bits is given)')
  common.add_options(q, [quant.get(n) for n in quant.names()], advanced=False,
                     show_advanced=show_advanced, seen=seen)
  a = p.add_argument_group('activation quantization')
  common.add_options(a, [actquant.ActQuant], advanced=False, show_advanced=show_advanced,
                     seen=seen)

  b = p.add_argument_group('BN re-estimation after compression (opt-in)')
  common.add_options(b, [bn_lib.BNReestimation], advanced=False, show_advanced=show_advanced,
                     seen=seen)
  k = p.add_argument_group('calibration images (NOT data-free; for --calibrate-bn N or '
                           '--act-ranges calibration)')
  k.add_argument('--calib-data', metavar='SPEC',
                 help='unlabelled images (any --data spec; labels are ignored) for --calibrate-bn N'
                      ' or --act-bits N --act-ranges calibration; the report marks the result '
                      'not data-free')
  k.add_argument('--calib-slice', metavar='START:STOP', type=_slice,
                 help='take the images from examples START..STOP-1 of --calib-data'
                      ' (e.g. 0:1000 of the development split)')
  k.add_argument('--calib-n', metavar='N', type=int,
                 help=f'--act-ranges calibration: use the first N images (of the slice); default '
                      f'{DEFAULT_CALIB_N} (--calibrate-bn N sets its own count)')

  e = p.add_argument_group('evaluation')
  e.add_argument('--data', help='cifar10 | fashion_mnist | path (npz, CIFAR batches dir/tar.gz, '
                 'IDX dir, ImageNet folder) | tfds:NAME[:SPLIT]')
  e.add_argument('--data-slice', metavar='START:STOP', type=_slice,
                 help="evaluate on examples START..STOP-1 only, e.g. 0:5000 (development split)"
                      " or 5000:10000 (held-out split)")
  e.add_argument('--limit', type=int, help='evaluate on the first N examples only')
  e.add_argument('--batch-size', type=int, default=500, help='evaluation batch (default: 500)')
  e.add_argument('--no-throughput', action='store_true',
                 help='skip the inference-throughput measurement before / after')

  s = p.add_argument_group('sweep')
  s.add_argument('--sweep', action='store_true', help='run every combination of the lists below')
  s.add_argument('--methods', type=_names, help='comma list (default: --method)')
  s.add_argument('--criteria', type=_names, help='comma list (default: --criterion)')
  s.add_argument('--ratios', type=_floats, help='comma list (default: --ratio)')
  s.add_argument('--bits', type=_names, dest='bits_list',
                 help="comma list of weight bits, 'none' for float (default: --weight-bits)")
  s.add_argument('--save-models', action='store_true', help='sweep: also save every model')

  o = p.add_argument_group('output')
  o.add_argument('--out', help='output directory (default: runs/<arch>-<method>-r<ratio>..., a '
                 'new name if taken); an existing one is refused unless --overwrite')
  o.add_argument('--overwrite', action='store_true',
                 help='replace an existing --out that this tool wrote (never anything else)')
  o.add_argument('--export', action='append', choices=export_lib.FORMATS, default=[],
                 help='also write the compressed model as a StableHLO artifact or as PyTorch-named '
                      'safetensors (repeatable)')
  o.add_argument('--json', action='store_true', help='print the report as one JSON line at the end')
  o.add_argument('--no-progress', action='store_true', help='no progress bars or phase lines')
  common.add_common(o)
  common.add_distributed(p)

  r = p.add_argument_group('research and reproduction (listed by --help-all)')
  r.add_argument('--preset', choices=plan_lib.PRESETS,
                 help=argparse.SUPPRESS if not show_advanced else
                 "'reference_code': the official codes' forms (LBYL / NM reference normal "
                 'equations, raw running variance, rounded kept count)')
  common.add_options(r, _stage_classes() + [bn_lib.BNReestimation], advanced=True,
                     show_advanced=show_advanced, seen=seen)
  return p


def calib_use(args: argparse.Namespace, plans, recipe: bn_lib.BNReestimation) -> str | None:
  """What reads --calib-data: 'bn' (--calibrate-bn), 'act' (--act-ranges calibration) or None;
  checked before any work (images nothing uses, or a consumer without images, are refused)."""
  act = plans[0].activations.needs_images
  given = [f for f, v in (('--calib-data', args.calib_data), ('--calib-slice', args.calib_slice),
                          ('--calib-n', args.calib_n)) if v is not None]
  if act and args.calib_data is None:
    raise ValueError('--act-ranges calibration needs --calib-data SPEC (the unlabelled images)')
  if given and recipe.calibrate_bn is None and not act:
    raise ValueError(f'{" / ".join(given)}: nothing reads the images; they apply to --calibrate-bn'
                     ' N or to --act-bits N --act-ranges calibration')
  if args.calib_n is not None and args.calib_n < 1:
    raise ValueError(f'--calib-n must be a positive number of images, got {args.calib_n}')
  return 'bn' if recipe.calibrate_bn is not None else ('act' if act else None)


def bn_recipe(args: argparse.Namespace) -> bn_lib.BNReestimation:
  """The BN re-estimation options of the command line, checked before any work."""
  recipe = bn_lib.BNReestimation.from_flat(common.given_options(args, [bn_lib.BNReestimation]))
  if recipe.calibrate_bn is not None and args.calib_data is None:
    raise ValueError('--calibrate-bn needs --calib-data SPEC (the unlabelled images)')
  if recipe.calibrate_bn is not None and args.calib_n is not None:
    raise ValueError('--calib-n applies to --act-ranges calibration; --calibrate-bn N sets its own '
                     'number of images')
  given = common.given_options(args, [bn_lib.BNReestimation])
  distill_only = [k for k in ('bn_distill_inputs', 'bn_distill_steps', 'bn_distill_lr', 'bn_seed')
                  if k in given]
  if distill_only and recipe.source != 'distilled':
    raise ValueError(f'--{distill_only[0].replace("_", "-")} applies to --bn-reestimate distilled')
  return recipe


# --------------------------------------------------------------------------------------------
# Configuration -> plans (all validated before any work).


def _grid(args: argparse.Namespace) -> list[plan_lib.Plan]:
  given = common.given_options(args, _stage_classes())
  given.pop('bits', None)
  if args.sweep:
    methods_ = args.methods or [args.method]
    crits = args.criteria or [given.get('criterion', 'l2')]
    ratios = args.ratios or [given.get('ratio', Selection.ratio)]
    bits_list = [None if b.lower() in ('none', 'float', '32') else _bits(b)
                 for b in (args.bits_list or [str(getattr(args, 'bits', 'none'))])]
  else:
    methods_ = [args.method]
    crits = [given.get('criterion', 'l2')]
    ratios = [given.get('ratio', Selection.ratio)]
    bits_list = [getattr(args, 'bits', None)]
  if args.quant_method is not None and all(b is None for b in bits_list):
    raise ValueError('--quant-method needs --weight-bits')
  plans, used = [], set()
  for m, c, r, b in itertools.product(methods_, crits, ratios, bits_list):
    quant_method = None if b is None else (args.quant_method or 'rtn')
    owners = [Selection, plan_lib.Corrections, methods.get(m), actquant.ActQuant] + (
        [quant.get(quant_method)] if quant_method else [])
    names = {n for cls in owners for n in cls.option_fields()}
    mine = {k: v for k, v in given.items() if k in names}
    used |= mine.keys()
    opts = dict(mine, criterion=c, ratio=r)
    if b is not None:
      opts['bits'] = b
    plans.append(plan_lib.Plan.from_options(method=m, quant_method=quant_method,
                                            preset=args.preset, **opts))
  unused = sorted(set(given) - used)
  if unused:  # an option no configuration uses would silently do nothing
    plan_lib.Plan.from_options(method=methods_[0], **{k: given[k] for k in unused})
  return plans


def _bits(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'--bits: expected integers or none, got {text!r}') from None


def default_out(args: argparse.Namespace, plan: plan_lib.Plan) -> pathlib.Path:
  """runs/<arch>-<method>-r<ratio>[-w<bits><quant>] (or runs/<arch>-sweep), with -2, -3, ...
  appended while the name is taken: the default never overwrites."""
  name = args.arch or args.model.rpartition(':')[2]
  if args.sweep:
    stem = f'{name}-sweep'
  else:
    stem = f'{name}-{plan.method.name}-r{plan.selection.ratio:g}'
    if plan.quantizer is not None:
      stem += f'-w{plan.quantizer.bits}{plan.quantizer.name}'
    if plan.activations.enabled:
      stem += f'-a{plan.activations.act_bits}'
  base = pathlib.Path('runs')
  out, k = base / stem, 1
  while out.exists() or out.is_symlink():
    k += 1
    out = base / f'{stem}-{k}'
  return out


# --------------------------------------------------------------------------------------------
# Running.


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Executes the parsed command line; returns the report (single) or sweep summary.

  With several processes (README, "Multi-host"): every process loads the weights and computes
  the same restore; evaluations are data-parallel over all processes' devices, each reading its
  part of the data; a sweep's configurations are divided among the processes (each evaluates its
  own on its local devices with all the data) and their rows merged on process 0; only process 0
  checks and writes ``--out`` and prints results, and no process exits before it has written.
  """
  primary = common.is_primary(args)
  say = common.log if primary else (lambda msg: None)
  phases = common.Phases(quiet=args.no_progress)
  progress = not args.no_progress
  factory = None
  if args.model is not None:
    if not args.input_shape:
      raise ValueError('--model needs --input-shape H,W,C')
    factory = custom.load_factory(args.model)
    spec = custom.custom_spec(factory.module, (1, *args.input_shape),
                              mean=tuple(args.input_mean or (0.0,)),
                              std=tuple(args.input_std or (1.0,)))
  else:
    for flag in ('input_shape', 'input_mean', 'input_std'):
      if getattr(args, flag) is not None:
        raise ValueError(f'--{flag.replace("_", "-")} applies to --model, not to a preset')
    spec = archs.get(args.arch)
  plans = _grid(args)
  recipe = bn_recipe(args)
  if recipe.enabled and plans[0].activations.enabled:
    raise ValueError('--bn-reestimate / --calibrate-bn with --act-bits: the activation ranges are '
                     'taken from the statistics before the re-estimation; use one of the two')
  calib_for = calib_use(args, plans, recipe)
  if args.data is None and args.data_slice is not None:
    raise ValueError('--data-slice needs --data')
  if args.export and args.sweep:
    raise ValueError('--export applies to a single run, not to --sweep')
  for fmt in args.export:
    export_lib.check_available(fmt, spec)
  out = None
  with common.all_or_none(args, 'checking --out'):
    if args.out is None and args.overwrite:
      raise ValueError('--overwrite needs an explicit --out')
    if primary:  # the only process that writes
      if args.out is not None:
        publish.recover(publish.resolve_out(args.out))  # a swap left half done by a killed run
        out = publish.check_target(args.out, overwrite=args.overwrite, create_parents=True)
      else:
        out = default_out(args, plans[0])
        out = publish.check_target(out, overwrite=False, create_parents=True)

  if not args.sweep:
    # The solver's executables compile (or load from the cache) in the background meanwhile.
    pipeline.prepare(spec, plans[0])
  with common.all_or_none(args, 'loading the weights'):
    if factory is not None:
      variables, source = phases.run('load', f'loading the weights of {spec.name}',
                                     weights_lib.load_custom_weights, spec, args.weights,
                                     factory_variables=factory.variables,
                                     key_map=factory.key_map, seed=args.init_seed)
      say(spec.discovery.table())
    else:
      variables, source = phases.run('load', f'loading the weights of {spec.name}',
                                     weights_lib.load_weights, spec, args.weights,
                                     download=not args.no_download, progress=progress,
                                     seed=args.init_seed)
  setup = getattr(args, 'setup', None)
  nproc = 1 if setup is None else setup.process_count
  if nproc > 1:  # every process must hold the same weights (same file, same seed)
    distributed.same_text(trees.digest(variables), 'the loaded weights (digest)')
  random_weights = args.weights == weights_lib.RANDOM
  if random_weights:
    say(f'weights: {source}: the accuracy of this run is meaningless')
  else:
    say(f'weights: {source}')

  calib = None
  if recipe.calibrate_bn is not None:
    calib_set = phases.run('calib_data', f'loading {args.calib_data} (BN calibration images)',
                           data_lib.load_dataset, args.calib_data, arch=spec,
                           download=not args.no_download, progress=progress,
                           slice_=args.calib_slice, limit=recipe.calibrate_bn)
    calib = next(iter(calib_set.batches(recipe.calibrate_bn)))[0]
  act_calib = None
  if calib_for == 'act':
    n = DEFAULT_CALIB_N if args.calib_n is None else args.calib_n
    act_calib = phases.run('calib_data', f'loading {args.calib_data} (activation calibration '
                           'images: not data-free)', data_lib.load_dataset, args.calib_data,
                           arch=spec, download=not args.no_download, progress=progress,
                           slice_=args.calib_slice, limit=n)

  dataset = evaluator = baseline = throughput_before = None
  if args.data:
    with common.all_or_none(args, 'loading the data'):
      dataset = phases.run('data', f'loading {args.data}', data_lib.load_dataset, args.data,
                           arch=spec, download=not args.no_download, progress=progress,
                           slice_=args.data_slice, limit=args.limit)
    evaluator = evaluation.Evaluator(spec, batch_size=args.batch_size, forward=actquant.forward)
    baseline = phases.run('evaluate_original', f'evaluating the original model on {dataset.name}'
                          f' (n={len(dataset)})', evaluator.evaluate, variables, dataset,
                          progress=progress)
    if not args.no_throughput:
      throughput_before = phases.run('throughput', 'measuring the original inference throughput',
                                     evaluator.throughput, variables)

  # A sweep with several processes: each process takes every n-th configuration and evaluates
  # it on its own devices with all the data; a single run is computed by every process alike.
  mine = list(range(len(plans)))
  local_evaluator = evaluator
  if args.sweep and nproc > 1:
    mine = [i for i in mine if i % nproc == setup.process_index]
    if dataset is not None:
      local_evaluator = evaluation.Evaluator(spec, batch_size=args.batch_size,
                                             devices=jax.local_devices(),
                                             forward=actquant.forward)
  rows, results = {}, {}
  for i in mine:
    rows[i], results[i] = _one_config(args, spec, plans[i], variables, source, random_weights,
                                      dataset, local_evaluator, baseline, throughput_before,
                                      phases, progress, primary, recipe, calib, act_calib)

  if not args.sweep:
    report = rows[0]
    report['phases'] = {**phases.seconds,
                        **{f'compress/{k}': v for k, v in report['phases'].items()}}
    with common.all_or_none(args, f'saving to {out}' if out else 'saving'):
      if primary:
        phases.run('save', f'saving to {out}', _save_run, out, spec, results[0], report,
                   overwrite=args.overwrite, exports=args.export)
    report['phases']['save'] = phases.seconds.get('save', 0.0)
    report['total_seconds'] = sum(phases.seconds.values())
    if primary:
      print(report_lib.summary_text(report))
      print(f'saved: {out}  (evaluate with: python -m lbyl_jax.evaluate {out} --data ...; '
            f'reload with lbyl_jax.load({str(out)!r}))')
    final = report
  else:
    all_rows = _merge_rows(rows, len(plans)) if nproc > 1 else [rows[i] for i in range(len(plans))]
    final = None
    with common.all_or_none(args, f'writing the sweep to {out}' if out else 'writing the sweep'):
      if primary:
        models = None
        if args.save_models:  # configurations computed elsewhere are recomputed (deterministic)
          models = [results[i] if i in results else _recompute(spec, variables, plans[i], recipe,
                                                               calib, act_calib, args)
                    for i in range(len(plans))]
        final = phases.run('save', f'writing the sweep to {out}', _write_sweep, out, spec,
                           all_rows, models, baseline, args)
    if final is None:
      final = dict(arch=spec.name, baseline=baseline, rows=all_rows)
    final['total_seconds'] = sum(phases.seconds.values())
  if args.json and primary:
    print(json.dumps(report_lib.jsonable(final)))
  return final


def _act_calib_report(result, args, act_calib) -> None:
  """Notes the --calib-data of activation ranges in the report (they are NOT data-free)."""
  if act_calib is not None and 'act_quant' in result.report:
    result.report['act_quant']['calib_data'] = dict(
        spec=args.calib_data, n=int(len(act_calib)),
        slice=None if args.calib_slice is None else list(args.calib_slice))


def _recompute(spec, variables, plan, recipe, calib, act_calib, args) -> pipeline.Compressed:
  """A configuration another process computed, again (deterministic), with its BN stage."""
  result = pipeline.compress(spec, variables, plan, calib_images=act_calib)
  _act_calib_report(result, args, act_calib)
  if recipe.enabled:
    result = bn_lib.reestimate_compressed(result, variables, recipe, images=calib)
  return result


def _one_config(args, spec, plan, variables, source, random_weights, dataset, evaluator, baseline,
                throughput_before, phases, progress, primary, recipe, calib, act_calib=None):
  """Compresses with one plan (and re-estimates the BN statistics if asked), evaluates the
  result (with --data); (report, result)."""
  p = plan
  tag = (f'method={p.method.name} criterion={p.selection.criterion} ratio={p.selection.ratio}'
         + (f' bits={p.quantizer.bits} quant={p.quantizer.name}' if p.quantizer else ''))
  bn_lib.prefetch(spec, variables, recipe)  # overlaps the compression
  result = phases.run('compress', f'compressing: {tag}', pipeline.compress, spec, variables, plan,
                      calib_images=act_calib)
  _act_calib_report(result, args, act_calib)
  if recipe.enabled:
    result = phases.run('bn_reestimate', f're-estimating the BN statistics: {recipe.recipe}'
                        + ('' if recipe.source != 'images' else ' (real images: not data-free)'),
                        bn_lib.reestimate_compressed, result, variables, recipe, images=calib)
    result.report['bn_reestimate']['calib_data'] = (
        None if calib is None else dict(spec=args.calib_data, n=int(len(calib)),
                                        slice=None if args.calib_slice is None
                                        else list(args.calib_slice)))
  setup = getattr(args, 'setup', None)
  if not args.sweep and setup is not None and setup.process_count > 1:
    # every process evaluates its own copy of the restored model: they must be the same
    distributed.same_text(trees.digest(result.variables), 'the restored variables (digest)')
  report = result.report
  report.update(weights=source, random_weights=random_weights, data=args.data,
                data_slice=None if args.data_slice is None else list(args.data_slice),
                top1_before=None, top5_before=None, top1_after=None, top5_after=None,
                n_eval=None)
  if evaluator is not None:
    after = phases.run('evaluate_compressed', 'evaluating the compressed model',
                       evaluator.evaluate, result.eval_variables(), dataset, widths=result.widths,
                       progress=progress)
    report.update(top1_before=baseline['top1'], top5_before=baseline['top5'],
                  top1_after=after['top1'], top5_after=after['top5'], n_eval=after['n'],
                  eval_seconds=after['seconds'])
    if throughput_before is not None:
      t_after = phases.run('throughput', 'measuring the compressed inference throughput',
                           evaluator.throughput, result.eval_variables(), widths=result.widths)
      report.update(throughput_before=throughput_before['images_per_second'],
                    throughput_after=t_after['images_per_second'],
                    throughput_batch=t_after['batch_size'])
  if not args.sweep and primary:
    print(report_lib.layer_table(report))
  return report, result


def _merge_rows(rows: dict[int, dict[str, Any]], n: int) -> list[dict[str, Any]]:
  """Every process's sweep rows (``{plan index: report}``), in plan order, on every process."""
  mine = json.dumps([[i, report_lib.jsonable(r)] for i, r in sorted(rows.items())]).encode()
  merged: dict[int, dict[str, Any]] = {}
  for blob in distributed.allgather_bytes(mine):
    for i, r in json.loads(blob.decode()):
      merged[int(i)] = r
  missing = sorted(set(range(n)) - set(merged))
  if missing:
    raise ValueError(f'sweep rows {missing} came back from no process')
  return [merged[i] for i in range(n)]


def _save_run(out: pathlib.Path, spec, result: pipeline.Compressed, report, *, overwrite: bool,
              exports: Sequence[str] = ()) -> None:
  files: dict[str, str | bytes] = {}
  for fmt in exports:
    files.update(result.export_files(fmt))
  publish.make_parents(out)
  result.save(out, overwrite=overwrite, files=files, report=report)


def _write_sweep(out, spec, rows, results, baseline, args) -> dict[str, Any]:
  publish.make_parents(out)
  with publish.staging_dir(out, kind='sweep', overwrite=args.overwrite) as tmp:
    slim = [{k: v for k, v in r.items() if k not in ('layers', 'quant_report', 'quant_errors')}
            for r in rows]
    summary = dict(arch=spec.name, baseline=baseline, rows=slim)
    (tmp / 'sweep.json').write_text(json.dumps(report_lib.jsonable(summary), indent=2) + '\n')
    (tmp / 'sweep_full.json').write_text(json.dumps(report_lib.jsonable(rows), indent=2) + '\n')
    md = report_lib.sweep_markdown(rows)
    (tmp / 'sweep.md').write_text(md + '\n')
    print(md)
    if any(r.get('top1_after') is not None for r in rows):
      report_lib.plot_sweep(rows, tmp / 'sweep.png', title=f'{spec.name} (no fine-tuning)',
                            baseline=None if baseline is None else baseline['top1'])
    if results is not None:
      (tmp / 'models').mkdir()
      for r, res in zip(rows, results):
        tag = f"{r['method']}_{r['criterion']}_r{r['ratio']:.2f}" + (
            f"_w{r['weight_bits']}{r['quant_method']}" if r.get('weight_bits') else '')
        res.save(tmp / 'models' / tag, report=r)
  print(f'saved: {out}/sweep.json, sweep.md' + (', sweep.png' if (out / 'sweep.png').exists() else ''))
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  """Console entry point (returns None: console scripts pass the return value to sys.exit)."""
  common.run_main(PROG, parser, run, argv)
  sys.stdout.flush()

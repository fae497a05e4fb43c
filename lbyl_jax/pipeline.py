"""Runs a :class:`~lbyl_jax.plan.Plan`: selection -> delivery -> corrections -> surgery ->
quantization, and reports sizes, FLOPs, timings and per-layer diagnostics.

:func:`compress` is pure: it never modifies ``variables`` and its result depends only on its
arguments (the random criterion is seeded by the plan's seed and the unit index).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from lbyl_jax.pruning import bias as bias_lib
from lbyl_jax.pruning import depthwise as depthwise_lib
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import selection as selection_lib
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning import stats
from lbyl_jax.pruning import surgery
from lbyl_jax.pruning.methods import Context
from lbyl_jax.pruning.problem import UnitSolution, check_solutions, coefficient_stats
from lbyl_jax.experimental import guard as guard_lib
from lbyl_jax.experimental import rules as rules_lib
from lbyl_jax.io import checkpoint
from lbyl_jax.io import export as export_lib
from lbyl_jax.io import publish
from lbyl_jax.models import archs
from lbyl_jax.models import trace
from lbyl_jax.plan import Plan
from lbyl_jax.quant import actquant
from lbyl_jax.quant import uniform
from lbyl_jax.report import jsonable


@dataclasses.dataclass
class Compressed:
  """Result of :func:`compress`.

  ``variables`` are float32 (dequantized when quantized) and run with ``spec.build(widths)``;
  ``qtree``/``qmeta`` are the stored integer form (None without quantization); ``act_meta`` the
  activation quantization (:func:`lbyl_jax.quant.actquant.act_meta`; None without it), stored as
  the checkpoint's ``meta['act_quant']`` and applied by :meth:`apply` / :meth:`eval_variables`.
  """

  widths: tuple[int, ...]
  variables: dict[str, Any]
  report: dict[str, Any]
  qtree: dict[str, Any] | None = None
  qmeta: dict[str, Any] | None = None
  spec: Any = None
  deliveries: dict[str, tuple[Any, Any, Any]] | None = None
  """{unit: (kept channels K, S_P, constant or None)} as surgery folded them (None on the joint
  UDFC path, which folds unit by unit)."""
  act_meta: dict[str, Any] | None = None

  def eval_variables(self) -> dict[str, Any]:
    """``variables``, plus the ``'act_quant'`` collection with activation quantization: what an
    :class:`lbyl_jax.evaluation.Evaluator` built with ``forward=actquant.forward`` runs."""
    if self.act_meta is None:
      return self.variables
    return actquant.attach(self.variables, *actquant.act_from_meta(self.act_meta))

  @property
  def model(self):
    """The compressed Flax module (the preset's class with the new widths)."""
    return self.spec.build(self.widths)

  def apply(self, images):
    """Logits of uint8 (or [0, 255] float) NHWC images: the preset's normalization included."""
    return actquant.forward(self.model, self.eval_variables(),
                            archs.normalize_fn(self.spec)(images))

  def export_files(self, fmt: str) -> dict[str, bytes]:
    """{file name: bytes} of one :mod:`lbyl_jax.io.export` format of what :meth:`apply`
    computes: with activation quantization the StableHLO function holds its quantize /
    dequantize steps and safetensors' metadata its grids (:func:`actquant.export_files`)."""
    spec = self.spec
    export_lib.check_available(fmt, spec)
    if self.act_meta is None:
      return export_lib.export(spec, self.widths, self.variables, fmt, qmeta=self.qmeta)
    return actquant.export_files(spec, self.widths, self.act_meta, self.variables, fmt)

  def save(self, out_dir, *, overwrite: bool = False, report: Mapping[str, Any] | None = None,
           files: Mapping[str, str | bytes] | None = None):
    """Writes the checkpoint (integers for a quantized result) and ``report.json`` atomically;
    ``lbyl_jax.load(out_dir)`` gives the model back. Missing parent directories are created (after
    the target is checked: an existing or unsafe ``out_dir`` is refused first). Returns the
    directory's absolute path."""
    publish.make_parents(publish.check_target(out_dir, overwrite=overwrite, create_parents=True))
    report = dict(self.report if report is None else report)
    meta = dict(method=report['method'], criterion=report['criterion'], ratio=report['ratio'],
                top1=report.get('top1_after'), options=report.get('options'))
    tree = self.variables
    if self.qtree is not None:
      meta['quant'] = self.qmeta
      tree = self.qtree
    if self.act_meta is not None:
      meta['act_quant'] = self.act_meta
    extra = {'report.json': json.dumps(jsonable(report), indent=2) + '\n', **dict(files or {})}
    return checkpoint.save(out_dir, self.spec if self.spec is not None else report['arch'],
                           self.widths, tree, meta=jsonable(meta),
                           overwrite=overwrite, files=extra)


def _timed(timings: dict[str, float], phase: str, fn, *args, **kwargs):
  t0 = time.perf_counter()
  out = fn(*args, **kwargs)
  timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t0
  return out


def prepare(spec, plan: Plan, variables: Mapping[str, Any] | None = None) -> int:
  """Starts compiling, in background threads, the solver executables that :func:`compress` of
  this plan will use (:func:`lbyl_jax.pruning.solvers.precompile`), from shapes alone: the
  architecture's own (``variables=None``) or those of ``variables``. Returns the number of
  compiles started; the command calls it before loading the weights, :func:`compress` at its
  start, so the compiles (or their loads from JAX's persistent cache) overlap the loading and the
  channel selection. Only an optimization: nothing is computed from it, and where the shapes do
  not match the systems of the run, :func:`compress` compiles what it needs as before. With the
  bias correction on, its elementwise moment kernel is warmed up in the same threads
  (:func:`lbyl_jax.pruning.moments.warm_up`; not counted in the return value)."""
  if plan.joint or plan.selection.ratio == 0 and not plan.selection.ratio_overrides:
    return 0
  if plan.bias_correction != 'off':
    moments_lib.warm_up(solvers.in_background)
  shapes = spec.abstract_variables() if variables is None else variables
  dims = selection_lib.unit_dims(spec, shapes, plan.selection)
  active = [i for i, u in enumerate(spec.units)
            if u.compensation not in ('prune_only', 'depthwise')]
  todo = plan.method.solver_dims([spec.units[i] for i in active], [dims[i] for i in active])
  if not todo:
    return 0
  return solvers.precompile(todo, dtype=getattr(plan.method, 'dtype', 'float32'))


def compress(spec, variables: Mapping[str, Any], plan: Plan | None = None, *,
             calib_images=None, **options) -> Compressed:
  """Prunes every unit of ``spec``, compensates, and optionally quantizes.

  Args:
    spec: :class:`lbyl_jax.models.archs.ArchSpec`.
    variables: original-width float variables ({'params', 'batch_stats'}), not modified.
    plan: the :class:`~lbyl_jax.plan.Plan`; or, instead, flat ``options`` for
      :meth:`Plan.from_options` (``compress(spec, v, method='nm', ratio=0.4)``).
    calib_images: unlabelled uint8 NHWC images (or a :class:`lbyl_jax.io.data.Dataset`) whose
      observed ranges the activation quantization uses (``act_ranges='calibration'``, NOT
      data-free); only with that source.

  Returns:
    :class:`Compressed`. The report holds arch, method, criterion, ratio, the resolved bias
    correction, the plan, params / MACs / FLOPs / bytes before and after, solve and compile
    seconds, the time per phase, and per layer its widths and the solver's diagnostics.
  """
  if plan is None:
    plan = Plan.from_options(**options)
  elif options:
    raise ValueError('pass a Plan or flat options, not both')
  if not isinstance(plan, Plan):
    raise ValueError(f'plan must be a lbyl_jax.plan.Plan (or pass flat options), got '
                     f'{type(plan).__name__}')
  if plan.activations.needs_images and calib_images is None:
    raise ValueError('--act-ranges calibration needs unlabelled images (--calib-data SPEC; '
                     'API: calib_images=)')
  if calib_images is not None and not plan.activations.needs_images:
    raise ValueError('calib_images are used by act_ranges=\'calibration\' (with act_bits) only')
  t_start = time.perf_counter()
  phases: dict[str, float] = {}
  _timed(phases, 'validate', selection_lib.validate_variables, spec, variables)
  prepare(spec, plan, variables)
  problems = _timed(phases, 'selection', selection_lib.build_problems, spec, variables,
                    plan.selection)
  bc = plan.bias_correction
  keep8 = (trace.first_and_last_layers(spec)
           if plan.quantizer is not None and plan.quantizer.keep_8bit_ends else ())
  _check_units(spec, plan)
  sols = deliveries = None
  qres = None
  bias_skipped: list[dict[str, str]] = []
  if plan.joint:
    widths, qres = _timed(phases, 'quantization', plan.quantizer.joint, spec, variables,
                          selection=plan.selection, keep_8bit=keep8, bias_correction=bc,
                          bias_fold=plan.corrections.bias_fold)
    new = None
  else:
    sols = _timed(phases, 'delivery', _deliver, plan, spec, variables, problems, bc,
                  bias_skipped)
    # Depthwise units got their guard and constants in the delivery (pruning.depthwise).
    generic = [i for i, p in enumerate(problems) if p.unit.compensation != 'depthwise']
    gp = [problems[i] for i in generic]
    if plan.corrections.guard != 'off' and generic:
      got = _timed(phases, 'guard', guard_lib.guard, spec, variables, gp,
                   [sols[i] for i in generic], cov_model=plan.corrections.moment_cov)
      check_solutions(gp, got, plan.method.name)
      for i, sol in zip(generic, got):
        sols[i] = sol
    if bc != 'off' and generic:
      rule = rules_lib.weights(bc) if bc in rules_lib.RULE_MODES else None
      gs = [sols[i] for i in generic]
      consts = _timed(phases, 'bias_correction', bias_lib.constants, spec, variables, gp,
                      gs, fold=plan.corrections.bias_fold, rule=rule, skipped=bias_skipped,
                      cov_model=plan.corrections.moment_cov)
      for i, sol in zip(generic, bias_lib.apply(gp, gs, consts)):
        sols[i] = sol
    deliveries = {p.unit.name: (p.keep, s.S_P, s.bias) for p, s in zip(problems, sols)}
    widths, new = _timed(phases, 'surgery', surgery.apply, spec, variables, deliveries)
    if plan.quantizer is not None:
      qres = _timed(phases, 'quantization', plan.quantizer.quantize, spec, new, keep_8bit=keep8,
                    context=dict(selection=plan.selection, original=variables))
  qtree = qmeta = None
  if qres is not None:
    qtree, qmeta = qres.qtree, qres.qmeta
    new = uniform.dequantize_tree(qtree, qmeta)
  act_meta = None
  if plan.activations.enabled:
    act_keep = (trace.first_and_last_layers(spec)
                if plan.quantizer is None or plan.quantizer.keep_8bit_ends else ())
    ranges = _timed(phases, 'activation_ranges', plan.activations.ranges, spec, new,
                    calib_images, folded_stats=None if qres is None else qres.output_stats)
    act_meta = actquant.act_meta(ranges, plan.activations.act_bits, act_keep)
  before = _timed(phases, 'stats', stats.summary, spec, variables)
  after = _timed(phases, 'stats', stats.summary, spec, new)
  report = _report(spec, plan, problems, sols, widths, before, after, bc)
  report.update(_discovery_report(spec), bias_skipped=bias_skipped)
  if qres is not None:
    report.update(
        weight_bits=plan.quantizer.bits, quant_method=plan.quantizer.name, keep_8bit=list(keep8),
        bytes_after=uniform.tree_nbytes(qtree), bytes_after_float=after['bytes'],
        quant_errors={p: d['rel_error'] for p, d in qmeta['layers'].items()},
        quant_report=jsonable(qres.report))
  # Solve / compile seconds are measured inside the delivery; the rest of the delivery phase is
  # building the systems (and host-side fits).
  phases['solve'] = report['solve_seconds']
  phases['compile'] = report['compile_seconds']
  if act_meta is not None:
    report['act_quant'] = dict(bits=act_meta['bits'], keep_8bit=act_meta['keep_8bit'],
                               source=act_meta['ranges']['source'],
                               data_free=act_meta['ranges']['data_free'],
                               info=act_meta['ranges']['info'])
  report['phases'] = phases
  report['seconds'] = time.perf_counter() - t_start
  if spec.builder is not None:
    report['module_kind'] = spec.builder.kind(spec, tuple(widths))
  return Compressed(tuple(widths), new, report, qtree, qmeta, spec, deliveries, act_meta)


def _deliver(plan: Plan, spec, variables, problems, bc: str,
             skipped: list[dict[str, str]] | None = None) -> list:
  """The method's rows for every unit it can compensate; S_P = 0 (plain pruning) for units whose
  compensation is 'prune_only' (a non-ReLU activation or a non-linear path, named in the report).
  Units whose compensation is 'depthwise' get the method's form through the depthwise conv, with
  their guard and constants (:func:`lbyl_jax.pruning.depthwise.deliver`, docs/mobilenet_v2.md)."""
  kinds = [p.unit.compensation for p in problems]
  active = [i for i, k in enumerate(kinds) if k not in ('prune_only', 'depthwise')]
  dw = [i for i, k in enumerate(kinds) if k == 'depthwise']
  if getattr(plan.method, 'bnm_spatial', None) is not None and not dw:
    raise ValueError(f'--bnm-spatial applies to depthwise units; {spec.name} has none')
  sols: list = [None] * len(problems)
  if dw:
    dw_options = plan.method.depthwise_options(spec)
    got = depthwise_lib.deliver(
        spec, variables, [problems[i] for i in dw], plan.method.name, dw_options,
        bias_correction=bc, guard=plan.corrections.guard, moment_cov=plan.corrections.moment_cov,
        bias_fold=plan.corrections.bias_fold, sigma=plan.selection.bn_sigma, skipped=skipped)
    check_solutions([problems[i] for i in dw], got, plan.method.name)
    for i, sol in zip(dw, got):
      sols[i] = sol
  if active:
    got = plan.method.deliver(spec, variables, [problems[i] for i in active],
                              Context(bias_correction=bc, bias_fold=plan.corrections.bias_fold))
    check_solutions([problems[i] for i in active], got, plan.method.name)
    for i, sol in zip(active, got):
      sols[i] = sol
  for i, p in enumerate(problems):
    if sols[i] is None:
      S = np.zeros((p.prune.size, p.m))
      sols[i] = UnitSolution(S, None, dict(method='prune', prune_only=p.unit.reason,
                                           **coefficient_stats(S)))
  return sols


def _check_units(spec, plan: Plan) -> None:
  """Refuses a quantizer on units it does not handle (:meth:`Quantizer.unsupported_units`)."""
  if plan.quantizer is None:
    return
  odd = plan.quantizer.unsupported_units(spec)
  if odd:
    raise ValueError(plan.quantizer.unsupported_message(spec, odd))


def _discovery_report(spec) -> dict[str, Any]:
  """What discovery found besides the units: approximations, exclusions, couplings, blocks."""
  d = spec.discovery
  return dict(
      prune_only=[dict(unit=u.name, reason=u.reason) for u in d.units
                  if u.compensation == 'prune_only'],
      approximations=[dict(unit=u.name, reason=u.reason) for u in d.units
                      if u.compensation in ('maxpool_approx', 'depthwise')],
      excluded=[dict(unit=e.unit.name, rule=e.rule) for e in d.excluded],
      couplings=[dict(kind=c.kind, members=list(c.members)) for c in d.couplings],
      blocked=[dict(producer=b.producer, reason=b.reason) for b in d.blocked])


def _report(spec, plan: Plan, problems, sols, widths, before, after, bc) -> dict[str, Any]:
  layers = []
  for i, p in enumerate(problems):
    diag = {} if sols is None else dict(sols[i].diag)
    layers.append(dict(name=p.unit.name, width_before=p.n, width_after=p.m,
                       ratio=plan.selection.ratio_for(p.unit.name), pool=p.unit.pool,
                       activation=p.unit.activation, compensation=p.unit.compensation,
                       consumers=[c.path for c in p.unit.consumers], diagnostics=diag))
  seconds = lambda key: float(sum(s.diag.get(key, 0.0) for s in sols)) if sols else 0.0
  return dict(
      arch=spec.name, method=plan.method.name, criterion=plan.selection.criterion,
      ratio=plan.selection.ratio, bias_correction=bc, options=jsonable(plan.to_options()),
      plan=plan.describe(), widths=list(widths),
      params_before=before['params'], params_after=after['params'],
      macs_before=before['macs'], macs_after=after['macs'],
      flops_before=before['flops'], flops_after=after['flops'],
      bytes_before=before['bytes'], bytes_after=after['bytes'],
      solve_seconds=seconds('solve_seconds'), compile_seconds=seconds('compile_seconds'),
      layers=layers)

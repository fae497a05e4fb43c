"""The whole job: pruning + compensation, optional weight quantization, evaluation, reports.

:func:`compress` is pure (architecture, variables, configs -> new widths, variables, report); the
rest of this module handles what the CLI needs around it: evaluation before / after, the per-layer
width table, sweeps that reuse the loaded model and compiled evaluators, and plots.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lbyl_jax import quant
from lbyl_jax import restore as restore_lib
from lbyl_jax import stats

QUANT_METHODS = ('rtn', 'udfc', 'dfq')


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Weight quantization after (or jointly with) pruning.

  Attributes:
    bits: weight bit width, 2..8.
    method: 'rtn' (round to nearest, 7.2), 'udfc' (6.2: per-channel rescale + pruning delivery on
      quantized kept filters, with a1/a2) or 'dfq' (7.1: BN fold, CLE, bias correction).
    per_channel: per-output-channel ranges (default) or one range per tensor.
    symmetric: symmetric (default) or asymmetric ranges.
    keep_8bit_ends: keep the first conv / dense and the classifier at 8 bits.
    a1, a2: UDFC regularization weights (8.2).
  """

  bits: int = 8
  method: str = 'rtn'
  per_channel: bool = True
  symmetric: bool = True
  keep_8bit_ends: bool = True
  a1: float = 0.01
  a2: float = 0.008

  def __post_init__(self):
    quant.check_bits(self.bits, where='QuantConfig')
    if self.method not in QUANT_METHODS:
      raise ValueError(f'unknown quantization method {self.method!r}; known: {", ".join(QUANT_METHODS)}')
    for name in ('a1', 'a2'):
      v = getattr(self, name)
      if not (np.isfinite(v) and v >= 0):
        raise ValueError(f'{name} must be a finite number >= 0, got {v!r}')


@dataclasses.dataclass
class Compressed:
  """Result of :func:`compress`.

  ``variables`` are float32 (dequantized when quantized) and run with ``spec.build(widths)``;
  ``qtree``/``qmeta`` are the stored integer form (None without quantization).
  """

  widths: tuple[int, ...]
  variables: dict[str, Any]
  report: dict[str, Any]
  qtree: dict[str, Any] | None = None
  qmeta: dict[str, Any] | None = None


def compress(spec, variables: Mapping[str, Any], config: restore_lib.RestoreConfig,
             qconfig: QuantConfig | None = None) -> Compressed:
  """Prune + compensate (``config``), then quantize (``qconfig``); no side effects.

  With ``qconfig.method == 'udfc'`` and ``config.method == 'lbyl'``, the pruning delivery is
  UDFC's (6.2 b: the LBYL closed form on the quantized kept filters, a1/a2 as lambdas); with any
  other restore method the network is restored first and UDFC then compensates the quantization
  of the pruned network (6.2 a). In the joint path ``config``'s bias correction ('on' by default
  for lbyl) adds UDFC's mean terms (:mod:`lbyl_jax.udfc`, ``bias_correction=True``); 'auto' and
  the guard are errors there. 'rtn' and 'dfq' always quantize the restored network.
  """
  t0 = time.perf_counter()
  joint_udfc = (qconfig is not None and qconfig.method == 'udfc' and config.method == 'lbyl'
                and config.ratio > 0)
  if joint_udfc:
    if config.ratio_overrides:
      raise ValueError('udfc with lbyl delivery does not support per-layer ratio overrides')
    if config.resolved_bias_correction() not in ('on', 'off') or config.guard != 'off':
      raise ValueError('udfc with lbyl delivery computes its own delivery (ALGORITHMS.md 6.2 b): '
                       f'bias_correction={config.bias_correction!r} and guard={config.guard!r} are not '
                       "supported there; use bias_correction 'on' / 'off' without the guard, or quant "
                       "method 'rtn'")
    base_report = _plain_report(spec, variables, config)
    pruned = variables
  else:
    _, pruned, base_report = restore_lib.restore(spec, variables, config)
  if qconfig is None:
    widths = tuple(base_report['widths'])
    return Compressed(widths, pruned, base_report)

  keep8 = quant.first_and_last_layers(spec) if qconfig.keep_8bit_ends else ()
  qopts = dict(bits=qconfig.bits, per_channel=qconfig.per_channel, symmetric=qconfig.symmetric,
               keep_8bit=keep8)
  if qconfig.method == 'udfc':
    from lbyl_jax import udfc  # pylint: disable=import-outside-toplevel

    ratio = config.ratio if joint_udfc else 0.0
    widths, qtree, qmeta, qreport = udfc.udfc(
        spec, pruned, ratio=ratio, criterion=config.criterion, a1=qconfig.a1, a2=qconfig.a2,
        bn_sigma=config.bn_sigma, seed=config.seed,
        bias_correction=joint_udfc and base_report['bias_correction'] == 'on', **qopts)
  elif qconfig.method == 'dfq':
    from lbyl_jax import dfq  # pylint: disable=import-outside-toplevel

    qtree, qmeta, qreport = dfq.dfq(spec, pruned, **qopts)
    widths = tuple(base_report['widths'])
  else:
    qtree, qmeta = quant.quantize_tree(pruned, **qopts)
    widths = tuple(base_report['widths'])
    qreport = {}
  deq = quant.dequantize_tree(qtree, qmeta)
  after = stats.summary(spec, deq)
  report = dict(base_report)
  report.update(
      widths=list(widths),
      params_after=after['params'], macs_after=after['macs'], flops_after=after['flops'],
      weight_bits=qconfig.bits, quant_method=qconfig.method, quant_config=dataclasses.asdict(qconfig),
      keep_8bit=list(keep8),
      bytes_after=quant.tree_nbytes(qtree),
      bytes_after_float=after['bytes'],
      quant_errors={p: d['rel_error'] for p, d in qmeta['layers'].items()},
      quant_report=jsonable(qreport),
      seconds=time.perf_counter() - t0,
  )
  return Compressed(widths, deq, report, qtree, qmeta)


def _plain_report(spec, variables, config) -> dict[str, Any]:
  """The size part of a restore report, for paths where another driver does the pruning."""
  s = stats.summary(spec, variables)
  return dict(arch=spec.name, method=config.method, criterion=config.criterion, ratio=config.ratio,
              config=dataclasses.asdict(config), bias_correction=config.resolved_bias_correction(),
              widths=list(spec.default_widths()),
              params_before=s['params'], macs_before=s['macs'], flops_before=s['flops'],
              bytes_before=s['bytes'], solve_seconds=0.0, compile_seconds=0.0, layers=[])


def jsonable(obj: Any) -> Any:
  """``obj`` with NumPy arrays / scalars turned into JSON-native values."""
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


# --------------------------------------------------------------------------------------------
# Human-readable output.


def _fmt_count(n: float) -> str:
  for unit, div in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= div:
      return f'{n / div:.2f}{unit}'
  return f'{n:.0f}'


def layer_table(report: Mapping[str, Any]) -> str:
  """Per-layer widths and solver diagnostics as a fixed-width text table."""
  rows = [('layer', 'width', 'kept', 'cond(A)', 'rel.resid', 'mean|s|', 'max|s|')]
  for layer in report.get('layers', []):
    d = layer.get('diagnostics', {})

    def g(key, fmt='{:.2e}'):
      v = d.get(key)
      return fmt.format(v) if isinstance(v, (int, float)) and v == v else '-'

    rows.append((layer['name'], str(layer['width_before']), str(layer['width_after']),
                 g('cond'), g('rel_residual'), g('coef_mean_abs'),
                 g('coef_max_abs')))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)


def summary_text(report: Mapping[str, Any]) -> str:
  """Params, FLOPs, bytes before/after, timings and accuracies."""
  def ratio(a, b):
    return f'{100.0 * (1 - b / a):.1f}% smaller' if a else ''

  lines = [f"{report['arch']}: method={report['method']} criterion={report['criterion']}"
           f" ratio={report['ratio']}"
           + (f" weight_bits={report['weight_bits']} quant={report['quant_method']}"
              if report.get('weight_bits') else '')]
  for key, label in (('params', 'params'), ('flops', 'FLOPs'), ('bytes', 'bytes')):
    a, b = report.get(f'{key}_before'), report.get(f'{key}_after')
    if a is not None and b is not None:
      lines.append(f'  {label:7s} {_fmt_count(a):>9s} -> {_fmt_count(b):>9s}  ({ratio(a, b)})')
  lines.append(f"  solve {report.get('solve_seconds', 0.0):.3f} s, compile "
               f"{report.get('compile_seconds', 0.0):.3f} s, total {report.get('seconds', 0.0):.2f} s")
  if report.get('top1_before') is not None:
    lines.append(f"  top-1 {report['top1_before']:.2f} -> {report['top1_after']:.2f}   "
                 f"top-5 {report['top5_before']:.2f} -> {report['top5_after']:.2f}"
                 f"   (n={report['n_eval']})")
  return '\n'.join(lines)


def sweep_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """One Markdown row per configuration of a sweep."""
  head = ('| method | criterion | ratio | bits | quant | params | FLOPs | bytes | top-1 | top-5 | solve s |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|')
  out = [head]
  for r in rows:
    t1 = '-' if r.get('top1_after') is None else f"{r['top1_after']:.2f}"
    t5 = '-' if r.get('top5_after') is None else f"{r['top5_after']:.2f}"
    out.append(f"| {r['method']} | {r['criterion']} | {r['ratio']:.2f} | {r.get('weight_bits') or 32}"
               f" | {r.get('quant_method') or '-'} | {_fmt_count(r['params_after'])}"
               f" | {_fmt_count(r['flops_after'])} | {_fmt_count(r['bytes_after'])} | {t1} | {t5}"
               f" | {r.get('solve_seconds', 0.0):.3f} |")
  return '\n'.join(out)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path, *, title: str, baseline: float | None = None):
  """Top-1 versus ratio, one line per (method, criterion, bits); writes a PNG."""
  series: dict[str, list[tuple[float, float]]] = {}
  for r in rows:
    if r.get('top1_after') is None:
      continue
    label = f"{r['method']} ({r['criterion']}"
    label += f", W{r['weight_bits']} {r['quant_method']})" if r.get('weight_bits') else ')'
    series.setdefault(label, []).append((r['ratio'], r['top1_after']))
  plot_series(series, path, title=title, baseline=baseline)


def plot_series(series: Mapping[str, Sequence[tuple[float, float | None]]], path, *, title: str,
                baseline: float | None = None) -> None:
  """One line per label of (ratio, top-1) points (None points skipped); writes a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for label, pts in sorted(series.items()):
    pts = sorted(p for p in pts if p[1] is not None)
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=label)
  if baseline is not None:
    ax.axhline(baseline, color='gray', linestyle='--', linewidth=1, label=f'unpruned {baseline:.2f}')
  ax.set_xlabel('pruning ratio per layer')
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)

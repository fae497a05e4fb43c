"""Human-readable output of compressions: width tables, summaries, sweep tables and plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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
               f"{report.get('compile_seconds', 0.0):.3f} s, total "
               f"{report.get('total_seconds', report.get('seconds', 0.0)):.2f} s")
  phases = report.get('phases') or {}
  if phases:
    def fmt(items):
      return ', '.join(f'{k.replace("_", " ")} {v:.2f} s' for k, v in items)

    top = [(k, v) for k, v in phases.items() if '/' not in k]
    inner = [(k.split('/', 1)[1], v) for k, v in phases.items() if k.startswith('compress/')]
    if not top:  # a report of the pipeline alone: its phases are the compression's
      inner = list(phases.items())
    if top:
      lines.append('  time: ' + fmt(top))
    lines.append('  compress: ' + fmt(inner) + ' (solve and compile are part of delivery)')
  bn = report.get('bn_reestimate')
  if bn:
    lines.append(f"  BN re-estimation: {bn['recipe']} "
                 f"({'data-free' if bn['data_free'] else 'NOT data-free: real images'}), "
                 f"{bn['seconds']:.2f} s")
  act = report.get('act_quant')
  if act:
    calib = act.get('calib_data') or {}
    lines.append(f"  activations: {act['bits']} bits, ranges {act['source']} "
                 + ('(data-free)' if act['data_free'] else
                    f"(NOT data-free: {calib.get('n', (act.get('info') or {}).get('n', '?'))} "
                    f"user images{' of ' + str(calib['spec']) if calib.get('spec') else ''})")
                 + f"; 8-bit inputs: {', '.join(act.get('keep_8bit') or []) or 'none'}")
  if report.get('top1_before') is not None:
    lines.append(f"  top-1 {report['top1_before']:.2f} -> {report['top1_after']:.2f}   "
                 f"top-5 {report['top5_before']:.2f} -> {report['top5_after']:.2f}"
                 f"   (n={report['n_eval']})")
  if report.get('throughput_before') is not None:
    lines.append(f"  throughput {report['throughput_before']:.0f} -> "
                 f"{report['throughput_after']:.0f} images/s (batch {report['throughput_batch']})")
  if report.get('random_weights'):
    lines.append('  weights were random: the accuracy above is meaningless')
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
  import matplotlib  # pylint: disable=import-outside-toplevel  (optional, heavy: only for plots)

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

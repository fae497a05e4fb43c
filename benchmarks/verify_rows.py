"""Re-runs stored sweep rows with the current code and checks that they reproduce exactly.

Each stored row of ``benchmarks/results/*.jsonl`` carries its job's fields. This script rebuilds
the :class:`benchmarks.reproduce.Job` from them, checks that its key is the stored key (so the
job, and the plan :func:`benchmarks.reproduce.job_plan` makes of it, is the one that produced the
row), compresses and evaluates it again on the full test set (:func:`benchmarks.reproduce.run_job`,
nothing is read from the stored row but the job), and compares the correct-prediction counts of
top-1 and top-5 and the parameter, FLOP and byte counts. Results go to stdout as a Markdown
table; the exit status is 1 if any row differs.

  python -m benchmarks.verify_rows                 # the default sample (SAMPLE below)
  python -m benchmarks.verify_rows --cheap         # only its ResNet-20 and LeNet rows
  python -m benchmarks.verify_rows --keys 3b6d3b245b4c8cb8 4b7a6f3849a3fef8
  python -m benchmarks.verify_rows --list          # the sample's keys and jobs, nothing run
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import reproduce
from benchmarks.reproduce import BC_ON, LENET_LBYL_LAM, REFERENCE_CODE, Job

GUARD = (('guard', 'moments'),)
BLEND = (('bias_correction', 'blend'),)
AUTO = (('bias_correction', 'auto'),)
TAPS = BC_ON + (('bias_fold', 'all_taps'),)

# A sample covering every kind of stored row: the --quick jobs of the restore suite; the LeNet
# reference-code rows of every method and criterion and the consistent ones; nm / lbyl / bnm with
# the bias correction off / on / auto / blend and the prototype's fold; the guard; every
# quantizer, the joint UDFC path with and without the bias correction, and bnm + UDFC's rescale.
SAMPLE = (
    # restore --quick (published forms and the default lbyl), full test set
    Job('resnet20', 'prune', 'l2', 0.3), Job('resnet20', 'nm', 'l2', 0.3),
    Job('resnet20', 'lbyl', 'l2', 0.3), Job('resnet20', 'lbyl', 'l2', 0.3, BC_ON),
    # other criteria and the nm default
    Job('resnet20', 'nm', 'l1', 0.5, BC_ON), Job('resnet20', 'lbyl', 'l2-gm', 0.4, BC_ON),
    Job('resnet20', 'prune', 'l2-gm', 0.2),
    # LeNet-300-100, the official codes' forms (preset reference_code) and the consistent forms
    Job('lenet_300_100', 'prune', 'l2', 0.5, REFERENCE_CODE, tag='reference'),
    Job('lenet_300_100', 'lbyl', 'l2', 0.7,
        REFERENCE_CODE + (('lambda1', 0.0), ('lambda2', LENET_LBYL_LAM[0.7])), tag='reference'),
    Job('lenet_300_100', 'prune', 'l1', 0.6, REFERENCE_CODE, tag='reference'),
    Job('lenet_300_100', 'nm', 'l1', 0.8, REFERENCE_CODE + (('nm_t', 0.45),), tag='reference'),
    Job('lenet_300_100', 'nm', 'l2', 0.5, REFERENCE_CODE + (('nm_t', 0.45),), tag='reference'),
    Job('lenet_300_100', 'bnm', 'l2', 0.6, tag='consistent'),
    Job('lenet_300_100', 'lbyl', 'l2', 0.8, tag='consistent'),
    Job('lenet_300_100', 'nm', 'l2', 0.7, AUTO), Job('lenet_300_100', 'bnm', 'l2', 0.5, BC_ON),
    # bnm, the four bias-correction settings
    Job('resnet20', 'bnm', 'l2', 0.3, (('bnm_cov', 'diag'),)), Job('resnet20', 'bnm', 'l2', 0.3, BC_ON),
    Job('resnet20', 'bnm', 'l2', 0.3, AUTO), Job('resnet20', 'bnm', 'l2', 0.3, BLEND),
    # the guard
    Job('resnet20', 'lbyl', 'l2', 0.3, GUARD), Job('resnet20', 'nm', 'l1', 0.4, GUARD),
    Job('lenet_300_100', 'nm', 'l2', 0.6, GUARD),
    # ResNet-56 checkpoints: the prototype's fold, the guard
    Job('resnet56_b', 'lbyl', 'l2', 0.4, TAPS),
    Job('resnet56', 'nm', 'l2', 0.5, GUARD),
    # quantization: rtn / dfq / udfc without pruning; joint UDFC off / on; lbyl + rtn; bnm + udfc
    Job('resnet56_b', 'prune', 'l2', 0.0, bits=4, quant_method='rtn'),
    Job('resnet56_b', 'prune', 'l2', 0.0, bits=4, quant_method='dfq'),
    Job('resnet56_b', 'prune', 'l2', 0.0, bits=4, quant_method='udfc'),
    Job('resnet56_b', 'lbyl', 'l2', 0.3, bits=4, quant_method='udfc'),
    Job('resnet56_b', 'lbyl', 'l2', 0.3, BC_ON, bits=4, quant_method='udfc'),
    Job('resnet56_b', 'lbyl', 'l2', 0.3, BC_ON, bits=4, quant_method='rtn'),
    Job('resnet56_b', 'bnm', 'l2', 0.3, bits=4, quant_method='udfc'),
)

CHEAP = ('resnet20', 'lenet_300_100')
COUNTS = ('params_after', 'flops_after', 'bytes_after')


def job_of(row: dict) -> Job:
  """The job of a stored row (its fields as ``dataclasses.asdict`` wrote them)."""
  return Job(row['arch'], row['method'], row['criterion'], row['ratio'],
             tuple(tuple(o) for o in row['options']), row['bits'], row['quant_method'], row['tag'])


def _hits(top: float, n: int) -> int:
  """Correct predictions behind a top-k percentage of n images."""
  return round(top * n / 100.0)


def describe(job: Job) -> str:
  opts = ', '.join(f'{k}={v}' for k, v in job.options)
  quant = '' if job.bits is None else f' W{job.bits} {job.quant_method}'
  return f'{job.arch} {job.method} {job.criterion} {job.ratio:g}{quant}' + (f' ({opts})' if opts else '')


def verify(keys: list[str], rows: dict[str, dict]) -> list[dict]:
  """Re-runs every key; returns one result dict per key (see the module docstring)."""
  out = []
  for key in keys:
    row = rows.get(key)
    if row is None:
      raise SystemExit(f'no stored row with key {key!r} in benchmarks/results/*.jsonl')
    if row.get('method') == 'baseline':
      raise SystemExit(f'{key} is a baseline row; give the key of a compression job')
    job = job_of(row)
    if job.key() != key:
      raise SystemExit(f'{key}: the stored fields hash to {job.key()}, not to the stored key')
    t = time.perf_counter()
    new = reproduce.run_job(job, None)
    seconds = time.perf_counter() - t
    n = row['n']
    same = (new['n'] == n and _hits(new['top1'], n) == _hits(row['top1'], n)
            and _hits(new['top5'], n) == _hits(row['top5'], n)
            and all(new[c] == row[c] for c in COUNTS))
    out.append(dict(key=key, job=describe(job), stored=row['top1'], new=new['top1'],
                    stored_top5=row['top5'], new_top5=new['top5'], n=new['n'], same=same,
                    seconds=seconds))
    print(f"{key} {describe(job)}: stored {row['top1']:.2f}, new {new['top1']:.2f}"
          f" ({'identical' if same else 'DIFFERS'}, {seconds:.0f} s)", file=sys.stderr, flush=True)
  return out


def markdown(results: list[dict]) -> str:
  lines = ['| key | job | stored top-1 | new top-1 | stored / new top-5 | identical |',
           '|---|---|---|---|---|---|']
  for r in results:
    lines.append(f"| {r['key']} | {r['job']} | {r['stored']:.2f} | {r['new']:.2f} | "
                 f"{r['stored_top5']:.2f} / {r['new_top5']:.2f} | {'yes' if r['same'] else 'NO'} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--keys', nargs='+', help='stored row keys (default: the sample)')
  p.add_argument('--cheap', action='store_true', help='only ResNet-20 and LeNet rows of the sample')
  p.add_argument('--list', action='store_true', help='print the keys and jobs, run nothing')
  args = p.parse_args(argv)
  rows = reproduce.stored_rows()
  if args.keys:
    keys = args.keys
  else:
    jobs = [j for j in SAMPLE if not args.cheap or j.arch in CHEAP]
    keys = [j.key() for j in jobs]
  if args.list:
    for k in keys:
      print(k, describe(job_of(rows[k])) if k in rows else '(no stored row)')
    return 0
  t = time.perf_counter()
  results = verify(keys, rows)
  print(markdown(results))
  same = sum(r['same'] for r in results)
  print(f'\n{same} of {len(results)} rows identical (top-1 and top-5 counts, params, FLOPs, bytes);'
        f' {time.perf_counter() - t:.0f} s on {reproduce.machine()}')
  return 0 if same == len(results) else 1


if __name__ == '__main__':
  sys.exit(main())

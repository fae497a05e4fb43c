"""What each crafted hostile file (tests/test_reader_bounds.py) gets from the readers, and at what cost.

Builds every crafted file of the test suite, reads each one in this process (CPU time, the error
type and message a user sees) and all of them again in a child process whose address space may
grow by at most 512 MiB (``tests/reader_harness.py``), whose peak-RSS growth is reported. Also
times the reads of the real checkpoints in ``../shared/weights`` (min of 5).

  python -m benchmarks.reader_bounds [--out benchmarks/results/reader_bounds.json]

Prints a Markdown table; writes JSON with the same rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _test_module(name: str):
  """Imports ``tests/<name>.py`` (the crafted cases live with the tests that pin them)."""
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, ROOT / 'tests' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', type=pathlib.Path, default=None)
  args = p.parse_args(argv)

  import converters  # pylint: disable=import-outside-toplevel
  rh = _test_module('reader_harness')
  trb = _test_module('test_reader_bounds')

  rows = []
  with tempfile.TemporaryDirectory() as d:
    tmp = pathlib.Path(d)
    cases = trb._crafted(tmp)  # pylint: disable=protected-access
    for name, (reader, path, error, _) in sorted(cases.items()):
      t0 = time.process_time()
      try:
        trb._run(reader, path)  # pylint: disable=protected-access
        outcome, message = 'loaded', ''
      except Exception as e:  # noqa: BLE001
        outcome, message = type(e).__name__, str(e).replace(str(path), '<file>')
      rows.append({'case': name, 'reader': reader, 'file_bytes': path.stat().st_size,
                   'expected': error.__name__, 'outcome': outcome, 'message': message,
                   'cpu_s': time.process_time() - t0})
    work = tmp / 'child'
    work.mkdir()
    names = sorted(cases)
    report = rh.run_readers([(cases[n][0], cases[n][1]) for n in names], mem_bytes=512 << 20,
                            timeout=600, workdir=work)
  for row, (status, _, seconds, grew) in zip(rows, report['results']):
    row['child_status'] = status
    row['child_cpu_s'] = seconds
    row['child_rss_growth_mib'] = grew / 2**20
  growth_mib = max(r[3] for r in report['results']) / 2**20

  real = []
  weights = ROOT.parent / 'shared' / 'weights'
  if weights.is_dir():
    for f in sorted(weights.iterdir()):
      times = []
      for _ in range(5):
        t0 = time.perf_counter()
        sd = converters.read_state_dict(f)
        times.append(time.perf_counter() - t0)
      real.append({'file': f.name, 'bytes': f.stat().st_size, 'tensors': len(sd),
                   'read_s_min': min(times)})

  print('| case | reader | file bytes | error type | CPU s | child | child peak RSS +MiB | message |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    msg = r['message'].replace('|', '\\|')
    print(f"| {r['case']} | {r['reader']} | {r['file_bytes']} | {r['outcome']} |"
          f" {r['cpu_s']:.3f} | {r['child_status']} | {r['child_rss_growth_mib']:.1f} | {msg} |")
  print(f'\nlargest peak-RSS rise of one file in the child: {growth_mib:.1f} MiB '
        f'(its address-space limit: +512 MiB over the imported modules)')
  if real:
    print('\n| real file | bytes | tensors | read_state_dict s (min of 5) |')
    print('|---|---|---|---|')
    for r in real:
      print(f"| {r['file']} | {r['bytes']} | {r['tensors']} | {r['read_s_min']:.4f} |")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({'machine': platform.platform(), 'crafted': rows,
                                    'child_max_peak_rss_rise_mib': growth_mib, 'real': real},
                                   indent=1))
  bad = [r['case'] for r in rows if r['outcome'] != r['expected'] and not (
      r['expected'] == 'CheckpointError' and r['outcome'] == 'UnsafePickleError')]
  return 1 if bad or any(r['child_status'] != 'error' for r in rows) else 0


if __name__ == '__main__':
  sys.exit(main())

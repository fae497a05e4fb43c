"""Whole-command speed and peak memory of ``python -m lbyl_jax.restore`` (issue 16, points 1 and 5).

The command: ``python -m lbyl_jax.restore --arch ARCH --weights random --no-progress`` (LBYL at
30 % with the default bias correction: load -> restore -> save, no data). Every measurement is a
fresh process, paired with the import baseline ``python -c "import jax, flax, orbax.checkpoint,
lbyl_jax"`` run right before it (same load on the machine), and repeated:

- cold: a fresh, empty JAX compilation cache directory for every run (``--compile-cache DIR``);
- warm: the cache populated by a previous run of the same command.

Per run: wall seconds, CPU seconds (user + system of the child, from ``os.wait4``), peak RSS of
the child (``ru_maxrss``), the phase breakdown of the report the command prints with ``--json``
(``outside``: wall time outside every phase: interpreter start, imports, printing, exit) and the
1-minute load average before and after. On a shared machine the CPU seconds move much less with
the load than the wall seconds; the table gives both. The table shows minimum and median over the repeats; the targets of issue 16
are checked on them (warm <= 3x import for ResNet-50 and <= 5x for ResNet-152, cold < 5 s, the
bias correction <= 10 % of the compress phase).

Before measuring, each checkout's packages (``lbyl_jax``, ``converters``) are byte-compiled
(``python -m compileall``), the state of an installed package: pip byte-compiles what it
installs, and an editable checkout gets its ``.pyc`` files on its first import -- except where
``PYTHONDONTWRITEBYTECODE`` is set, as on the development machine, where every run compiled the
project's ~70 modules from source again (ResNet-50 warm: 2.15 s without the .pyc files, 1.98 s
with them; 6 alternating runs, ad hoc) while jax, flax and
orbax, byte-compiled at their install, did not. The JSON records it (``bytecode``).

``--root LABEL=PATH`` (repeatable) measures other checkouts of the repository in the same run
(e.g. the commit before an optimization), each row labelled; the default is this checkout.

  python -m benchmarks.command_speed                                   # R50 / 101 / 152, 3 repeats
  python -m benchmarks.command_speed --archs resnet50 --repeats 5
  python -m benchmarks.command_speed --root before=/tmp/base --root after=.
  python -m benchmarks.command_speed --archs resnet50 --extra "--bn-reestimate moments" \
      --out benchmarks/results/command_speed_moments.json
  python -m benchmarks.command_speed --archs resnet152 --modes warm --root tuned=. \
      --root default=. --env default:LBYL_JAX_DEFAULT_MALLOC=1     # the allocator setup's effect
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'command_speed.json'
IMPORT_ARGV = ('-c', 'import jax, flax, orbax.checkpoint, lbyl_jax')
TARGETS = {'resnet50': 3.0, 'resnet152': 5.0}  # warm command / import, issue 16
COLD_TARGET_S = 5.0
BIAS_SHARE_TARGET = 0.10


def command_argv(arch: str, out: pathlib.Path, cache: pathlib.Path,
                 extra: Sequence[str] = ()) -> list[str]:
  # --json prints the final report (with the save phase, which report.json cannot hold).
  return ['-m', 'lbyl_jax.restore', '--arch', arch, '--weights', 'random', '--no-progress',
          '--out', str(out), '--compile-cache', str(cache), '--json', *extra]


def run_child(argv: Sequence[str], *, root: pathlib.Path, workdir: pathlib.Path,
              timeout: float, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs ``python ARGV`` with ``root`` on PYTHONPATH (and ``env_extra`` set); wall / CPU
  seconds and peak RSS (MiB)."""
  env = dict(os.environ, PYTHONPATH=str(root), **(env_extra or {}))
  load_before = os.getloadavg()[0]
  with open(workdir / 'stdout.txt', 'wb') as out, open(workdir / 'stderr.txt', 'wb') as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=workdir, env=env, stdout=out, stderr=err)
    deadline = t0 + timeout
    while True:  # os.wait4 gives this child's own rusage (RUSAGE_CHILDREN mixes all children)
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if time.perf_counter() > deadline:
        proc.kill()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = -9
        raise TimeoutError(f'{" ".join(argv)} ran past {timeout} s')
      time.sleep(0.005)
    wall = time.perf_counter() - t0
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    tail = (workdir / 'stderr.txt').read_text(errors='replace')[-2000:]
    raise RuntimeError(f'{" ".join(argv)} exited with {proc.returncode}:\n{tail}')
  # ru_maxrss is in KiB on Linux, bytes on macOS.
  rss = usage.ru_maxrss / (1 << 20 if sys.platform == 'darwin' else 1 << 10)
  return dict(wall=wall, cpu=usage.ru_utime + usage.ru_stime, maxrss_mib=rss,
              load_before=load_before, load_after=os.getloadavg()[0])


def run_pair(root: pathlib.Path, arch: str, cache: pathlib.Path, workdir: pathlib.Path,
             timeout: float, extra: Sequence[str] = (),
             env_extra: dict[str, str] | None = None) -> dict[str, Any]:
  """The import baseline, then the command (its report's phases attached)."""
  base = run_child(IMPORT_ARGV, root=root, workdir=workdir, timeout=timeout, env_extra=env_extra)
  out = workdir / 'run'
  if out.exists():
    shutil.rmtree(out)
  cmd = run_child(command_argv(arch, out, cache, extra), root=root, workdir=workdir,
                  timeout=timeout, env_extra=env_extra)
  lines = [ln for ln in (workdir / 'stdout.txt').read_text().splitlines() if ln.startswith('{')]
  report = json.loads(lines[-1])
  shutil.rmtree(out)
  cmd['phases'] = dict(report.get('phases', {}))
  # Outside the phases: interpreter start, imports, argument parsing, printing, exit.
  cmd['phases']['outside'] = cmd['wall'] - float(report.get('total_seconds', 0.0))
  return dict(import_=base, command=cmd)


PACKAGES = ('lbyl_jax', 'converters')


def byte_compile(root: pathlib.Path) -> None:
  """Writes the ``.pyc`` files of the checkout's packages (compileall writes them whatever
  ``PYTHONDONTWRITEBYTECODE`` says; they are ignored by git)."""
  subprocess.run([sys.executable, '-m', 'compileall', '-q',
                  *(str(root / pkg) for pkg in PACKAGES if (root / pkg).is_dir())],
                 check=True, stdout=subprocess.DEVNULL)


def _stats(values: list[float]) -> dict[str, float]:
  return dict(min=min(values), median=statistics.median(values))


def measure(label: str, root: pathlib.Path, arch: str, repeats: int, timeout: float,
            log, extra: Sequence[str] = (), env_extra: dict[str, str] | None = None,
            modes: Sequence[str] = ('cold', 'warm')) -> dict[str, Any]:
  """Cold and warm runs of one architecture from one checkout (``modes='warm'``: one unmeasured
  run fills the cache, then the warm runs)."""
  rows: dict[str, list[dict[str, Any]]] = {m: [] for m in ('cold', 'warm') if m in modes}
  with tempfile.TemporaryDirectory(prefix='lbyl_cmd_speed_') as tmp:
    tmp = pathlib.Path(tmp)
    cache = tmp / 'cache'
    for i in range(repeats if 'cold' in rows else 0):
      if cache.exists():
        shutil.rmtree(cache)
      rows['cold'].append(run_pair(root, arch, cache, tmp, timeout, extra, env_extra))
      log(f'  {label} {arch} cold {i + 1}/{repeats}: '
          f'{rows["cold"][-1]["command"]["wall"]:.2f} s')
    if 'cold' not in rows:  # fills the cache (the cold runs do that otherwise)
      run_pair(root, arch, cache, tmp, timeout, extra, env_extra)
    for i in range(repeats):  # the cache is populated
      rows['warm'].append(run_pair(root, arch, cache, tmp, timeout, extra, env_extra))
      log(f'  {label} {arch} warm {i + 1}/{repeats}: '
          f'{rows["warm"][-1]["command"]["wall"]:.2f} s')
  result: dict[str, Any] = dict(label=label, root=str(root), arch=arch, repeats=repeats,
                                env=dict(env_extra or {}))
  for mode, runs in rows.items():
    cmd = [r['command'] for r in runs]
    imp = [r['import_'] for r in runs]
    phases = sorted({k for c in cmd for k in c['phases']})
    result[mode] = dict(
        command_wall=_stats([c['wall'] for c in cmd]),
        command_cpu=_stats([c['cpu'] for c in cmd]),
        import_wall=_stats([b['wall'] for b in imp]),
        import_cpu=_stats([b['cpu'] for b in imp]),
        ratio_wall=_stats([c['wall'] / b['wall'] for c, b in zip(cmd, imp)]),
        maxrss_mib=max(c['maxrss_mib'] for c in cmd),
        import_maxrss_mib=max(b['maxrss_mib'] for b in imp),
        load=_stats([x for r in runs for x in (r['import_']['load_before'],
                                                r['command']['load_after'])]),
        phases={k: statistics.median([c['phases'].get(k, 0.0) for c in cmd]) for k in phases},
        runs=runs,
    )
  return result


def bias_share(phases: dict[str, float]) -> float | None:
  bc, total = phases.get('compress/bias_correction'), phases.get('compress')
  return None if not bc or not total else bc / total


def targets(row: dict[str, Any], judge: bool = True) -> list[str]:
  """Which of issue 16's targets this row meets (by medians); ``judge=False`` (a command with
  extra flags, which the targets are not about): the same figures without a verdict."""
  out = []
  if not judge:
    return [ln.split(' (')[0] for ln in targets(row)]
  warm, cold = row['warm'], row.get('cold')
  limit = TARGETS.get(row['arch'])
  if limit is not None:
    ratio = warm['command_wall']['median'] / warm['import_wall']['median']
    out.append(f'warm {ratio:.2f}x import ({"meets" if ratio <= limit else "misses"} <= {limit:g}x)')
  if row['arch'] == 'resnet50' and cold is not None:
    c = cold['command_wall']['median']
    out.append(f'cold {c:.2f} s ({"meets" if c < COLD_TARGET_S else "misses"} < {COLD_TARGET_S:g} s)')
  cpu = warm['command_cpu']['median'] / warm['import_cpu']['median']
  out.append(f'warm CPU {cpu:.2f}x the import\'s')
  share = bias_share(warm['phases'])
  if share is not None:
    out.append(f'bias correction {100 * share:.1f} % of compress '
               f'({"meets" if share <= BIAS_SHARE_TARGET else "misses"} <= 10 %)')
  return out


PHASES_SHOWN = ('load', 'compress/selection', 'compress/delivery', 'compress/solve',
                'compress/compile', 'compress/bias_correction', 'compress/surgery',
                'compress/stats', 'save', 'outside')


def table(rows: list[dict[str, Any]]) -> str:
  shown = list(PHASES_SHOWN)
  if any('bn_reestimate' in r[m]['phases'] for r in rows for m in ('cold', 'warm') if m in r):
    shown.insert(shown.index('save'), 'bn_reestimate')  # a command run with --bn-reestimate
  head = ('| checkout | arch | cache | import s (min / med) | command s (min / med) | ratio med |'
          ' CPU s med (import) | peak RSS MiB | load 1-min | '
          + ' | '.join(p.split('/')[-1] for p in shown) + ' |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    for mode in ('cold', 'warm'):
      if mode not in r:  # --modes warm
        continue
      m = r[mode]
      lines.append(
          f"| {r['label']} | {r['arch']} | {mode} | {m['import_wall']['min']:.2f} / "
          f"{m['import_wall']['median']:.2f} | {m['command_wall']['min']:.2f} / "
          f"{m['command_wall']['median']:.2f} | {m['ratio_wall']['median']:.2f} | "
          f"{m['command_cpu']['median']:.2f} ({m['import_cpu']['median']:.2f}) | "
          f"{m['maxrss_mib']:.0f} | "
          f"{m['load']['min']:.1f}-{max(x for run in m['runs'] for x in (run['import_']['load_before'], run['command']['load_after'])):.1f} | "
          + ' | '.join(f"{m['phases'].get(p, 0.0):.2f}" for p in shown) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--archs', default='resnet50,resnet101,resnet152')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--root', action='append', metavar='LABEL=PATH',
                 help='checkout to measure (repeatable; default: this one, labelled "current")')
  p.add_argument('--timeout', type=float, default=600.0, help='seconds per child process')
  p.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  p.add_argument('--env', action='append', default=[], metavar='LABEL:KEY=VALUE',
                 help="environment variable for one --root's runs (repeatable), e.g. "
                      "'default:LBYL_JAX_DEFAULT_MALLOC=1' to measure the commands' allocator "
                      "setup against glibc's defaults on the same checkout")
  p.add_argument('--modes', default='cold,warm', help="'cold,warm' or 'warm'")
  p.add_argument('--extra', default='', metavar='"FLAGS"',
                 help='more flags for the command, e.g. "--bn-reestimate moments" (its cost); '
                      'the targets are those of the plain command')
  args = p.parse_args(argv)
  extra = args.extra.split()
  if args.repeats < 1:
    p.error('--repeats must be >= 1')
  roots = []
  for item in args.root or [f'current={ROOT}']:
    label, sep, path = item.partition('=')
    if not sep or not label:
      p.error(f'--root expects LABEL=PATH, got {item!r}')
    path = pathlib.Path(path).resolve()
    if not (path / 'lbyl_jax' / '__init__.py').is_file():
      p.error(f'--root {item}: no lbyl_jax package in {path}')
    roots.append((label, path))
  envs: dict[str, dict[str, str]] = {}
  for item in args.env:
    label, sep, kv = item.partition(':')
    key, eq, value = kv.partition('=')
    if not sep or not eq or not key or label not in dict(roots):
      p.error(f'--env expects LABEL:KEY=VALUE with a --root label, got {item!r}')
    envs.setdefault(label, {})[key] = value
  modes = tuple(m.strip() for m in args.modes.split(',') if m.strip())
  if not modes or set(modes) - {'cold', 'warm'} or 'warm' not in modes:
    p.error(f"--modes must be 'cold,warm' or 'warm', got {args.modes!r}")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  for _, root in roots:
    byte_compile(root)
  rows = []
  started = time.time()
  for arch in [a.strip() for a in args.archs.split(',') if a.strip()]:
    for label, root in roots:  # interleaved per arch, so checkouts see similar load
      rows.append(measure(label, root, arch, args.repeats, args.timeout, log, extra,
                          envs.get(label), modes))
  result = dict(
      argv=list(sys.argv[1:] if argv is None else argv),  # as invoked (RESULTS.md shows it)
      command='python -m lbyl_jax.restore --arch ARCH --weights random --no-progress'
      + (' ' + ' '.join(extra) if extra else ''),
      import_baseline='python ' + ' '.join(repr(a) if ' ' in a else a for a in IMPORT_ARGV),
      bytecode='compiled before measuring (python -m compileall ' + ' '.join(PACKAGES) + ')',
      python=sys.version.split()[0], machine=platform.machine(), cpus=os.cpu_count(),
      started=time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(started)),
      seconds=time.time() - started, rows=rows,
      targets={f"{r['label']} {r['arch']}": targets(r, judge=not extra) for r in rows})
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1) + '\n')
  print(table(rows))
  for key, lines in result['targets'].items():
    print(f'{key}: ' + '; '.join(lines))
  print(f'wrote {args.out}')
  return result


if __name__ == '__main__':
  main()

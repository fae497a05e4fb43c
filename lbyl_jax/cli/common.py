"""What the commands share: flags generated from the stages' options, one-line errors, phases.

Errors: every expected error (a bad argument, a missing or unreadable file, a checkpoint that does
not fit, a failed download, a missing optional extra, an output that must not be replaced) is
printed as ONE line ``<prog>: error: ...`` on stderr with exit code 1; usage errors found by the
argument parser exit with 2. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lbyl_jax.core import distributed
from lbyl_jax.core.options import Options, flag_of
from lbyl_jax.io import compile_cache
from lbyl_jax.io import download as download_lib

EXIT_ERROR = 1
EXIT_USAGE = 2
EXPECTED_ERRORS = (ValueError, OSError, ImportError, download_lib.DownloadError)


def one_line(e: BaseException) -> str:
  """The error's message on one line (multi-line messages joined with '; ')."""
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  text = '; '.join(lines) if lines else type(e).__name__
  if isinstance(e, ImportError) and getattr(e, 'name', None):
    text = f'{text} (the optional package {e.name!r} is missing; see README "Installing")'
  return text


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run_main(prog: str, make_parser: Callable[[bool], argparse.ArgumentParser],
             run: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None) -> Any:
  """Parses ``argv`` (``--help-all``: the full listing), runs, and turns expected errors into one
  line with exit code 1."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if '--help-all' in argv:
    make_parser(True).print_help()
    raise SystemExit(0)
  args = make_parser(False).parse_args(argv)
  where = ''
  try:
    compile_cache.enable(getattr(args, 'compile_cache', None))
    if hasattr(args, 'coordinator_address'):
      args.setup = distributed.initialize(args.coordinator_address, args.num_processes,
                                          args.process_id)
      if args.setup.process_count > 1:
        where = f'[process {args.setup.process_index}/{args.setup.process_count}] '
        if not args.setup.primary:  # one set of progress lines and tables: the primary's
          args.no_progress = True
    return run(args)
  except KeyboardInterrupt:
    log(f'{prog}: {where}interrupted')
    raise SystemExit(130) from None
  except EXPECTED_ERRORS as e:
    if getattr(args, 'debug', False):
      raise
    log(f'{prog}: {where}error: {one_line(e)}')
    raise SystemExit(EXIT_ERROR) from None


# glibc mallopt parameters (malloc.h) and the values the commands set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD = 32 * 2**20  # glibc's own ceiling for its sliding threshold (64-bit)
_TRIM_THRESHOLD = 2**31 - 1
_ARENA_MAX = 2
# Environment variables by which a user sets these himself (then nothing is changed).
_MEMORY_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_',
               'MALLOC_ARENA_MAX', 'NUMPY_MADVISE_HUGEPAGE', 'LBYL_JAX_DEFAULT_MALLOC')


def tune_process_memory() -> dict[str, bool]:
  """Lets a command reuse the memory it frees instead of faulting in fresh pages (Linux, glibc).

  A restore allocates and frees hundreds of MB of short-lived arrays (float64 filters, the
  stacked systems of each solver bucket, the device copies). By default glibc maps every block
  of more than a few MB freshly and gives freed memory back to the kernel, and NumPy asks for
  transparent huge pages on large arrays, so the same memory was faulted in again and again:
  1.0-1.6 s of system time in a 4.2-4.5 s ResNet-152 restore on a 2-core CPU (about 330,000
  page faults; measured ad hoc with /usr/bin/time).
  Here blocks of up to 32 MiB come from the heap from the start, freed memory stays with the
  process up to 2 GiB, at most two malloc arenas serve all threads (``mallopt``; the host work
  runs in threads, :mod:`lbyl_jax.core.threads`, and memory freed in one thread's arena was not
  reused by another), and NumPy's huge-page hint is off. This changes no result, only where the
  bytes live. Warm restores, 5 runs each, against glibc's and NumPy's defaults on the same code
  (``python -m benchmarks.command_speed --modes warm --root tuned=. --root default=. --env
  default:LBYL_JAX_DEFAULT_MALLOC=1``, benchmarks/results/command_speed_allocator.json):
  ResNet-152 3.46 -> 3.42 s and 1435 -> 1379 MiB peak RSS; ResNet-50 2.10 -> 2.02 s and 806 ->
  708 MiB (an earlier pair of runs: ResNet-152 3.51 -> 3.26 s; the wall-time gain is within the
  run-to-run spread, the RSS gain is not). While choosing (ad hoc, through the environment variables): a 512 MiB threshold was
  as fast as 32 MiB but raised the ResNet-152 peak RSS by about 250 MiB, and glibc's default
  arena count with the threaded host work by about 100 MiB.

  Process-wide, so only the commands' entry point (:func:`exit_without_teardown`) calls it,
  never the library. Nothing is changed where the user set any of ``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_ARENA_MAX``, ``NUMPY_MADVISE_HUGEPAGE``
  or ``LBYL_JAX_DEFAULT_MALLOC=1``. Returns what was set.
  """
  done = {'mallopt': False, 'numpy_hugepage_off': False}
  if not sys.platform.startswith('linux') or any(v in os.environ for v in _MEMORY_ENV):
    return done
  try:
    mallopt = ctypes.CDLL(None).mallopt  # glibc; absent from musl
  except (OSError, AttributeError):
    mallopt = None
  if mallopt is not None:
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done['mallopt'] = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                           and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                           and mallopt(_M_ARENA_MAX, _ARENA_MAX))
  try:
    from numpy._core import multiarray  # pylint: disable=import-outside-toplevel
  except ImportError:  # NumPy < 2
    from numpy.core import multiarray  # pylint: disable=import-outside-toplevel
  set_hugepage = getattr(multiarray, '_set_madvise_hugepage', None)
  if set_hugepage is not None:
    set_hugepage(False)
    done['numpy_hugepage_off'] = True
  return done


def exit_without_teardown(main: Callable[[], Any]) -> None:
  """Runs a command's ``main()`` as the program, then ends the process without the interpreter's
  teardown (``os._exit`` after flushing stdout, stderr and logging).

  For ``python -m lbyl_jax.<command>`` and the console scripts only, never for ``main()`` called
  in-process. The teardown (collecting the variables, destroying the XLA client and the thread
  pools of jax and orbax) took 0.2-0.25 s of the ResNet-50 restore's 2.5 s on a 2-core CPU
  (benchmarks/command_speed.py), and nothing in it is needed once the command has returned: every
  output is written, fsynced and published atomically before ``main`` returns, the compilation
  cache writes its entries when it compiles, and orbax's save has been waited for. With several
  processes on ``jax.distributed`` the normal exit runs (its shutdown tells the coordinator this
  process is done), and so it does under a profiler or a tracer (``python -m cProfile``,
  ``coverage run``: they write their results at exit) or with ``LBYL_JAX_FULL_EXIT=1``.

  It first sets the process's allocator up for a command (:func:`tune_process_memory`).
  """
  tune_process_memory()
  code: Any = 0
  try:
    main()
  except SystemExit as e:
    code = e.code
  if (jax_distributed_running() or sys.getprofile() is not None or sys.gettrace() is not None
      or os.environ.get('LBYL_JAX_FULL_EXIT', '') not in ('', '0')):
    raise SystemExit(code)
  if code is None:
    status = 0
  elif isinstance(code, int):
    status = code
  else:  # SystemExit('message'): printed to stderr, status 1, as the interpreter does
    print(code, file=sys.stderr)
    status = 1
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe: the interpreter would not report it either
      pass
  logging.shutdown()
  os._exit(status)  # pylint: disable=protected-access


def jax_distributed_running() -> bool:
  """Whether ``jax.distributed`` was started in this process (without starting anything)."""
  jax = sys.modules.get('jax')
  return jax is not None and jax.distributed.is_initialized()


def add_distributed(p: argparse.ArgumentParser) -> None:
  """--coordinator-address / --num-processes / --process-id (README, "Multi-host")."""
  g = p.add_argument_group('multi-host (one process per host on jax.distributed)')
  g.add_argument('--coordinator-address', metavar='HOST:PORT',
                 help='address of process 0, the same on every process (default: detected on '
                      'SLURM and Cloud TPU; otherwise a single process)')
  g.add_argument('--num-processes', type=int, metavar='N', help='number of processes')
  g.add_argument('--process-id', type=int, metavar='I', help='this process, in [0, N)')


@contextlib.contextmanager
def all_or_none(args: argparse.Namespace, what: str):
  """Runs a step that may fail on some processes only (files, outputs): afterwards every process
  knows whether all succeeded, and a failure anywhere is an error everywhere (no process is left
  waiting in a collective). Plain execution with one process."""
  setup = getattr(args, 'setup', None)
  if setup is None or setup.process_count == 1:
    yield
    return
  try:
    yield
  except EXPECTED_ERRORS:
    try:
      distributed.agree(False, what)
    except ValueError:
      pass
    raise
  distributed.agree(True, what)


def is_primary(args: argparse.Namespace) -> bool:
  """Whether this process writes outputs and prints results (always, with one process)."""
  setup = getattr(args, 'setup', None)
  return setup is None or setup.primary


def add_common(p: argparse.ArgumentParser) -> None:
  p.add_argument('--compile-cache', metavar='DIR|off',
                 help="JAX's persistent compilation cache (default: $LBYL_JAX_COMPILATION_CACHE, "
                      "else ~/.cache/lbyl_jax/jax); 'off' disables it")
  p.add_argument('--debug', action='store_true', help='show tracebacks of errors')
  p.add_argument('--help-all', action='store_true',
                 help='show every flag, including research and reproduction options')


# --------------------------------------------------------------------------------------------
# Flags from options.


def _override(text: str) -> tuple[str, float]:
  pattern, sep, value = text.rpartition('=')
  if not sep or not pattern:
    raise argparse.ArgumentTypeError(f'expected PATTERN=RATIO, got {text!r}')
  try:
    return pattern, float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f'bad ratio in {text!r}') from None


def _show(v: Any) -> str:
  return 'per method / preset' if v is None else ('none' if v == () else str(v))


def add_option(group, field: dataclasses.Field, *, advanced: bool, show_advanced: bool) -> None:
  """One flag for an options field (argparse default SUPPRESS: only given flags reach the plan)."""
  meta = field.metadata
  flag = flag_of(field)
  helptext = meta['help']
  if advanced and not show_advanced:
    helptext = argparse.SUPPRESS
  kwargs: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS)
  ann = str(field.type)
  if isinstance(field.default, bool):
    kwargs['action'] = 'store_false' if field.default else 'store_true'
    if helptext is not argparse.SUPPRESS:
      kwargs['help'] = helptext
  elif field.name == 'ratio_overrides':
    kwargs.update(action='append', type=_override, metavar=meta.get('metavar') or 'PATTERN=RATIO')
    if helptext is not argparse.SUPPRESS:
      kwargs['help'] = helptext + ' (repeatable)'
  else:
    choices = meta.get('choices')
    choices = choices() if callable(choices) else choices
    if choices is not None:
      kwargs['choices'] = [c for c in choices if c is not None]
    elif 'float' in ann:
      kwargs['type'] = float
    elif 'int' in ann:
      kwargs['type'] = int
    if meta.get('metavar'):
      kwargs['metavar'] = meta['metavar']
    if helptext is not argparse.SUPPRESS:
      shown = meta.get('default_text') or _show(field.default)
      kwargs['help'] = f'{helptext} (default: {shown})'
  if 'help' not in kwargs:
    kwargs['help'] = argparse.SUPPRESS
  group.add_argument(flag, **kwargs)


def add_options(group, classes: Iterable[type[Options]], *, advanced: bool | None,
                show_advanced: bool, skip: Iterable[str] = (), seen: set[str] | None = None) -> None:
  """Flags of every option field of ``classes`` whose ``advanced`` flag equals ``advanced`` (None:
  all), each flag once."""
  seen = set() if seen is None else seen
  skip = set(skip)
  for cls in classes:
    for name, field in cls.option_fields().items():
      if name in seen or name in skip:
        continue
      if advanced is not None and bool(field.metadata.get('advanced')) != advanced:
        continue
      seen.add(name)
      add_option(group, field, advanced=bool(field.metadata.get('advanced')),
                 show_advanced=show_advanced)


def given_options(args: argparse.Namespace, classes: Iterable[type[Options]]) -> dict[str, Any]:
  """The option values given on the command line (flags not given are absent)."""
  names = {name for cls in classes for name in cls.option_fields()}
  out = {k: v for k, v in vars(args).items() if k in names}
  if 'ratio_overrides' in out:
    out['ratio_overrides'] = tuple(out['ratio_overrides'])
  return out


# --------------------------------------------------------------------------------------------
# Phases.


class Phases:
  """Announces each phase on stderr and records its wall time."""

  def __init__(self, quiet: bool = False):
    self.seconds: dict[str, float] = {}
    self.quiet = quiet

  def run(self, name: str, message: str, fn, *args, **kwargs):
    if not self.quiet:
      log(f'[{name}] {message}')
    t0 = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

"""Host work on independent units in a few threads.

The per-unit host work of a restore (widening and ranking the filters, rewriting each consumer
kernel) is made of large NumPy operations, which release the GIL, so threads run them side by
side (a warm ResNet-152 restore on a 2-core CPU: selection 0.35 -> 0.21 s, surgery 0.29 ->
0.22 s, whole command 3.39 -> 3.34 s, an earlier pair of runs 3.56 -> 3.30 s;
benchmarks/results/command_speed_threads.json). Every item
is computed exactly as in a plain loop (its own arrays, single-threaded NumPy), so the results
are bitwise those of the loop, in order.

``LBYL_JAX_HOST_THREADS=1`` runs the plain loop.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar('T')

MAX_WORKERS = 4


def workers() -> int:
  """Threads for host work: ``$LBYL_JAX_HOST_THREADS``, else the CPU count, at most 4."""
  env = os.environ.get('LBYL_JAX_HOST_THREADS', '').strip()
  if env:
    try:
      n = int(env)
    except ValueError:
      raise ValueError(f'LBYL_JAX_HOST_THREADS must be a positive integer, got {env!r}') from None
    if n < 1:
      raise ValueError(f'LBYL_JAX_HOST_THREADS must be a positive integer, got {env!r}')
    return n
  return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def map_ordered(fn: Callable[..., T], *iterables: Iterable[Any]) -> list[T]:
  """``list(map(fn, *iterables))``, with the calls spread over :func:`workers` threads; the
  first exception (in input order) is raised, as the loop would.

  The first call runs alone in the calling thread: whatever ``fn`` imports lazily (a criterion's
  SciPy module, say) is imported before any two threads could import it at once (importlib can
  raise ``_DeadlockError`` when two threads import intertwined modules concurrently).
  """
  items = list(zip(*iterables))
  n = workers()
  if n == 1 or len(items) < 3:
    return [fn(*item) for item in items]
  first = fn(*items[0])
  with concurrent.futures.ThreadPoolExecutor(min(n, len(items) - 1),
                                             thread_name_prefix='lbyl_jax-host') as pool:
    return [first, *pool.map(lambda item: fn(*item), items[1:])]

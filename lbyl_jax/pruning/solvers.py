"""Batched, jit-compiled linear solves for the delivery coefficients (docs/solvers.md).

Two system kinds cover every LBYL variant:

- :class:`SharedSystem` (docs/solvers.md#shared-systems, one SPD matrix per layer)::

    A = F F^T + lam1 b b^T + lam2 I      (m x m)
    R = F F_P^T + lam1 b b_P^T           (m x p)
    S_P^T = A^{-1} R                     (one Cholesky, multi-right-hand-side triangular solves)

- :class:`RowSystem` (docs/solvers.md#row-systems, one matrix per pruned row, batched as (p, m, m))::

    (X X^T + diag(d_j)) c_j = X y_j + e_j

Units are grouped into shape buckets (kind, m, p), filters zero-padded to the bucket's longest D
(which changes no Gram product); each bucket is stacked along a new leading axis and solved by ONE
compiled executable (vmap over layers for docs/solvers.md#shared-systems, ``lax.map`` over layers for
docs/solvers.md#row-systems to bound the (p, m, m) memory), so a ResNet-101 compiles a handful of times, not once per layer.
Executables are cached per (bucket, number of layers, dtype) for the process, so ratio / lambda
sweeps reuse them (the lambdas are runtime arguments).

Precision: Gram products use ``Precision.HIGHEST`` (no TF32 on GPUs). In float32 a jitter of
1e-6 * trace(A) / m is added before the Cholesky (docs/solvers.md#jitter); float64 runs under ``jax.enable_x64``.
A layer whose solution is non-finite or whose relative residual ||A S - R|| / ||R|| (measured
against the matrix WITHOUT jitter) is too large is re-solved on the host in float64 with an
eigen-decomposition pseudo-inverse (the minimum-norm solution); if that is still not finite a
ValueError names the layer. NaN is never returned. Condition numbers are computed on the host
from the returned Gram matrices (see :func:`_condition` for why not on the device).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
_JITTER = 1e-6
# Relative residual above which the device solve is rejected and redone on the host (per dtype).
_RESIDUAL_TOL = {'float32': 1e-3, 'float64': 1e-8}


@dataclasses.dataclass(frozen=True)
class SharedSystem:
  """The consistent-form system of one layer (docs/lbyl.md#consistent-closed-form). Arrays are float64 on the host.

  Attributes:
    F: m x D kept filters (BN-scaled in docs/lbyl.md#consistent-closed-form).
    FP: p x D pruned targets.
    b: m kept shifts; bP: p pruned shifts (zeros when lam1 plays no role).
    lam1, lam2: BN-error and ridge weights.
    name: layer name for diagnostics and errors.
  """

  F: np.ndarray
  FP: np.ndarray
  b: np.ndarray
  bP: np.ndarray
  lam1: float
  lam2: float
  name: str = ''


@dataclasses.dataclass(frozen=True)
class RowSystem:
  """Per-row systems of one layer (docs/lbyl.md#reference-code-form): (X X^T + diag(d_j)) c_j = X y_j + e_j.

  Attributes:
    X: m x D kept filters; Y: p x D pruned filters (row j = y_j).
    d: p x m diagonal additions; e: p x m right-hand-side additions.
    name: layer name for diagnostics and errors.
  """

  X: np.ndarray
  Y: np.ndarray
  d: np.ndarray
  e: np.ndarray
  name: str = ''


@dataclasses.dataclass(frozen=True)
class Result:
  """S_P (p x m float64; for a RowSystem the rows c_j) and per-layer diagnostics."""

  S_P: np.ndarray
  diag: dict[str, Any]


System = SharedSystem | RowSystem


@dataclasses.dataclass(frozen=True)
class Deferred:
  """A system built only when its bucket is solved, so the float64 arrays of one bucket at a
  time exist instead of those of the whole network (:func:`solve` accepts it anywhere a system
  goes). ``build`` must return a system of kind ``kind`` with m kept rows, p pruned rows and
  filter length d (checked).
  """

  kind: str
  m: int
  p: int
  d: int
  build: Callable[[], SharedSystem | RowSystem]
  name: str = ''

  def built(self) -> System:
    s = self.build()
    if _dims(s) != (self.kind, self.m, self.p, self.d):
      raise ValueError(f'{self.name}: the system built has (kind, m, p, D) {_dims(s)}, declared'
                       f' {(self.kind, self.m, self.p, self.d)}')
    return s


def _dims(system: System | Deferred) -> tuple[str, int, int, int]:
  """(kind, m, p, D) of a system, without building a deferred one."""
  if isinstance(system, Deferred):
    return system.kind, system.m, system.p, system.d
  if isinstance(system, SharedSystem):
    return 'shared', system.F.shape[0], system.FP.shape[0], system.F.shape[1]
  return 'row', system.X.shape[0], system.Y.shape[0], system.X.shape[1]


def _built(system: System | Deferred) -> System:
  return system.built() if isinstance(system, Deferred) else system


def bucket_key(system: System | Deferred) -> tuple[str, int, int]:
  """(kind, m, p): systems with equal keys are stacked and share one compiled executable.

  The filter length D is not part of the key: shorter filters are zero-padded to the longest in
  the bucket, which leaves every Gram product (F F^T, F F_P^T) unchanged. A uniformly pruned
  ResNet thus needs one executable per stage (conv1 and conv2 of a stage share m and p).
  """
  return _dims(system)[:3]


# --------------------------------------------------------------------------------------------
# Compile bookkeeping. Every compile builds a fresh Python function, so JAX's own trace cache
# can never hide a trace from the counter: traces == compiles == distinct cache keys.

_TRACES = 0
_CACHE: dict[tuple, Any] = {}
# Executables being compiled in the background (:func:`precompile`), by the same keys as _CACHE.
_PENDING: dict[tuple, concurrent.futures.Future] = {}
_POOL: list[concurrent.futures.ThreadPoolExecutor] = []


def trace_count() -> int:
  """How many times a solver kernel has been traced (== compiled) in this process."""
  return _TRACES


def clear_cache() -> None:
  """Forgets all compiled executables (the next solve of each bucket compiles again)."""
  for fut in list(_PENDING.values()):
    fut.cancel()
  for fut in list(_PENDING.values()):
    if not fut.cancelled():
      concurrent.futures.wait([fut])
  _PENDING.clear()
  _CACHE.clear()


def _count_trace() -> None:
  global _TRACES
  _TRACES += 1


def _jitter(A: jnp.ndarray, m: int, jitter: bool) -> jnp.ndarray:
  if not jitter:
    return jnp.zeros((), A.dtype)
  return _JITTER * jnp.trace(A) / m


def _chol_solve(A: jnp.ndarray, B: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """A^{-1} B for SPD A (batched over leading axes) by Cholesky + two triangular solves.

  Also returns min(diag L)^2 / max(diag L)^2 (over everything): a pivot ratio near machine
  epsilon means the factorization "succeeded" on a numerically singular matrix.
  """
  L = jnp.linalg.cholesky(A)
  y = jax.lax.linalg.triangular_solve(L, B, left_side=True, lower=True)
  X = jax.lax.linalg.triangular_solve(L, y, left_side=True, lower=True, transpose_a=True)
  piv = jnp.abs(jnp.diagonal(L, axis1=-2, axis2=-1))
  return X, (jnp.min(piv) / jnp.max(piv)) ** 2


def _make_shared_kernel(jitter: bool):
  def one(F, FP, b, bP, lam1, lam2):
    m = F.shape[0]
    eye = jnp.eye(m, dtype=F.dtype)
    A = jnp.matmul(F, F.T, precision=_HIGHEST) + lam1 * jnp.outer(b, b) + lam2 * eye
    R = jnp.matmul(F, FP.T, precision=_HIGHEST) + lam1 * jnp.outer(b, bP)
    jit_val = _jitter(A, m, jitter)
    X, piv = _chol_solve(A + jit_val * eye, R)
    res = jnp.linalg.norm(jnp.matmul(A, X, precision=_HIGHEST) - R)
    return X, res, jnp.linalg.norm(R), jit_val, piv, A

  def kernel(F, FP, b, bP, lam1, lam2):
    _count_trace()
    return jax.vmap(one)(F, FP, b, bP, lam1, lam2)

  return kernel


def _make_row_kernel(jitter: bool):
  def one(args):
    X, Y, d, e = args
    m = X.shape[0]
    eye = jnp.eye(m, dtype=X.dtype)
    G = jnp.matmul(X, X.T, precision=_HIGHEST)
    R = jnp.matmul(Y, X.T, precision=_HIGHEST) + e  # (p, m): row j is the right-hand side r_j
    A = G[None] + jax.vmap(jnp.diag)(d)  # (p, m, m)
    jit_val = jax.vmap(lambda a: _jitter(a, m, jitter))(A)
    C, piv = _chol_solve(A + jit_val[:, None, None] * eye, R[:, :, None])
    C = C[:, :, 0]
    res = jnp.linalg.norm(jnp.einsum('pik,pk->pi', A, C, precision=_HIGHEST) - R)
    return C, res, jnp.linalg.norm(R), jnp.max(jit_val), piv, G

  def kernel(X, Y, d, e):
    _count_trace()
    return jax.lax.map(one, (X, Y, d, e))

  return kernel


def _stack(bucket: Sequence[System], dtype) -> tuple[np.ndarray, ...]:
  """The bucket's arrays stacked along a new leading layer axis, filters zero-padded in D.

  Filters are written straight into the zero-filled stack (the float64 -> dtype rounding of an
  assignment is that of ``astype``), without a padded copy per layer."""

  def filters(rows: Sequence[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(rows), *np.shape(rows[0])[:1], max(np.shape(r)[1] for r in rows)), dtype)
    for n, r in enumerate(rows):
      out[n, :, :np.shape(r)[1]] = r
    return out

  if isinstance(bucket[0], SharedSystem):
    return (filters([s.F for s in bucket]), filters([s.FP for s in bucket]),
            *(np.stack([np.asarray(a, dtype) for a in f]) for f in (
                [s.b for s in bucket], [s.bP for s in bucket], [s.lam1 for s in bucket],
                [s.lam2 for s in bucket])))
  return (filters([s.X for s in bucket]), filters([s.Y for s in bucket]),
          *(np.stack([np.asarray(a, dtype) for a in f]) for f in (
              [s.d for s in bucket], [s.e for s in bucket])))


def _openblas_thread_setters() -> list[tuple[Any, Any]]:
  """(get, set) num-threads functions of every OpenBLAS loaded in this process (Linux only)."""
  try:
    with open('/proc/self/maps', encoding='utf-8') as f:
      libs = sorted({ln.split()[-1] for ln in f if 'openblas' in ln.lower() and '/' in ln})
  except OSError:
    return []
  out = []
  for lib in libs:
    try:
      handle = ctypes.CDLL(lib)
    except OSError:
      continue
    for suffix in ('', '64_'):
      for prefix in ('scipy_openblas', 'openblas'):
        get = getattr(handle, f'{prefix}_get_num_threads{suffix}', None)
        put = getattr(handle, f'{prefix}_set_num_threads{suffix}', None)
        if get is not None and put is not None:
          out.append((get, put))
  return out


@contextlib.contextmanager
def single_threaded_blas():
  """Runs the block with every loaded OpenBLAS limited to one thread (CPU backend only).

  jaxlib's CPU LAPACK kernels call SciPy's OpenBLAS and the host diagnostics NumPy's. Their
  spinning worker threads next to XLA's own thread pool made small eigen-decompositions 100-200x
  slower (0.8 s instead of 5 ms for 8 x 89 x 89 on a 2-core machine with jaxlib 0.10.2;
  ``OPENBLAS_NUM_THREADS=1`` gives the same cure). The host-side small solves of the bias
  correction gain the same way (16 solves of at most 154 unknowns: 1.3 s with two threads on a
  loaded 2-core machine, 30 ms with one). One thread also makes the host results independent
  of the machine's core count: OpenBLAS's threaded Gram products (syrk) and LU solves round
  differently from its single-threaded ones in the last bits for n >= 100.

  SciPy's OpenBLAS is loaded first (jaxlib's LAPACK kernels load it on their first call, which
  would otherwise come after the thread counts were set, leaving it multi-threaded: measured
  0.5-9 s instead of 0.6 s for the first ResNet-50 solve). The previous counts are restored on
  exit.
  """
  if jax.default_backend() != 'cpu':
    yield
    return
  import scipy.linalg.cython_lapack  # pylint: disable=import-outside-toplevel,unused-import
  setters = _openblas_thread_setters()
  saved = [get() for get, _ in setters]
  for _, put in setters:
    put(1)
  try:
    yield
  finally:
    for (_, put), n in zip(setters, saved):
      put(n)


def _compile_key(kind: str, dtype: str, n: int, m: int, p: int, d: int
                 ) -> tuple[tuple, list[jax.ShapeDtypeStruct]]:
  """The key of ``_CACHE`` / ``_PENDING`` for a bucket of n systems (kind, m, p) whose longest
  filter has length d, and the stacked shapes its executable is compiled for."""
  shapes = _bucket_shapes(kind, n, m, p, d, np.float64 if dtype == 'float64' else np.float32)
  return (kind, dtype, tuple(s.shape for s in shapes)), shapes


def _bucket_shapes(kind: str, n: int, m: int, p: int, d: int, dtype
                   ) -> list[jax.ShapeDtypeStruct]:
  """The shapes :func:`_stack` gives for a bucket of n systems (kind, m, p) whose longest filter
  has length d, without building the systems or the stacked arrays."""
  if kind == 'shared':
    shapes = [(n, m, d), (n, p, d), (n, m), (n, p), (n,), (n,)]
  else:
    shapes = [(n, m, d), (n, p, d), (n, p, m), (n, p, m)]
  return [jax.ShapeDtypeStruct(s, dtype) for s in shapes]


def _executable(kind: str, dtype: str, shapes: Sequence[jax.ShapeDtypeStruct]) -> tuple[Any, float]:
  """The compiled executable of one bucket shape, lowered from the shapes alone (the same HLO as
  with the stacked arrays), and the seconds it took (JAX's persistent cache, when on, turns the
  compile into a load)."""
  t = time.perf_counter()
  make = _make_shared_kernel if kind == 'shared' else _make_row_kernel
  with jax.enable_x64(dtype == 'float64'):
    exe = jax.jit(make(dtype == 'float32')).lower(*shapes).compile()
  _WARM.add((kind, dtype))
  return exe, time.perf_counter() - t


# (kind, dtype) pairs compiled at least once in this process. The first lowering and compile of a
# kernel imports modules lazily (jaxlib's LAPACK kernels load scipy.linalg.cython_lapack, the
# compilation cache its helpers); two threads importing the same chain at once can raise
# importlib's _DeadlockError (seen: a background compile against the main thread's
# single_threaded_blas). So the first executable of each pair is compiled in the calling thread,
# before any other thread compiles one.
_WARM: set[tuple[str, str]] = set()


def _split_first(todo: Sequence[tuple[str, str, Any]]) -> tuple[list[int], list[int]]:
  """Indices of ``todo`` (items (kind, dtype, ...)) to compile in the calling thread first (one
  per (kind, dtype) not compiled yet in this process) and the rest, which may run concurrently."""
  first, rest, seen = [], [], set(_WARM)
  for i, (kind, dtype, *_) in enumerate(todo):
    if (kind, dtype) in seen:
      rest.append(i)
    else:
      seen.add((kind, dtype))
      first.append(i)
  return first, rest


def _compile_all(todo: Sequence[tuple[str, str, Sequence[jax.ShapeDtypeStruct]]]
                 ) -> tuple[list[Any], list[float]]:
  """:func:`_executable` of every (kind, dtype, shapes), concurrently (XLA compiles outside the
  GIL; a cold ResNet-50 has 4 buckets); returns the executables and each one's share of the wall
  time (the shares add up to the wall time, split in proportion to each one's own duration)."""
  if not todo:
    return [], []
  t0 = time.perf_counter()
  first, rest = _split_first(todo)
  done: list[Any] = [None] * len(todo)
  for i in first:  # in this thread: the first compile of a kind imports what it needs
    done[i] = _executable(*todo[i])
  if len(rest) == 1:
    done[rest[0]] = _executable(*todo[rest[0]])
  elif rest:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(rest)) as pool:
      for i, out in zip(rest, pool.map(lambda i: _executable(*todo[i]), rest)):
        done[i] = out
  wall = time.perf_counter() - t0
  own = sum(d for _, d in done) or 1.0
  return [e for e, _ in done], [wall * d / own for _, d in done]


def precompile(dims: Sequence[tuple[str, int, int, int]], *, dtype: str = 'float32') -> int:
  """Starts compiling, in background threads, the executables that :func:`solve` will need for
  systems of these (kind, m, p, D) (one tuple per system, as :class:`Deferred` declares them);
  returns with the number of compiles started. The first executable of a kernel kind in this
  process is compiled before returning, in the calling thread (see ``_WARM``).

  A caller that knows the shapes of its systems before it can build them (the pipeline knows them
  from the architecture and the plan before the weights are loaded and the channels selected)
  overlaps the compile -- or, with JAX's persistent cache, its load -- with that host work:
  :func:`solve` takes the executable of a bucket from here when its key matches and compiles
  nothing again. Keys already compiled or pending are skipped; an executable whose bucket never
  comes is only a wasted compile. Compile errors surface in the :func:`solve` that uses it.
  """
  if dtype not in _RESIDUAL_TOL:
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
  groups: dict[tuple[str, int, int], list[int]] = {}
  for kind, m, p, d in dims:
    if p > 0:
      groups.setdefault((kind, int(m), int(p)), []).append(int(d))
  todo = {}
  for (kind, m, p), ds in groups.items():
    key, shapes = _compile_key(kind, dtype, len(ds), m, p, max(ds))
    if key not in _CACHE and key not in _PENDING:
      todo[key] = (kind, dtype, shapes)
  keys = list(todo)
  first, rest = _split_first(list(todo.values()))
  for i in first:  # the first compile of a kind, here (see _WARM); it is then ready at once
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(_executable(*todo[keys[i]]))
    _PENDING[keys[i]] = fut
  for i in rest:
    _PENDING[keys[i]] = in_background(_executable, *todo[keys[i]])
  return len(todo)


def in_background(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
  """Runs ``fn(*args)`` in the precompile threads (also for other kernels' warm-ups,
  :func:`lbyl_jax.pruning.moments.warm_up`)."""
  if not _POOL:
    _POOL.append(concurrent.futures.ThreadPoolExecutor(
        max_workers=4, thread_name_prefix='lbyl_jax-precompile'))
  return _POOL[0].submit(fn, *args)


def _run(compiled, bucket: Sequence[System], dtype: str) -> tuple[list[np.ndarray], float]:
  """Stacks one bucket, runs its executable; host float64 outputs (one leading layer axis) and
  the seconds of the run (the stacked arrays live only for this bucket)."""
  with jax.enable_x64(dtype == 'float64'):
    dev = [jax.device_put(a) for a in _stack(bucket, np.float64 if dtype == 'float64'
                                             else np.float32)]
    jax.block_until_ready(dev)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*dev))
    seconds = time.perf_counter() - t0
    return [np.asarray(o, np.float64) for o in out], seconds


def _host_system(system: System) -> tuple[np.ndarray, np.ndarray]:
  """(A, R) in float64 on the host; for a RowSystem A is (p, m, m) and R is (p, m)."""
  if isinstance(system, SharedSystem):
    F = np.asarray(system.F, np.float64)
    b = np.asarray(system.b, np.float64)
    A = F @ F.T + system.lam1 * np.outer(b, b) + system.lam2 * np.eye(F.shape[0])
    R = F @ np.asarray(system.FP, np.float64).T + system.lam1 * np.outer(b, system.bP)
    return A, R
  X = np.asarray(system.X, np.float64)
  G = X @ X.T
  A = G[None] + np.asarray(system.d, np.float64)[:, :, None] * np.eye(X.shape[0])[None]
  R = np.asarray(system.Y, np.float64) @ X.T + np.asarray(system.e, np.float64)
  return A, R


def solve_host(system: SharedSystem) -> np.ndarray:
  """S_P of one consistent-form system in float64 on the host (Cholesky; with no ridge term or a
  singular A, the minimum-norm least-squares solution). For callers whose rows depend on each
  other layer by layer (joint UDFC), where batching across layers is impossible."""
  m = system.F.shape[0]
  if system.FP.shape[0] == 0:
    return np.zeros((0, m))
  if system.FP.shape[1] != system.F.shape[1]:
    raise ValueError(f'{system.name}: kept rows have D={system.F.shape[1]}, pruned rows '
                     f'D={system.FP.shape[1]}')
  import scipy.linalg  # pylint: disable=import-outside-toplevel  (0.1 s to import)

  A, R = _host_system(system)
  try:
    if system.lam2 <= 0:
      raise np.linalg.LinAlgError('no ridge term')
    St = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, lower=True), R)
  except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
    St = np.linalg.pinv(A, hermitian=True) @ R
  return St.T


def _pinv_solve(A: np.ndarray, B: np.ndarray) -> np.ndarray:
  """Minimum-norm A^+ B for symmetric A via eigh, cutting eigenvalues below m * eps * max|w|."""
  w, Q = np.linalg.eigh(A)
  cut = A.shape[-1] * np.finfo(np.float64).eps * np.max(np.abs(w))
  winv = np.where(np.abs(w) > cut, 1.0 / np.where(w == 0, 1.0, w), 0.0)
  return Q @ (winv[:, None] * (Q.T @ B))


def _host_fallback(system: System) -> tuple[np.ndarray, float]:
  """float64 eigen pseudo-inverse solve of one layer; (S_P, relative residual)."""
  A, R = _host_system(system)
  if not (np.all(np.isfinite(A)) and np.all(np.isfinite(R))):
    raise ValueError(f'{system.name}: the linear system has non-finite entries (check the weights)')
  if isinstance(system, SharedSystem):
    X = _pinv_solve(A, R)
    res = np.linalg.norm(A @ X - R)
    S = X.T
  else:
    S = np.stack([_pinv_solve(A[j], R[j][:, None])[:, 0] for j in range(R.shape[0])])
    res = np.linalg.norm(np.einsum('pik,pk->pi', A, S) - R)
  if not np.all(np.isfinite(S)):
    raise ValueError(f'{system.name}: the pseudo-inverse fallback produced non-finite coefficients')
  rn = np.linalg.norm(R)
  return S, float(res / rn) if rn > 0 else float(res)


def _condition(system: System, gram: np.ndarray) -> float:
  """cond(A) from the device's A (SharedSystem); for a RowSystem the Weyl upper bound
  (w_max(G) + max d) / (w_min(G) + min d) on every cond(G + diag(d_j)), from G = X X^T alone.

  Computed on the host (NumPy, float64): inside the solve executable a batched eigen-
  decomposition running next to the batched Cholesky deadlocked jaxlib 0.10.2's CPU LAPACK
  kernels, which both block XLA's small intra-op thread pool while waiting for their batch.
  """
  if not np.all(np.isfinite(gram)):
    return float('nan')
  w = np.linalg.eigvalsh(gram)
  if isinstance(system, SharedSystem):
    lo, hi = w[0], w[-1]
  else:
    d = np.asarray(system.d, np.float64)
    lo, hi = w[0] + d.min(axis=1).min(), w[-1] + d.max(axis=1).max()
  return float(hi / lo) if lo > 0 else float('inf')


def solve(
    systems: Sequence[System], *, dtype: str = 'float32', with_cond: bool = True
) -> list[Result]:
  """Solves every system; results in input order.

  Args:
    systems: SharedSystem / RowSystem per layer (p may be 0: an empty S_P, nothing compiled).
    dtype: 'float32' (jitter added) or 'float64'.
    with_cond: also compute the condition number of A (exact for SharedSystem, a Weyl upper
      bound over the rows for RowSystem).

  Returns:
    One :class:`Result` per system. ``diag`` holds cond, rel_residual, jitter, solver
    ('cholesky' or 'eigh_pinv_fallback'), bucket, and the bucket's compile and solve seconds
    shared evenly among its layers (so sums over layers give the totals).
  """
  if dtype not in _RESIDUAL_TOL:
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
  results: list[Result | None] = [None] * len(systems)
  buckets: dict[tuple, list[int]] = {}
  for i, s in enumerate(systems):
    key = bucket_key(s)
    if key[2] == 0:
      results[i] = Result(np.zeros((0, key[1])), dict(
          cond=float('nan'), rel_residual=0.0, jitter=0.0, solver='none', dtype=dtype,
          bucket=None, compile_seconds=0.0, solve_seconds=0.0))
      continue
    buckets.setdefault(key, []).append(i)
  with single_threaded_blas():
    _solve_buckets(systems, buckets, results, dtype, with_cond)
  return results  # type: ignore[return-value]


def _solve_buckets(systems, buckets, results, dtype: str, with_cond: bool) -> None:
  tol = _RESIDUAL_TOL[dtype]
  # Every new bucket shape gets its executable first (all of them together), then each bucket is
  # stacked and solved in turn: one bucket's stacked arrays at a time.
  cache_keys, todo, pending = {}, {}, {}
  for key, idx in buckets.items():
    kind, m, p, _ = _dims(systems[idx[0]])
    cache_keys[key], shapes = _compile_key(kind, dtype, len(idx), m, p,
                                           max(_dims(systems[i])[3] for i in idx))
    if cache_keys[key] in _PENDING:
      pending[key] = _PENDING.pop(cache_keys[key])
    elif cache_keys[key] not in _CACHE:
      todo[key] = (kind, dtype, shapes)
  executables, shares = _compile_all(list(todo.values()))
  compile_seconds = dict.fromkeys(buckets, 0.0)
  for k, exe, share in zip(todo, executables, shares):
    _CACHE[cache_keys[k]] = exe
    compile_seconds[k] = share
  background = dict.fromkeys(buckets, 0.0)
  for k, fut in pending.items():
    # Started by precompile(): the solve pays only the wait; the compile's own seconds (mostly
    # overlapped with the host work before the solve) are reported as precompile_seconds.
    t0 = time.perf_counter()
    _CACHE[cache_keys[k]], background[k] = fut.result()
    compile_seconds[k] = time.perf_counter() - t0
  for key, idx in buckets.items():
    bucket = [_built(systems[i]) for i in idx]  # this bucket's float64 systems only
    outs, solve_seconds = _run(_CACHE[cache_keys[key]], bucket, dtype)
    timing = {'compile': compile_seconds[key], 'solve': solve_seconds}
    X, res, rn, jit_val, piv, gram = outs
    dpad = max((s.F if key[0] == 'shared' else s.X).shape[1] for s in bucket)
    # float64 runs without jitter: a Cholesky that only "succeeded" on a numerically singular A
    # returns huge coefficients, so such layers go to the pseudo-inverse as well.
    piv_tol = key[1] * np.finfo(np.float64).eps if dtype == 'float64' else 0.0
    for n, (i, system) in enumerate(zip(idx, bucket)):
      S = X[n].T if key[0] == 'shared' else X[n]
      rel = float(res[n] / rn[n]) if rn[n] > 0 else float(res[n])
      diag = dict(
          cond=float('nan'),
          cond_kind='exact' if key[0] == 'shared' else 'weyl_upper_bound',
          rel_residual=rel, jitter=float(jit_val[n]), pivot_ratio=float(piv[n]), solver='cholesky',
          dtype=dtype,
          bucket=f'{key[0]}(m={key[1]}, p={key[2]}, D={dpad}, L={len(idx)})',
          compile_seconds=timing['compile'] / len(idx), solve_seconds=timing['solve'] / len(idx),
          precompile_seconds=background[key] / len(idx),
      )
      if with_cond:
        t0 = time.perf_counter()
        diag['cond'] = _condition(system, gram[n])
        diag['cond_seconds'] = time.perf_counter() - t0
      if not (np.all(np.isfinite(S)) and np.isfinite(rel) and rel <= tol and piv[n] > piv_tol):
        if not np.all(np.isfinite(S)):
          reason = 'non-finite'
        elif not (np.isfinite(rel) and rel <= tol):
          reason = f'residual {rel:.3g} > {tol:g}'
        else:
          reason = f'numerically singular (pivot ratio {piv[n]:.3g})'
        t0 = time.perf_counter()
        S, rel = _host_fallback(system)
        diag.update(solver='eigh_pinv_fallback', fallback_reason=reason, rel_residual=rel,
                    solve_seconds=diag['solve_seconds'] + time.perf_counter() - t0)
      results[i] = Result(np.ascontiguousarray(S), diag)

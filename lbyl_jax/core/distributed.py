"""One process per host on ``jax.distributed``: start-up, who is who, and agreement between processes.

The commands run unchanged as one process per host (README, "Multi-host"):

- :func:`initialize` starts ``jax.distributed`` from ``--coordinator-address``,
  ``--num-processes`` and ``--process-id``; with none of them given it lets JAX detect a SLURM job
  step with several tasks or a Cloud TPU VM (``jax.distributed.initialize()`` without arguments),
  and otherwise runs as a single process, as before. It must run before anything touches a JAX
  backend.
- every process computes the same restore (it is deterministic and host-side); evaluation is
  data-parallel over all global devices (:mod:`lbyl_jax.evaluation`); only the primary process
  (index 0) writes outputs.
- :func:`agree` is the collective "did everyone succeed": each process contributes a flag and all
  of them learn whether any failed, so an error on one host (an output that may not be replaced, a
  missing file) stops every host instead of leaving the others waiting in a collective, and no
  process exits before the primary has written its outputs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

_ADDRESS = re.compile(r'^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$')


@dataclasses.dataclass(frozen=True)
class Setup:
  """How this process runs.

  Attributes:
    process_index, process_count: this process's index and the number of processes.
    mode: 'single' (no jax.distributed), 'explicit' (the flags), or the detected environment
      ('slurm', 'tpu').
  """

  process_index: int = 0
  process_count: int = 1
  mode: str = 'single'

  @property
  def primary(self) -> bool:
    return self.process_index == 0


def _slurm_tasks() -> int:
  """Tasks of the current SLURM job step (0 outside SLURM); JAX's SLURM detection needs these
  variables."""
  names = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  if not all(n in os.environ for n in names):
    return 0
  try:
    return int(os.environ['SLURM_NTASKS'])
  except ValueError:
    return 0


def _on_cloud_tpu_vm() -> bool:
  """Whether JAX found a Cloud TPU VM when it was imported (libtpu and TPU chips present)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def detect() -> str | None:
  """'slurm' (a job step with several tasks), 'tpu' (a Cloud TPU VM) or None."""
  if _slurm_tasks() > 1:
    return 'slurm'
  if _on_cloud_tpu_vm():
    return 'tpu'
  return None


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> None:
  """ValueError naming the flag for malformed values (before anything starts)."""
  if coordinator_address is not None and not _ADDRESS.match(coordinator_address):
    raise ValueError(f'--coordinator-address: expected HOST:PORT, got {coordinator_address!r}')
  if coordinator_address is not None and not 0 < int(coordinator_address.rsplit(':', 1)[1]) < 65536:
    raise ValueError(f'--coordinator-address: port out of range in {coordinator_address!r}')
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num-processes must be >= 1, got {num_processes}')
  if process_id is not None and process_id < 0:
    raise ValueError(f'--process-id must be >= 0, got {process_id}')
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(f'--process-id {process_id} is not below --num-processes {num_processes}')
  if num_processes is not None and num_processes > 1 and coordinator_address is None and (
      detect() is None):
    raise ValueError(f'--num-processes {num_processes} needs --coordinator-address HOST:PORT'
                     ' (the address of process 0) outside SLURM and Cloud TPU')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> Setup:
  """Starts ``jax.distributed`` when asked to or when the environment calls for it.

  Args:
    coordinator_address: HOST:PORT of process 0's coordinator service.
    num_processes: the number of processes (one per host).
    process_id: this process's index in [0, num_processes).
    timeout_s: seconds to wait for every process to connect.

  Returns:
    :class:`Setup`. With no argument and no SLURM job step / Cloud TPU VM, or with
    ``num_processes=1`` alone, a single process without ``jax.distributed``.
  """
  check_flags(coordinator_address, num_processes, process_id)
  if jax.distributed.is_initialized():
    return Setup(jax.process_index(), jax.process_count(), 'explicit')
  given = (coordinator_address, num_processes, process_id)
  if all(v is None for v in given):
    mode = detect()
    if mode is None:
      return Setup()
  elif num_processes == 1 and coordinator_address is None:
    return Setup()
  else:
    mode = 'explicit'
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(timeout_s))
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'jax.distributed could not start ({mode}: coordinator '
                     f'{coordinator_address or "auto"}, {num_processes or "auto"} processes, '
                     f'process {process_id if process_id is not None else "auto"}): {first}'
                     ) from None
  return Setup(jax.process_index(), jax.process_count(), mode)


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_primary() -> bool:
  """Whether this process writes the outputs (index 0)."""
  return jax.process_index() == 0


def global_devices() -> list[jax.Device]:
  """Every device of every process, process by process (index order), then by id; the local
  devices in JAX's own order with a single process."""
  if jax.process_count() == 1:
    return list(jax.local_devices())
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def allgather(x: Any) -> np.ndarray:
  """``x`` (an array of the same shape and dtype on every process) from every process, stacked
  along a new leading axis in process order; ``x[None]`` with one process."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def allgather_bytes(data: bytes) -> list[bytes]:
  """One byte string from every process, in process order (lengths may differ)."""
  if jax.process_count() == 1:
    return [bytes(data)]
  sizes = allgather(np.int64(len(data)))
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  rows = allgather(buf)
  return [rows[p, :int(n)].tobytes() for p, n in enumerate(sizes)]


def agree(ok: bool, what: str) -> None:
  """Collective: every process states whether its part of ``what`` succeeded; returns when all
  did, raises ValueError naming the failed processes otherwise (on every process). A no-op with
  one process."""
  if jax.process_count() == 1:
    return
  flags = allgather(np.int32(bool(ok)))
  failed = [p for p, f in enumerate(flags.reshape(-1)) if not f]
  if failed:
    raise ValueError(f'{what} failed on process(es) {", ".join(map(str, failed))}'
                     + ('' if ok else ' (this one; see the error above)'))


def same_everywhere(value: Sequence[int] | int, what: str) -> None:
  """ValueError on every process unless ``value`` (small integers) is equal on all of them."""
  if jax.process_count() == 1:
    return
  rows = allgather(np.asarray(value, np.int64).reshape(-1))
  if not np.all(rows == rows[0]):
    raise ValueError(f'the processes disagree on {what}: '
                     + '; '.join(f'process {p}: {rows[p].tolist()}' for p in range(len(rows))))


def same_text(text: str, what: str) -> None:
  """ValueError on every process unless ``text`` (e.g. a digest of the variables each process
  computed) is the same on all of them."""
  if jax.process_count() == 1:
    return
  texts = [b.decode() for b in allgather_bytes(text.encode())]
  if any(t != texts[0] for t in texts):
    raise ValueError(f'the processes disagree on {what}: '
                     + '; '.join(f'process {p}: {t[:16]}' for p, t in enumerate(texts)))

"""JAX's persistent compilation cache, on by default for the commands.

The second run of a command loads its compiled executables (solver buckets, evaluation steps,
BN-moment kernels) from disk instead of compiling them again. Location, in order:
``--compile-cache DIR|off`` of the commands, ``$LBYL_JAX_COMPILATION_CACHE`` (a directory, or
``off``), a cache directory the user already configured in JAX (``jax_compilation_cache_dir``),
else ``<user cache>/jax`` (``$LBYL_JAX_CACHE``, default ``~/.cache/lbyl_jax/jax``). Every
executable is cached, however short its compile (the commands compile many small ones). The same
directory keeps each preset's abstract model trace and its unit discovery (``lbyl_jax_traces/``,
see :func:`lbyl_jax.models.trace.trace_layers` and :func:`lbyl_jax.models.trace.discovery_on_disk`),
which a run would otherwise redo (0.3-1 s and 1.5-4 s for a ResNet-50 on the 2-core CPU); the
package ships the presets' copies (:mod:`lbyl_jax.models.shipped`), read when the directory has
none. ``off`` turns the cache and the trace files off.
"""

from __future__ import annotations

import os
import pathlib

import jax

from lbyl_jax.io import weights as weights_lib

OFF = ('off', 'none', '0', 'false', 'no')


def enable(setting: str | None = None) -> pathlib.Path | None:
  """Turns the cache on (see the module docstring); returns its directory, or None when off."""
  if setting is None:
    setting = os.environ.get('LBYL_JAX_COMPILATION_CACHE')
  if setting is not None and setting.strip().lower() in OFF:
    return None
  if setting:
    path = pathlib.Path(setting).expanduser()
  elif jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  else:
    path = weights_lib.cache_root() / 'jax'
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OSError(f'cannot create the compilation cache {path} ({e}); pass --compile-cache off'
                  ' or another directory') from None
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path

"""The presets' traces and discoveries shipped with the package (:data:`lbyl_jax.models.trace.SHIPPED_DIR`).

A preset's trace and discovery are pure functions of the model code and the flax / jax versions;
the disk cache keeps them next to JAX's compilation cache (:func:`lbyl_jax.models.trace._disk_path`),
and the package ships the same files, gzipped, so that the first command with an empty cache
traces nothing either (a ResNet-50 trace and discovery cost 1-2 s on a 2-core CPU). A shipped
file is found only under its exact key, so after a change to the keyed modules it is ignored
until regenerated:

  python -m lbyl_jax.models.shipped            # every preset
  python -m lbyl_jax.models.shipped resnet50   # some

``tests/test_command_speed.py`` fails while a preset's shipped files are missing or stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import pathlib
import sys
import tempfile
from collections.abc import Sequence

import jax

from lbyl_jax.models import archs
from lbyl_jax.models import nets
from lbyl_jax.models import trace


def eligible(spec: archs.ArchSpec) -> bool:
  """Whether the disk cache (and so the shipped copy) holds this preset's trace and discovery."""
  return (type(spec.model).__module__ == nets.__name__ and spec.discover_module is None
          and spec.builder is None and spec.fixed_units is None and spec.family != 'custom')


def expected_files(spec: archs.ArchSpec, cache_dir: str) -> list[str]:
  """The names (without .gz) of the preset's files under the current keys."""
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  try:
    # pylint: disable=protected-access
    return [trace._disk_path(spec).name, trace._discovery_path(spec).name]
  finally:
    jax.config.update('jax_compilation_cache_dir', previous)


def ship(names: Sequence[str], directory: pathlib.Path | None = None) -> list[pathlib.Path]:
  """Computes the trace and the discovery of the presets ``names`` afresh (an empty cache, no
  shipped copy read) and writes them gzipped into ``directory`` (default
  :data:`~lbyl_jax.models.trace.SHIPPED_DIR`), replacing the preset's older files. Returns the
  files written."""
  directory = trace.SHIPPED_DIR if directory is None else directory
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  previous = (jax.config.jax_compilation_cache_dir, trace.SHIPPED_DIR)
  with tempfile.TemporaryDirectory() as tmp:
    jax.config.update('jax_compilation_cache_dir', tmp)
    trace.SHIPPED_DIR = pathlib.Path(tmp) / 'none'  # compute, never read a shipped copy
    try:
      for name in names:
        spec = archs.get(name)
        if not eligible(spec):
          raise ValueError(f'{name}: its trace is not kept on disk (not a lbyl_jax.models.nets'
                           ' model with discovered units)')
        trace.trace_layers.cache_clear()
        fresh = dataclasses.replace(spec)  # nothing cached in memory
        fresh.discovery  # pylint: disable=pointless-statement  (traces and discovers; writes both)
        for fname in expected_files(spec, tmp):
          src = pathlib.Path(tmp) / trace.DISK_SUBDIR / fname
          stem = fname.rsplit('-', 1)[0]
          for old in directory.glob(f'{stem}-*.json.gz'):
            old.unlink()
          out = directory / (fname + '.gz')
          out.write_bytes(gzip.compress(src.read_bytes(), mtime=0))
          written.append(out)
    finally:
      jax.config.update('jax_compilation_cache_dir', previous[0])
      trace.SHIPPED_DIR = previous[1]
      trace.trace_layers.cache_clear()
  return written


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog='python -m lbyl_jax.models.shipped',
                              description=__doc__.splitlines()[0])
  p.add_argument('names', nargs='*', help='presets (default: every preset that is kept on disk)')
  args = p.parse_args(argv)
  names = args.names or [n for n in archs.names() if eligible(archs.get(n))]
  for path in ship(names):
    print(f'{path.stat().st_size:8d}  {path}', file=sys.stderr)


if __name__ == '__main__':
  main()

"""``python -m lbyl_jax.convert``: a PyTorch / safetensors / npz weight file -> an lbyl_jax checkpoint.

  python -m lbyl_jax.convert --arch resnet20 --weights resnet20-12fca82f.th --out ckpt/resnet20

The result loads with ``lbyl_jax.load('ckpt/resnet20')``. Widths are read from the file, so the
checkpoint of a pruned PyTorch network converts too. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import converters
from lbyl_jax.cli import common
from lbyl_jax.core import units
from lbyl_jax.io import checkpoint
from lbyl_jax.io import download
from lbyl_jax.models import archs

PROG = 'python -m lbyl_jax.convert'


def _leaves(tree: Any) -> list[np.ndarray]:
  if isinstance(tree, dict):
    return [leaf for v in tree.values() for leaf in _leaves(v)]
  return [tree]


def convert(arch: str, weights: str, out: str, *, overwrite: bool = False) -> dict[str, Any]:
  """Reads ``weights`` for ``arch``, saves the checkpoint to ``out``; returns a summary dict."""
  spec = archs.get(arch)
  src = pathlib.Path(weights).absolute()
  fmt = converters.detect_format(src)
  variables = converters.load_variables(src, spec)
  widths = units.widths_of(variables, spec.units)
  digest = download.sha256_file(src)
  published = None
  if spec.weights is not None and src.name == spec.weights.filename:
    published = digest.startswith(spec.weights.sha256)
  meta = {'source': {'path': str(src), 'format': fmt, 'sha256': digest}}
  if published is not None:
    meta['source']['sha256_matches_published'] = published
  pruned = widths != spec.default_widths()
  path = checkpoint.save(out, spec.name, widths if pruned else None, variables, meta=meta,
                         overwrite=overwrite)
  return {
      'arch': spec.name,
      'source': str(src),
      'source_format': fmt,
      'sha256': digest,
      'sha256_matches_published': published,
      'out': str(path),
      'tensors': len(_leaves(variables)),
      'params': int(sum(np.size(x) for x in _leaves(variables.get('params', {})))),
      'widths': list(widths) if pruned else None,
  }


def parser(show_advanced: bool = False) -> argparse.ArgumentParser:
  del show_advanced
  p = argparse.ArgumentParser(
      prog=PROG,
      description='Convert PyTorch (.pth/.th/.pth.tar, legacy or zip), .safetensors or .npz weights'
                  ' into an lbyl_jax checkpoint directory.',
  )
  p.add_argument('--arch', required=True, choices=archs.names(), metavar='ARCH',
                 help=f'architecture: {", ".join(archs.names())}')
  p.add_argument('--weights', required=True, help='weight file to convert')
  p.add_argument('--out', required=True, help='checkpoint directory to create')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an existing --out that this tool wrote (never anything else)')
  p.add_argument('--json', action='store_true', help='print the summary as JSON')
  common.add_common(p)
  return p


def _run(args: argparse.Namespace) -> dict[str, Any]:
  summary = convert(args.arch, args.weights, args.out, overwrite=args.overwrite)
  if args.json:
    print(json.dumps(summary, indent=2))
  else:
    widths = 'original' if summary['widths'] is None else summary['widths']
    print(f"converted {summary['source']} ({summary['source_format']}) -> {summary['out']}")
    print(f"  arch {summary['arch']}, widths {widths}: {summary['tensors']} tensors,"
          f" {summary['params']:,} parameters")
    if summary['sha256_matches_published'] is False:
      print('  warning: sha256 differs from the published weights of this arch', file=sys.stderr)
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  """Console entry point."""
  common.run_main(PROG, parser, _run, argv)

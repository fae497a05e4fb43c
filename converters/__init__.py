"""Torch-free readers for PyTorch (.pth/.pt/.th/.pth.tar), .safetensors and .npz checkpoints.

``load_variables(path, spec)`` is the one call most users need: it returns Flax variables for a
registered architecture, or raises :class:`CheckpointError` explaining what does not fit.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from converters import formats, torch_pickle
from converters.errors import CheckpointError, UnsafePickleError
from converters.mapping import normalize_state_dict, to_variables

__all__ = ['CheckpointError', 'UnsafePickleError', 'read_state_dict', 'load_variables',
           'detect_format']


def detect_format(path: str | os.PathLike) -> str:
  """'torch-zip', 'torch-legacy', 'safetensors' or 'npz' from the file's first bytes."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'checkpoint not found: {path}')
  with open(path, 'rb') as f:
    head = f.read(16)
  name = path.name.lower()
  if head.startswith(b'PK'):
    return 'npz' if name.endswith('.npz') else 'torch-zip'
  if name.endswith('.safetensors'):
    return 'safetensors'
  if head[:1] == b'\x80':  # pickle protocol >= 2
    return 'torch-legacy'
  if len(head) >= 8 and head[8:9] == b'{':  # safetensors: u64 header length then JSON
    return 'safetensors'
  raise CheckpointError(
      f'{path}: not a PyTorch, safetensors or npz checkpoint (starts with {head[:8]!r})'
  )


def read_state_dict(path: str | os.PathLike, *,
                    module_prefixes: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Reads a checkpoint into a flat name -> array dict (containers unwrapped, 'module.' stripped).

  A whole pickled ``nn.Module`` (torch.nn layers, torchvision models) gives its ``state_dict()``,
  read without importing or running any of its classes; ``module_prefixes`` names further
  modules whose classes may be read that way (see :func:`converters.torch_pickle.load_weights`).
  Only the weights are materialized, within the resource bounds of the readers.
  """
  fmt = detect_format(path)
  if fmt in ('torch-zip', 'torch-legacy'):
    obj: Any = torch_pickle.load_weights(str(path), module_prefixes=module_prefixes)
  else:
    try:
      obj = formats.read_safetensors(path) if fmt == 'safetensors' else formats.read_npz(path)
    except CheckpointError:
      raise
    except (ValueError, OSError, KeyError) as e:
      if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
        raise
      raise CheckpointError(f'{path}: unreadable {fmt} file: {e}') from e
  return normalize_state_dict(obj)


def load_variables(path: str | os.PathLike, spec) -> dict[str, Any]:
  """Flax variables of ``spec`` (an ``lbyl_jax.models.archs.ArchSpec``) read from a checkpoint file."""
  return to_variables(read_state_dict(path), spec)

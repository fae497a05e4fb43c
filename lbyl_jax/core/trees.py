"""Variable-tree paths: '/'-joined keys into nested dicts (``'layer1_0/conv1'``).

The flat views use :func:`flax.traverse_util.flatten_dict` / ``unflatten_dict``; the point
accessors walk the nested dicts directly (no flattening for one lookup).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util


def get_path(tree: Mapping[str, Any], path: str) -> Any:
  node = tree
  for key in path.split('/'):
    node = node[key]
  return node


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
  keys = path.split('/')
  node = tree
  for key in keys[:-1]:
    node = node[key]
  node[keys[-1]] = value


def has_path(tree: Mapping[str, Any], path: str) -> bool:
  try:
    get_path(tree, path)
  except (KeyError, TypeError):
    return False
  return True


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested mapping (empty sub-mappings are dropped)."""
  return traverse_util.flatten_dict(_plain(tree), sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`flatten`."""
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def _plain(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def copy_tree(tree: Any, leaf: Callable[[Any], Any] | None = None) -> Any:
  """New nested dicts; leaves mapped by ``leaf`` (None: the same leaf objects, so edits of the
  copy's dicts never reach the caller's tree while arrays are shared)."""
  if isinstance(tree, Mapping):
    return {k: copy_tree(v, leaf) for k, v in tree.items()}
  return tree if leaf is None else leaf(tree)


def copy_arrays(tree: Any) -> Any:
  """A deep copy of a nested dict of arrays (NumPy copies of the leaves)."""
  return copy_tree(tree, np.array)


def digest(tree: Mapping[str, Any], *extra: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (sorted by path), then ``extra``
  objects as canonical JSON: equal exactly when the stored arrays are bitwise equal."""
  h = hashlib.sha256()
  for path, leaf in sorted(flatten(tree).items()):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{path}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.reshape(-1).view(np.uint8))  # the array's bytes, without a copy (GIL released)
  for obj in extra:
    h.update(json.dumps(obj, sort_keys=True, separators=(',', ':')).encode())
  return h.hexdigest()

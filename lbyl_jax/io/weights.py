"""Where a preset's pretrained weights come from: ``--weights``, local caches, or a download.

Search order of :func:`resolve_weights` (the first hit wins; the network is only used when no local
file exists):

1. the explicit ``weights`` path (a file, or a directory holding the preset's file name);
2. ``$LBYL_JAX_WEIGHTS`` (a directory);
3. the user cache ``$LBYL_JAX_CACHE/weights`` (default ``$XDG_CACHE_HOME/lbyl_jax/weights``, i.e.
   ``~/.cache/lbyl_jax/weights``);
4. the torch hub cache ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``),
   so files torchvision already downloaded are reused;
5. a download of ``spec.weights.url`` into the user cache, verified with ``spec.weights.sha256``.

Presets whose weights are not publicly hosted have a documented file name
(:data:`UNHOSTED_FILENAMES`) that steps 1-4 look for.

Files found by name (steps 1 with a directory, 2-4) are verified against the registry's sha256
when the preset has one, and downloads always are. An explicit weights *file* is the user's
choice and is read as it is: its name is never taken as a checksum, so a fine-tuned
``resnet50-0676ba61.pth`` (named like the torchvision file it started from) is accepted.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import converters
import jax
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.io import checkpoint
from lbyl_jax.io import download as download_lib
from lbyl_jax.models import archs

# File names for presets whose weights are not publicly hosted; users drop them into
# $LBYL_JAX_WEIGHTS (or the user cache) under exactly this name.
UNHOSTED_FILENAMES: dict[str, str] = {
    'resnet56_b': 'nm_resnet56.cifar10.pth.tar',  # Neuron Merging's ResNet-56 (shortcut B).
    'lenet_300_100': 'lbyl_lenet_300_100.fashionmnist.pth.tar',  # LBYL / NM FashionMNIST LeNet.
    # The channel-pruned CIFAR-10 MobileNetV2 of ../shared (a student's model, not hosted).
    'mobilenet_v2_cifar10': 'mobilenet_v2_pruned.cifar10_224.state_dict.pt',
}

# (resolved path, size, mtime_ns, expected) of files already verified in this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()


class WeightsNotFoundError(FileNotFoundError):
  """No weights file for a preset was found locally, and none could (or may) be downloaded."""


def cache_root() -> pathlib.Path:
  """``$LBYL_JAX_CACHE``, else ``$XDG_CACHE_HOME/lbyl_jax`` (default ``~/.cache/lbyl_jax``)."""
  env = os.environ.get('LBYL_JAX_CACHE')
  if env:
    return pathlib.Path(env).expanduser()
  xdg = os.environ.get('XDG_CACHE_HOME')
  base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / '.cache'
  return base / 'lbyl_jax'


def user_weights_dir() -> pathlib.Path:
  return cache_root() / 'weights'


def torch_hub_dir() -> pathlib.Path:
  """``$TORCH_HOME/hub/checkpoints`` with torch's own defaults (no torch import)."""
  env = os.environ.get('TORCH_HOME')
  if env:
    home = pathlib.Path(env).expanduser()
  else:
    xdg = os.environ.get('XDG_CACHE_HOME')
    home = (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / '.cache') / 'torch'
  return home / 'hub' / 'checkpoints'


def weights_filename(spec: archs.ArchSpec) -> str | None:
  """The file name looked for in the weight directories (None: the preset has none)."""
  if spec.weights is not None:
    return spec.weights.filename
  return UNHOSTED_FILENAMES.get(spec.name)


def expected_sha256(spec: archs.ArchSpec | None, path: str | os.PathLike) -> str | None:
  """The registry's sha256 (or prefix) for a file found under the preset's file name, else None.

  Only the registry is trusted: a file name that merely looks like a torch-hub name
  (``name-<hex>.pth``) carries no checksum (users name fine-tuned files that way).
  """
  name = pathlib.Path(path).name
  if spec is not None and spec.weights is not None and name == spec.weights.filename:
    return spec.weights.sha256
  return None


def verify_local(path: pathlib.Path, sha256: str) -> None:
  """Verifies a local file once per process (keyed by size and mtime, so edits re-verify)."""
  st = path.stat()
  key = (str(path.resolve()), st.st_size, st.st_mtime_ns, download_lib.normalize_sha256(sha256))
  if key in _VERIFIED:
    return
  download_lib.verify(path, sha256=sha256)
  _VERIFIED.add(key)


def search_dirs() -> list[tuple[str, pathlib.Path]]:
  """The local directories searched, in order, as (description, path)."""
  dirs = []
  env = os.environ.get('LBYL_JAX_WEIGHTS')
  if env:
    dirs.append(('$LBYL_JAX_WEIGHTS', pathlib.Path(env).expanduser()))
  dirs.append(('user cache', user_weights_dir()))
  dirs.append(('torch hub cache', torch_hub_dir()))
  return dirs


def _checked(spec: archs.ArchSpec, path: pathlib.Path) -> pathlib.Path:
  sha = expected_sha256(spec, path)
  if sha is not None:
    verify_local(path, sha)
  return path


def resolve_weights(
    spec: archs.ArchSpec | str,
    weights: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> pathlib.Path:
  """The weights file of ``spec``, found locally or downloaded (see the module docstring).

  Args:
    spec: the preset (or its registry name).
    weights: explicit file (returned as it is, never checksum-verified), or a directory
      containing the preset's file name (verified like the caches).
    download: allow step 5 (a verified download into the user cache).
    progress: show a progress bar while downloading.

  Raises:
    WeightsNotFoundError: explicit path missing, or nothing found and no download possible.
    download_lib.ChecksumError: a local or downloaded file does not match its known checksum.
    WeightsNotFoundError: also when the download failed (the message lists every place looked).
  """
  if isinstance(spec, str):
    spec = archs.get(spec)
  filename = weights_filename(spec)

  if weights is not None:
    path = pathlib.Path(weights).expanduser()
    if path.is_dir():
      if filename is None or not (path / filename).is_file():
        raise WeightsNotFoundError(
            f'{spec.name}: --weights {path} is a directory without '
            f'{filename or "a known weights file name"}'
        )
      path = path / filename
      return _checked(spec, path)  # found by the registry's file name: verified
    if not path.is_file():
      raise WeightsNotFoundError(f'{spec.name}: weights file {path} does not exist')
    return path  # an explicit file is the user's choice: never rejected by its name

  searched = []
  if filename is not None:
    for what, d in search_dirs():
      candidate = d / filename
      searched.append(f'{what} {candidate}')
      if candidate.is_file():
        return _checked(spec, candidate)
  if filename is not None and not os.environ.get('LBYL_JAX_WEIGHTS'):
    searched.insert(0, '$LBYL_JAX_WEIGHTS (not set)')

  if spec.weights is None:
    where = (
        f'put {filename} into $LBYL_JAX_WEIGHTS (or {user_weights_dir()})'
        if filename else 'pass --weights PATH'
    )
    raise WeightsNotFoundError(
        f'{spec.name}: its pretrained weights are not publicly hosted; {where}'
        + (f' (looked for {", ".join(searched)})' if searched else '')
    )
  dest = user_weights_dir() / filename
  if not download:
    raise WeightsNotFoundError(
        f'{spec.name}: no {filename} (looked in --weights (not given), {", ".join(searched)}) and'
        f' downloading is disabled; fetch {spec.weights.url} to {dest} or pass --weights PATH'
    )
  try:
    path = download_lib.fetch(spec.weights.url, dest, sha256=spec.weights.sha256,
                              progress=progress)
  except download_lib.DownloadError as e:
    raise WeightsNotFoundError(
        f'{spec.name}: no {filename} (looked in --weights (not given), {", ".join(searched)}) and'
        f' the download of {spec.weights.url} failed ({_first_line(e)}); put the file into one'
        ' of those places or pass --weights PATH') from None
  st = path.stat()
  _VERIFIED.add((str(path.resolve()), st.st_size, st.st_mtime_ns,
                 download_lib.normalize_sha256(spec.weights.sha256)))
  return path


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


RANDOM = 'random'


def load_weights(spec: archs.ArchSpec, weights: str | os.PathLike | None = None, *,
                 download: bool = True, progress: bool = True, seed: int = 0
                 ) -> tuple[dict[str, Any], str]:
  """Original-width float variables of ``spec`` and a description of where they came from.

  ``weights`` is a checkpoint file (PyTorch, safetensors, npz), an lbyl_jax checkpoint directory
  (a converted or saved run: its architecture must be ``spec``), ``'random'`` (seeded random
  weights, :meth:`ArchSpec.init`, for running the pipeline without a pretrained file: accuracy is
  meaningless), or None (the preset's file from the caches or a verified download,
  :func:`resolve_weights`).
  """
  if weights is not None and os.fspath(weights) == RANDOM:
    return spec.init(int(seed)), f'random (seed {int(seed)})'
  if weights is not None and checkpoint.is_checkpoint(weights):
    loaded = checkpoint.load(weights)
    if loaded.spec.name != spec.name:
      raise ValueError(f'--weights {weights} is a checkpoint of {loaded.spec.name}, not {spec.name}')
    return loaded.variables, str(pathlib.Path(weights).absolute())
  path = resolve_weights(spec, weights, download=download, progress=progress)
  return converters.load_variables(path, spec), str(path)


def _orbax_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any((path / n).exists() for n in ('_METADATA', '_CHECKPOINT_METADATA',
                                                             'manifest.ocdbt', 'checkpoint'))


def _from_key_map(flat: Mapping[str, np.ndarray], key_map: Mapping[str, str] | None,
                  where: str) -> dict[str, Any]:
  """Checkpoint entries -> Flax variables: keys already in Flax form ('params/conv1/kernel'), or
  mapped by ``key_map`` {checkpoint key: Flax leaf path} with PyTorch layouts converted (conv
  OIHW -> HWIO, linear (out, in) -> (in, out))."""
  if all('/' in k for k in flat):
    return trees.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
  if not key_map:
    raise ValueError(f'{where}: its keys ({", ".join(list(flat)[:3])}, ...) are not Flax paths;'
                     " the model factory must return (module, {checkpoint key: Flax path}) for it")
  unknown = sorted(set(flat) - set(key_map))
  missing = sorted(set(key_map) - set(flat))
  if missing:
    raise ValueError(f'{where}: the key mapping names entries the file lacks: {missing[:10]}')
  out = {}
  for key, path in key_map.items():
    v = np.asarray(flat[key], np.float32)
    if path.endswith('/kernel') and v.ndim == 4:
      v = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
    elif path.endswith('/kernel') and v.ndim == 2:
      v = np.ascontiguousarray(v.T)
    out[path] = v
  del unknown  # entries the mapping leaves out (optimizer state, counters) are not needed
  return trees.unflatten(out)


def load_custom_weights(spec: archs.ArchSpec, weights: str | os.PathLike | None, *,
                        factory_variables: Mapping[str, Any] | None = None,
                        key_map: Mapping[str, str] | None = None,
                        seed: int = 0) -> tuple[dict[str, Any], str]:
  """Variables of a user's model (``--model``): from the factory, ``'random'``, an lbyl_jax
  checkpoint of it, an orbax directory of its variables, or a weights file (.npz / .safetensors /
  PyTorch) with Flax paths as keys or a ``key_map``. Shapes are checked against the module."""
  if weights is None:
    if factory_variables is None:
      raise ValueError('--model: the factory returned no variables; give --weights PATH or random')
    variables, source = factory_variables, 'the model factory'
  elif os.fspath(weights) == RANDOM:
    return spec.init(int(seed)), f'random (seed {int(seed)})'
  else:
    path = pathlib.Path(weights).expanduser()
    if checkpoint.is_checkpoint(path):
      loaded = checkpoint.load(path, module=spec.discover_module)
      variables = loaded.variables
    elif _orbax_dir(path):
      variables = checkpoint.read_orbax(path)
    elif path.is_file():
      variables = _from_key_map(converters.read_state_dict(path), key_map, str(path))
    else:
      raise WeightsNotFoundError(f'--weights {path} does not exist')
    source = str(path.absolute())
  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  checkpoint.check_shapes(spec, variables, None, where=f'--weights {source}')
  return variables, source

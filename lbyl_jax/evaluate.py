"""Top-1 / top-5 accuracy of (possibly pruned) variables on a :class:`~lbyl_jax.data.Dataset`.

The evaluator is data-parallel over all local devices: a 1-D mesh ``('data',)``, every batch split
along its first axis, variables replicated. Pixels travel as uint8 and are normalized on device
(:func:`lbyl_jax.archs.normalize_fn`). Each batch has the same shape (the last one is zero-padded
and its padded rows are masked out of the counts), so one executable serves a whole dataset.
Executables are cached per widths (a pruned model is a different module), so a sweep over pruning
ratios compiles each width configuration once.

CLI::

  python -m lbyl_jax.evaluate --arch resnet20 [--weights PATH] [--data SPEC] [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lbyl_jax import archs
from lbyl_jax import data as data_lib
from lbyl_jax import units as units_lib

_Key = tuple[Any, ...]


def _make_step(model, normalize, k: int):
  """Adds this batch's (top-1, top-k) hit counts, over valid rows only, to ``total``."""

  def step(variables, images, labels, valid, total):
    logits = model.apply(variables, normalize(images))
    # top_k puts the lower index first among equal logits, like argmax.
    topk = jax.lax.top_k(logits.astype(jnp.float32), k)[1]
    hit = topk == labels[:, None]
    top1 = jnp.sum(hit[:, 0] & valid)
    topk_hits = jnp.sum(jnp.any(hit, axis=1) & valid)
    return total + jnp.stack([top1, topk_hits]).astype(jnp.int32)

  return step


def _signature(variables: Any) -> tuple[Any, ...]:
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  return treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype).str) for x in leaves)


class Evaluator:
  """Jit-compiled, data-parallel top-1/top-5 evaluation of one architecture.

  Attributes:
    spec: the preset.
    batch_size: global batch (rounded up to a multiple of the device count).
    mesh: the 1-D device mesh with axis 'data'.
    compile_seconds: seconds spent compiling, per widths key (None = original widths).
  """

  def __init__(self, spec: archs.ArchSpec | str, *, batch_size: int = 500,
               devices: Sequence[jax.Device] | None = None):
    self.spec = archs.get(spec) if isinstance(spec, str) else spec
    devices = list(devices) if devices is not None else jax.local_devices()
    if int(batch_size) != batch_size or batch_size < 1:
      raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    n_dev = len(devices)
    self.batch_size = -(-int(batch_size) // n_dev) * n_dev
    self.mesh = Mesh(np.asarray(devices), ('data',))
    self._batch_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    self._replicated = NamedSharding(self.mesh, PartitionSpec())
    self._normalize = archs.normalize_fn(self.spec)
    self._k = min(5, self.spec.num_classes)
    self._default_widths = self.spec.default_widths()
    self._compiled: dict[_Key, Any] = {}
    self.compile_seconds: dict[tuple[int, ...] | None, float] = {}

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def widths_key(self, variables: Any,
                 widths: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """Widths as a cache key: None for the original widths; read off ``variables`` if not given."""
    if widths is None:
      try:
        widths = units_lib.widths_of(variables, self.spec.units)
      except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f'variables do not match {self.spec.name}: {type(e).__name__}: {e}') from e
    widths = tuple(int(w) for w in widths)
    if len(widths) != len(self.spec.units):
      raise ValueError(
          f'{self.spec.name}: expected {len(self.spec.units)} widths, got {len(widths)}')
    return None if widths == self._default_widths else widths

  def compiled(self, variables: Any, widths: tuple[int, ...] | None,
               image_shape: tuple[int, int, int]) -> tuple[Any, float]:
    """The executable for these widths / variable shapes / image shape, and its compile seconds
    (0.0 when it was cached)."""
    key = (widths, _signature(variables), tuple(image_shape))
    if key in self._compiled:
      return self._compiled[key], 0.0
    model = self.spec.build(widths)
    step = jax.jit(
        _make_step(model, self._normalize, self._k),
        in_shardings=(self._replicated, self._batch_sharding, self._batch_sharding,
                      self._batch_sharding, self._replicated),
        out_shardings=self._replicated,
    )
    b = self.batch_size
    abstract_vars = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self._replicated), variables)
    args = (
        abstract_vars,
        jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8, sharding=self._batch_sharding),
        jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self._batch_sharding),
        jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=self._batch_sharding),
        jax.ShapeDtypeStruct((2,), jnp.int32, sharding=self._replicated),
    )
    t0 = time.perf_counter()
    executable = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    self._compiled[key] = executable
    self.compile_seconds[widths] = self.compile_seconds.get(widths, 0.0) + seconds
    return executable, seconds

  def evaluate(self, variables: Any, dataset: data_lib.Dataset, *,
               widths: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Top-1 / top-5 accuracy in percent.

    Args:
      variables: {'params': ..., 'batch_stats': ...} of the model with ``widths``.
      dataset: yields uint8 NHWC images and int labels.
      widths: the model's widths; None reads them off the variables.
      progress: tqdm bar on stderr.

    Returns:
      dict(n, top1, top5, seconds, compile_seconds): ``seconds`` is the evaluation wall time
      without compilation; ``compile_seconds`` is 0.0 when the executable was reused.
    """
    key = self.widths_key(variables, widths)
    n = len(dataset)
    if n == 0:
      raise ValueError(f'dataset {dataset.name} is empty')
    image_shape = tuple(dataset.image_shape)
    if image_shape != tuple(self.spec.input_shape):
      raise ValueError(
          f'dataset {dataset.name} has images of shape {image_shape}, {self.spec.name} expects '
          f'{tuple(self.spec.input_shape)}'
      )
    executable, compile_s = self.compiled(variables, key, image_shape)

    b = self.batch_size
    t0 = time.perf_counter()
    device_vars = jax.device_put(variables, self._replicated)
    total = jax.device_put(np.zeros(2, np.int32), self._replicated)
    seen = 0
    with tqdm.tqdm(total=n, unit='img', desc=self.spec.name, disable=not progress,
                   leave=False) as bar:
      for images, labels in dataset.batches(b):
        m = len(labels)
        valid = np.zeros(b, bool)
        valid[:m] = True
        if m < b:  # pad to the compiled shape; padded rows are masked out of the counts
          images = np.concatenate([images, np.zeros((b - m, *image_shape), np.uint8)])
          labels = np.concatenate([labels, np.zeros(b - m, labels.dtype)])
        total = executable(
            device_vars,
            jax.device_put(np.asarray(images, np.uint8), self._batch_sharding),
            jax.device_put(np.asarray(labels, np.int32), self._batch_sharding),
            jax.device_put(valid, self._batch_sharding),
            total,
        )
        seen += m
        bar.update(m)
    top1, top5 = (int(c) for c in np.asarray(total))
    seconds = time.perf_counter() - t0
    if seen != n:
      raise ValueError(f'dataset {dataset.name} yielded {seen} examples, expected {n}')
    return dict(n=n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, seconds=seconds,
                compile_seconds=compile_s)


# --------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='lbyl-evaluate', description='Top-1/top-5 accuracy of a preset on its test set.')
  p.add_argument('--arch', required=True, help=f'preset: {", ".join(archs.names())}')
  p.add_argument('--weights', help='checkpoint file or directory (default: caches, then download)')
  p.add_argument('--data', help='dataset name, path or tfds:NAME[:SPLIT] (default: the preset\'s)')
  p.add_argument('--batch-size', type=int, default=500)
  p.add_argument('--limit', type=int, help='evaluate only the first N examples')
  p.add_argument('--no-download', action='store_true', help='never use the network')
  p.add_argument('--no-progress', action='store_true', help='no progress bars')
  p.add_argument('--json', action='store_true',
                 help='print the report as one JSON object on the last line of stdout')
  return p


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Resolves weights and data, evaluates, returns the report."""
  import converters  # pylint: disable=import-outside-toplevel  (keeps `import lbyl_jax` light)
  from lbyl_jax import weights as weights_lib  # pylint: disable=import-outside-toplevel

  spec = archs.get(args.arch)
  progress = not args.no_progress
  path = weights_lib.resolve_weights(spec, args.weights, download=not args.no_download,
                                     progress=progress)
  variables = converters.load_variables(path, spec)
  dataset = data_lib.load_dataset(args.data, arch=spec, limit=args.limit,
                                  download=not args.no_download, progress=progress)
  evaluator = Evaluator(spec, batch_size=args.batch_size)
  result = evaluator.evaluate(variables, dataset, progress=progress)
  return dict(arch=spec.name, weights=str(path), data=dataset.source or dataset.name,
              n=result['n'], top1=result['top1'], top5=result['top5'],
              seconds=result['seconds'], compile_seconds=result['compile_seconds'],
              devices=evaluator.num_devices, batch_size=evaluator.batch_size)


def main(argv: Sequence[str] | None = None) -> None:
  """Console entry point (returns None: console scripts pass the return value to sys.exit)."""
  args = _parser().parse_args(argv)
  from lbyl_jax import download as download_lib  # pylint: disable=import-outside-toplevel
  try:
    report = run(args)
  except (ValueError, FileNotFoundError, ImportError, download_lib.DownloadError) as e:
    raise SystemExit(f'lbyl-evaluate: error: {e}') from e
  print(f'{report["arch"]} on {report["data"]} ({report["n"]} images, '
        f'weights {report["weights"]}):')
  print(f'  top-1 {report["top1"]:.2f}%  top-5 {report["top5"]:.2f}%  '
        f'({report["seconds"]:.1f} s on {report["devices"]} device(s), '
        f'compile {report["compile_seconds"]:.1f} s)')
  if args.json:
    print(json.dumps(report))
  sys.stdout.flush()


if __name__ == '__main__':
  main()

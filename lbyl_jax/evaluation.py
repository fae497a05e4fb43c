"""Top-1 / top-5 accuracy of (possibly pruned) variables on a :class:`~lbyl_jax.io.data.Dataset`.

The evaluator is data-parallel over all local devices: a 1-D mesh ``('data',)``, every batch split
along its first axis, variables replicated. Pixels travel as uint8 and are normalized on device
(:func:`lbyl_jax.models.archs.normalize_fn`). Each batch has the same shape (the last one is zero-padded
and its padded rows are masked out of the counts), so one executable serves a whole dataset.
Executables are cached per widths (a pruned model is a different module), so a sweep over pruning
ratios compiles each width configuration once.

CLI::

  python -m lbyl_jax.evaluate --arch resnet20 [--weights PATH] [--data SPEC] [--limit N] [--json]
  python -m lbyl_jax.evaluate --compare RUN_A RUN_B [--data SPEC] [--limit N] [--json]

``--compare`` evaluates two saved checkpoints (directories written by ``lbyl_jax.restore --out``
or ``python -m converters --out``) of the same architecture on the same examples and reports
:func:`paired_comparison`: is A's accuracy different from B's by more than the test set resolves?
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lbyl_jax.models import archs
from lbyl_jax.io import data as data_lib
from lbyl_jax.core import units as units_lib

_Key = tuple[Any, ...]


def _top_classes(model, normalize, variables, images, k: int):
  """The k highest-scoring classes per row; top_k puts the lower index first among equal
  logits, like argmax."""
  logits = model.apply(variables, normalize(images))
  return jax.lax.top_k(logits.astype(jnp.float32), k)[1]


def _make_step(model, normalize, k: int):
  """Adds this batch's (top-1, top-k) hit counts, over valid rows only, to ``total``."""

  def step(variables, images, labels, valid, total):
    hit = _top_classes(model, normalize, variables, images, k) == labels[:, None]
    top1 = jnp.sum(hit[:, 0] & valid)
    topk_hits = jnp.sum(jnp.any(hit, axis=1) & valid)
    return total + jnp.stack([top1, topk_hits]).astype(jnp.int32)

  return step


def _make_predict(model, normalize):
  """Top-1 class per row (the same ranking and tie rule as :func:`_make_step`)."""

  def predict(variables, images):
    return _top_classes(model, normalize, variables, images, 1)[:, 0].astype(jnp.int32)

  return predict


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
               image_shape: tuple[int, int, int], kind: str = 'counts') -> tuple[Any, float]:
    """The executable for these widths / variable shapes / image shape, and its compile seconds
    (0.0 when it was cached). ``kind`` 'counts' adds a batch's hit counts to a running total;
    'predict' returns the batch's top-1 classes."""
    if kind not in ('counts', 'predict'):
      raise ValueError(f"kind must be 'counts' or 'predict', got {kind!r}")
    key = (kind, widths, _signature(variables), tuple(image_shape))
    if key in self._compiled:
      return self._compiled[key], 0.0
    model = self.spec.build(widths)
    b = self.batch_size
    abstract_vars = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self._replicated), variables)
    images = jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8, sharding=self._batch_sharding)
    if kind == 'counts':
      fn = jax.jit(
          _make_step(model, self._normalize, self._k),
          in_shardings=(self._replicated, self._batch_sharding, self._batch_sharding,
                        self._batch_sharding, self._replicated),
          out_shardings=self._replicated,
      )
      args = (
          abstract_vars,
          images,
          jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self._batch_sharding),
          jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=self._batch_sharding),
          jax.ShapeDtypeStruct((2,), jnp.int32, sharding=self._replicated),
      )
    else:
      fn = jax.jit(_make_predict(model, self._normalize),
                   in_shardings=(self._replicated, self._batch_sharding),
                   out_shardings=self._batch_sharding)
      args = (abstract_vars, images)
    t0 = time.perf_counter()
    executable = fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    self._compiled[key] = executable
    self.compile_seconds[widths] = self.compile_seconds.get(widths, 0.0) + seconds
    return executable, seconds

  def _padded_batches(self, dataset: data_lib.Dataset, progress: bool):
    """(images, labels, valid, m) per batch, each padded to the compiled batch size."""
    b = self.batch_size
    image_shape = tuple(dataset.image_shape)
    seen = 0
    with tqdm.tqdm(total=len(dataset), unit='img', desc=self.spec.name, disable=not progress,
                   leave=False) as bar:
      for images, labels in dataset.batches(b):
        m = len(labels)
        valid = np.zeros(b, bool)
        valid[:m] = True
        if m < b:  # pad to the compiled shape; padded rows are masked out
          images = np.concatenate([images, np.zeros((b - m, *image_shape), np.uint8)])
          labels = np.concatenate([labels, np.zeros(b - m, labels.dtype)])
        yield np.asarray(images, np.uint8), np.asarray(labels, np.int32), valid, m
        seen += m
        bar.update(m)
    if seen != len(dataset):
      raise ValueError(f'dataset {dataset.name} yielded {seen} examples, expected {len(dataset)}')

  def _checked(self, variables: Any, dataset: data_lib.Dataset,
               widths: Sequence[int] | None) -> tuple[Any, tuple[int, int, int]]:
    key = self.widths_key(variables, widths)
    if len(dataset) == 0:
      raise ValueError(f'dataset {dataset.name} is empty')
    image_shape = tuple(dataset.image_shape)
    if image_shape != tuple(self.spec.input_shape):
      raise ValueError(
          f'dataset {dataset.name} has images of shape {image_shape}, {self.spec.name} expects '
          f'{tuple(self.spec.input_shape)}'
      )
    return key, image_shape

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
    key, image_shape = self._checked(variables, dataset, widths)
    executable, compile_s = self.compiled(variables, key, image_shape)
    t0 = time.perf_counter()
    device_vars = jax.device_put(variables, self._replicated)
    total = jax.device_put(np.zeros(2, np.int32), self._replicated)
    for images, labels, valid, _ in self._padded_batches(dataset, progress):
      total = executable(
          device_vars,
          jax.device_put(images, self._batch_sharding),
          jax.device_put(labels, self._batch_sharding),
          jax.device_put(valid, self._batch_sharding),
          total,
      )
    top1, top5 = (int(c) for c in np.asarray(total))
    seconds = time.perf_counter() - t0
    n = len(dataset)
    return dict(n=n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, seconds=seconds,
                compile_seconds=compile_s)

  def predictions(self, variables: Any, dataset: data_lib.Dataset, *,
                  widths: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Per-example top-1 predictions, for comparing two models on the same examples
    (:func:`paired_comparison`).

    Returns:
      dict(pred, labels, correct, seconds, compile_seconds): ``pred`` and ``labels`` int32 and
      ``correct`` bool arrays of length ``len(dataset)``, in the dataset's order; the mean of
      ``correct`` is :meth:`evaluate`'s top-1 (same executable math, same tie rule).
    """
    key, image_shape = self._checked(variables, dataset, widths)
    executable, compile_s = self.compiled(variables, key, image_shape, kind='predict')
    t0 = time.perf_counter()
    device_vars = jax.device_put(variables, self._replicated)
    preds, labels_all = [], []
    for images, labels, _, m in self._padded_batches(dataset, progress):
      out = executable(device_vars, jax.device_put(images, self._batch_sharding))
      preds.append(np.asarray(out)[:m])
      labels_all.append(labels[:m])
    pred = np.concatenate(preds).astype(np.int32)
    labels = np.concatenate(labels_all).astype(np.int32)
    return dict(pred=pred, labels=labels, correct=pred == labels,
                seconds=time.perf_counter() - t0, compile_seconds=compile_s)


def paired_comparison(correct_a, correct_b) -> dict[str, Any]:
  """Compares two models' per-example correctness on the same examples.

  The difference of accuracies is carried only by the discordant examples: ``only_a`` (A right,
  B wrong) and ``only_b``. Returns their counts, the accuracies and their difference (percentage
  points), the two-sided exact McNemar p-value (binomial test of only_a against
  Binomial(only_a + only_b, 1/2); 1.0 when nothing is discordant) and a 95 % normal-approximation
  interval of the difference from the per-example differences d_i in {-1, 0, 1}:
  diff +- 1.96 * sqrt((only_a + only_b) / n - (diff / 100)^2) / sqrt(n - 1) * 100.

  Raises:
    ValueError: the arrays are empty, not 1-D or of different lengths.
  """
  import scipy.stats  # pylint: disable=import-outside-toplevel

  a = np.asarray(correct_a)
  b = np.asarray(correct_b)
  if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape or a.size == 0:
    raise ValueError(f'paired_comparison needs two non-empty 1-D arrays of equal length, '
                     f'got shapes {a.shape} and {b.shape}')
  a, b = a.astype(bool), b.astype(bool)
  n = a.size
  only_a = int(np.sum(a & ~b))
  only_b = int(np.sum(~a & b))
  discordant = only_a + only_b
  diff = (only_a - only_b) / n
  p = (1.0 if discordant == 0
       else float(scipy.stats.binomtest(only_a, discordant, 0.5).pvalue))
  var = max(discordant / n - diff * diff, 0.0)
  half = 1.96 * np.sqrt(var / (n - 1)) if n > 1 else float('inf')
  return dict(n=n, top1_a=100.0 * a.mean(), top1_b=100.0 * b.mean(), diff=100.0 * diff,
              only_a=only_a, only_b=only_b, mcnemar_p=p,
              ci95=(100.0 * (diff - half), 100.0 * (diff + half)))


# --------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='lbyl-evaluate', description='Top-1/top-5 accuracy of a preset on its test set, or a '
      'paired comparison of two saved checkpoints on the same examples (--compare).')
  p.add_argument('--arch', help=f'preset: {", ".join(archs.names())}')
  p.add_argument('--compare', nargs=2, metavar=('RUN_A', 'RUN_B'),
                 help='two lbyl_jax checkpoint directories of one architecture: accuracies, '
                 'examples only one gets right, exact McNemar p-value, 95%% interval of A - B')
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
  from lbyl_jax.io import weights as weights_lib  # pylint: disable=import-outside-toplevel

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


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
  """Loads two saved checkpoints, evaluates both on the same examples, returns the comparison."""
  from lbyl_jax.io import checkpoint  # pylint: disable=import-outside-toplevel

  run_a, run_b = (checkpoint.load(d) for d in args.compare)
  if run_a.spec.name != run_b.spec.name:
    raise ValueError(f'--compare needs two checkpoints of one architecture, got '
                     f'{run_a.spec.name} ({args.compare[0]}) and {run_b.spec.name} ({args.compare[1]})')
  if args.arch and archs.get(args.arch).name != run_a.spec.name:
    raise ValueError(f'--arch {args.arch} does not match the checkpoints ({run_a.spec.name})')
  spec = run_a.spec
  progress = not args.no_progress
  dataset = data_lib.load_dataset(args.data, arch=spec, limit=args.limit,
                                  download=not args.no_download, progress=progress)
  evaluator = Evaluator(spec, batch_size=args.batch_size)
  correct = [evaluator.predictions(r.variables, dataset, widths=r.meta['widths'],
                                   progress=progress)['correct'] for r in (run_a, run_b)]
  return dict(arch=spec.name, a=str(pathlib.Path(args.compare[0]).absolute()),
              b=str(pathlib.Path(args.compare[1]).absolute()),
              data=dataset.source or dataset.name, **paired_comparison(*correct))


def main(argv: Sequence[str] | None = None) -> None:
  """Console entry point (returns None: console scripts pass the return value to sys.exit)."""
  parser = _parser()
  args = parser.parse_args(argv)
  if not args.arch and not args.compare:
    parser.error('give --arch (evaluate one checkpoint) or --compare RUN_A RUN_B')
  if args.compare and args.weights:
    parser.error('--weights does not apply to --compare (the runs hold their variables)')
  from lbyl_jax.io import download as download_lib  # pylint: disable=import-outside-toplevel
  try:
    report = run_compare(args) if args.compare else run(args)
  except (ValueError, FileNotFoundError, ImportError, download_lib.DownloadError) as e:
    raise SystemExit(f'lbyl-evaluate: error: {e}') from e
  if args.compare:
    lo, hi = report['ci95']
    print(f'{report["arch"]} on {report["data"]} ({report["n"]} examples):')
    print(f'  A {report["a"]}: top-1 {report["top1_a"]:.2f}%')
    print(f'  B {report["b"]}: top-1 {report["top1_b"]:.2f}%')
    print(f'  A - B {report["diff"]:+.2f} points (95% interval {lo:+.2f} to {hi:+.2f}); '
          f'only A right {report["only_a"]}, only B right {report["only_b"]}; '
          f'exact McNemar p = {report["mcnemar_p"]:.3g}')
  else:
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

"""Top-1 / top-5 accuracy of (possibly pruned) variables on a :class:`~lbyl_jax.io.data.Dataset`.

The evaluator is data-parallel over all devices of all processes (one process per host on
``jax.distributed``, :mod:`lbyl_jax.core.distributed`): a 1-D mesh ``('data',)`` over the global
devices, process by process, every global batch split along its first axis, variables replicated.
With several processes each one reads only its contiguous part of the dataset
(:meth:`lbyl_jax.io.data.Dataset.shard`) and feeds its rows of every global batch
(``jax.make_array_from_process_local_data``); all processes run the same number of steps (a process
whose part is exhausted feeds padding). The hit counts are integer sums inside the step, so top-1 /
top-5 are exact; per-example predictions are gathered from every process and put back in the
dataset's order. Pixels travel as uint8 and are normalized on device
(:func:`lbyl_jax.models.archs.normalize_fn`). Each batch has the same shape (the last one is
zero-padded and its padded rows are masked out of the counts), so one executable serves a whole
dataset. Executables are cached per widths (a pruned model is a different module), so a sweep over
pruning ratios compiles each width configuration once.

CLI::

  python -m lbyl_jax.evaluate --arch resnet20 [--weights PATH] [--data SPEC] [--limit N] [--json]
  python -m lbyl_jax.evaluate --compare RUN_A RUN_B [--data SPEC] [--limit N] [--json]

``--compare`` evaluates two saved checkpoints (directories written by ``lbyl_jax.restore --out``
or ``python -m converters --out``) of the same architecture on the same examples and reports
:func:`paired_comparison`: is A's accuracy different from B's by more than the test set resolves?
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lbyl_jax.models import archs
from lbyl_jax.io import data as data_lib
from lbyl_jax.pruning import selection
from lbyl_jax.core import distributed
from lbyl_jax.core import units as units_lib

_Key = tuple[Any, ...]


def _top_classes(model, normalize, variables, images, k: int, forward=None):
  """The k highest-scoring classes per row (top_k puts the lower index first among equal logits,
  like argmax) and whether each row's logits are all finite. ``forward(model, variables, x)``
  replaces ``model.apply`` if given."""
  x = normalize(images)
  logits = (model.apply(variables, x) if forward is None
            else forward(model, variables, x)).astype(jnp.float32)
  return jax.lax.top_k(logits, k)[1], jnp.all(jnp.isfinite(logits), axis=1)


def _make_step(model, normalize, k: int, forward=None):
  """Adds this batch's (top-1, top-k, non-finite) counts, over valid rows only, to ``total``."""

  def step(variables, images, labels, valid, total):
    top, finite = _top_classes(model, normalize, variables, images, k, forward)
    hit = top == labels[:, None]
    top1 = jnp.sum(hit[:, 0] & valid)
    topk_hits = jnp.sum(jnp.any(hit, axis=1) & valid)
    bad = jnp.sum(~finite & valid)
    return total + jnp.stack([top1, topk_hits, bad]).astype(jnp.int32)

  return step


def _make_predict(model, normalize, forward=None):
  """Top-1 class per row (the same ranking and tie rule as :func:`_make_step`), and whether the
  row's logits are finite."""

  def predict(variables, images):
    top, finite = _top_classes(model, normalize, variables, images, 1, forward)
    return top[:, 0].astype(jnp.int32), finite

  return predict


def _refuse_nonfinite(n_bad: int, n: int, name: str) -> None:
  if n_bad:
    raise ValueError(f'{name}: the network produced NaN or Inf logits on {n_bad} of {n} examples;'
                     ' a non-finite network has no accuracy (check its weights)')


def _signature(variables: Any) -> tuple[Any, ...]:
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  return treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype).str) for x in leaves)


class Evaluator:
  """Jit-compiled, data-parallel top-1/top-5 evaluation of one architecture.

  Attributes:
    spec: the preset.
    batch_size: global batch (rounded up to a multiple of the device count).
    local_batch: the rows of every global batch this process feeds (``batch_size`` with one
      process).
    mesh: the 1-D device mesh with axis 'data'.
    num_processes: processes owning the mesh's devices (each feeds its part of the data).
    compile_seconds: seconds spent compiling, per widths key (None = original widths).

  ``forward(model, variables, x) -> logits`` (optional) replaces ``model.apply`` in the compiled
  step, e.g. :func:`lbyl_jax.quant.actquant.forward` for fake-quantized activations (whose ranges
  travel inside ``variables``, so one executable serves every range set). Fixed per evaluator.
  """

  def __init__(self, spec: archs.ArchSpec | str, *, batch_size: int = 500,
               devices: Sequence[jax.Device] | None = None, forward: Callable | None = None):
    self.spec = archs.get(spec) if isinstance(spec, str) else spec
    devices = list(devices) if devices is not None else distributed.global_devices()
    if int(batch_size) != batch_size or batch_size < 1:
      raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    n_dev = len(devices)
    self.batch_size = -(-int(batch_size) // n_dev) * n_dev
    procs = sorted({d.process_index for d in devices})
    if len(procs) > 1:  # rows of a global batch go to the processes in index order
      devices = sorted(devices, key=lambda d: d.process_index)
      per = {p: sum(d.process_index == p for d in devices) for p in procs}
      if len(set(per.values())) != 1:
        raise ValueError(f'every process needs the same number of devices, got {per}')
    me = jax.process_index()
    if me not in procs:
      raise ValueError(f'the evaluation devices include none of process {me}')
    self.num_processes = len(procs)
    self.process_position = procs.index(me)
    self.local_batch = self.batch_size // self.num_processes
    self.mesh = Mesh(np.asarray(devices), ('data',))
    self._batch_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    self._replicated = NamedSharding(self.mesh, PartitionSpec())
    self._normalize = archs.normalize_fn(self.spec)
    self._k = min(5, self.spec.num_classes)
    self._forward = forward
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
          _make_step(model, self._normalize, self._k, self._forward),
          in_shardings=(self._replicated, self._batch_sharding, self._batch_sharding,
                        self._batch_sharding, self._replicated),
          out_shardings=self._replicated,
      )
      args = (
          abstract_vars,
          images,
          jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self._batch_sharding),
          jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=self._batch_sharding),
          jax.ShapeDtypeStruct((3,), jnp.int32, sharding=self._replicated),
      )
    else:
      fn = jax.jit(_make_predict(model, self._normalize, self._forward),
                   in_shardings=(self._replicated, self._batch_sharding),
                   out_shardings=(self._batch_sharding, self._batch_sharding))
      args = (abstract_vars, images)
    t0 = time.perf_counter()
    executable = fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    self._compiled[key] = executable
    self.compile_seconds[widths] = self.compile_seconds.get(widths, 0.0) + seconds
    return executable, seconds

  def _bar(self, dataset: data_lib.Dataset, progress: bool):
    n = len(dataset)
    if self.num_processes > 1:  # this process's part
      lo, hi = data_lib.shard_bounds(n, self.process_position, self.num_processes)
      n = hi - lo
    return tqdm.tqdm(total=n, unit='img', desc=f'evaluating {self.spec.name}',
                     disable=not progress, leave=False, file=sys.stderr)

  def _padded_batches(self, dataset: data_lib.Dataset):
    """(images, labels, valid, m) per step: this process's rows of every global batch, padded to
    ``local_batch``. With several processes: this process's part of ``dataset``, and as many
    steps as the largest part needs (all-padding steps when this part is exhausted)."""
    b = self.local_batch
    image_shape = tuple(dataset.image_shape)
    n = len(dataset)
    part = dataset
    steps = None
    if self.num_processes > 1:
      part = dataset.shard(self.process_position, self.num_processes)
      sizes = [hi - lo for lo, hi in (data_lib.shard_bounds(n, p, self.num_processes)
                                      for p in range(self.num_processes))]
      steps = max(-(-size // b) for size in sizes)
    seen = done = 0
    for images, labels in part.batches(b):
      m = len(labels)
      valid = np.zeros(b, bool)
      valid[:m] = True
      if m < b:  # pad to the compiled shape; padded rows are masked out
        images = np.concatenate([images, np.zeros((b - m, *image_shape), np.uint8)])
        labels = np.concatenate([labels, np.zeros(b - m, labels.dtype)])
      yield np.asarray(images, np.uint8), np.asarray(labels, np.int32), valid, m
      seen += m
      done += 1
    if seen != len(part):
      raise ValueError(f'dataset {part.name} yielded {seen} examples, expected {len(part)}')
    while steps is not None and done < steps:
      yield (np.zeros((b, *image_shape), np.uint8), np.zeros(b, np.int32), np.zeros(b, bool), 0)
      done += 1

  def _global(self, x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows (batch-sharded) or copy (replicated) of a global array."""
    if self.num_processes == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    if sharding.spec == PartitionSpec():
      return jax.make_array_from_process_local_data(sharding, x, x.shape)
    return jax.make_array_from_process_local_data(
        sharding, x, (x.shape[0] * self.num_processes, *x.shape[1:]))

  def _replicate(self, tree: Any) -> Any:
    if self.num_processes == 1:
      return jax.device_put(tree, self._replicated)
    return jax.tree_util.tree_map(lambda x: self._global(np.asarray(x), self._replicated), tree)

  def _local_rows(self, out: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded output that this process fed (all rows with one process)."""
    if self.num_processes == 1:
      return np.asarray(out)
    shards = sorted(out.addressable_shards, key=lambda sh: sh.index[0].start or 0)
    return np.concatenate([np.asarray(sh.data) for sh in shards])

  def _same_data(self, dataset: data_lib.Dataset) -> None:
    distributed.same_everywhere([len(dataset), *dataset.image_shape],
                                f'the evaluation data ({dataset.name}: size, image shape)')

  def _checked(self, variables: Any, dataset: data_lib.Dataset,
               widths: Sequence[int] | None) -> tuple[Any, tuple[int, int, int]]:
    selection.check_finite(variables, where=f'{self.spec.name} variables')
    key = self.widths_key(variables, widths)
    if len(dataset) == 0:
      raise ValueError(f'dataset {dataset.name} is empty')
    image_shape = tuple(dataset.image_shape)
    if not self.spec.accepts_image_shape(image_shape):
      raise ValueError(
          f'dataset {dataset.name} has images of shape {image_shape}, {self.spec.name} expects '
          f'{self.spec.image_shape}'
      )
    return key, image_shape

  def evaluate(self, variables: Any, dataset: data_lib.Dataset, *,
               widths: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Top-1 / top-5 accuracy in percent.

    Args:
      variables: {'params': ..., 'batch_stats': ...} of the model with ``widths``.
      dataset: yields uint8 NHWC images and int labels.
      widths: the model's widths; None reads them off the variables.
      progress: tqdm bar on stderr, advanced as batches FINISH (one batch is kept in flight).

    Returns:
      dict(n, top1, top5, seconds, compile_seconds): ``seconds`` is the evaluation wall time
      without compilation; ``compile_seconds`` is 0.0 when the executable was reused.

    Raises:
      ValueError: non-finite variables (a NaN network has no accuracy), or a dataset that does
        not fit the model.
    """
    key, image_shape = self._checked(variables, dataset, widths)
    executable, compile_s = self.compiled(variables, key, image_shape)
    self._same_data(dataset)
    t0 = time.perf_counter()
    device_vars = self._replicate(variables)
    total = self._global(np.zeros(3, np.int32), self._replicated)
    with self._bar(dataset, progress) as bar:
      pending = 0
      for images, labels, valid, m in self._padded_batches(dataset):
        previous = total
        total = executable(
            device_vars,
            self._global(images, self._batch_sharding),
            self._global(labels, self._batch_sharding),
            self._global(valid, self._batch_sharding),
            total,
        )
        if progress and pending:  # this batch is queued; wait for the previous one to finish
          jax.block_until_ready(previous)
          bar.update(pending)
        pending = m
      top1, top5, bad = (int(c) for c in np.asarray(total))
      bar.update(pending)
    seconds = time.perf_counter() - t0
    n = len(dataset)
    _refuse_nonfinite(bad, n, self.spec.name)
    return dict(n=n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, seconds=seconds,
                compile_seconds=compile_s)

  def throughput(self, variables: Any, *, widths: Sequence[int] | None = None,
                 batches: int = 5, seed: int = 0) -> dict[str, Any]:
    """Warm inference throughput of the compiled forward at this evaluator's batch size.

    Random uint8 images of the preset's image shape (its dataset's; the pipeline's resize is
    included) go through the 'predict' executable: one call
    to warm up (its compile is excluded), then ``batches`` timed calls.

    Returns:
      dict(images_per_second, batch_size, batches, seconds).
    """
    if int(batches) != batches or batches < 1:
      raise ValueError(f'batches must be a positive integer, got {batches!r}')
    selection.check_finite(variables, where=f'{self.spec.name} variables')
    key = self.widths_key(variables, widths)
    shape = self.spec.image_shape
    executable, _ = self.compiled(variables, key, shape, kind='predict')
    images = np.random.default_rng(seed).integers(0, 256, (self.batch_size, *shape), np.uint8)
    lo = self.process_position * self.local_batch
    device_vars = self._replicate(variables)
    x = self._global(images[lo:lo + self.local_batch], self._batch_sharding)
    jax.block_until_ready(executable(device_vars, x))
    t0 = time.perf_counter()
    for _ in range(int(batches)):
      out = executable(device_vars, x)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - t0
    return dict(images_per_second=self.batch_size * int(batches) / seconds,
                batch_size=self.batch_size, batches=int(batches), seconds=seconds)

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
    self._same_data(dataset)
    t0 = time.perf_counter()
    device_vars = self._replicate(variables)
    preds, labels_all, finite_all, valid_all = [], [], [], []
    with self._bar(dataset, progress) as bar:
      for images, labels, valid, m in self._padded_batches(dataset):
        out, finite = executable(device_vars, self._global(images, self._batch_sharding))
        preds.append(self._local_rows(out))
        finite_all.append(self._local_rows(finite))
        labels_all.append(labels)
        valid_all.append(valid)
        bar.update(m)
    # This process's rows in its part's order; then every process's rows in process order,
    # which is the dataset's order (the parts are contiguous).
    valid_g = distributed.allgather(np.concatenate(valid_all))

    def gather(parts: list[np.ndarray]) -> np.ndarray:
      rows = distributed.allgather(np.concatenate(parts))
      return np.concatenate([rows[p][valid_g[p]] for p in range(len(rows))])

    pred, labels, finite = gather(preds), gather(labels_all), gather(finite_all)
    bad = int(np.sum(~finite))
    _refuse_nonfinite(bad, len(dataset), self.spec.name)
    pred = pred.astype(np.int32)
    labels = labels.astype(np.int32)
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










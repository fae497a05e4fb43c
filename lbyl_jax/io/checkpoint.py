"""Saving and loading compressed (or converted) models: an orbax checkpoint plus ``meta.json``.

A checkpoint directory holds everything needed to rebuild the model without the original weights:

  out_dir/
    meta.json    {'format_version', 'arch', 'widths', 'format': 'float' | 'quantized', ...caller meta}
    variables/   orbax checkpoint of the variables pytree ({'params': ..., 'batch_stats': ...})

``widths`` (one per prunable unit, or null for the original widths) is what makes a pruned model
loadable: ``archs.get(arch).build(widths)`` is the same model class with the pruned shapes.

Writes are atomic: the checkpoint is assembled in a hidden sibling directory and renamed into
place, so a crash or an error mid-save never leaves a half-written ``out_dir`` behind.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core.version import __version__
from lbyl_jax.io import export as export_lib
from lbyl_jax.io import publish
from lbyl_jax.models import archs
from lbyl_jax.models import custom
from lbyl_jax.quant import uniform as quant

# 2: meta.json records the SHA-256 of the stored variables (and of the quantization metadata),
# which load verifies; version-1 checkpoints (no digest) still load.
FORMAT_VERSION = 2
DIGEST_KEY = 'variables_sha256'
META_FILE = 'meta.json'
VARIABLES_DIR = 'variables'
FORMATS = ('float', 'quantized')
_RESERVED = ('format_version', 'arch', 'widths', DIGEST_KEY)


class Loaded(NamedTuple):
  """A loaded checkpoint.

  Attributes:
    spec: the architecture preset.
    model: ``spec.build(widths)``, ready for ``model.apply(variables, x)``.
    variables: float variables (dequantized for a quantized checkpoint), NumPy arrays.
    meta: the contents of ``meta.json``.
    raw: the stored integer tree of a quantized checkpoint (None for a float one).
  """

  spec: archs.ArchSpec
  model: Any
  variables: Any
  meta: dict[str, Any]
  raw: Any = None

  @property
  def widths(self) -> tuple[int, ...] | None:
    w = self.meta.get('widths')
    return None if w is None else tuple(w)

  def apply(self, images):
    """Logits of uint8 (or [0, 255] float) NHWC images: the preset's normalization included."""
    return self.model.apply(self.variables, archs.normalize_fn(self.spec)(images))

  def export_files(self, fmt: str) -> dict[str, bytes]:
    """{file name: bytes} of one :mod:`lbyl_jax.io.export` format of this model (what
    :meth:`apply` computes; a quantized checkpoint is exported dequantized)."""
    export_lib.check_available(fmt, self.spec)
    return export_lib.export(self.spec, self.widths, self.variables, fmt)

  def export(self, out_dir: str | os.PathLike, formats=('stablehlo',), *,
             overwrite: bool = False) -> pathlib.Path:
    """Writes the exports of ``formats`` ('stablehlo', 'safetensors') into the NEW directory
    ``out_dir`` atomically (plus ``export.json``: the architecture, widths and what the files
    carry); an existing ``out_dir`` is refused unless ``overwrite`` (and then replaced only if
    this tool wrote it). Returns its absolute path."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    if not formats or len(set(formats)) != len(formats):
      raise ValueError(f'export formats: give each of {", ".join(export_lib.FORMATS)} at most '
                       f'once, got {formats!r}')
    for fmt in formats:
      export_lib.check_available(fmt, self.spec)
    publish.check_target(out_dir, overwrite=overwrite, flag='out_dir',
                         overwrite_flag='overwrite=True', create_parents=True)
    files: dict[str, bytes] = {}
    for fmt in formats:
      files.update(self.export_files(fmt))
    return export_lib.write(out_dir, files, self.export_description(formats),
                            overwrite=overwrite)

  def export_description(self, formats) -> dict[str, Any]:
    """What :meth:`export` writes as ``export.json``."""
    return dict(arch=self.meta.get('arch'), widths=self.meta.get('widths'), formats=list(formats),
                format=self.meta.get('format'), act_quant=None,
                source_sha256=self.meta.get(DIGEST_KEY))


# --------------------------------------------------------------------------------------------
# Shape validation.




@functools.lru_cache(maxsize=64)
def _expected_shapes(arch_name: str, widths: tuple[int, ...] | None) -> dict[str, tuple[int, ...]]:
  # An abstract init traces the whole model (seconds for ResNet-152): do it once per widths.
  abstract = archs.get(arch_name).abstract_variables(widths)
  return {k: tuple(v.shape) for k, v in trees.flatten(abstract).items()}


def shape_mismatches(spec: archs.ArchSpec, variables: Mapping[str, Any],
                     widths: tuple[int, ...] | None = None) -> list[str]:
  """Differences between ``variables`` and the shapes ``spec.build(widths)`` expects.

  Returns:
    One line per missing, unexpected or mis-shaped leaf ('/'-joined paths); empty if all match.
  """
  widths = None if widths is None else tuple(int(w) for w in widths)
  if spec.name in archs.names() and archs.get(spec.name) is spec:
    expected = _expected_shapes(spec.name, widths)
  else:  # an unregistered spec (e.g. built in a test): no caching by name
    expected = {k: tuple(v.shape) for k, v in trees.flatten(spec.abstract_variables(widths)).items()}
  got = {k: tuple(np.shape(v)) for k, v in trees.flatten(variables).items()}
  lines = [f'missing: {k} {expected[k]}' for k in sorted(expected.keys() - got.keys())]
  lines += [f'unexpected: {k} {got[k]}' for k in sorted(got.keys() - expected.keys())]
  lines += [
      f'mis-shaped: {k} is {got[k]}, expected {expected[k]}'
      for k in sorted(expected.keys() & got.keys()) if got[k] != expected[k]
  ]
  return lines


def check_shapes(spec: archs.ArchSpec, variables: Mapping[str, Any],
                 widths: tuple[int, ...] | None = None, *, where: str = '') -> None:
  """Raises ValueError naming every leaf whose shape differs from ``spec.build(widths)``'s."""
  lines = shape_mismatches(spec, variables, widths)
  if lines:
    head = f'{where}: ' if where else ''
    shown = lines[:40] + ([f'... and {len(lines) - 40} more'] if len(lines) > 40 else [])
    raise ValueError(
        f'{head}variables do not match {spec.name} with widths'
        f' {"original" if widths is None else list(widths)}:\n  ' + '\n  '.join(shown)
    )


# --------------------------------------------------------------------------------------------
# Save.


def _to_numpy_tree(variables: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Plain nested dicts of NumPy arrays (orbax keeps the dtype: int8/uint8 trees stay integer)."""
  out = {}
  for key, value in variables.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      out[str(key)] = _to_numpy_tree(value, path)
      continue
    arr = np.asarray(jax.device_get(value))
    if arr.dtype == object:
      raise ValueError(f'variable {path} is not a numeric array ({type(value).__name__})')
    if arr.size == 0:
      # orbax refuses zero-size arrays; a pruned width of 0 removes the layer, which the
      # width-parameterized models cannot express anyway.
      raise ValueError(f'variable {path} has zero size (shape {arr.shape}); widths must be >= 1')
    out[str(key)] = arr
  return out


@functools.lru_cache(maxsize=None)
def _default_widths(arch_name: str) -> tuple[int, ...]:
  return archs.get(arch_name).default_widths()


CUSTOM_PREFIX = 'custom:'


def _spec_of(arch) -> archs.ArchSpec:
  """A registered preset (by name or spec) or a user model's spec (family 'custom')."""
  if isinstance(arch, archs.ArchSpec):
    return arch
  return archs.get(arch)


def _normalize_widths(spec: archs.ArchSpec, widths) -> tuple[int, ...] | None:
  if widths is None:
    return None
  widths = tuple(int(w) for w in widths)
  if len(widths) != len(spec.units):
    raise ValueError(f'{spec.name}: expected {len(spec.units)} widths, got {len(widths)}')
  if any(w < 1 for w in widths):
    raise ValueError(f'{spec.name}: widths must be >= 1, got {list(widths)}')
  default = (spec.default_widths() if spec.family == 'custom'
             else _default_widths(spec.name))
  return None if widths == default else widths


def _write_json(path: pathlib.Path, obj: Any) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())


def _this_process_only(ocp) -> dict[str, Any]:
  """Checkpointer options making this process the only participant: with several processes on
  jax.distributed, orbax otherwise expects every process to join every save and restore (only
  process 0 writes, README "Multi-host"; every process reads on its own)."""
  if jax.process_count() == 1:
    return {}
  me = jax.process_index()
  return dict(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f'lbyl_jax_p{me}_'))


def _write_orbax(path: pathlib.Path, tree: Mapping[str, Any]) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  with ocp.StandardCheckpointer(**_this_process_only(ocp)) as ckptr:
    ckptr.save(path, tree)
    # StandardCheckpointer saves asynchronously: the rename that publishes the directory must
    # not happen before every array is on disk.
    ckptr.wait_until_finished()


def save(out_dir: str | os.PathLike, arch_name: str | archs.ArchSpec, widths,
         variables: Mapping[str, Any], *,
         meta: Mapping[str, Any] | None = None, overwrite: bool = False,
         files: Mapping[str, str | bytes] | None = None) -> pathlib.Path:
  """Writes ``variables`` and their architecture description to ``out_dir`` atomically.

  Args:
    out_dir: checkpoint directory to create (its parent must exist and be writable).
    arch_name: registry name (``archs.get``), or the spec of a user's model
      (:func:`lbyl_jax.models.custom.custom_spec`), saved as ``'custom:<name>'`` (loading it
      needs the module again: ``load(path, module=...)``).
    widths: per-unit widths of ``variables`` (None: the original widths).
    variables: ``{'params': ..., 'batch_stats': ...}`` of NumPy or JAX arrays. A quantized tree
      may hold integer arrays (and whatever extra leaves ``lbyl_jax.quant.uniform`` stores).
    meta: extra JSON-serializable metadata (method, config, accuracy, ...). ``meta['format']``
      may be 'float' or 'quantized'; it defaults to 'quantized' when ``meta['quant']`` is given.
      A quantized checkpoint needs ``meta['quant']`` (the argument of
      ``lbyl_jax.quant.uniform.dequantize_tree``).
    overwrite: replace an existing ``out_dir`` that this tool wrote (crash-safe, see
      :mod:`lbyl_jax.io.publish`: the old one is removed only after the new one is in place;
      files, foreign directories, the current or home directory and roots are refused).
    files: extra files (name -> text or bytes) written into the directory before it is
      published, e.g. ``{'report.json': ...}``; names must be plain file names.

  Returns:
    The absolute path of the checkpoint directory.

  Raises:
    FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    lbyl_jax.io.publish.UnsafeOutputError: ``out_dir`` must not be replaced (see there).
    PermissionError / FileNotFoundError: the parent directory is not writable / does not exist.
    ValueError: unknown arch, wrong number of widths, float variables whose shapes do not match
      the arch at these widths, non-JSON meta, reserved meta keys.
  """
  spec = _spec_of(arch_name)
  widths = _normalize_widths(spec, widths)
  meta = dict(meta or {})
  clash = [k for k in _RESERVED if k in meta]
  if clash:
    raise ValueError(f'meta keys {clash} are reserved (they are written from the arguments)')
  fmt = meta.pop('format', 'quantized' if 'quant' in meta else 'float')
  if fmt not in FORMATS:
    raise ValueError(f"meta['format'] must be one of {FORMATS}, got {fmt!r}")
  if fmt == 'quantized' and 'quant' not in meta:
    raise ValueError("a quantized checkpoint needs meta['quant'] (the dequantization config)")

  tree = _to_numpy_tree(variables)
  _check_finite_leaves(tree, f'save({os.fspath(out_dir)!r})')
  if fmt == 'float':
    bad = [k for k, v in trees.flatten(tree).items() if not np.issubdtype(v.dtype, np.floating)]
    if bad:
      raise ValueError(f"float checkpoint has non-float leaves {bad[:5]}; pass meta['quant'] for a quantized tree")
    check_shapes(spec, tree, widths, where=f'save({os.fspath(out_dir)!r})')

  full_meta = {
      **meta,
      'format_version': FORMAT_VERSION,
      'arch': (CUSTOM_PREFIX + spec.name) if spec.family == 'custom' else spec.name,
      **({'input_shape': list(spec.input_shape), 'policy': list(spec.policy)}
         if spec.family == 'custom' else {}),
      'widths': None if widths is None else list(widths),
      'format': fmt,
      'lbyl_jax_version': meta.get('lbyl_jax_version', __version__),
      DIGEST_KEY: '',  # below, computed while orbax writes
  }
  try:
    json.dumps(full_meta)
  except (TypeError, ValueError) as e:
    raise ValueError(f'meta is not JSON-serializable: {e}') from None

  files = dict(files or {})
  for name in files:
    if pathlib.PurePath(name).name != name or name in (META_FILE, VARIABLES_DIR) or name.startswith('.'):
      raise ValueError(f'extra file name {name!r} must be a plain file name other than '
                       f'{META_FILE!r} / {VARIABLES_DIR!r}')

  with publish.staging_dir(out_dir, kind='checkpoint', overwrite=overwrite,
                          flag='out_dir', overwrite_flag='overwrite=True') as tmp:
    # The digest (SHA-256 of every array, 0.1 s for a pruned ResNet-152) is hashed in a second
    # thread while orbax writes the arrays: hashlib releases the GIL on large buffers, and the
    # write spends most of its time waiting for TensorStore's own threads.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='lbyl_jax-digest') as pool:
      digesting = pool.submit(trees.digest, tree, meta.get('quant'))
      _write_orbax(tmp / VARIABLES_DIR, tree)
      full_meta[DIGEST_KEY] = digesting.result()
    _write_json(tmp / META_FILE, full_meta)
    for name, content in files.items():
      mode = 'wb' if isinstance(content, bytes) else 'w'
      with open(tmp / name, mode) as f:
        f.write(content)
  return publish.resolve_out(out_dir)


# --------------------------------------------------------------------------------------------
# Load.


def is_checkpoint(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a directory holding a checkpoint's ``meta.json``."""
  p = pathlib.Path(path)
  return p.is_dir() and (p / META_FILE).is_file()


def _check_finite_leaves(tree: Mapping[str, Any], where: str) -> None:
  for path, leaf in trees.flatten(tree).items():
    a = np.asarray(leaf)
    if a.dtype.kind == 'f' and not np.all(np.isfinite(a)):
      raise ValueError(f'{where}: non-finite values in {path} ({int(np.sum(~np.isfinite(a)))} of'
                       f' {a.size}); a network with NaN / Inf weights is refused')


def _check_meta_fields(meta: dict[str, Any], meta_path: pathlib.Path) -> None:
  """Types of the fields load relies on; ValueError naming the file and the field."""
  def bad(field, why):
    raise ValueError(f'{meta_path}: field {field!r} {why}')

  if not isinstance(meta['arch'], str):
    bad('arch', f'must be a preset name, got {meta["arch"]!r}')
  w = meta['widths']
  if w is not None:
    if not isinstance(w, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                          for x in w):
      bad('widths', f'must be null or a list of integers, got {w!r:.200}')
    if any(x < 1 for x in w):
      bad('widths', f'must be >= 1, got {w!r:.200}')
  if meta['format'] == 'quantized':
    q = meta.get('quant')
    if not isinstance(q, dict) or not isinstance(q.get('layers'), dict):
      bad('quant', 'must describe the quantized layers (a quantized checkpoint without its'
          ' dequantization data)')
    for layer, info in q['layers'].items():
      if not isinstance(info, dict) or not {'bits', 'shape', 'axis', 'packed', 'symmetric'} <= info.keys():
        bad('quant', f'layer {layer!r} lacks its bits / shape / axis / packed / symmetric entries')
      shape = info['shape']
      if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
        bad('quant', f'layer {layer!r} has a malformed shape {shape!r:.100}')
  d = meta.get(DIGEST_KEY)
  if d is not None and not (isinstance(d, str) and len(d) == 64):
    bad(DIGEST_KEY, 'must be a hex SHA-256')


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The ``meta.json`` of a checkpoint directory (errors say why it is not one)."""
  d = pathlib.Path(path).absolute()
  if not d.is_dir():
    raise FileNotFoundError(f'{d}: no such checkpoint directory')
  meta_path = d / META_FILE
  if not meta_path.is_file():
    raise ValueError(f'{d}: not an lbyl_jax checkpoint (no {META_FILE})')
  try:
    meta = json.loads(meta_path.read_text(encoding='utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{meta_path}: unreadable JSON ({e})') from None
  if not isinstance(meta, dict):
    raise ValueError(f'{meta_path}: not a JSON object')
  missing = [k for k in ('format_version', 'arch', 'widths', 'format') if k not in meta]
  if missing:
    raise ValueError(f'{meta_path}: missing keys {missing}')
  if not isinstance(meta['format_version'], int) or meta['format_version'] > FORMAT_VERSION:
    raise ValueError(
        f'{meta_path}: format_version {meta["format_version"]!r} is newer than this lbyl_jax'
        f' understands ({FORMAT_VERSION})'
    )
  if meta['format'] not in FORMATS:
    raise ValueError(f'{meta_path}: unknown format {meta["format"]!r} (expected one of {FORMATS})')
  if meta['format_version'] >= 2 and DIGEST_KEY not in meta:
    raise ValueError(f'{meta_path}: missing keys [{DIGEST_KEY!r}]')
  _check_meta_fields(meta, meta_path)
  return meta


def read_orbax(path: pathlib.Path) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  if not path.is_dir():
    raise ValueError(f'{path.parent}: checkpoint has no {VARIABLES_DIR}/ directory')
  try:
    with ocp.StandardCheckpointer(**_this_process_only(ocp)) as ckptr:
      tree = ckptr.restore(path)
  except (ValueError, OSError, KeyError, TypeError, AttributeError, RuntimeError) as e:
    raise ValueError(f'{path}: unreadable orbax checkpoint ({type(e).__name__}: {e})') from None
  return jax.tree_util.tree_map(np.asarray, tree)


def load(path: str | os.PathLike, *, module=None, **model_options) -> Loaded:
  """Loads a checkpoint written by :func:`save`.

  A quantized checkpoint is dequantized with ``lbyl_jax.quant.uniform.dequantize_tree(raw, meta['quant'])``
  and the stored integer tree is kept in ``Loaded.raw``.

  Raises:
    ValueError: not a checkpoint, an unknown arch, or variables whose shapes do not match
      ``archs.get(meta['arch']).build(meta['widths'])`` (every mismatch is listed).
  """
  d = pathlib.Path(path).absolute()
  meta = read_meta(d)
  if meta['arch'].startswith(CUSTOM_PREFIX):
    if module is None:
      raise ValueError(f'{d}: a checkpoint of the user model {meta["arch"][len(CUSTOM_PREFIX):]!r};'
                       ' pass its original-width module: lbyl_jax.load(path, module=...)')
    spec = custom.custom_spec(module, (1, *meta['input_shape']), name=meta['arch'][len(CUSTOM_PREFIX):],
                              policy=tuple(meta.get('policy', ())), **model_options)
  else:
    if module is not None:
      raise ValueError(f'{d}: a checkpoint of the preset {meta["arch"]}; module= is for user models')
    spec = archs.get(meta['arch'])
  widths = None if meta['widths'] is None else tuple(int(w) for w in meta['widths'])
  if widths is not None and len(widths) != len(spec.units):
    raise ValueError(f'{d / META_FILE}: {spec.name} needs {len(spec.units)} widths, meta has {len(widths)}')
  stored = read_orbax(d / VARIABLES_DIR)
  if DIGEST_KEY in meta and trees.digest(stored, meta.get('quant')) != meta[DIGEST_KEY]:
    raise ValueError(f'{d / VARIABLES_DIR}: the stored variables do not match the SHA-256 in'
                     f' {d / META_FILE} (changed or replaced after saving)')
  raw = None
  variables = stored
  if meta['format'] == 'quantized':
    raw = stored
    try:
      deq = quant.dequantize_tree(raw, meta['quant'])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'{d / META_FILE}: field \'quant\' does not fit the stored tree'
                       f' ({type(e).__name__}: {e})') from None
    variables = jax.tree_util.tree_map(np.asarray, deq)
  check_shapes(spec, variables, widths, where=os.fspath(d))
  _check_finite_leaves(variables, os.fspath(d))
  return Loaded(spec=spec, model=spec.build(widths), variables=variables, meta=meta, raw=raw)

"""Exports of a (compressed) preset for deployment outside lbyl_jax.

- ``stablehlo``: the whole inference function, uint8 NHWC images of the preset's image shape (any
  batch size) -> float32 logits, the preset's resize and normalization included and the variables baked in as constants, serialized with
  :mod:`jax.export` (``model.stablehlo``; reload with :func:`load_stablehlo`, or
  ``jax.export.deserialize``), plus its StableHLO text (``model.stablehlo.mlir``).
- ``safetensors``: flat float32 tensors named and shaped as the PyTorch module of the preset with
  the pruned widths expects (``model.safetensors``: ``model.load_state_dict(...)`` in torch),
  the layouts of :func:`converters.mapping.to_torch`. A quantized model is exported dequantized.

Activation quantization (``--act-bits``) is supplied by the caller (this layer does not know the
quantizers): ``forward`` replaces ``model.apply`` in the exported function and ``variables`` may
carry extra collections (``'act_quant'``), baked in like the weights, so the StableHLO function
holds the quantize / dequantize steps and gives the logits of the in-process forward. safetensors
stores tensors only: the activation grids (``act``: per layer ``scale``, ``qmin``, ``qmax``) are
written as the JSON string ``__metadata__['act_quant']``, its layers named like the PyTorch
modules whose inputs they quantize (``{"bits", "source", "data_free", "keep_8bit", "layers":
{torch module: {"scale", "qmin", "qmax"}}}``; input ``x`` -> ``scale * clip(round(x / scale),
qmin, qmax)``, round half to even).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters import mapping
from lbyl_jax.io import publish
from lbyl_jax.core import trees
from lbyl_jax.models import archs
from lbyl_jax.models import nets

FORMATS = ('stablehlo', 'safetensors')
STABLEHLO_FILE = 'model.stablehlo'
EXPORT_FILE = 'export.json'
SAFETENSORS_FILE = 'model.safetensors'


Forward = Callable[..., Any]
"""``forward(model, variables, x) -> logits``; the default is ``model.apply(variables, x)``."""


def _apply(model, variables, x):
  return model.apply(variables, x)


def stablehlo(spec: archs.ArchSpec, widths, variables: Mapping[str, Any], *,
              forward: Forward | None = None) -> jax.export.Exported:
  """The exported inference function (see the module docstring).

  Args:
    spec: the architecture.
    widths: the per-unit widths of ``variables`` (None: the original widths).
    variables: float variables; extra collections (``'act_quant'``) are baked in too.
    forward: ``forward(model, variables, normalized_images) -> logits`` in place of
      ``model.apply`` (e.g. :func:`lbyl_jax.quant.actquant.forward`); must be jit-compatible.
  """
  model = spec.build(None if widths is None else tuple(widths))
  normalize = archs.normalize_fn(spec)
  consts = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x, np.float32)),
                                  dict(variables))
  fwd = _apply if forward is None else forward

  def infer(images):
    return fwd(model, consts, normalize(images)).astype(jnp.float32)

  (b,) = jax.export.symbolic_shape('b')
  arg = jax.ShapeDtypeStruct((b, *spec.image_shape), jnp.uint8)
  return jax.export.export(jax.jit(infer))(arg)


def load_stablehlo(data: bytes) -> jax.export.Exported:
  """Inverse of the ``stablehlo`` export: ``load_stablehlo(b).call(images)`` gives the logits."""
  return jax.export.deserialize(bytearray(data))


def torch_names(spec: archs.ArchSpec, variables: Mapping[str, Any]) -> dict[str, str]:
  """Flax module path -> PyTorch module name for every module of the preset's variables."""
  modules = sorted({p.rpartition('/')[0] for p in trees.flatten(variables.get('params', {}))}
                   | {p.rpartition('/')[0] for p in trees.flatten(variables.get('batch_stats', {}))})
  out: dict[str, str] = {}
  if spec.torch_naming in ('cifar_resnet', 'resnet'):
    # akamaster's CIFAR ResNets name the head 'linear', the NM / torchvision ones 'fc'.
    head = 'linear' if (spec.torch_naming == 'cifar_resnet'
                        and getattr(spec.model, 'shortcut', 'B') == 'A') else 'fc'
    for m in modules:
      g = re.fullmatch(r'layer(\d+)_(\d+)/(\w+)', m)
      if g:
        leaf = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(
            g.group(3), g.group(3))
        out[m] = f'layer{g.group(1)}.{g.group(2)}.{leaf}'
      else:
        out[m] = head if m == 'fc' else m
    return out
  if spec.torch_naming == 'lenet':
    return {m: m for m in modules}
  if spec.torch_naming == 'mobilenet_v2':
    # converters.mapping's MobileNetV2 rules, inverted: features_i/conv_j_k -> features.i.conv.j.k,
    # features_i/{conv,bn} -> features.i.{0,1}, classifier_1 -> classifier.1.
    for m in modules:
      g = re.fullmatch(r'features_(\d+)/conv_(\d+)(?:_(\d+))?', m)
      if g:
        out[m] = f'features.{g.group(1)}.conv.{g.group(2)}' + (
            f'.{g.group(3)}' if g.group(3) is not None else '')
        continue
      g = re.fullmatch(r'features_(\d+)/(conv|bn)', m)
      if g:
        out[m] = f'features.{g.group(1)}.{0 if g.group(2) == "conv" else 1}'
        continue
      g = re.fullmatch(r'classifier_(\d+)', m)
      if g:
        out[m] = f'classifier.{g.group(1)}'
        continue
      raise ValueError(f'{spec.name}: no PyTorch name for module {m!r}')
    return out
  if spec.torch_naming in ('vgg_cifar', 'vgg'):
    cifar = spec.torch_naming == 'vgg_cifar'
    cfg = nets.VGG16_CFG[:-1] if cifar else nets.VGG16_CFG
    feats = 'feature' if cifar else 'features'
    index, conv = 0, 0
    for c in cfg:
      if c == 'M':
        index += 1
        continue
      out[f'conv{conv}'] = f'{feats}.{index}'
      out[f'bn{conv}'] = f'{feats}.{index + 1}'
      index += 3  # conv, BN, ReLU
      conv += 1
    heads = ({'fc1': 'classifier.0', 'bn_fc1': 'classifier.1', 'fc2': 'classifier.3'} if cifar
             else {'fc1': 'classifier.0', 'fc2': 'classifier.3', 'fc3': 'classifier.6'})
    out.update(heads)
    return {m: out[m] for m in modules if m in out} | {m: m for m in modules if m not in out}
  raise ValueError(f'{spec.name}: no PyTorch naming for export ({spec.torch_naming!r})')


_ST_DTYPES = {np.dtype('float32'): 'F32', np.dtype('int64'): 'I64'}


def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
  """The safetensors file format: u64 little-endian header length, the JSON header (names ->
  dtype, shape, byte offsets; ``__metadata__``) padded to 8 bytes, then the little-endian data."""
  header: dict[str, Any] = {'__metadata__': {str(k): str(v) for k, v in metadata.items()}}
  chunks, offset = [], 0
  for name, a in tensors.items():
    a = np.ascontiguousarray(a)
    if a.dtype not in _ST_DTYPES:
      raise ValueError(f'{name}: dtype {a.dtype} is not exported')
    data = a.astype(a.dtype.newbyteorder('<'), copy=False).tobytes()
    header[name] = dict(dtype=_ST_DTYPES[a.dtype], shape=list(a.shape),
                        data_offsets=[offset, offset + len(data)])
    chunks.append(data)
    offset += len(data)
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  return struct.pack('<Q', len(text)) + text + b''.join(chunks)


def torch_act_description(spec: archs.ArchSpec, variables: Mapping[str, Any],
                          act: Mapping[str, Any]) -> dict[str, Any]:
  """``act`` (``{'layers': {Flax layer path: {'scale', 'qmin', 'qmax'}}, ...}``) with its layers
  renamed to the PyTorch modules of :func:`torch_names` (the other keys unchanged).

  Raises:
    ValueError: a layer path that is not a module of ``variables``.
  """
  names = torch_names(spec, variables)
  layers = {}
  for path, grid in dict(act.get('layers') or {}).items():
    if path not in names:
      raise ValueError(f'activation quantization of layer {path!r}: no such module in the '
                       f'variables of {spec.name}')
    layers[names[path]] = {k: float(grid[k]) for k in ('scale', 'qmin', 'qmax')}
  return {**{k: v for k, v in act.items() if k != 'layers'}, 'layers': layers}


def safetensors_bytes(spec: archs.ArchSpec, variables: Mapping[str, Any], *,
                      act: Mapping[str, Any] | None = None) -> bytes:
  """The ``safetensors`` export as bytes (``act``: the activation grids, module docstring)."""
  params = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  sd = mapping.to_torch(params, torch_names(spec, params))
  meta = {'format': 'pt', 'arch': spec.name}
  if act is not None:
    meta['act_quant'] = json.dumps(torch_act_description(spec, params, act), sort_keys=True)
  return encode_safetensors(sd, meta)


def check_available(fmt: str, spec: archs.ArchSpec | None = None) -> None:
  """Raises before any work when ``fmt`` cannot be written (unknown, a missing package, or no
  PyTorch naming for the architecture)."""
  if fmt not in FORMATS:
    raise ValueError(f'unknown export format {fmt!r}; known: {", ".join(FORMATS)}')
  if fmt == 'safetensors' and spec is not None and spec.torch_naming is None:
    raise ValueError(f'--export safetensors: {spec.name} has no PyTorch naming (a user model);'
                     ' use --export stablehlo')
  if fmt == 'stablehlo':
    import flatbuffers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


def export(spec: archs.ArchSpec, widths, variables: Mapping[str, Any], fmt: str, *,
           qmeta: Mapping[str, Any] | None = None, forward: Forward | None = None,
           act: Mapping[str, Any] | None = None) -> dict[str, bytes]:
  """{file name: bytes} of one export format.

  Args:
    spec, widths: the architecture and the per-unit widths of ``variables``.
    variables: float variables (a quantized model's are its dequantized values; ``qmeta`` is not
      needed and ignored), plus any extra collection ``forward`` reads (``'act_quant'``).
    fmt: one of :data:`FORMATS`.
    forward: the StableHLO function's forward pass (:func:`stablehlo`); None: ``model.apply``.
    act: the activation quantization for safetensors' metadata (module docstring); the
      StableHLO export carries it through ``forward`` and ``variables`` instead.
  """
  del qmeta
  if fmt == 'stablehlo':
    exp = stablehlo(spec, widths, variables, forward=forward)
    return {STABLEHLO_FILE: bytes(exp.serialize()),
            STABLEHLO_FILE + '.mlir': exp.mlir_module().encode()}
  if fmt == 'safetensors':
    return {SAFETENSORS_FILE: safetensors_bytes(spec, variables, act=act)}
  raise ValueError(f'unknown export format {fmt!r}; known: {", ".join(FORMATS)}')


def write(out_dir: str | os.PathLike, files: Mapping[str, bytes], description: Mapping[str, Any],
          *, overwrite: bool = False) -> pathlib.Path:
  """Publishes export ``files`` plus :data:`EXPORT_FILE` (``description`` as JSON) as a new
  directory ``out_dir``, atomically (:func:`lbyl_jax.io.publish.staging_dir`, kind 'export').

  Raises:
    FileExistsError: ``out_dir`` exists and ``overwrite`` is False (nothing is replaced
      silently); :class:`lbyl_jax.io.publish.UnsafeOutputError` for a path that must not be
      replaced.
  """
  path = publish.check_target(out_dir, overwrite=overwrite, flag='out_dir',
                              overwrite_flag='overwrite=True', create_parents=True)
  publish.make_parents(path)
  with publish.staging_dir(path, kind='export', overwrite=overwrite, flag='out_dir',
                           overwrite_flag='overwrite=True') as tmp:
    for name, content in files.items():
      (tmp / name).write_bytes(content)
    (tmp / EXPORT_FILE).write_text(json.dumps(dict(description), indent=2, sort_keys=True) + '\n')
  return path

"""Exports of a (compressed) preset for deployment outside lbyl_jax.

- ``stablehlo``: the whole inference function, uint8 NHWC images of the preset's image shape (any
  batch size) -> float32 logits, the preset's resize and normalization included and the variables baked in as constants, serialized with
  :mod:`jax.export` (``model.stablehlo``; reload with :func:`load_stablehlo`, or
  ``jax.export.deserialize``), plus its StableHLO text (``model.stablehlo.mlir``).
- ``safetensors``: flat float32 tensors named and shaped as the PyTorch module of the preset with
  the pruned widths expects (``model.safetensors``: ``model.load_state_dict(...)`` in torch),
  the layouts of :func:`converters.mapping.to_torch`. A quantized model is exported dequantized.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters import mapping
from lbyl_jax.core import trees
from lbyl_jax.models import archs
from lbyl_jax.models import nets

FORMATS = ('stablehlo', 'safetensors')
STABLEHLO_FILE = 'model.stablehlo'
SAFETENSORS_FILE = 'model.safetensors'


def stablehlo(spec: archs.ArchSpec, widths, variables: Mapping[str, Any]) -> jax.export.Exported:
  """The exported inference function (see the module docstring)."""
  model = spec.build(None if widths is None else tuple(widths))
  normalize = archs.normalize_fn(spec)
  consts = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x, np.float32)),
                                  dict(variables))

  def infer(images):
    return model.apply(consts, normalize(images)).astype(jnp.float32)

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


def safetensors_bytes(spec: archs.ArchSpec, variables: Mapping[str, Any]) -> bytes:
  """The ``safetensors`` export as bytes."""
  sd = mapping.to_torch(variables, torch_names(spec, variables))
  return encode_safetensors(sd, {'format': 'pt', 'arch': spec.name})


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
           qmeta: Mapping[str, Any] | None = None) -> dict[str, bytes]:
  """{file name: bytes} of one export format (float variables; a quantized model's are its
  dequantized values, ``qmeta`` is noted in the StableHLO file name only through the report)."""
  del qmeta
  if fmt == 'stablehlo':
    exp = stablehlo(spec, widths, variables)
    return {STABLEHLO_FILE: bytes(exp.serialize()),
            STABLEHLO_FILE + '.mlir': exp.mlir_module().encode()}
  if fmt == 'safetensors':
    return {SAFETENSORS_FILE: safetensors_bytes(spec, variables)}
  raise ValueError(f'unknown export format {fmt!r}; known: {", ".join(FORMATS)}')

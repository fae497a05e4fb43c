"""PyTorch state-dict names and layouts -> Flax variables of a registered architecture.

Layouts: conv OIHW -> HWIO, Linear (out, in) -> (in, out), BN weight/bias -> params scale/bias,
running_mean/var -> batch_stats mean/var. Module names: ``layer1.0.conv1`` -> ``layer1_0/conv1``,
``downsample.{0,1}`` / ``shortcut.{0,1}`` -> ``downsample_conv`` / ``downsample_bn``, akamaster's
``linear`` -> ``fc``; VGG ``features.N`` / ``feature.N`` are numbered conv0.., bn0.. in order and
the classifier's Linear layers fc1.., its BatchNorm1d bn_fc1; torchvision MobileNetV2
``features.i.conv.j[.k]`` -> ``features_i/conv_j[_k]``, ``features.i.{0,1}`` ->
``features_i/{conv,bn}``, ``classifier.1`` -> ``classifier_1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.errors import CheckpointError

_CONTAINER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net', 'params')


def normalize_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """Unwraps ``{'state_dict': ...}`` style containers, strips ``module.``, drops counters."""
  seen = 0
  while isinstance(obj, Mapping) and seen < 4:
    inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj, seen = inner, seen + 1
  if not isinstance(obj, Mapping):
    raise CheckpointError(f'checkpoint holds a {type(obj).__name__}, not a state dict')
  out: dict[str, np.ndarray] = {}
  for key, value in obj.items():
    key = str(key)
    while key.startswith('module.'):
      key = key[len('module.'):]
    if key.endswith('num_batches_tracked'):
      continue
    if not isinstance(value, np.ndarray):
      raise CheckpointError(f'state dict entry {key!r} is a {type(value).__name__}, not a tensor')
    out[key] = value
  if not out:
    raise CheckpointError('checkpoint contains no tensors')
  return out


def _split(key: str) -> tuple[str, str]:
  mod, _, leaf = key.rpartition('.')
  return mod, leaf


def _modules(sd: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  mods: dict[str, dict[str, np.ndarray]] = {}
  for key, value in sd.items():
    mod, leaf = _split(key)
    mods.setdefault(mod, {})[leaf] = value
  return mods


def _is_bn(leaves: Mapping[str, np.ndarray]) -> bool:
  return 'running_mean' in leaves or 'running_var' in leaves


_RESNET_RULES = (
    (re.compile(r'^layer(\d+)\.(\d+)\.(conv\d|bn\d)$'), r'layer\1_\2/\3'),
    (re.compile(r'^layer(\d+)\.(\d+)\.(?:downsample|shortcut)\.0$'), r'layer\1_\2/downsample_conv'),
    (re.compile(r'^layer(\d+)\.(\d+)\.(?:downsample|shortcut)\.1$'), r'layer\1_\2/downsample_bn'),
    (re.compile(r'^(conv1|bn1)$'), r'\1'),
    (re.compile(r'^(?:linear|fc)$'), 'fc'),
)
_LENET_RULES = ((re.compile(r'^(ip\d)$'), r'\1'),)
# torchvision MobileNetV2 (lbyl_jax/models/mobilenet.py): blocks features.i.conv.* ->
# features_i/conv_*, the conv + BN + ReLU6 stages features.{0,18}.{0,1} -> features_i/{conv,bn},
# classifier.1 (the Linear after the Dropout).
_MOBILENET_RULES = (
    (re.compile(r'^features\.(\d+)\.conv\.(\d+)\.(\d+)$'), r'features_\1/conv_\2_\3'),
    (re.compile(r'^features\.(\d+)\.conv\.(\d+)$'), r'features_\1/conv_\2'),
    (re.compile(r'^features\.(\d+)\.0$'), r'features_\1/conv'),
    (re.compile(r'^features\.(\d+)\.1$'), r'features_\1/bn'),
    (re.compile(r'^classifier\.(\d+)$'), r'classifier_\1'),
)


def _rule_names(mods: Mapping[str, Any], rules) -> dict[str, str]:
  names = {}
  for mod in mods:
    for pattern, repl in rules:
      if pattern.match(mod):
        names[mod] = pattern.sub(repl, mod)
        break
  return names


def _vgg_names(mods: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, str]:
  names = {}
  feats = []
  cls = []
  for mod in mods:
    m = re.match(r'^(features?)\.(\d+)$', mod)
    if m:
      feats.append((int(m.group(2)), mod))
    m = re.match(r'^classifier\.(\d+)$', mod)
    if m:
      cls.append((int(m.group(1)), mod))
  conv = bn = 0
  for _, mod in sorted(feats):
    if _is_bn(mods[mod]):
      names[mod] = f'bn{bn}'
      bn += 1
    else:
      names[mod] = f'conv{conv}'
      conv += 1
  fc = 0
  for _, mod in sorted(cls):
    if _is_bn(mods[mod]):
      names[mod] = f'bn_fc{fc}'
    else:
      fc += 1
      names[mod] = f'fc{fc}'
  return names


def flax_names(naming: str, mods: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, str]:
  """torch module name -> Flax module path, for the modules this naming knows."""
  if naming in ('cifar_resnet', 'resnet'):
    return _rule_names(mods, _RESNET_RULES)
  if naming == 'lenet':
    return _rule_names(mods, _LENET_RULES)
  if naming == 'mobilenet_v2':
    return _rule_names(mods, _MOBILENET_RULES)
  if naming in ('vgg_cifar', 'vgg'):
    return _vgg_names(mods)
  raise ValueError(f'unknown torch naming {naming!r}')


def _convert_module(leaves: Mapping[str, np.ndarray]) -> tuple[dict, dict, dict[str, str]]:
  """(params, batch_stats, flax leaf -> torch leaf) of one module."""
  params, stats, origin = {}, {}, {}
  if _is_bn(leaves):
    for t, (col, f) in {'weight': ('p', 'scale'), 'bias': ('p', 'bias'),
                        'running_mean': ('s', 'mean'), 'running_var': ('s', 'var')}.items():
      if t in leaves:
        (params if col == 'p' else stats)[f] = np.asarray(leaves[t], np.float32)
        origin[f] = t
    return params, stats, origin
  for t, v in leaves.items():
    v = np.asarray(v, np.float32)
    if t == 'weight':
      if v.ndim == 4:
        params['kernel'] = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
      elif v.ndim == 2:
        params['kernel'] = np.ascontiguousarray(v.T)
      else:
        params['kernel'] = v
      origin['kernel'] = t
    elif t == 'bias':
      params['bias'] = v
      origin['bias'] = t
    else:
      params[t] = v
      origin[t] = t
  return params, stats, origin


def _flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f'{prefix}/{k}' if prefix else k
    if isinstance(v, Mapping):
      out.update(_flat(v, path))
    else:
      out[path] = v
  return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    keys = path.split('/')
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = v
  return out


def to_variables(state_dict: Mapping[str, np.ndarray], spec) -> dict[str, Any]:
  """Maps a normalized state dict onto ``spec``'s variables; widths are read from the file.

  A checkpoint of a pruned network (smaller unit widths) loads into ``spec.build(widths)``; the
  widths can be recovered with ``lbyl_jax.core.units.widths_of``.

  Raises:
    CheckpointError: listing missing, unexpected and mis-shaped entries (torch and Flax names).
  """
  flat: dict[str, np.ndarray] = {}
  torch_of: dict[str, str] = {}
  if state_dict and all('/' in k for k in state_dict):  # Flax layout ('params/conv1/kernel')
    mods, names, unexpected = {}, {}, []
    for k, v in state_dict.items():
      flat[k] = np.asarray(v, np.float32)
      torch_of[k] = k
  else:
    mods = _modules(state_dict)
    names = flax_names(spec.torch_naming, mods)
    unexpected = [f'{m}.{leaf}' for m in mods if m not in names for leaf in mods[m]]
  for mod, path in names.items():
    params, stats, origin = _convert_module(mods[mod])
    for leaf, v in params.items():
      flat[f'params/{path}/{leaf}'] = v
      torch_of[f'params/{path}/{leaf}'] = f'{mod}.{origin[leaf]}'
    for leaf, v in stats.items():
      flat[f'batch_stats/{path}/{leaf}'] = v
      torch_of[f'batch_stats/{path}/{leaf}'] = f'{mod}.{origin[leaf]}'

  widths = []
  for unit, default in zip(spec.units, spec.default_widths()):
    kernel = flat.get(f'params/{unit.producer}/kernel')
    widths.append(int(kernel.shape[-1]) if kernel is not None and kernel.ndim >= 2 else default)
  widths = tuple(widths)
  try:
    expected = {k: tuple(v.shape) for k, v in _flat(spec.abstract_variables(widths)).items()}
  except Exception as e:  # inconsistent widths make the model itself fail to build
    raise CheckpointError(f'checkpoint widths {widths} do not fit {spec.name}: {e}') from e

  missing = sorted(p for p in expected if p not in flat)
  unexpected += sorted(f'{torch_of[p]} (-> {p})' for p in flat if p not in expected)
  misshaped = sorted(
      f'{torch_of[p]} -> {p}: file {tuple(flat[p].shape)} vs model {tuple(expected[p])}'
      for p in flat if p in expected and tuple(flat[p].shape) != tuple(expected[p])
  )
  if missing or unexpected or misshaped:
    lines = [f'checkpoint does not match architecture {spec.name!r}:']
    for title, items in (('missing', missing), ('unexpected', sorted(unexpected)),
                         ('mis-shaped', misshaped)):
      if items:
        shown = items[:20] + ([f'... and {len(items) - 20} more'] if len(items) > 20 else [])
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(shown))
    raise CheckpointError('\n'.join(lines))
  for p, v in flat.items():
    if not np.all(np.isfinite(v)):
      raise CheckpointError(f'{torch_of[p]} (-> {p}) contains NaN or Inf values')
  return _nest(flat)


def to_torch(variables: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, np.ndarray]:
  """Flax variables -> a PyTorch state dict (the inverse of :func:`to_variables`' layouts).

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` (NumPy or JAX arrays).
    names: Flax module path ('layer1_0/conv1') -> torch module name ('layer1.0.conv1') for every
      module holding variables; a module missing here is an error.

  Returns:
    An ordered dict of float32 arrays (conv HWIO -> OIHW, dense (in, out) -> (out, in), BN scale /
    bias / mean / var -> weight / bias / running_mean / running_var, plus an int64
    ``num_batches_tracked`` of 0 per BatchNorm, as ``torch.nn.BatchNorm*`` expects).
  """
  params = _flat(variables.get('params', {}))
  stats = _flat(variables.get('batch_stats', {}))
  modules: dict[str, dict[str, np.ndarray]] = {}
  for path, v in params.items():
    mod, _, leaf = path.rpartition('/')
    modules.setdefault(mod, {})[leaf] = np.asarray(v, np.float32)
  bn_mods = set()
  for path, v in stats.items():
    mod, _, leaf = path.rpartition('/')
    modules.setdefault(mod, {})[leaf] = np.asarray(v, np.float32)
    bn_mods.add(mod)
  missing = sorted(m for m in modules if m not in names)
  if missing:
    raise CheckpointError(f'no torch name for Flax modules {missing}')
  out: dict[str, np.ndarray] = {}
  for mod in sorted(modules, key=lambda m: _torch_order(names[m])):
    leaves = modules[mod]
    t = names[mod]
    if mod in bn_mods:
      for f, tl in (('scale', 'weight'), ('bias', 'bias'), ('mean', 'running_mean'),
                    ('var', 'running_var')):
        out[f'{t}.{tl}'] = np.ascontiguousarray(leaves[f])
      out[f'{t}.num_batches_tracked'] = np.zeros((), np.int64)
      continue
    k = leaves['kernel']
    if k.ndim == 4:
      out[f'{t}.weight'] = np.ascontiguousarray(k.transpose(3, 2, 0, 1))
    elif k.ndim == 2:
      out[f'{t}.weight'] = np.ascontiguousarray(k.T)
    else:
      raise CheckpointError(f'{mod}: kernel of rank {k.ndim} has no torch layout here')
    if 'bias' in leaves:
      out[f'{t}.bias'] = np.ascontiguousarray(leaves['bias'])
  return out


def _torch_order(name: str) -> tuple:
  """Sort key: numeric parts numerically (features.10 after features.9)."""
  return tuple((0, int(p), '') if p.isdigit() else (1, 0, p) for p in name.split('.'))

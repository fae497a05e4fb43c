"""Conversion parity: PyTorch reference logits == Flax logits of the converted weights.

Each architecture family gets an independent PyTorch model (tests/torch_reference.py) with random
weights and random BN statistics. Its state dict is written in every form users bring (legacy
and zip ``torch.save``, ``{'state_dict': ...}`` / ``{'model': ...}`` containers, ``module.``
prefixes, with and without ``num_batches_tracked``, safetensors, npz), read back with
``converters.load_variables`` and run through ``spec.build(widths).apply``. The inputs exercise
stride-2 padding on odd sizes, option-A and option-B shortcuts, VGG max-pools, the CIFAR VGG
classifier BN and torchvision's adaptive average pool.
"""

from __future__ import annotations

import collections
import pathlib

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')

import converters  # noqa: E402
import torch_reference as tr  # noqa: E402
from lbyl_jax.models import archs  # noqa: E402
from lbyl_jax.io import checkpoint  # noqa: E402
from lbyl_jax.core import trees  # noqa: E402
from lbyl_jax.core import units  # noqa: E402

RTOL = 1e-4

# Forms a state dict is written in. Each builds the object to save from the reference model.
ALL_FORMS = ('legacy', 'zip', 'legacy_akamaster', 'zip_model_module', 'safetensors', 'npz')

# case: (arch, input side, pruned widths or None, forms)
CASES: dict[str, tuple[str, int, tuple[int, ...] | None, tuple[str, ...]]] = {
    # Every serialization on the two smallest nets; the others check the architecture mapping.
    'lenet_300_100': ('lenet_300_100', 28, None, ALL_FORMS + ('flax_npz',)),
    'lenet_300_100_pruned': ('lenet_300_100', 28, (211, 37), ('zip',)),
    'resnet20': ('resnet20', 32, None, ALL_FORMS + ('flax_npz',)),
    'resnet20_pruned': ('resnet20', 32, (5, 16, 9, 32, 11, 20, 64, 3, 40), ('legacy_akamaster',)),
    'resnet20_b': ('resnet20_b', 32, None, ALL_FORMS),
    'vgg16_bn_cifar': ('vgg16_bn_cifar', 32, None, ('zip', 'legacy_akamaster', 'zip_features')),
    'vgg16_bn_cifar_pruned': (
        'vgg16_bn_cifar', 32, (32, 64, 100, 128, 200, 256, 77, 300, 512, 64, 512, 100, 37), ('npz',)),
    # Odd intermediate sizes (72 -> 36 -> 18 -> 9 -> 5 -> 3): stride-2 padding must match torch.
    'resnet18': ('resnet18', 72, None, ('zip', 'safetensors')),
    'resnet50': ('resnet50', 72, None, ('legacy_akamaster',)),
    # torchvision vgg16_bn at pruned conv widths (full fc2/fc3): 80 -> 2x2 after five max-pools,
    # so the adaptive pool to 7x7 uses overlapping bins, and fc1 reads 49 positions per channel.
    'vgg16_bn_pruned': (
        'vgg16_bn', 80, (8, 8, 16, 16, 16, 16, 16, 32, 32, 32, 24, 24, 12), ('zip',)),
}


def _strip_counters(sd):
  return collections.OrderedDict((k, v) for k, v in sd.items() if not k.endswith('num_batches_tracked'))


def _write(form: str, model, path: pathlib.Path, flax_vars=None) -> None:
  sd = tr.state_dict(model)
  if form == 'legacy':
    torch.save(sd, path, _use_new_zipfile_serialization=False)
  elif form == 'zip':
    torch.save(sd, path)
  elif form == 'legacy_akamaster':
    # akamaster's files: DataParallel 'module.' names, no BN counters, a metric beside them.
    wrapped = _strip_counters(tr.DataParallelNames(model).state_dict())
    torch.save({'best_prec1': 91.5, 'state_dict': wrapped}, path, _use_new_zipfile_serialization=False)
  elif form == 'zip_model_module':
    wrapped = tr.DataParallelNames(model).state_dict()
    torch.save({'epoch': 3, 'model': wrapped, 'optimizer': {'lr': 0.1}}, path)
  elif form == 'zip_features':
    # The CIFAR VGG under the other common attribute name ('features' instead of 'feature').
    other = tr.CifarVGG(widths=None, feature_attr='features')
    renamed = collections.OrderedDict(
        (k.replace('feature.', 'features.', 1), v) for k, v in sd.items())
    other.load_state_dict(renamed)  # proves the renamed keys are exactly that model's keys
    torch.save(other.state_dict(), path)
  elif form == 'safetensors':
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  elif form == 'npz':
    np.savez(path, **{k: v.numpy() for k, v in sd.items()})
  elif form == 'flax_npz':
    flat = trees.flatten(flax_vars)
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})
  else:
    raise ValueError(form)


class _Reference:
  """A random PyTorch model of one case, its logits on a fixed input, and the Flax input."""

  def __init__(self, case: str, seed: int):
    arch, side, widths, _ = CASES[case]
    self.spec = archs.get(arch)
    self.widths = widths
    self.model = tr.randomize(tr.build(arch, widths), seed=seed)
    channels = self.spec.input_shape[2]
    x = np.random.default_rng(seed).standard_normal((2, channels, side, side)).astype(np.float32)
    with torch.no_grad():
      self.logits = self.model(torch.from_numpy(x)).numpy().astype(np.float64)
    self.x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    # One compile per case, reused by every form (a jitted apply compiles faster than the
    # op-by-op compiles of an eager one).
    self.apply = jax.jit(self.spec.build(widths).apply)


@pytest.fixture(scope='module')
def references():
  cache: dict[str, _Reference] = {}

  def get(case: str) -> _Reference:
    if case not in cache:
      cache[case] = _Reference(case, seed=len(cache) + 1)
    return cache[case]

  return get


def _suffix(form: str) -> str:
  return {'safetensors': '.safetensors', 'npz': '.npz', 'flax_npz': '.npz'}.get(
      form, '.th' if form.startswith('legacy') else '.pth')


def _rel_err(out, ref) -> float:
  return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize(
    'case,form', [(c, f) for c, (_, _, _, forms) in CASES.items() for f in forms])
def test_logits_match_torch(references, tmp_path, case, form):
  ref = references(case)
  flax_vars = None
  if form == 'flax_npz':  # re-read what the converter produced from the plain zip file
    _write('zip', ref.model, tmp_path / 'src.pth')
    flax_vars = converters.load_variables(tmp_path / 'src.pth', ref.spec)
  path = tmp_path / f'weights{_suffix(form)}'
  _write(form, ref.model, path, flax_vars)

  variables = converters.load_variables(path, ref.spec)

  widths = units.widths_of(variables, ref.spec.units)
  assert widths == (ref.widths or ref.spec.default_widths())
  assert checkpoint.shape_mismatches(ref.spec, variables, ref.widths) == []
  assert all(np.asarray(v).dtype == np.float32 for v in trees.flatten(variables).values())
  out = ref.apply(variables, ref.x_nhwc)
  assert out.shape == ref.logits.shape
  err = _rel_err(out, ref.logits)
  assert err <= RTOL, f'{case} ({form}): relative logit error {err:.2e}'


def test_parity_detects_a_wrong_mapping(references, tmp_path):
  """The tolerance is meaningful: a spatially flipped kernel (convolution instead of torch's
  cross-correlation) in one layer breaks parity by far more than RTOL."""
  ref = references('resnet20')
  path = tmp_path / 'w.pth'
  _write('zip', ref.model, path)
  variables = converters.load_variables(path, ref.spec)
  conv = variables['params']['layer2_0']['conv1']
  conv['kernel'] = conv['kernel'][::-1, ::-1]
  out = np.asarray(ref.apply(variables, ref.x_nhwc))
  assert np.all(np.isfinite(out))
  assert _rel_err(out, ref.logits) > 100 * RTOL


@pytest.mark.parametrize('arch', ['resnet101'])
def test_deep_resnet_loads_with_exact_shapes(tmp_path, arch):
  """A deep bottleneck net loads completely (fp16 storages, no weights materialized in torch)."""
  with torch.device('meta'):
    model = tr.build(arch)
  sd = collections.OrderedDict(
      (k, torch.zeros(v.shape, dtype=torch.float16 if v.is_floating_point() else v.dtype))
      for k, v in model.state_dict().items())
  path = tmp_path / f'{arch}.pth'
  torch.save(sd, path)
  spec = archs.get(arch)

  variables = converters.load_variables(path, spec)

  assert checkpoint.shape_mismatches(spec, variables) == []
  flat = trees.flatten(variables)
  n_torch = sum(v.numel() for k, v in sd.items() if not k.endswith('num_batches_tracked'))
  assert sum(np.size(v) for v in flat.values()) == n_torch
  assert all(np.asarray(v).dtype == np.float32 for v in flat.values())


# --------------------------------------------------------------------------------------------
# The real checkpoints in ../shared, on real test images.

REAL = {
    'resnet20': ('resnet20-12fca82f.th', 'cifar10_test.npz'),
    'resnet56_b': ('nm_resnet56.cifar10.pth.tar', 'cifar10_test.npz'),
    'lenet_300_100': ('lbyl_lenet_300_100.fashionmnist.pth.tar', 'fashion_mnist_test.npz'),
}


@pytest.mark.realdata
@pytest.mark.parametrize('arch', sorted(REAL))
def test_real_weights_match_torch(shared, arch):
  """The published files: torch.load into the independent reference (strict names) vs the
  torch-free conversion, on the first 32 test images."""
  weights, data = REAL[arch]
  spec = archs.get(arch)
  obj = torch.load(shared / 'weights' / weights, map_location='cpu', weights_only=True)
  sd = {k.removeprefix('module.'): v for k, v in obj['state_dict'].items()}
  model = tr.build(arch)
  model.load_state_dict(sd, strict=True)
  model.eval()
  with np.load(shared / 'data' / data) as z:
    images = z['images'][:32]
  x = np.asarray(archs.normalize_fn(spec)(images), np.float32)  # NHWC
  with torch.no_grad():
    ref = model(torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))).numpy()

  variables = converters.load_variables(shared / 'weights' / weights, spec)

  out = jax.jit(spec.build().apply)(variables, x)
  err = _rel_err(out, ref.astype(np.float64))
  assert err <= RTOL, f'{arch}: relative logit error {err:.2e}'

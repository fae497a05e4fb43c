"""MobileNetV2 (lbyl_jax/models/mobilenet.py, the presets of lbyl_jax/models/archs.py): widths from
a state dict, discovered units, conversion parity against the PyTorch reference of
tests/torch_reference.py (random weights, irregular widths), the depthwise conv, the 32 -> 224
input pipeline against torch's F.interpolate, and the real CIFAR-10 files of ../shared.
"""

from __future__ import annotations

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional

import converters  # noqa: E402
import torch_reference as tr  # noqa: E402
from lbyl_jax.core import units  # noqa: E402
from lbyl_jax.evaluation import Evaluator  # noqa: E402
from lbyl_jax.io import data as data_lib  # noqa: E402
from lbyl_jax.models import archs, mobilenet  # noqa: E402
from lbyl_jax.models import resize as resize_lib  # noqa: E402
from lbyl_jax.pruning import stats  # noqa: E402

RTOL = 1e-5

# Irregular widths: blocks 3, 5, 6, 8-10, 12, 13, 15, 16 get residuals (stride 1, equal widths),
# block 11 changes width at stride 1 (no residual), like the shared checkpoint but smaller.
IRREGULAR = dict(
    stem=7,
    expand=(13, 17, 17, 23, 19, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71),
    out=(5, 9, 9, 6, 6, 6, 11, 11, 11, 11, 14, 14, 14, 17, 17, 17, 21),
    last=33, num_classes=10)


def _torch_model(fields, seed):
  model = tr.TVMobileNetV2(fields['stem'], fields['expand'], fields['out'], fields['last'],
                           fields['num_classes'])
  return tr.randomize(model, seed=seed)


def _rel_err(out, ref) -> float:
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


class _Case:
  """A random torch MobileNetV2, its state dict file, its logits on a fixed input."""

  def __init__(self, fields, seed, side, tmp_dir):
    self.fields = fields
    self.model = _torch_model(fields, seed)
    x = np.random.default_rng(seed).standard_normal((2, 3, side, side)).astype(np.float32)
    with torch.no_grad():
      self.logits = self.model(torch.from_numpy(x)).numpy()
    self.x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    self.path = tmp_dir / f'mnv2_{seed}.pth'
    torch.save(self.model.state_dict(), self.path)


@pytest.fixture(scope='module')
def irregular(tmp_path_factory):
  # 72 -> 36 -> 18 -> 9 -> 5 -> 3: odd sizes at every later stride-2 depthwise conv.
  return _Case(IRREGULAR, seed=3, side=72, tmp_dir=tmp_path_factory.mktemp('mnv2'))


@pytest.fixture(scope='module')
def irregular_spec(irregular):
  sd = converters.read_state_dict(irregular.path)
  return archs.mobilenet_v2_spec_from_state_dict(sd, name='mnv2_irregular',
                                                 input_shape=(72, 72, 3))


# --------------------------------------------------------------------------------------------
# Widths and units.


def test_fields_from_state_dict_reads_every_width(irregular):
  sd = converters.read_state_dict(irregular.path)
  assert mobilenet.fields_from_state_dict(sd) == IRREGULAR


def test_fields_from_state_dict_names_the_bad_entry(irregular):
  sd = dict(converters.read_state_dict(irregular.path))
  broken = dict(sd)
  del broken['features.18.0.weight']
  with pytest.raises(ValueError, match=r"features\.18\.0\.weight"):
    mobilenet.fields_from_state_dict(broken)
  broken = dict(sd)
  broken['features.5.conv.1.0.weight'] = np.zeros((22, 1, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r'features\.5\.conv\.1\.0\.weight has shape'):
    mobilenet.fields_from_state_dict(broken)


def test_units_and_blocks_follow_torchvision():
  """Discovery finds the 16 expanded-channel units, each with its depthwise conv + BN as through
  layers and the projection as consumer; nothing else is pruned (the 'compensable' policy)."""
  spec = archs.get('mobilenet_v2_cifar10')
  blocks = spec.model.blocks()
  assert [b.index for b in blocks if b.residual] == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
  assert [b.index for b in blocks if b.stride == 2] == [2, 4, 7, 14]
  assert len(spec.units) == 16
  assert [u.producer for u in spec.units] == [f'features_{i}/conv_0_0' for i in range(2, 18)]
  u = spec.units[0]
  (con,) = u.consumers
  assert (u.producer, u.bn, u.activation, u.through_activation, u.compensation) == (
      'features_2/conv_0_0', 'features_2/conv_0_1', 'relu6', 'relu6', 'depthwise')
  assert (con.path, con.bn) == ('features_2/conv_2', 'features_2/conv_3')
  assert [(t.path, t.kind) for t in con.through] == [('features_2/conv_1_0', 'depthwise'),
                                                     ('features_2/conv_1_1', 'bn')]
  assert all(u.compensation == 'depthwise' for u in spec.units)
  # Projections, the stem and features.18 are left out, each with its rule.
  rules = {e.unit.name: e.rule for e in spec.discovery.excluded}
  assert rules['features_18/conv'].startswith('compensable')
  assert spec.default_widths() == archs.MOBILENET_V2_CIFAR10['expand']
  small = spec.build((20,) * 16)
  shapes = jax.eval_shape(lambda: small.init(jax.random.PRNGKey(0), spec.dummy_input()))
  assert shapes['params']['features_9']['conv_1_0']['kernel'].shape == (3, 3, 1, 20)
  assert shapes['params']['features_9']['conv_2']['kernel'].shape == (1, 1, 20, 23)


def test_torchvision_preset_size():
  """torchvision mobilenet_v2: 3,504,872 parameters and about 300.8 M MACs at 224x224."""
  spec = archs.get('mobilenet_v2')
  variables = spec.abstract_variables()
  assert stats.param_count(variables) == 3504872
  assert spec.discovery.macs(variables) == 300774272
  ref = tr.TVMobileNetV2(**{k: v for k, v in mobilenet.torchvision_widths().items()})
  assert sum(p.numel() for p in ref.parameters()) == 3504872


# --------------------------------------------------------------------------------------------
# Depthwise conv.


@pytest.mark.parametrize('stride,side', [(1, 9), (2, 9), (2, 10)])
def test_depthwise_conv_equals_grouped_conv(stride, side):
  x = jnp.asarray(np.random.default_rng(side).standard_normal((2, side, side, 6)), jnp.float32)
  dw = mobilenet.DepthwiseConv(6, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                               use_bias=False, feature_group_count=6)
  params = dw.init(jax.random.PRNGKey(0), x)
  ref = nn.Conv(6, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=False,
                feature_group_count=6)
  out = dw.apply(params, x)
  expected = ref.apply(params, x)
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Conversion parity.


@pytest.mark.parametrize('form', ['zip', 'legacy', 'module_prefix'])
def test_logits_match_torch_irregular_widths(irregular, irregular_spec, tmp_path, form):
  sd = tr.state_dict(irregular.model, module_prefix=form == 'module_prefix')
  path = tmp_path / 'w.pth'
  torch.save(sd, path, _use_new_zipfile_serialization=form != 'legacy')
  variables = converters.load_variables(path, irregular_spec)
  assert units.widths_of(variables, irregular_spec.units) == IRREGULAR['expand']
  out = jax.jit(irregular_spec.build().apply)(variables, irregular.x)
  err = _rel_err(out, irregular.logits)
  assert err <= RTOL, f'{form}: relative logit error {err:.2e}'


def test_preset_loads_a_pruned_checkpoint_and_matches_torch(tmp_path):
  """A checkpoint whose expanded widths are smaller than the preset's loads into the preset
  (widths read off the file) and reproduces the torch logits."""
  fields = dict(archs.MOBILENET_V2_CIFAR10, expand=(30, 40, 41, 60, 52, 70, 100, 120, 90, 142,
                                                    150, 200, 213, 300, 250, 355))
  case = _Case(fields, seed=5, side=40, tmp_dir=tmp_path)
  spec = archs.get('mobilenet_v2_cifar10')
  variables = converters.load_variables(case.path, spec)
  widths = units.widths_of(variables, spec.units)
  assert widths == fields['expand']
  out = jax.jit(spec.build(widths).apply)(variables, case.x)
  assert _rel_err(out, case.logits) <= RTOL


def test_parity_detects_a_wrong_mapping(irregular, irregular_spec):
  """Flipping one depthwise kernel (a plausible layout error) breaks parity far above RTOL."""
  variables = converters.load_variables(irregular.path, irregular_spec)
  blk = variables['params']['features_9']
  blk['conv_1_0']['kernel'] = blk['conv_1_0']['kernel'][::-1, ::-1]
  out = np.asarray(jax.jit(irregular_spec.build().apply)(variables, irregular.x))
  assert np.all(np.isfinite(out))
  assert _rel_err(out, irregular.logits) > 100 * RTOL


def test_wrong_widths_for_the_preset_are_refused(irregular):
  spec = archs.get('mobilenet_v2_cifar10')
  with pytest.raises(converters.CheckpointError, match='mobilenet_v2_cifar10'):
    converters.load_variables(irregular.path, spec)


def test_torch_names_round_trip(irregular, irregular_spec):
  """lbyl_jax.io.export.torch_names inverts the converter's MobileNetV2 name rules."""
  from lbyl_jax.io import export

  variables = converters.load_variables(irregular.path, irregular_spec)
  names = export.torch_names(irregular_spec, variables)
  sd_modules = {k.rsplit('.', 1)[0] for k in tr.TVMobileNetV2(**IRREGULAR).state_dict()}
  assert set(names.values()) == sd_modules
  assert names['features_2/conv_1_0'] == 'features.2.conv.1.0'
  assert names['features_1/conv_2'] == 'features.1.conv.2'
  assert names['features_18/bn'] == 'features.18.1'
  assert names['classifier_1'] == 'classifier.1'


# --------------------------------------------------------------------------------------------
# Input pipeline.


def _torch_resize(images_nhwc: np.ndarray, size) -> np.ndarray:
  x = torch.from_numpy(images_nhwc.astype(np.float32).transpose(0, 3, 1, 2))
  y = F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=False)
  return y.numpy().transpose(0, 2, 3, 1)


@functools.cache
def _cifar_like(n=6, side=32, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_upsampling_32_to_224_matches_torch_after_rounding():
  images = _cifar_like()
  ours = np.asarray(jax.jit(lambda x: jnp.round(
      resize_lib.resize_bilinear(x.astype(jnp.float32), (224, 224))))(images))
  ref = np.round(_torch_resize(images, (224, 224)))
  np.testing.assert_array_equal(ours, ref)
  # Extreme pixels survive, so the resize is not clipping or rescaling.
  assert ours.min() == images.min() and ours.max() == images.max()


@pytest.mark.parametrize('src,dst', [((32, 32), (50, 37)), ((17, 9), (40, 40)), ((32, 32), (20, 11))])
def test_resize_matches_torch_interpolate_other_sizes(src, dst):
  images = np.random.default_rng(1).integers(0, 256, (2, *src, 3), dtype=np.uint8)
  ours = np.asarray(resize_lib.resize_bilinear(jnp.asarray(images, jnp.float32), dst))
  # torch computes the source coordinates in float32 (ours in float64): a relative error of about
  # 1e-6 in the weights, times pixel differences up to 255.
  np.testing.assert_allclose(ours, _torch_resize(images, dst), rtol=0, atol=2e-3)
  # A wrong convention (align_corners=True) is far outside that tolerance.
  x = torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2))
  other = F.interpolate(x, size=dst, mode='bilinear', align_corners=True).numpy().transpose(0, 2, 3, 1)
  assert np.max(np.abs(ours - other)) > 1.0


def test_preset_preprocess_is_resize_round_normalize():
  spec = archs.get('mobilenet_v2_cifar10')
  images = _cifar_like()
  x = np.asarray(jax.jit(archs.normalize_fn(spec))(images))
  ref = np.round(_torch_resize(images, (224, 224))) / 255.0
  ref = (ref - np.asarray(archs.IMAGENET_MEAN)) / np.asarray(archs.IMAGENET_STD)
  assert x.shape == (6, 224, 224, 3)
  np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5)


def test_spec_refuses_a_data_shape_without_resize():
  with pytest.raises(ValueError, match='resize'):
    archs.mobilenet_v2_spec('bad', archs.MOBILENET_V2_CIFAR10, data_shape=(32, 32, 3))
  with pytest.raises(ValueError, match='resize must be one of'):
    archs.mobilenet_v2_spec('bad', archs.MOBILENET_V2_CIFAR10, data_shape=(32, 32, 3),
                            resize='nearest')


def test_evaluator_takes_cifar_images_and_refuses_other_sizes():
  spec = archs.get('mobilenet_v2_cifar10')
  assert spec.accepts_image_shape((32, 32, 3)) and spec.accepts_image_shape((224, 224, 3))
  assert not spec.accepts_image_shape((28, 28, 3))
  ev = Evaluator(spec, batch_size=4)
  variables = spec.init(0)
  labels = np.arange(4, dtype=np.int32)
  ok = data_lib.ArrayDataset(_cifar_like(4), labels, name='tiny')
  report = ev.evaluate(variables, ok, progress=False)
  assert report['n'] == 4
  bad = data_lib.ArrayDataset(np.zeros((4, 28, 28, 3), np.uint8), labels, name='bad')
  with pytest.raises(ValueError, match=r'\(28, 28, 3\).*\(32, 32, 3\)'):
    ev.evaluate(variables, bad, progress=False)


def test_state_dict_helper_matches_torch_keys():
  """The reference's state dict is torchvision's key set (what the name rules are written for)."""
  keys = set(tr.TVMobileNetV2(**IRREGULAR).state_dict())
  assert 'features.1.conv.0.0.weight' in keys and 'features.1.conv.2.running_var' in keys
  assert 'features.2.conv.1.0.weight' in keys and 'features.2.conv.3.weight' in keys
  assert 'features.18.1.running_mean' in keys and 'classifier.1.bias' in keys
  assert isinstance(tr.state_dict(tr.TVMobileNetV2(**IRREGULAR)), collections.OrderedDict)


# --------------------------------------------------------------------------------------------
# The real checkpoint (../shared).

STATE_DICT = 'mobilenet_v2_pruned.cifar10_224.state_dict.pt'
WHOLE_MODULE = 'mobilenet_v2_pruned.cifar10_224.pth'


@functools.cache
def _real(shared):
  spec = archs.get('mobilenet_v2_cifar10')
  return spec, converters.load_variables(shared / 'weights' / STATE_DICT, spec)


@functools.cache
def _cifar(shared):
  return data_lib.load_dataset(str(shared / 'data' / 'cifar10_test.npz'))


@pytest.mark.realdata
def test_real_state_dict_matches_torch_reference(shared):
  """The shared file in the independent torch model (strict names) vs the torch-free conversion,
  on 8 real test images through the whole 32 -> 224 pipeline."""
  spec, variables = _real(shared)
  obj = torch.load(shared / 'weights' / STATE_DICT, map_location='cpu', weights_only=True)
  sd = converters.read_state_dict(shared / 'weights' / STATE_DICT)
  assert mobilenet.fields_from_state_dict(sd) == archs.MOBILENET_V2_CIFAR10
  model = tr.TVMobileNetV2(**archs.MOBILENET_V2_CIFAR10)
  model.load_state_dict(obj, strict=True)
  model.eval()
  images = _cifar(shared).images[:8]
  x = np.asarray(jax.jit(archs.normalize_fn(spec))(images), np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  out = jax.jit(spec.build().apply)(variables, x)
  assert _rel_err(out, ref) <= RTOL


def _check_full_accuracy(spec, variables, shared):
  report = Evaluator(spec, batch_size=50).evaluate(variables, _cifar(shared), progress=False)
  assert report['n'] == 10000
  assert abs(report['top1'] - 91.61) <= 0.05, report
  return report


@pytest.mark.realdata
@pytest.mark.slow
def test_real_state_dict_reproduces_9161(shared):
  """The published 91.61 % on the full CIFAR-10 test set (a few minutes on 2 CPU cores)."""
  spec, variables = _real(shared)
  _check_full_accuracy(spec, variables, shared)


@pytest.mark.realdata
def test_real_whole_module_pickle_reproduces_9161(shared):
  """The whole pickled nn.Module: read without importing or running torchvision's classes; the
  same tensors as the state dict and bit-identical Flax variables, hence the same 91.61 (the
  evaluation itself is the test above; it is not run twice)."""
  path = shared / 'weights' / WHOLE_MODULE
  sd = converters.read_state_dict(path)
  spec = archs.get('mobilenet_v2_cifar10')
  assert mobilenet.fields_from_state_dict(sd) == archs.MOBILENET_V2_CIFAR10
  ref_sd = converters.read_state_dict(shared / 'weights' / STATE_DICT)
  assert sorted(sd) == sorted(ref_sd)
  for k, v in ref_sd.items():
    np.testing.assert_array_equal(sd[k], v, err_msg=k)
  variables = converters.load_variables(path, spec)
  _, ref_variables = _real(shared)
  flat, ref_flat = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(ref_variables)
  assert sorted(flat) == sorted(ref_flat)
  for k, v in ref_flat.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg='/'.join(k))


def test_results_section_renders_the_selected_rows():
  """benchmarks/report.py's MobileNetV2 section reads the probe's rows: the dev selection picks
  which rows are shown; nothing is shown before the probe has run."""
  from benchmarks import report

  arch = 'mobilenet_v2_cifar10'
  chosen = {'prune': {'bias_correction': 'on'}, 'nm': {'nm_lam': 0.85},
            'lbyl': {'lambda1': 0.01, 'lambda2': 0.01}, 'bnm': {'spatial': 'calibrated'}}
  rows = [dict(arch=arch, method='unpruned', split='full', top1=91.61, top1_heldout=91.5)]
  assert report.mobilenet_section(rows) == []
  rows.append(dict(arch=arch, method='selection', chosen=chosen, select_ratios=[0.2, 0.4]))
  for i, (m, opts) in enumerate(chosen.items()):
    rows.append(dict(arch=arch, method=m, ratio=0.3, split='full', top1=50.0 + i,
                     top1_heldout=40.0 + i, options=[list(p) for p in sorted(opts.items())]))
  rows.append(dict(arch=arch, method='bnm', ratio=0.1, split='full', top1=1.0, top1_heldout=1.0,
                   options=[['spatial', 'independent']]))  # not the selected option: not shown
  text = '\n'.join(report.mobilenet_section(rows))
  assert '| bnm | spatial=calibrated | - | - | 43.00 / 53.00 | - | - |' in text
  assert '| prune | bias_correction=on | - | - | 40.00 / 50.00 |' in text
  assert 'unpruned 91.61' in text


def test_probe_options_are_plan_options():
  """The probe's row options (bnm's 'spatial') translate to valid compress options."""
  from benchmarks.probes import mobilenet_v2 as probe
  from lbyl_jax.plan import Plan

  plan = Plan.from_options(method='bnm', **probe._plan_options(  # pylint: disable=protected-access
      {'spatial': 'independent', 'bias_correction': 'off'}))
  assert plan.method.bnm_spatial == 'independent'
  assert plan.method.depthwise_options(archs.get('mobilenet_v2_cifar10'))['spatial'] == 'independent'

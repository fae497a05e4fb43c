"""Coverage: every weight quantizer and activation quantization through ``lbyl_jax.compress`` on
one model of every family (a CIFAR ResNet, an ImageNet ResNet, the CIFAR VGG, LeNet-300-100,
MobileNetV2 and a user Flax CNN), random weights. Each result must give finite logits, save, and
reload with ``lbyl_jax.load`` to the same logits (with activation quantization, also its StableHLO
export); the combinations a method cannot handle are
refused with an error naming the reason.

Speed: random-init weights shared per module, 2 images, ``method='prune'`` (the compensation
methods have their own tests); resnet18 and MobileNetV2 run at their 224x224 input, the smallest
members of their families.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lbyl_jax
from lbyl_jax import quant
from lbyl_jax.io import export as export_lib
from lbyl_jax.models import archs
from lbyl_jax.quant import actquant

QUANTIZERS = tuple(quant.names())
ARCHS = ('resnet20', 'resnet18', 'vgg16_bn_cifar', 'lenet_300_100', 'mobilenet_v2_cifar10',
         'custom')
# (family, quantizer) -> the refusal. None left: DFQ and UDFC handle MobileNetV2's depthwise units
# (tests/test_quant_depthwise.py), DF-MPC those and user models (tests/test_dfmpc_through.py).
REFUSED: dict[tuple[str, str], str] = {}
# The BN range rule covers every preset family and user models (lbyl_jax.quant.act_graph).
BN_RULE_REFUSED = ()


class SmallCNN(nn.Module):
  """The README's user model."""

  width: int = 32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for _ in range(2):
      x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope='module')
def models():
  """name -> (compress's leading arguments, variables, images, load kwargs), built on first use."""
  cache: dict[str, tuple] = {}

  def get(name: str):
    if name not in cache:
      if name == 'custom':
        module = SmallCNN()
        v = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
        v = jax.tree_util.tree_map(np.asarray, v)
        head, shape, load_kw = (module,), (32, 32, 3), dict(module=module)
      else:
        spec = archs.get(name)
        v = jax.tree_util.tree_map(np.asarray, spec.init(jax.random.PRNGKey(0)))
        head, shape, load_kw = (name,), spec.image_shape, {}
      images = np.random.default_rng(0).integers(0, 256, size=(2, *shape), dtype=np.uint8)
      cache[name] = (head, v, images, load_kw)
    return cache[name]

  return get


def _compress(models, name, **options):
  head, v, _, _ = models(name)
  extra = dict(example_shape=(1, 32, 32, 3)) if name == 'custom' else {}
  return lbyl_jax.compress(*head, v, **extra, method='prune', ratio=0.5, **options)


def _check_reload(models, name, result, tmp_path):
  _, _, images, load_kw = models(name)
  logits = np.asarray(result.apply(images))
  assert logits.shape[0] == images.shape[0] and np.all(np.isfinite(logits))
  loaded = lbyl_jax.load(result.save(tmp_path / 'run'), **load_kw)
  np.testing.assert_array_equal(np.asarray(loaded.apply(images)), logits)
  return loaded, logits


@pytest.mark.parametrize('name', ARCHS)
@pytest.mark.parametrize('method', QUANTIZERS)
def test_every_quantizer_on_every_family(models, tmp_path, name, method):
  if (name, method) in REFUSED:
    with pytest.raises(ValueError, match=REFUSED[name, method]):
      _compress(models, name, quant_method=method, bits=4)
    return
  result = _compress(models, name, quant_method=method, bits=4)
  assert result.report['quant_method'] == method and result.report['weight_bits'] == 4
  loaded, _ = _check_reload(models, name, result, tmp_path)
  assert loaded.meta['format'] == 'quantized'


@pytest.mark.parametrize('name', ARCHS)
def test_act_bits_on_every_family(models, tmp_path, name):
  if name in BN_RULE_REFUSED:
    with pytest.raises(ValueError, match='--act-ranges calibration'):
      _compress(models, name, act_bits=4)
    # observed ranges run on every model: here on the (random) images themselves
    result = _compress(models, name, act_bits=4, act_ranges='calibration',
                       calib_images=models(name)[2])
    assert result.report['act_quant']['data_free'] is False
  else:
    result = _compress(models, name, act_bits=4)
    assert result.report['act_quant']['source'] == 'bn'
  loaded, logits = _check_reload(models, name, result, tmp_path)
  assert isinstance(loaded, actquant.ActLoaded) and loaded.act[1] == 4
  _, v, images, _ = models(name)
  plain = np.asarray(result.model.apply(result.variables,
                                        archs.normalize_fn(result.spec)(images)))
  assert not np.array_equal(plain, logits)  # the activations were quantized
  # the reloaded checkpoint exports with its ranges: StableHLO logits = the act-quant forward
  exp = export_lib.load_stablehlo(loaded.export_files('stablehlo')[export_lib.STABLEHLO_FILE])
  np.testing.assert_array_equal(np.asarray(exp.call(images)), logits)


@pytest.mark.parametrize('method', QUANTIZERS)
def test_act_bits_with_every_quantizer(models, tmp_path, method):
  result = _compress(models, 'resnet20', quant_method=method, bits=4, act_bits=4)
  assert result.report['act_quant']['bits'] == 4 and result.report['quant_method'] == method
  _check_reload(models, 'resnet20', result, tmp_path)


def test_distilled_act_ranges_short(models, tmp_path, monkeypatch):
  real = actquant.distilled_ranges

  def short(spec, variables):  # the real distillation with 2 inputs and 2 steps (speed)
    return real(spec, variables, n=2, steps=2, batch_size=2)

  monkeypatch.setattr(actquant, 'distilled_ranges', short)
  for name in ('resnet20', 'custom'):
    result = _compress(models, name, act_bits=4, act_ranges='distilled')
    assert result.report['act_quant']['source'] == 'distilled'
    assert result.report['act_quant']['data_free'] is True
    _check_reload(models, name, result, tmp_path / name)


@pytest.mark.parametrize('method', ['dfq', 'udfc'])
@pytest.mark.parametrize('ratio', [0.0, 0.3])
def test_dfq_udfc_on_mobilenet_v2(models, tmp_path, method, ratio):
  """DFQ / UDFC-style on MobileNetV2's depthwise units, unpruned and after LBYL 30 %; UDFC with
  LBYL takes the joint path (the depthwise composite delivery on the deployed kept channels)."""
  head, v, _, _ = models('mobilenet_v2_cifar10')
  options = dict(method='lbyl' if ratio else 'prune', ratio=ratio, quant_method=method, bits=4)
  result = lbyl_jax.compress(*head, v, **options)
  assert result.report['quant_method'] == method and result.report['ratio'] == ratio
  if method == 'udfc' and ratio:
    units = result.report['quant_report']['units']
    pruned = [n for n, u in units.items() if u['pruned']]
    assert pruned and all(units[n]['delivery'] == 'depthwise_composite' for n in pruned)
  _check_reload(models, 'mobilenet_v2_cifar10', result, tmp_path)


def test_joint_udfc_with_act_bits(models, tmp_path):
  head, v, _, _ = models('resnet20')
  result = lbyl_jax.compress(*head, v, method='lbyl', ratio=0.3, quant_method='udfc', bits=4,
                             act_bits=4)
  _check_reload(models, 'resnet20', result, tmp_path)


@pytest.mark.parametrize('name', archs.names())
def test_bn_range_rule_covers_every_preset(name):
  """The default ranges (--act-ranges bn) exist for every conv / dense input of every preset."""
  spec = archs.get(name)
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map(  # random values of the preset's shapes (cheaper than spec.init)
      lambda a: rng.random(a.shape, np.float32) + 0.1,
      spec.abstract_variables(None))
  ranges = actquant.bn_ranges(spec, v, bits=4)
  assert set(ranges.layers) == set(quant.uniform.kernel_paths(v))
  assert all(np.isfinite(r.hi) and r.hi > 0 for r in ranges.layers.values())


def test_joint_udfc_on_a_user_model_names_the_way_out(models):
  """UDFC joint with LBYL: its default mean terms need the presets' network-level moment model;
  on a user model the refusal names the flag that lifts it, and with it the joint path runs."""
  head, v, images, _ = models('custom')
  with pytest.raises(ValueError, match='--bias-correction off'):
    lbyl_jax.compress(*head, v, example_shape=(1, 32, 32, 3), method='lbyl', ratio=0.3,
                      quant_method='udfc', bits=4)
  result = lbyl_jax.compress(*head, v, example_shape=(1, 32, 32, 3), method='lbyl', ratio=0.3,
                             quant_method='udfc', bits=4, bias_correction='off')
  assert result.report['quant_method'] == 'udfc'
  assert np.all(np.isfinite(np.asarray(result.apply(images))))

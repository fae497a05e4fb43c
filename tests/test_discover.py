"""Discovery, surgery and compress on Flax models this project has no preset for.

Models written here, independently of lbyl_jax.models: a Flax-examples ResNet (bottlenecks,
projection shortcuts), a DenseNet-BC (concatenation, BN-ReLU-conv order), a plain CNN with a Dense
head after an NHWC flatten, a model with GELU / SiLU activations and a MobileNet-style inverted
residual (depthwise conv). For each: the discovered units (asserted field by field), compress with
every method, and the compressed network against a float64 reference: the ORIGINAL network run with
each consumer's input a replaced by a with a_P := S_P a_K (0 for plain pruning) and the consumer's
pre-BN output shifted by scale * sum over taps / rows of V[:, P] c -- the fold of a_P ~ S_P a_K + c
(ALGORITHMS.md 1) -- using the plan compress applied. In float64 the two must agree to rounding.
"""

from __future__ import annotations

import functools
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lbyl_jax
from lbyl_jax.core import units as units_lib
from lbyl_jax.models import custom
from lbyl_jax.models import discover as discover_lib
from lbyl_jax.pruning import criteria
from lbyl_jax.pruning import surgery

ModuleDef = Any


def per_consumer(unit, c):
  """A unit's constant as {consumer path: constant or None} (one consumer: a plain array)."""
  if c is None or isinstance(c, dict):
    return c
  return {unit.consumers[0].path: c}


def ucompress(module, variables, example_shape, *, apply_kwargs=None,
              policy=units_lib.DEFAULT_POLICY, width_fields=None, hparams=None, **options):
  """lbyl_jax.compress of a user's module, with the result's parts under short names."""
  model_options = dict(apply_kwargs=apply_kwargs, policy=policy, width_fields=width_fields)
  if hparams is not None:
    model_options['hparams'] = hparams
  res = lbyl_jax.compress(module, variables, example_shape, model_options=model_options, **options)
  return SimpleNamespace(module=res.model, variables=res.variables, report=res.report,
                         discovery=res.spec.discovery, plan=res.deliveries, result=res)

# --------------------------------------------------------------------------------------------
# Models (the Flax examples' ResNet as published in flax/examples/imagenet/models.py).


class BottleneckResNetBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype, axis_name='batch')
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
    x = norm(name='bn_init')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm,
                           act=self.act)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    x = jnp.asarray(x, self.dtype)
    return x


ResNet50 = partial(ResNet, stage_sizes=[3, 4, 6, 3], block_cls=BottleneckResNetBlock)


class DenseLayer(nn.Module):
  """DenseNet-BC layer: BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k), concatenated to its input."""

  growth: int
  bn_size: int = 4

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    y = nn.Conv(self.bn_size * self.growth, (1, 1), use_bias=False)(y)
    y = nn.relu(nn.BatchNorm(use_running_average=True)(y))
    y = nn.Conv(self.growth, (3, 3), padding=1, use_bias=False)(y)
    return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = nn.Conv(self.features, (1, 1), use_bias=False)(x)
    return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNetBC(nn.Module):
  growth: int = 4
  blocks: Sequence[int] = (2, 2)
  init_features: int = 8
  compression: float = 0.5
  num_classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.init_features, (3, 3), padding=1, use_bias=False, name='conv0')(x)
    for b, n in enumerate(self.blocks):
      for i in range(n):
        x = DenseLayer(self.growth, name=f'block{b}_layer{i}')(x)
      if b < len(self.blocks) - 1:  # width from the input: follows pruning of the growth convs
        x = Transition(int(x.shape[-1] * self.compression), name=f'trans{b}')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name='norm_final')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='classifier')(x)


class PlainCNN(nn.Module):
  """conv-BN-ReLU-maxpool, conv(+bias)-ReLU, NHWC flatten, Dense-ReLU-Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), padding='SAME', use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), padding='SAME')(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(5)(x)


class GeluNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    bn = partial(nn.BatchNorm, use_running_average=True)
    x = nn.gelu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))  # tanh approximation
    x = nn.gelu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)), approximate=False)
    x = nn.silu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
    x = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(5)(x)


class MobileNetish(nn.Module):
  """Stem, one inverted residual (expand 1x1, depthwise 3x3, linear project, add), 1x1, head."""

  @nn.compact
  def __call__(self, x):
    bn = partial(nn.BatchNorm, use_running_average=True)
    x = nn.relu6(bn()(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)))
    y = nn.relu6(bn()(nn.Conv(24, (1, 1), use_bias=False)(x)))
    y = nn.relu6(bn()(nn.Conv(24, (3, 3), feature_group_count=24, use_bias=False)(y)))
    y = bn()(nn.Conv(8, (1, 1), use_bias=False)(y))
    x = x + y
    x = nn.relu6(bn()(nn.Conv(16, (1, 1), use_bias=False)(x)))
    return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


def small_resnet(**kw):
  return ResNet(stage_sizes=(2, 1), block_cls=BottleneckResNetBlock, num_classes=5,
                num_filters=4, **kw)


# name -> (module factory (dtype -> module), input shape, apply kwargs, discovery policy)
CASES = {
    'resnet': (lambda dt: small_resnet(dtype=dt), (2, 32, 32, 3), {'train': False},
               units_lib.DEFAULT_POLICY),
    'densenet': (lambda dt: DenseNetBC(), (2, 16, 16, 3), {}, units_lib.DEFAULT_POLICY),
    'plain': (lambda dt: PlainCNN(), (2, 8, 8, 3), {}, ()),
    'gelu': (lambda dt: GeluNet(), (2, 12, 12, 3), {}, units_lib.DEFAULT_POLICY),
    'mobile': (lambda dt: MobileNetish(), (2, 16, 16, 3), {}, units_lib.DEFAULT_POLICY),
}


def random_variables(module, shape, kw, seed):
  """NumPy float32 variables of ``module.init``'s shapes (traced abstractly, no compile): He-normal
  kernels, random biases and BN statistics / affine terms, so no BN is an identity."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape), **kw))
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = path[-1].key
    if name == 'kernel':
      x = rng.standard_normal(a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))
    elif name in ('var', 'scale'):
      x = rng.uniform(0.5, 1.5, a.shape)
    else:  # mean, BN bias, layer bias
      x = 0.2 * rng.standard_normal(a.shape)
    return x.astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, dict(abstract))


def cast(tree, dtype):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), tree)


@pytest.fixture(scope='module')
def built():
  out = {}
  for i, (name, (make, shape, kw, _)) in enumerate(CASES.items()):
    module = make(jnp.float32)
    x = np.random.default_rng(100 + i).standard_normal(shape).astype(np.float32)
    out[name] = (module, random_variables(module, shape, kw, i), x)
  return out


@pytest.fixture(scope='module')
def discovered(built):
  return {name: discover_lib.discover(built[name][0], built[name][1], CASES[name][1],
                               apply_kwargs=CASES[name][2], policy=CASES[name][3])
          for name in CASES}


def test_discovery_json_round_trip(discovered):
  """What is kept on disk for the presets reads back equal, for every kind of unit (offsets,
  flatten orders, through layers, geometry, couplings, exclusions, blocked producers)."""
  assert any(c.through for d in discovered.values() for u in d.units for c in u.consumers)
  for name, d in discovered.items():
    data = units_lib.discovery_to_json(d)
    back = units_lib.discovery_from_json(json.loads(json.dumps(data)))
    assert back == d, name
    assert units_lib.discovery_to_json(back) == data, name  # the geometry (compare=False) too


# --------------------------------------------------------------------------------------------
# Discovery: the expected units, field by field.


def summary(d: units_lib.Discovery):
  """(name, bn, activation, compensation, ((path, kind, offset, flatten, order, row_stride, pool,
  consumer bn, ((through kind, path, offset), ...)), ...)) per unit."""
  return [(u.name, u.bn, u.activation, u.compensation,
           tuple((c.path, c.kind, c.offset, c.flatten, c.flatten_order, c.row_stride, c.pool, c.bn,
                  tuple((t.kind, t.path, t.offset) for t in c.through)) for c in u.consumers))
          for u in d.units]


def test_discover_flax_examples_resnet(discovered):
  d = discovered['resnet']
  expected = []
  for b in range(3):
    blk = f'BottleneckResNetBlock_{b}'
    for k in range(2):
      expected.append((f'{blk}/Conv_{k}', f'{blk}/BatchNorm_{k}', 'relu', 'exact', (
          (f'{blk}/Conv_{k + 1}', 'conv', 0, 1, 'nchw', 0, None, f'{blk}/BatchNorm_{k + 1}', ()),)))
  assert summary(d) == expected
  assert [e.unit.name for e in d.excluded] == ['conv_init']  # the stem, by policy (A13)
  assert d.excluded[0].unit.compensation == 'maxpool_approx'  # it would be prunable with policy=()
  assert [set(c.members) for c in d.couplings] == [
      {'BottleneckResNetBlock_0/Conv_2', 'BottleneckResNetBlock_0/conv_proj',
       'BottleneckResNetBlock_1/Conv_2'},
      {'BottleneckResNetBlock_2/Conv_2', 'BottleneckResNetBlock_2/conv_proj'}]
  assert [(b.producer, b.reason) for b in d.blocked] == [('Dense_0', 'reaches the network output')]
  geo = d.units[0].consumers[0].geometry  # 3x3 conv at 8x8 with SAME padding, stride 1
  assert geo.in_spatial == (8, 8) and geo.window == (3, 3) and geo.padding == ((1, 1), (1, 1))
  table = str(d)
  assert 'BottleneckResNetBlock_2/Conv_1' in table and 'residual_add' in table


def test_discover_full_size_resnet50_abstract():
  """The published ResNet-50 configuration, traced abstractly at 224 x 224 (no weights)."""
  model = ResNet50(num_classes=1000)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                        train=False))
  d = discover_lib.discover(model, v, (1, 224, 224, 3), apply_kwargs={'train': False})
  assert len(d.units) == 32 and all(u.compensation == 'exact' for u in d.units)
  assert [u.name for u in d.units[:2]] == ['BottleneckResNetBlock_0/Conv_0',
                                           'BottleneckResNetBlock_0/Conv_1']
  assert [u.width for u in d.units[-2:]] == [512, 512]
  assert len(d.couplings) == 4 and [len(c.members) for c in d.couplings] == [4, 5, 7, 4]
  full = discover_lib.discover(model, v, (1, 224, 224, 3), apply_kwargs={'train': False}, policy=())
  assert full.units[0].name == 'conv_init' and len(full.units) == 33
  assert {c.path for c in full.units[0].consumers} == {'BottleneckResNetBlock_0/Conv_0',
                                                       'BottleneckResNetBlock_0/conv_proj'}


def test_discover_densenet(discovered):
  d = discovered['densenet']

  def through_bn(path, off):
    return (('bn', path, off),)

  L = lambda b, i: f'block{b}_layer{i}'  # noqa: E731
  exact = lambda b, i: (f'{L(b, i)}/Conv_0', f'{L(b, i)}/BatchNorm_1', 'relu', 'exact', (  # noqa: E731
      (f'{L(b, i)}/Conv_1', 'conv', 0, 1, 'nchw', 0, None, None, ()),))

  def feeds(b, i, off, pool=None):  # the 1x1 conv of dense layer (b, i), through its first BN
    return (f'{L(b, i)}/Conv_0', 'conv', off, 1, 'nchw', 0, pool, f'{L(b, i)}/BatchNorm_1',
            through_bn(f'{L(b, i)}/BatchNorm_0', off))

  trans = lambda off: ('trans0/Conv_0', 'conv', off, 1, 'nchw', 0, None, None,  # noqa: E731
                       through_bn('trans0/BatchNorm_0', off))
  head = lambda off: ('classifier', 'dense', off, 1, 'nchw', 0, 'avg', None,  # noqa: E731
                      through_bn('norm_final', off))
  expected = [
      ('conv0', None, 'identity', 'prune_only', (feeds(0, 0, 0), feeds(0, 1, 0), trans(0))),
      exact(0, 0),
      (f'{L(0, 0)}/Conv_1', None, 'identity', 'prune_only', (feeds(0, 1, 8), trans(8))),
      exact(0, 1),
      (f'{L(0, 1)}/Conv_1', None, 'identity', 'prune_only', (trans(12),)),
      ('trans0/Conv_0', None, 'identity', 'prune_only',
       (feeds(1, 0, 0, 'avg'), feeds(1, 1, 0, 'avg'), head(0))),
      exact(1, 0),
      (f'{L(1, 0)}/Conv_1', None, 'identity', 'prune_only', (feeds(1, 1, 8), head(8))),
      exact(1, 1),
      (f'{L(1, 1)}/Conv_1', None, 'identity', 'prune_only', (head(12),)),
  ]
  assert summary(d) == expected
  assert 'BatchNorm trans0/BatchNorm_0 between the channels and a consumer' in d.units[0].reason
  assert not d.couplings and [b.producer for b in d.blocked] == ['classifier']


def test_discover_plain_cnn_nhwc_flatten(discovered):
  d = discovered['plain']  # policy=(): the Dense hidden layer is a unit too
  assert summary(d) == [
      ('Conv_0', 'BatchNorm_0', 'relu', 'maxpool_approx',
       (('Conv_1', 'conv', 0, 1, 'nchw', 0, 'max', None, ()),)),
      ('Conv_1', None, 'relu', 'exact',
       (('Dense_0', 'dense', 0, 16, 'nhwc', 8, None, None, ()),)),  # 4x4 positions, 8 channels
      ('Dense_0', None, 'relu', 'exact', (('Dense_1', 'dense', 0, 1, 'nchw', 0, None, None, ()),)),
  ]
  default = discover_lib.discover(PlainCNN(), jax.eval_shape(lambda: PlainCNN().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))), (1, 8, 8, 3))
  assert [u.name for u in default.units] == ['Conv_0', 'Conv_1']
  assert [e.unit.name for e in default.excluded] == ['Dense_0']  # classifier head (A13)


def test_discover_gelu_silu(discovered):
  d = discovered['gelu']
  assert [(u.name, u.activation, u.compensation) for u in d.units] == [
      ('Conv_0', 'gelu_tanh', 'prune_only'), ('Conv_1', 'gelu', 'prune_only'),
      ('Conv_2', 'silu', 'prune_only'), ('Conv_3', 'relu', 'exact')]
  assert 'activation gelu_tanh: the closed forms' in d.units[0].reason
  last = d.units[3].consumers[0]
  assert (last.path, last.kind, last.pool, last.scale) == ('Dense_0', 'dense', 'avg', 1.0)


def test_discover_depthwise_and_residual(discovered):
  d = discovered['mobile']
  # The inverted residual's expanded channels: ReLU6 -> depthwise -> BN -> ReLU6 -> projection is
  # the path lbyl_jax.pruning.depthwise compensates (docs/mobilenet_v2.md); the last conv's ReLU6
  # before a linear head has no derived form (plain pruning).
  assert summary(d) == [
      ('Conv_1', 'BatchNorm_1', 'relu6', 'depthwise',
       (('Conv_3', 'conv', 0, 1, 'nchw', 0, None, 'BatchNorm_3',
         (('depthwise', 'Conv_2', 0), ('bn', 'BatchNorm_2', 0))),)),
      ('Conv_4', 'BatchNorm_4', 'relu6', 'prune_only',
       (('Dense_0', 'dense', 0, 1, 'nchw', 0, 'avg', None, ()),)),
  ]
  assert d.units[0].through_activation == 'relu6' and d.units[1].through_activation is None
  assert 'depthwise conv Conv_2' in d.units[0].reason
  assert [c.members for c in d.couplings] == [('Conv_0', 'Conv_3')]
  assert dict((b.producer, b.reason.split(':')[0]) for b in d.blocked) == {
      'Conv_2': 'grouped or depthwise conv', 'Dense_0': 'reaches the network output'}


@pytest.mark.parametrize('fn,name', [
    (nn.relu, 'relu'), (nn.relu6, 'relu6'), (nn.silu, 'silu'), (nn.hard_swish, 'hard_swish'),
    (lambda x: nn.gelu(x, approximate=False), 'gelu'), (nn.gelu, 'gelu_tanh'),
    (nn.leaky_relu, 'leaky_relu'), (nn.elu, 'elu'), (nn.sigmoid, 'sigmoid'),
    (lambda x: jnp.maximum(x, 0.0) * 2.0, 'relu'), (lambda x: x * 3.0, 'linear'),
    (lambda x: x + 1.0, 'affine'), (lambda x: jnp.sin(x), 'elementwise')])
def test_activation_classified_numerically(fn, name):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(fn(nn.Dense(4)(x)))

  v = jax.eval_shape(lambda: Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 5))))
  d = discover_lib.discover(Net(), v, (1, 5))
  if name == 'linear':
    assert d.units[0].activation == 'identity' and d.units[0].consumers[0].scale == 3.0
  else:
    assert d.units[0].activation == name
  assert d.units[0].compensation == ('exact' if name == 'relu' else 'prune_only')


def test_discover_refusals_named():
  class Gated(nn.Module):  # squeeze-excite style product and a LayerNorm
    @nn.compact
    def __call__(self, x):
      y = nn.relu(nn.Conv(4, (1, 1))(x))
      g = nn.sigmoid(nn.Dense(4)(jnp.mean(y, axis=(1, 2))))
      z = nn.relu(nn.Conv(6, (1, 1))(y * g[:, None, None, :]))
      z = nn.LayerNorm()(nn.Conv(6, (1, 1))(z))
      z = nn.Conv(6, (1, 1), feature_group_count=3)(z)
      return nn.Conv(3, (1, 1))(z)

  m = Gated()
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2))))
  d = discover_lib.discover(m, v, (1, 4, 4, 2), policy=())
  reasons = {b.producer: b.reason for b in d.blocked}
  assert 'combined with another tensor (mul)' in reasons['Conv_0']
  assert 'combined with another tensor (mul)' in reasons['Dense_0']
  assert 'channels reduced together' in reasons['Conv_2']  # the LayerNorm's mean over channels
  assert 'grouped or depthwise' in reasons['Conv_3']
  assert 'reaches the network output' in reasons['Conv_4']
  assert [u.name for u in d.units] == ['Conv_1']  # Conv_1 -> ReLU -> Conv_2

  class StdConv(nn.Conv):  # big_vision's weight-standardized conv
    def param(self, name, *args, **kwargs):
      p = super().param(name, *args, **kwargs)
      if name == 'kernel':
        p = (p - p.mean(axis=(0, 1, 2))) / (p.std(axis=(0, 1, 2)) + 1e-5)
      return p

  class WS(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(StdConv(4, (3, 3))(x))
      x = nn.relu(nn.Conv(5, (3, 3))(x))
      x = nn.relu(StdConv(6, (3, 3))(x))
      return nn.Conv(2, (1, 1))(x)

  ws = WS()
  wv = jax.eval_shape(lambda: ws.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2))))
  d = discover_lib.discover(ws, wv, (1, 6, 6, 2))
  reasons = {b.producer: b.reason for b in d.blocked}
  assert not d.units  # Conv_0 feeds a standardized consumer, StdConv_* are standardized
  assert 'transformed inside the call' in reasons['StdConv_0']
  assert 'StdConv_1: its kernel is transformed' in reasons['Conv_0']
  assert 'transformed inside the call' in reasons['StdConv_1']
  with pytest.raises(ValueError, match='use_running_average=True'):
    model = small_resnet()
    rv = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    discover_lib.discover(model, rv, (1, 32, 32, 3))  # train=True by default: batch statistics
  with pytest.raises(ValueError, match='unknown policy rule'):
    discover_lib.discover(m, v, (1, 4, 4, 2), policy=('stems',))
  with pytest.raises(ValueError, match='example_shape'):
    discover_lib.discover(m, v, 'abc')


# --------------------------------------------------------------------------------------------
# compress with every method, against the float64 reference.


def make_reference(module, disc, kw):
  """f(variables, x, plan) -> the ORIGINAL network with every consumer input a -> a with
  a_P := S_P a_K, and the folded constant scale * sum over taps / rows of V[:, P] c added to the
  consumer's output (before its BN). Jitted; the plan's arrays are arguments, so one compilation
  serves every method. Run under x64 with float64 variables."""
  edits: dict[str, list] = {}
  for u in disc.units:
    for con in u.consumers:
      edits.setdefault(con.path, []).append((con, u.name))

  def rows(con, ch):  # written out here, not con.indices
    s = jnp.arange(con.flatten)
    if con.flatten_order == 'nchw':
      return con.offset + ch[:, None] * con.flatten + s[None, :]
    return con.offset + ch[:, None] + s[None, :] * con.row_stride

  def fn(variables, x, plan):
    def interceptor(next_fun, args, kwargs, ctx):
      path = '/'.join(ctx.module.path)
      if ctx.method_name != '__call__' or path not in edits:
        return next_fun(*args, **kwargs)
      a0 = args[0]
      a = a0
      V = ctx.module.variables['params']['kernel']
      delta = jnp.zeros(V.shape[-1], V.dtype)
      for con, name in edits[path]:
        keep, prune, S, consts = plan[name]
        c = consts[con.path]
        if con.kind == 'conv':
          iK, iP = con.offset + keep, con.offset + prune
          a = a.at[..., iP].set(a0[..., iK] @ S.T)
          VP = V[..., iP, :].reshape(-1, prune.size, V.shape[-1])  # (taps, p, O)
        else:
          rK, rP = rows(con, keep), rows(con, prune)  # (m, R), (p, R)
          a = a.at[:, rP].set(jnp.einsum('pm,bmr->bpr', S, a0[:, rK]))
          VP = jnp.moveaxis(V[rP], 1, 0)  # (R, p, O)
        delta = delta + con.scale * jnp.einsum('p,tpo->o', c, VP)
      return next_fun(a, *args[1:], **kwargs) + delta

    with nn.intercept_methods(interceptor):
      return module.apply(variables, x, **kw)

  return jax.jit(fn)


def plan_arrays(disc, plan):
  """The compress plan as arrays (c = 0 where no constant is folded: the same fold)."""
  out = {}
  for u in disc.units:
    keep, S, c = plan[u.name]
    prune = np.setdiff1d(np.arange(u.width), keep)
    consts = {}
    for con in u.consumers:
      cc = c.get(con.path) if isinstance(c, dict) else c
      consts[con.path] = np.zeros(prune.size) if cc is None else np.asarray(cc, np.float64)
    out[u.name] = (np.asarray(keep), prune, np.asarray(S, np.float64), consts)
  return out


@functools.lru_cache(maxsize=None)
def jitted_apply(module, kw_items):
  return jax.jit(lambda v, x: module.apply(v, x, **dict(kw_items)))


METHODS = ('prune', 'nm', 'lbyl')


@pytest.fixture(scope='module')
def references(built, discovered):
  return {name: make_reference(CASES[name][0](jnp.float64), discovered[name], CASES[name][2])
          for name in CASES}


def reference(references, name, v, x, res):
  with jax.enable_x64(True):
    return np.asarray(references[name](cast(v, np.float64), jnp.asarray(x, jnp.float64),
                                       plan_arrays(res.discovery, res.plan)), np.float64)


@pytest.fixture(scope='module')
def compressed64(built, discovered, references):
  """compress of every case and method on float64 variables (x64 enabled), with the reference."""
  out = {}
  with jax.enable_x64(True):
    for name, (make, shape, kw, policy) in CASES.items():
      _, v, x = built[name]
      module = make(jnp.float64)
      v64 = cast(v, np.float64)
      for method in METHODS:
        res = ucompress(module, v64, shape, method=method, ratio=0.4, apply_kwargs=kw,
                        policy=policy)
        got = np.asarray(jitted_apply(res.module, tuple(kw.items()))(
            res.variables, jnp.asarray(x, jnp.float64)))
        out[name, method] = (res, got, reference(references, name, v, x, res))
  return out


@pytest.mark.parametrize('name', list(CASES))
@pytest.mark.parametrize('method', METHODS)
def test_compress_matches_float64_reference(compressed64, name, method):
  res, got, ref = compressed64[name, method]
  scale = np.max(np.abs(ref))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * scale)
  # every unit pruned at 40 % (floor), and the module is the equivalent wrapper
  for u, w in zip(res.discovery.units, res.report['widths']):
    assert w == criteria.n_keep(u.width, 0.4)
  assert res.report['module_kind'] == 'PrunedModule'
  for u in res.discovery.units:
    keep, S, c = res.plan[u.name]
    if u.compensation == 'prune_only' or method == 'prune':
      assert not np.any(S) and c is None
  assert {p['unit'] for p in res.report['prune_only']} == {
      u.name for u in res.discovery.units if u.compensation == 'prune_only'}


def test_compensation_is_delivered(compressed64):
  """lbyl and nm deliver on the exact units (non-zero S_P, constants where a BN / bias absorbs
  them), and that delivery changes the output: the reference check is not vacuous."""
  res, got, ref = compressed64['resnet', 'lbyl']
  _, pruned, _ = compressed64['resnet', 'prune']
  for u in res.discovery.units:
    keep, S, c = res.plan[u.name]
    c = per_consumer(u, c)
    assert np.any(S) and set(c) == {u.consumers[0].path} and np.all(np.isfinite(c[u.consumer]))
  assert np.max(np.abs(got - pruned)) > 1e-3 * np.max(np.abs(ref))
  res_nm = compressed64['resnet', 'nm'][0]
  assert any(np.any(res_nm.plan[u.name][1]) for u in res_nm.discovery.units)
  dense = compressed64['densenet', 'lbyl'][0]  # growth 3x3 convs: no BN, no bias -> no constant
  skipped = {(s['unit'], s.get('consumer')) for s in dense.report['bias_skipped']}
  assert ('block0_layer0/Conv_0', 'block0_layer0/Conv_1') in skipped
  plain = compressed64['plain', 'lbyl'][0]
  assert {s['unit'] for s in plain.report['bias_skipped']} == {'Conv_1', 'Dense_0'}  # BN-free
  keep, S, c = plain.plan['Conv_0']  # BN unit, constant folded into Conv_1's bias
  c = per_consumer(plain.discovery.unit('Conv_0'), c)
  assert c is not None and c['Conv_1'] is not None


@pytest.mark.parametrize('name', list(CASES))
def test_compress_float32_jit(built, references, name):
  """The float32 pipeline: jitted compressed module vs the float64 reference of its own plan;
  init of the compressed module gives exactly the pruned shapes."""
  make, shape, kw, policy = CASES[name]
  module, v, x = built[name]
  res = ucompress(module, v, shape, method='lbyl', ratio=0.4, apply_kwargs=kw,
                             policy=policy)
  got = np.asarray(jitted_apply(res.module, tuple(kw.items()))(res.variables, x))
  ref = reference(references, name, v, x, res)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.max(np.abs(ref)))
  init = jax.eval_shape(lambda: res.module.init(jax.random.PRNGKey(0), jnp.zeros(shape), **kw))
  assert jax.tree_util.tree_map(np.shape, init) == jax.tree_util.tree_map(np.shape, res.variables)
  assert res.report['params_after'] < res.report['params_before']
  assert res.report['macs_after'] < res.report['macs_before']


def test_bnm_on_user_models(built, references):
  module, v, x = built['resnet']
  shape, kw = CASES['resnet'][1], CASES['resnet'][2]
  with pytest.raises(ValueError, match="bnm_cov='identity'"):
    ucompress(module, v, shape, method='bnm', apply_kwargs=kw)
  with pytest.raises(ValueError, match="moment_cov='identity'"):
    ucompress(module, v, shape, method='lbyl', bias_correction='auto', apply_kwargs=kw)
  res = ucompress(module, v, shape, method='bnm', bnm_cov='identity', ratio=0.4,
                             apply_kwargs=kw)
  assert all(np.any(res.plan[u.name][1]) for u in res.discovery.units)
  got = np.asarray(res.module.apply(res.variables, x, **kw))
  ref = reference(references, 'resnet', v, x, res)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.max(np.abs(ref)))
  with_c = ucompress(module, v, shape, method='bnm', bnm_cov='identity', ratio=0.4,
                                bias_correction='on', apply_kwargs=kw)  # intercept fit + fold
  assert all(res.plan[u.name][2] is None and with_c.plan[u.name][2] is not None
             for u in res.discovery.units)
  got = np.asarray(with_c.module.apply(with_c.variables, x, **kw))
  ref = reference(references, 'resnet', v, x, with_c)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.max(np.abs(ref)))
  guarded = ucompress(module, v, shape, method='lbyl', moment_cov='identity',
                                 guard='moments', ratio=0.4, apply_kwargs=kw)
  assert 'guard_t_mean' in guarded.report['layers'][0]['diagnostics']
  pm, pv, _ = built['plain']
  with pytest.raises(ValueError, match='units without BN: Conv_1'):
    ucompress(pm, pv, CASES['plain'][1], method='bnm', bnm_cov='identity')


def test_compress_bad_input_changes_nothing(built):
  module, v, _ = built['gelu']
  before = jax.tree_util.tree_map(np.copy, v)
  bad = jax.tree_util.tree_map(np.copy, v)
  bad['params']['Conv_1']['kernel'][0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='non-finite values in params/Conv_1/kernel'):
    ucompress(module, bad, (1, 12, 12, 3))
  with pytest.raises(ValueError, match='ratio'):
    ucompress(module, v, (1, 12, 12, 3), ratio=1.5)
  with pytest.raises(ValueError, match="ratio override 'nope' matches no unit"):
    ucompress(module, v, (1, 12, 12, 3), ratio_overrides={'nope': 0.2})
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, v)


# --------------------------------------------------------------------------------------------
# Surgery checks and errors.


def test_apply_plan_errors(built, discovered):
  _, v, _ = built['plain']
  d = discovered['plain']
  u = d.unit('Conv_0')
  with pytest.raises(ValueError, match='no prunable unit named nope'):
    surgery.apply_plan(v, d, {'nope': ([0], np.zeros((5, 1)), None)})
  with pytest.raises(ValueError, match='sorted, unique'):
    surgery.apply_plan(v, d, {'Conv_0': ([2, 1], np.zeros((4, 2)), None)})
  with pytest.raises(ValueError, match='S_P has shape'):
    surgery.apply_plan(v, d, {'Conv_0': ([0, 1], np.zeros((3, 2)), None)})
  with pytest.raises(ValueError, match='finite'):
    surgery.apply_plan(v, d, {'Conv_0': ([0, 1], np.zeros((4, 2)), np.full(4, np.inf))})
  dd = discovered['densenet']
  with pytest.raises(ValueError, match='prune_only'):
    surgery.apply_plan(built['densenet'][1], dd, {'conv0': ([0, 1], np.ones((6, 2)), None)})
  with pytest.raises(ValueError, match='needs a following BatchNorm or a bias'):
    surgery.apply_plan(built['densenet'][1], dd,
                     {'block0_layer0/Conv_0': (np.arange(8), np.zeros((8, 8)), np.ones(8))})
  new = surgery.apply_plan(v, d, {u.name: (np.arange(6), np.zeros((0, 6)), None)})
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), new, v)


# --------------------------------------------------------------------------------------------
# --model pkg.module:factory


def test_load_factory(tmp_path, monkeypatch):
  (tmp_path / 'my_models.py').write_text(textwrap.dedent('''
      import flax.linen as nn
      import jax, jax.numpy as jnp

      class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
          return nn.Dense(2)(nn.relu(nn.Dense(3)(x)))

      tiny = Tiny()

      def plain():
        return Tiny()

      def with_variables():
        m = Tiny()
        return m, m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))

      def with_keys():
        return Tiny(), {'fc1.weight': 'Dense_0/kernel'}

      def bad():
        return 3

      def bad_second():
        return Tiny(), {'x': 1}

      def needs_args(n):
        return Tiny()
  '''))
  monkeypatch.syspath_prepend(str(tmp_path))
  sys.modules.pop('my_models', None)
  f = custom.load_factory('my_models:plain')
  assert type(f.module).__name__ == 'Tiny' and f.variables is None and f.key_map is None
  assert custom.load_factory('my_models:tiny').module is not None
  assert 'params' in custom.load_factory('my_models:with_variables').variables
  assert custom.load_factory('my_models:with_keys').key_map == {'fc1.weight': 'Dense_0/kernel'}
  assert type(custom.load_factory('my_models:Tiny').module).__name__ == 'Tiny'
  for spec, match in [('my_models', "pkg.module:factory"), ('nope_mod:f', 'cannot import'),
                      ('my_models:nope', "no attribute 'nope'"), ('my_models:bad', 'must return'),
                      ('my_models:bad_second', 'second value'),
                      ('my_models:needs_args', 'without arguments')]:
    with pytest.raises(ValueError, match=match):
      custom.load_factory(spec)
  f = custom.load_factory('my_models:with_variables')
  f = lbyl_jax.load_factory('my_models:with_variables')  # the package-level entry points
  res = lbyl_jax.compress(f.module, jax.tree_util.tree_map(np.asarray, f.variables), (1, 4),
                          method='lbyl', ratio=0.4)
  # Tiny's outer Dense(2) is constructed first (Dense_0); the hidden Dense(3) is Dense_1
  assert [u.name for u in lbyl_jax.discover(f.module, f.variables, (1, 4)).units] == ['Dense_1']
  assert res.report['widths'] == [1] and res.report['bias_skipped']  # Dense unit, no BN


# --------------------------------------------------------------------------------------------
# Same class with new widths: width_fields, a `widths` field, and the fallback.


class TwoConv(nn.Module):
  c1: int = 8
  c2: int = 6
  widths: Any = None  # a field named like the presets' but with another meaning (unused here)

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.c1, (3, 3))(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.c2, (3, 3))(x)))
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_width_fields_and_fallback():
  m = TwoConv()
  v = random_variables(m, (1, 8, 8, 2), {}, 5)
  res = ucompress(m, v, (1, 8, 8, 2), method='lbyl', ratio=0.5,
                             width_fields={'c1': 'Conv_0', 'c2': 'Conv_1'})
  assert res.report['module_kind'] == 'width_fields' and res.module == TwoConv(c1=4, c2=3)
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 2)).astype(np.float32)
  fallback = ucompress(m, v, (1, 8, 8, 2), method='lbyl', ratio=0.5)
  assert fallback.report['module_kind'] == 'PrunedModule'  # `widths` does not size this class
  np.testing.assert_allclose(res.module.apply(res.variables, x),
                             fallback.module.apply(fallback.variables, x), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='do not give the pruned shapes'):
    ucompress(m, v, (1, 8, 8, 2), ratio=0.5, width_fields={'c1': 'Conv_1'})
  with pytest.raises(ValueError, match="no field 'c3'"):
    ucompress(m, v, (1, 8, 8, 2), ratio=0.5, width_fields={'c3': 'Conv_1'})


def test_bn_epsilon_and_missing_scale_are_used():
  """NM's exact merge (ALGORITHMS.md T2): a filter proportional to a kept one, with the BN shift
  that makes a_3 = S a_0, S = s alpha_3 / alpha_0, is delivered exactly. The BN has epsilon 1e-2
  and no scale: with the default 1e-5 (or a missing gamma) S would be 20 % off."""

  class EpsNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (1, 1), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-2, use_scale=False)(x))
      return nn.Conv(3, (1, 1), use_bias=False)(x)

  rng = np.random.default_rng(0)
  w = rng.standard_normal((1, 1, 2, 4)).astype(np.float32) * np.float32([1, 3, 3, 1])
  w[..., 3] = 0.5 * w[..., 0]
  var = np.float32([0.01, 1.0, 1.0, 0.03])
  alpha = 1 / np.sqrt(var.astype(np.float64) + 1e-2)
  S = 0.5 * alpha[3] / alpha[0]
  beta = np.float32([0.2, 0.1, -0.1, S * 0.2])
  v = {'params': {'Conv_0': {'kernel': w}, 'BatchNorm_0': {'bias': beta},
                  'Conv_1': {'kernel': rng.standard_normal((1, 1, 4, 3)).astype(np.float32)}},
       'batch_stats': {'BatchNorm_0': {'mean': np.zeros(4, np.float32), 'var': var}}}
  m = EpsNet()
  x = rng.standard_normal((2, 5, 5, 2)).astype(np.float32)
  res = ucompress(m, v, (1, 5, 5, 2), method='nm', ratio=0.25, bias_correction='off')
  keep, S_P, _ = res.plan['Conv_0']
  assert list(keep) == [0, 1, 2] and np.isclose(S_P[0, 0], S, rtol=1e-6)
  np.testing.assert_allclose(res.module.apply(res.variables, x), m.apply(v, x), rtol=1e-5,
                             atol=1e-5)

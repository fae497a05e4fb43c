"""Architecture registry: ``--arch NAME`` -> model, input size, normalization, units, weights.

Each preset carries what its pretrained weights expect (input size and normalization constants),
where its weights can be downloaded (with a sha256 to verify), which PyTorch naming its
checkpoints use, and per-method default hyper-parameters from docs/neuron_merging.md#hyper-parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.core.registry import Registry
from lbyl_jax.models import discover as discover_lib
from lbyl_jax.models import mobilenet
from lbyl_jax.models import nets as models
from lbyl_jax.models import resize as resize_lib
from lbyl_jax.models import trace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  """Public weights of a preset. ``sha256`` may be a full digest or a torch-hub style prefix."""

  url: str
  filename: str
  sha256: str


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (caches below)
class ArchSpec:
  """One ``--arch`` preset.

  The prunable units are DISCOVERED by tracing the model (:mod:`lbyl_jax.models.discover`), the
  same for presets and users' models; ``units`` is their order, the order of the width slots.

  Attributes:
    name: registry key.
    family: 'mlp', 'cifar_resnet', 'resnet', 'vgg_cifar', 'vgg', 'mobilenet_v2', or 'custom' (a
      user's model).
    model: the module with original widths (``widths=None``).
    input_shape: (H, W, C) the weights expect.
    mean, std: per-channel normalization applied after scaling pixels to [0, 1].
    num_classes: classifier outputs.
    dataset: default evaluation dataset name ('cifar10', 'fashion_mnist', 'imagenet').
    torch_naming: key of the converter's name map ('cifar_resnet', 'resnet', 'vgg_cifar', 'vgg',
      'lenet', 'mobilenet_v2').
    weights: public download source, or None if the weights are not publicly hosted.
    hparams: per-method default hyper-parameters.
    policy: discovery policy (which structurally prunable units are left out).
    builder: for a user's model, how modules of other widths are built
      (:class:`lbyl_jax.models.custom.CustomBuilder`); None: ``model.clone(widths=...)``.
    discover_module: the module discovery traces when it is not ``model`` (a user's module
      inside its wrapper); apply_kwargs: keyword arguments of its calls.
    fixed_units: units stated instead of discovered (hand-built test networks); None for
      presets and users' models.
    data_shape: (H, W, C) of the images the preset's dataset stores when the weights expect
      another size (the CIFAR-10 MobileNetV2: 32x32 images, 224x224 input); None: ``input_shape``.
    resize: how images of ``data_shape`` are brought to ``input_shape`` on device before the
      normalization (:data:`lbyl_jax.models.resize.RESIZES`: 'bilinear', or 'bilinear_round' =
      then rounded to integer pixels); needed when ``data_shape`` is given.
  """

  name: str
  family: str
  model: nn.Module
  input_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int
  dataset: str | None
  torch_naming: str | None
  weights: WeightsSource | None = None
  hparams: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  description: str = ''
  policy: tuple[str, ...] = units_lib.DEFAULT_POLICY
  builder: Any = None
  discover_module: nn.Module | None = None
  apply_kwargs: tuple[tuple[str, Any], ...] = ()
  fixed_units: tuple[units_lib.Unit, ...] | None = None
  data_shape: tuple[int, ...] | None = None
  resize: str | None = None

  def __post_init__(self):
    if self.resize is not None and self.resize not in resize_lib.RESIZES:
      raise ValueError(f'{self.name}: resize must be one of {resize_lib.RESIZES}, got'
                       f' {self.resize!r}')
    if self.data_shape is not None:
      data, inp = tuple(self.data_shape), tuple(self.input_shape)
      if len(data) != len(inp) or data[-1] != inp[-1]:
        raise ValueError(f'{self.name}: data_shape {data} must differ from input_shape {inp} in'
                         ' its spatial size only')
      if data != inp and self.resize is None:
        raise ValueError(f'{self.name}: data_shape {data} differs from input_shape {inp}; say how'
                         f' the images are resized (resize, one of {resize_lib.RESIZES})')

  @property
  def image_shape(self) -> tuple[int, ...]:
    """The (H, W, C) of the uint8 images the preset's pipeline takes (its dataset's)."""
    return tuple(self.data_shape if self.data_shape is not None else self.input_shape)

  def accepts_image_shape(self, shape) -> bool:
    """Whether uint8 images of this (H, W, C) can feed the model: the dataset's shape, or the
    model input itself (then nothing is resized)."""
    shape = tuple(int(d) for d in shape)
    return shape in (tuple(self.input_shape), self.image_shape)

  @functools.cached_property
  def discovery(self) -> units_lib.Discovery:
    """What tracing the model found (units, couplings, unprunable layers); cached, and for the
    presets also on disk next to the compilation cache
    (:func:`lbyl_jax.models.trace.discovery_on_disk`)."""
    module = self.discover_module if self.discover_module is not None else self.model

    def compute() -> units_lib.Discovery:
      return discover_lib.discover(module, self.abstract_variables(), (1, *self.input_shape),
                                   apply_kwargs=dict(self.apply_kwargs), policy=self.policy)

    if (self.discover_module is None and self.builder is None and self.fixed_units is None
        and self.family != 'custom'):
      return trace.discovery_on_disk(self, compute)
    return compute()

  @property
  def units(self) -> tuple[units_lib.Unit, ...]:
    """The prunable units, in width-slot order (``fixed_units`` when given: hand-built test
    networks whose units are stated rather than discovered)."""
    if self.fixed_units is not None:
      return self._fixed_units
    return self.discovery.units

  @functools.cached_property
  def _fixed_units(self) -> tuple[units_lib.Unit, ...]:
    """``fixed_units`` with each consumer's following BatchNorm filled in by tracing."""
    bn_of = trace.trace_module(self.model, self.dummy_input()).bn
    out = []
    for u in self.fixed_units:
      cons = tuple(c if c.bn is not None else dataclasses.replace(c, bn=bn_of.get(c.path))
                   for c in u.consumers)
      out.append(dataclasses.replace(u, consumers=cons))
    return tuple(out)

  def bn_epsilon(self, path: str) -> float:
    """The epsilon of the BatchNorm at ``path`` (as traced)."""
    try:
      eps = self.discovery.layer(path).epsilon
    except KeyError:
      eps = None
    return BN_EPS if eps is None else float(eps)

  @property
  def width_names(self) -> tuple[str, ...]:
    return tuple(u.name for u in self.units)

  def default_widths(self) -> tuple[int, ...]:
    """Original widths, read off the shapes of an abstract init (no FLOPs spent)."""
    return units_lib.widths_of(self.abstract_variables(), self.units)

  def build(self, widths: tuple[int, ...] | None = None) -> nn.Module:
    """The model with the given widths (None: original widths)."""
    if widths is not None:
      widths = tuple(int(w) for w in widths)
      if len(widths) != len(self.units):
        raise ValueError(
            f'{self.name}: expected {len(self.units)} widths ({", ".join(self.width_names[:3])}, ...),'
            f' got {len(widths)}'
        )
      if widths == self.default_widths():
        widths = None
    if self.builder is not None:
      return self.builder.build(self, widths)
    return self.model.clone(widths=widths)

  def dummy_input(self, batch: int = 1) -> jnp.ndarray:
    return jnp.zeros((batch, *self.input_shape), jnp.float32)

  def abstract_variables(self, widths: tuple[int, ...] | None = None) -> Any:
    """ShapeDtypeStructs of the variables for the given widths (cached per widths).

    The original widths come from the model's one abstract trace of ``init``
    (:func:`lbyl_jax.models.trace.trace_layers`, kept on disk for the presets); for a preset,
    other widths are derived from it and the discovered units without tracing
    (:func:`lbyl_jax.models.trace.abstract_variables_at`); users' models and hand-built test
    networks are traced at those widths.
    """
    if widths is not None:
      widths = tuple(int(w) for w in widths)
    return _abstract_variables(self, widths)

  def init(self, rng: jax.Array | int, widths: tuple[int, ...] | None = None) -> Any:
    """Random float32 NumPy variables of the given widths, without running Flax initializers.

    Kernels ~ U(-a, a) with a = sqrt(6 / fan_in) (He-uniform: variance 2 / fan_in), Dense/conv
    biases ~ N(0, 0.01); BN statistics and affine terms are random too
    (:func:`randomize_batch_stats`), so BN is not an identity. Shapes are those of
    ``self.build(widths).init``; drawing them in NumPy from the abstract shapes keeps this fast
    and deterministic. The kernels are drawn as float32 uniforms, scaled in place: 0.04 s for a
    ResNet-50 where float64 normals took 0.27 s (measured ad hoc, in-process; ``python -m
    lbyl_jax.restore --weights random`` draws them in every run, benchmarks/command_speed.py).
    """
    if not isinstance(rng, int):
      rng = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    rs = np.random.default_rng(rng)
    shapes = self.abstract_variables(widths)

    def _draw(path, leaf):
      if path[-1].key == 'kernel':
        fan_in = int(np.prod(leaf.shape[:-1]))
        x = rs.random(leaf.shape, dtype=np.float32)  # [0, 1)
        x -= np.float32(0.5)
        x *= np.float32(2.0 * np.sqrt(6.0 / fan_in))  # in place, float32 throughout
        return x
      if path[-1].key == 'bias':
        return (0.1 * rs.standard_normal(leaf.shape)).astype(np.float32)
      return np.ones(leaf.shape, np.float32)  # BN scale / var before randomization

    variables = jax.tree_util.tree_map_with_path(_draw, shapes)
    bns = {layer.path for layer in self.discovery.layers if layer.kind == 'bn'}
    return _randomize_batch_stats(dict(variables), int(rs.integers(2**31 - 1)), bn_paths=bns)


@functools.lru_cache(maxsize=256)
def _abstract_variables(spec: ArchSpec, widths: tuple[int, ...] | None) -> Any:
  if widths is None:
    return trace.trace_layers(spec).abstract
  if widths == spec.default_widths():
    return _abstract_variables(spec, None)
  if spec.builder is None and spec.fixed_units is None and spec.family != 'custom':
    return trace.abstract_variables_at(spec, widths)
  model = spec.build(widths)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), spec.dummy_input()))


def randomize_batch_stats(variables: Any, seed: int, *, bn_paths=None) -> Any:
  """BN running stats and affine params replaced by random, well-conditioned values (NumPy).

  ``bn_paths``: the BatchNorm layers ('/'-joined); None: layers named 'bn*' / 'downsample_bn'.

  mean ~ N(0, 0.1), var ~ U(0.5, 1.5), scale ~ U(0.5, 1.5), bias ~ N(0, 0.1).
  """
  return _randomize_batch_stats(jax.tree_util.tree_map(np.array, dict(variables)), seed,
                                bn_paths=bn_paths)


def _randomize_batch_stats(variables: dict[str, Any], seed: int, *, bn_paths=None
                           ) -> dict[str, Any]:
  """:func:`randomize_batch_stats` on a tree the caller owns (its dict is updated, BN leaves
  replaced, the other arrays kept without a copy)."""
  rs = np.random.default_rng(seed)
  if 'batch_stats' not in variables:
    return variables

  def _is_bn(path) -> bool:
    if bn_paths is not None:
      return '/'.join(str(getattr(p, 'key', '')) for p in path[:-1]) in bn_paths
    return any(str(getattr(p, 'key', '')).startswith(('bn', 'downsample_bn')) for p in path[:-1])

  def _randomize(path, leaf):
    if not _is_bn(path):
      return leaf
    if path[-1].key in ('var', 'scale'):
      return rs.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    return (0.1 * rs.standard_normal(leaf.shape)).astype(leaf.dtype)

  variables['batch_stats'] = jax.tree_util.tree_map_with_path(_randomize, variables['batch_stats'])
  variables['params'] = jax.tree_util.tree_map_with_path(_randomize, variables['params'])
  return variables


REGISTRY: Registry[ArchSpec] = Registry('architecture')


def register(spec: ArchSpec) -> ArchSpec:
  return REGISTRY.add(spec.name, spec)


def get(name: str) -> ArchSpec:
  """The preset called ``name``; an error listing the known names otherwise."""
  return REGISTRY.get(name)


def names() -> list[str]:
  return REGISTRY.names()


# --------------------------------------------------------------------------------------------
# Presets.

_AKAMASTER = 'https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/'
_AKAMASTER_SHA = {
    20: ('resnet20-12fca82f.th', '12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8'),
    32: ('resnet32-d509ac18.th', 'd509ac18'),
    44: ('resnet44-014dd654.th', '014dd654'),
    56: ('resnet56-4bfd9763.th', '4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367'),
    110: ('resnet110-1d1ed7c2.th', '1d1ed7c2'),
}
_TORCHVISION = 'https://download.pytorch.org/models/'

# docs/neuron_merging.md#hyper-parameters: NM (t, lam) of the official scripts.
_NM_CIFAR = {'t': 0.1, 'lam': 0.85}

_CIFAR_HP = {'nm': _NM_CIFAR}
_IMAGENET_HP = {'nm': {'t': 0.1, 'lam': 0.85}}

for _depth in (20, 32, 44, 56, 110):
  _file, _sha = _AKAMASTER_SHA[_depth]
  register(ArchSpec(
      name=f'resnet{_depth}',
      family='cifar_resnet',
      model=models.CifarResNet(depth=_depth, shortcut='A'),
      input_shape=(32, 32, 3), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10,
      dataset='cifar10', torch_naming='cifar_resnet',
      weights=WeightsSource(_AKAMASTER + _file, _file, _sha),
      hparams=_CIFAR_HP,
      description=f'CIFAR-10 ResNet-{_depth}, shortcut A (akamaster weights)',
  ))
  register(ArchSpec(
      name=f'resnet{_depth}_b',
      family='cifar_resnet',
      model=models.CifarResNet(depth=_depth, shortcut='B'),
      input_shape=(32, 32, 3), mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10,
      dataset='cifar10', torch_naming='cifar_resnet',
      hparams=_CIFAR_HP,
      description=f'CIFAR-10 ResNet-{_depth}, shortcut B (Neuron Merging layout; weights not hosted)',
  ))

register(ArchSpec(
    name='lenet_300_100',
    family='mlp',
    model=models.MLP(hidden=(300, 100), num_classes=10),
    input_shape=(28, 28, 1), mean=(0.5,), std=(0.5,), num_classes=10,
    dataset='fashion_mnist', torch_naming='lenet',
    hparams={'nm': {'t': 0.45, 'lam': 0.85}},
    description='LeNet-300-100 MLP (LBYL / Neuron Merging FashionMNIST model; weights not hosted)',
))

register(ArchSpec(
    name='vgg16_bn_cifar',
    family='vgg_cifar',
    model=models.VGG(cifar=True, num_classes=10),
    input_shape=(32, 32, 3), mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10,
    dataset='cifar10', torch_naming='vgg_cifar',
    hparams={'nm': {'t': 0.1, 'lam': 0.85}},
    description='VGG-16-BN, CIFAR form of LBYL / Neuron Merging (weights not hosted)',
))

register(ArchSpec(
    name='vgg16_bn',
    family='vgg',
    model=models.VGG(cifar=False, num_classes=1000),
    input_shape=(224, 224, 3), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000,
    dataset='imagenet', torch_naming='vgg',
    weights=WeightsSource(_TORCHVISION + 'vgg16_bn-6c64b313.pth', 'vgg16_bn-6c64b313.pth', '6c64b313'),
    hparams=_IMAGENET_HP,
    description='torchvision VGG-16-BN (ImageNet)',
))

_TV_RESNETS: dict[str, tuple[tuple[int, ...], bool, str]] = {
    'resnet18': ((2, 2, 2, 2), False, 'resnet18-f37072fd.pth'),
    'resnet34': ((3, 4, 6, 3), False, 'resnet34-b627a593.pth'),
    'resnet50': ((3, 4, 6, 3), True, 'resnet50-0676ba61.pth'),
    'resnet101': ((3, 4, 23, 3), True, 'resnet101-63fe2227.pth'),
    'resnet152': ((3, 8, 36, 3), True, 'resnet152-394f9c45.pth'),
}
for _name, (_sizes, _bottleneck, _file) in _TV_RESNETS.items():
  register(ArchSpec(
      name=_name,
      family='resnet',
      model=models.ResNet(stage_sizes=_sizes, bottleneck=_bottleneck, num_classes=1000),
      input_shape=(224, 224, 3), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000,
      dataset='imagenet', torch_naming='resnet',
      weights=WeightsSource(_TORCHVISION + _file, _file, _file.split('-')[1].split('.')[0]),
      hparams=_IMAGENET_HP,
      description=f'torchvision {_name} (ImageNet, v1.5)',
  ))


def normalize_fn(spec: ArchSpec) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """uint8 (or [0, 255] float) NHWC images -> the normalized float input the weights expect:
  resized on device first when the preset says so (``spec.resize``, images of another size than
  ``input_shape``), then /255 and (x - mean) / std."""
  mean = jnp.asarray(spec.mean, jnp.float32)
  std = jnp.asarray(spec.std, jnp.float32)
  if spec.resize is not None:
    out_hw = tuple(int(d) for d in spec.input_shape[:2])
    mode = spec.resize

    def resized(x: jnp.ndarray) -> jnp.ndarray:
      x = x.astype(jnp.float32)
      if x.ndim == 3:
        x = x[..., None]
      if tuple(x.shape[1:3]) != out_hw:
        x = resize_lib.resize(x, out_hw, mode)
      return (x / 255.0 - mean) / std

    return resized

  def fn(x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(jnp.float32) / 255.0
    if x.ndim == 3:
      x = x[..., None]
    return (x - mean) / std

  return fn


# --------------------------------------------------------------------------------------------
# MobileNetV2 (lbyl_jax/models/mobilenet.py; compensation of its units: docs/mobilenet_v2.md).

# ../shared/weights/mobilenet_v2_pruned.cifar10_224.* (../shared/DATA.md):
# mobilenet.fields_from_state_dict of that file gives exactly these (tests/test_mobilenet.py).
MOBILENET_V2_CIFAR10 = dict(
    stem=11,
    expand=(35, 53, 53, 71, 71, 71, 142, 142, 142, 142, 213, 213, 213, 355, 355, 355),
    out=(5, 24, 24, 11, 11, 11, 23, 23, 23, 23, 35, 35, 35, 59, 59, 59, 75),
    last=208, num_classes=10)

# NM (t, lam) and LBYL's lambdas on this family, chosen on the development split of CIFAR-10 with
# the shared checkpoint (benchmarks/probes/mobilenet_v2.py, test images 0-1999, mean top-1 at
# ratios 0.2 and 0.4; docs/mobilenet_v2.md#measured): NM lam in {0.85, 0.5, 1.0} kept the
# published 0.85 (t = 0.1, docs/neuron_merging.md#hyper-parameters); LBYL (lambda1, lambda2)
# over {1e-5, 1e-2} x {1e-4, 1e-3, 1e-2, 1e-1} chose (1e-2, 1e-2). BN-moments' spatial model
# ('calibrated') is the bnm method's default. The ImageNet preset uses the same values (no
# ImageNet data here to choose with).
MOBILENET_V2_HPARAMS: dict[str, dict[str, Any]] = {
    'nm': {'t': 0.1, 'lam': 0.85},
    'lbyl': {'lambda1': 1e-2, 'lambda2': 1e-2},
}
# Only the expanded channels are pruned: the linear-bottleneck projections and features.18 would
# get no compensation ('compensable'), the stem reads the input of a residual network.
MOBILENET_V2_POLICY = units_lib.DEFAULT_POLICY + ('compensable',)


def mobilenet_v2_spec(name: str, fields: Mapping[str, Any], *,
                      input_shape: tuple[int, int, int] = (224, 224, 3),
                      mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                      dataset: str | None = 'imagenet',
                      data_shape: tuple[int, int, int] | None = None, resize: str | None = None,
                      weights: WeightsSource | None = None,
                      hparams: Mapping[str, Mapping[str, Any]] | None = None,
                      description: str = '') -> ArchSpec:
  """An (unregistered) :class:`ArchSpec` of a :class:`~lbyl_jax.models.mobilenet.MobileNetV2` with
  these width fields (``stem``, ``expand``, ``out``, ``last``, ``num_classes``, optionally
  ``strides`` / ``residual``). Discovery traces the model with plain grouped convolutions
  (``discover_module``), execution uses the fast depthwise path.

  Args:
    data_shape, resize: the dataset's stored image size and how it is resized to ``input_shape``
      (see :class:`ArchSpec`).
    hparams: per-method defaults; None: :data:`MOBILENET_V2_HPARAMS`.
  """
  model = mobilenet.MobileNetV2(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                                   for k, v in fields.items()})
  return ArchSpec(
      name=name, family='mobilenet_v2', model=model, input_shape=tuple(input_shape),
      mean=tuple(mean), std=tuple(std), num_classes=int(model.num_classes), dataset=dataset,
      torch_naming='mobilenet_v2', weights=weights,
      hparams=dict(MOBILENET_V2_HPARAMS if hparams is None else hparams),
      description=description, policy=MOBILENET_V2_POLICY,
      discover_module=model.clone(fast_depthwise=False),
      data_shape=None if data_shape is None else tuple(data_shape), resize=resize)


def mobilenet_v2_spec_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                      name: str = 'mobilenet_v2_custom', **kwargs) -> ArchSpec:
  """:func:`mobilenet_v2_spec` with the widths of a torchvision-layout state dict
  (:func:`lbyl_jax.models.mobilenet.fields_from_state_dict`); ``kwargs`` go to
  :func:`mobilenet_v2_spec`."""
  return mobilenet_v2_spec(name, mobilenet.fields_from_state_dict(state_dict), **kwargs)


register(mobilenet_v2_spec(
    'mobilenet_v2_cifar10', MOBILENET_V2_CIFAR10, dataset='cifar10', data_shape=(32, 32, 3),
    resize='bilinear_round',
    description='torchvision-layout MobileNetV2 with channel-pruned widths, CIFAR-10 upsampled to'
    ' 224x224 (bilinear, half-pixel centres, rounded; weights not hosted)'))

register(mobilenet_v2_spec(
    'mobilenet_v2', mobilenet.torchvision_widths(),
    weights=WeightsSource(_TORCHVISION + 'mobilenet_v2-b0353104.pth', 'mobilenet_v2-b0353104.pth',
                          'b0353104'),
    description='torchvision mobilenet_v2 (ImageNet, IMAGENET1K_V1)'))

"""Independent PyTorch reference models for conversion parity tests (test-only: imports torch).

Written from the original papers' code layouts, not from lbyl_jax.models.nets, so that a parity test
compares two independent implementations:

* ``LeNet300100``: the Neuron Merging / LBYL MLP (``ip1``, ``ip2``, ``ip3``).
* ``AkamasterResNet``: akamaster's CIFAR ResNet (``pytorch_resnet_cifar10/resnet.py``), option A
  shortcut through a ``LambdaLayer`` that subsamples and zero-pads channels, head ``linear``.
* ``NMResNet``: the Neuron Merging CIFAR ResNet (``models/ResNet.py``): option B shortcut
  ``downsample.{0,1}`` (1x1 stride-2 conv, BN), the ReLU applied at the *entry* of each block and
  before the pool (equivalent to the usual post-activation form), 8x8 average pool, head ``fc``.
* ``CifarVGG``: the Neuron Merging / network-slimming VGG-16-BN for CIFAR: convs without bias in
  ``self.feature`` (``feature_attr='features'`` gives the other common spelling), a 2x2 average
  pool, classifier ``Linear(512, 512), BatchNorm1d(512), ReLU, Linear(512, classes)``. Key names:
  ``feature.{0,1,3,4,7,...}.*`` and ``classifier.{0,1,3}.*``.
* ``TVResNet`` / ``TVVGG16BN``: torchvision ResNet-18..152 (v1.5: stride on the bottleneck 3x3) and
  ``vgg16_bn`` (``features.N``, ``AdaptiveAvgPool2d((7, 7))``, ``classifier.{0,3,6}``).
* ``TVMobileNetV2``: torchvision's ``mobilenetv2.py`` layout (``features.0`` conv-BN-ReLU6,
  ``InvertedResidual`` blocks with ``self.conv`` and ``use_res_connect``, ``features.18``,
  adaptive average pool, ``classifier = (Dropout, Linear)``) with every width an argument, as a
  channel-pruned network has them; depthwise convs are real grouped ``nn.Conv2d``.

Every constructor takes optional pruned inner widths, mirroring the ``cfg`` arguments of the
original pruning codes. :func:`randomize` gives every model random weights *and* random BN
running statistics so that BN is not an identity.
"""

from __future__ import annotations

import collections

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------
# LeNet-300-100


class LeNet300100(nn.Module):

  def __init__(self, widths=(300, 100), num_classes=10):
    super().__init__()
    self.ip1 = nn.Linear(28 * 28, widths[0])
    self.relu_ip1 = nn.ReLU(inplace=True)
    self.ip2 = nn.Linear(widths[0], widths[1])
    self.relu_ip2 = nn.ReLU(inplace=True)
    self.ip3 = nn.Linear(widths[1], num_classes)

  def forward(self, x):
    x = x.view(x.size(0), 28 * 28)
    x = self.relu_ip1(self.ip1(x))
    x = self.relu_ip2(self.ip2(x))
    return self.ip3(x)


# --------------------------------------------------------------------------------------------
# akamaster CIFAR ResNet, option A


class LambdaLayer(nn.Module):

  def __init__(self, lambd):
    super().__init__()
    self.lambd = lambd

  def forward(self, x):
    return self.lambd(x)


class AkamasterBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, inner, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, inner, kernel_size=3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(inner)
    self.conv2 = nn.Conv2d(inner, planes, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      # Option A of He et al.: identity with stride-2 subsampling and zero channel padding.
      self.shortcut = LambdaLayer(
          lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), 'constant', 0))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += self.shortcut(x)
    return F.relu(out)


class AkamasterResNet(nn.Module):

  def __init__(self, depth=20, num_classes=10, widths=None):
    super().__init__()
    n = (depth - 2) // 6
    widths = list(widths) if widths is not None else [16] * n + [32] * n + [64] * n
    self.in_planes = 16
    self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    self.layer1 = self._make_layer(16, widths[0:n], stride=1)
    self.layer2 = self._make_layer(32, widths[n:2 * n], stride=2)
    self.layer3 = self._make_layer(64, widths[2 * n:3 * n], stride=2)
    self.linear = nn.Linear(64, num_classes)

  def _make_layer(self, planes, inner, stride):
    layers = []
    for i, w in enumerate(inner):
      layers.append(AkamasterBlock(self.in_planes, planes, w, stride if i == 0 else 1))
      self.in_planes = planes
    return nn.Sequential(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    out = F.avg_pool2d(out, out.size()[3])
    out = out.view(out.size(0), -1)
    return self.linear(out)


# --------------------------------------------------------------------------------------------
# Neuron Merging CIFAR ResNet, option B


class NMBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, inner, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, inner, kernel_size=3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(inner)
    self.conv2 = nn.Conv2d(inner, planes, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    x = F.relu(x)  # the NM code applies the previous block's ReLU here
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    return out + residual


class NMResNet(nn.Module):

  def __init__(self, depth=56, num_classes=10, widths=None):
    super().__init__()
    n = (depth - 2) // 6
    widths = list(widths) if widths is not None else [16] * n + [32] * n + [64] * n
    self.inplanes = 16
    self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    self.layer1 = self._make_layer(16, widths[0:n])
    self.layer2 = self._make_layer(32, widths[n:2 * n], stride=2)
    self.layer3 = self._make_layer(64, widths[2 * n:3 * n], stride=2)
    self.avgpool = nn.AvgPool2d(8)
    self.fc = nn.Linear(64, num_classes)

  def _make_layer(self, planes, inner, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
          nn.BatchNorm2d(planes),
      )
    layers = [NMBlock(self.inplanes, planes, inner[0], stride, downsample)]
    self.inplanes = planes
    layers += [NMBlock(planes, planes, w) for w in inner[1:]]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.bn1(self.conv1(x))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = self.avgpool(F.relu(x))
    return self.fc(x.view(x.size(0), -1))


# --------------------------------------------------------------------------------------------
# VGG-16-BN, CIFAR (Neuron Merging / network slimming)

VGG16_CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]


def _vgg_layers(cfg, widths, *, bias):
  layers, in_channels, i = [], 3, 0
  for v in cfg:
    if v == 'M':
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      continue
    w = widths[i] if widths is not None else v
    layers += [nn.Conv2d(in_channels, w, kernel_size=3, padding=1, bias=bias),
               nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
    in_channels, i = w, i + 1
  return nn.Sequential(*layers), in_channels


class CifarVGG(nn.Module):

  def __init__(self, num_classes=10, widths=None, feature_attr='feature'):
    super().__init__()
    self.feature_attr = feature_attr
    layers, last = _vgg_layers(VGG16_CFG, widths, bias=False)
    setattr(self, feature_attr, layers)
    self.classifier = nn.Sequential(
        nn.Linear(last, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )

  def forward(self, x):
    x = getattr(self, self.feature_attr)(x)
    x = nn.AvgPool2d(2)(x)
    x = x.view(x.size(0), -1)
    return self.classifier(x)


# --------------------------------------------------------------------------------------------
# torchvision ResNet (v1.5) and vgg16_bn


def _conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class TVBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, inner, stride=1, downsample=None):
    super().__init__()
    self.conv1 = _conv3x3(inplanes, inner[0], stride)
    self.bn1 = nn.BatchNorm2d(inner[0])
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv3x3(inner[0], planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class TVBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, inner, stride=1, downsample=None):
    super().__init__()
    self.conv1 = _conv1x1(inplanes, inner[0])
    self.bn1 = nn.BatchNorm2d(inner[0])
    self.conv2 = _conv3x3(inner[0], inner[1], stride)  # v1.5: the stride sits on the 3x3
    self.bn2 = nn.BatchNorm2d(inner[1])
    self.conv3 = _conv1x1(inner[1], planes * 4)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


TV_RESNETS = {
    'resnet18': (TVBasicBlock, (2, 2, 2, 2)),
    'resnet34': (TVBasicBlock, (3, 4, 6, 3)),
    'resnet50': (TVBottleneck, (3, 4, 6, 3)),
    'resnet101': (TVBottleneck, (3, 4, 23, 3)),
    'resnet152': (TVBottleneck, (3, 8, 36, 3)),
}


class TVResNet(nn.Module):

  def __init__(self, name='resnet50', num_classes=1000, widths=None):
    super().__init__()
    block, sizes = TV_RESNETS[name]
    per_block = 2 if block is TVBottleneck else 1
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    b = 0
    for s, (n, planes) in enumerate(zip(sizes, (64, 128, 256, 512))):
      inner = []
      for _ in range(n):
        if widths is None:
          inner.append((planes,) * per_block)
        else:
          inner.append(tuple(widths[b * per_block:(b + 1) * per_block]))
        b += 1
      setattr(self, f'layer{s + 1}', self._make_layer(block, planes, inner, 1 if s == 0 else 2))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, inner, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          _conv1x1(self.inplanes, planes * block.expansion, stride),
          nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, inner[0], stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, w) for w in inner[1:]]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = torch.flatten(self.avgpool(x), 1)
    return self.fc(x)


class TVVGG16BN(nn.Module):

  def __init__(self, num_classes=1000, widths=None):
    super().__init__()
    self.features, last = _vgg_layers(VGG16_CFG + ['M'], widths, bias=True)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(last * 7 * 7, 4096),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(4096, 4096),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(4096, num_classes),
    )

  def forward(self, x):
    x = self.avgpool(self.features(x))
    x = torch.flatten(x, 1)
    return self.classifier(x)


# --------------------------------------------------------------------------------------------
# torchvision MobileNetV2 (mobilenetv2.py), arbitrary widths


def _conv_bn_relu6(cin, cout, kernel, stride=1, groups=1):
  """torchvision's Conv2dNormActivation(..., activation_layer=ReLU6): keys .0 (conv), .1 (BN)."""
  return nn.Sequential(
      nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
      nn.BatchNorm2d(cout),
      nn.ReLU6(inplace=True),
  )


class TVInvertedResidual(nn.Module):
  """``expand=False`` is torchvision's expand_ratio 1 (block 1): no expansion conv."""

  def __init__(self, inp, oup, stride, hidden, expand=True):
    super().__init__()
    self.stride = stride
    self.use_res_connect = stride == 1 and inp == oup
    layers = [_conv_bn_relu6(inp, hidden, 1)] if expand else []
    layers += [
        _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
        nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
    ]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    if self.use_res_connect:
      return x + self.conv(x)
    return self.conv(x)


TV_MOBILENET_STRIDES = (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)


class TVMobileNetV2(nn.Module):
  """``expand``: expanded widths of blocks 2..17; ``out``: projection widths of blocks 1..17."""

  def __init__(self, stem, expand, out, last, num_classes=10, strides=TV_MOBILENET_STRIDES):
    super().__init__()
    features = [_conv_bn_relu6(3, stem, 3, 2)]
    inp = stem
    for i, (oup, stride) in enumerate(zip(out, strides)):
      if i == 0:
        features.append(TVInvertedResidual(inp, oup, stride, inp, expand=False))
      else:
        features.append(TVInvertedResidual(inp, oup, stride, expand[i - 1]))
      inp = oup
    features.append(_conv_bn_relu6(inp, last, 1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(last, num_classes))

  def forward(self, x):
    x = self.features(x)
    x = F.adaptive_avg_pool2d(x, (1, 1))
    return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------
# Construction helpers.


class DataParallelNames(nn.Module):
  """Wraps a model as ``self.module`` so its state_dict keys get the ``module.`` prefix."""

  def __init__(self, module):
    super().__init__()
    self.module = module

  def forward(self, x):
    return self.module(x)


def build(arch: str, widths=None) -> nn.Module:
  """The reference model for an lbyl_jax preset name."""
  if arch == 'lenet_300_100':
    return LeNet300100(widths or (300, 100))
  if arch.startswith('resnet') and arch.endswith('_b'):
    return NMResNet(int(arch[len('resnet'):-2]), widths=widths)
  if arch in TV_RESNETS:
    return TVResNet(arch, widths=widths)
  if arch.startswith('resnet'):
    return AkamasterResNet(int(arch[len('resnet'):]), widths=widths)
  if arch == 'vgg16_bn_cifar':
    return CifarVGG(widths=widths)
  if arch == 'vgg16_bn':
    return TVVGG16BN(widths=widths)
  raise ValueError(f'no torch reference for {arch!r}')


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights and BN statistics (mean ~ N(0, 0.1), var, gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1)).

  Conv/Linear weights are He-scaled so activations keep a moderate range through depth; the model
  is put in eval mode (BN uses the running statistics, dropout is off).
  """
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      fan_in = m.weight[0].numel()
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) * np.sqrt(2.0 / fan_in))
      if m.bias is not None:
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
      m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
      m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
      m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
      m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
  return model.eval()


def state_dict(model: nn.Module, *, module_prefix: bool = False,
               num_batches_tracked: bool = True) -> collections.OrderedDict:
  """The model's state_dict, optionally with 'module.' prefixes and without BN counters."""
  sd = collections.OrderedDict()
  for k, v in model.state_dict().items():
    if not num_batches_tracked and k.endswith('num_batches_tracked'):
      continue
    sd[('module.' if module_prefix else '') + k] = v.detach().clone()
  return sd

"""Re-estimation of BatchNorm statistics after compression (issue 17, point 1).

Every compensation (pruning delivery, quantization rescale) changes the distribution of the
activations that the following BatchNorm layers see, while their running statistics stay those of
the original network. Nothing renormalizes, and the error compounds down the network
(``benchmarks/NOTES.md``). :func:`reestimate` gives every BN of a compressed network new running
statistics (``batch_stats`` mean / var only; the result is the same Flax model class with the same
widths and parameters). Three sources:

- ``'moments'`` (data-free, no inputs; under a second per CIFAR ResNet, about 2 s for a ResNet-50
  on a 2-core CPU): the BN-moments model of :mod:`lbyl_jax.pruning.moments` /
  :mod:`lbyl_jax.pruning.methods.bnm`, propagated through the COMPRESSED network (derivation below);
- ``'distilled'`` (data-free): inputs distilled from the ORIGINAL checkpoint's BN statistics
  (:func:`lbyl_jax.experimental.distill.distill`, ZeroQ-style) pushed through the compressed network;
- ``'images'`` (NOT data-free, marked so in the report): the same from the caller's unlabelled
  images.

For the two input-driven sources, ``mode`` chooses how the statistics are gathered:
``'sequential'`` (layer by layer in forward order: while the inputs pass, every BN normalizes with
the batch statistics of its own input, so each layer sees already re-estimated upstream BNs; the
recorded statistics are the new running statistics) or ``'all_at_once'`` (one forward pass with the
old running statistics, every BN's input statistics recorded; downstream layers see stale upstream
BNs). With ``batch_size`` smaller than the number of inputs, chunks are pooled exactly
(mean of means; E[z^2] pooled, law of total variance) and, in 'sequential' mode, each chunk is
normalized with its own statistics (the cumulative BN recalibration of AdaBN / PyTorch's
``momentum=None``); one chunk gives the exact layer-by-layer result.

``anchor=True`` re-estimates differentially: each BN channel keeps its ORIGINAL running statistics
and receives the change that the chosen source predicts between the original and the compressed
network on the same inputs (or under the same model):

  mean_new = mu_orig + (m_c - m_o),    var_new = var_orig * v_c / v_o,

where (m, v) are the source's statistics of that channel's input in the compressed (c) and the
original (o) network (a channel whose v_o vanishes gets var_orig + v_c - v_o; the variance is kept
>= 1e-6 var_orig). An unchanged network is a fixed point exactly, and a bias common to both
networks (distilled inputs that are not real images, the model's independence assumptions) cancels
to first order. The channels of a pruned producer's BN are matched to the original ones by their BN
scale and running variance, which surgery copies unchanged (:func:`channel_map`).

Derivation of the moments route
-------------------------------
BN_MOMENTS.md models every BN output as N(beta, gamma^2) per channel, exact in mean and variance
when the running statistics are those of the BN's input. After re-estimation that premise holds by
construction for every upstream BN of the compressed network, so under the model:

1. every activation that feeds a layer is a function of (beta, gamma) of the BNs above it, the
   residual structure and the pools, exactly as :func:`lbyl_jax.pruning.moments.propagate` models it:
   block inputs ReLU(N(beta_out + m_sc, gamma_out^2 + v_sc)), the stem's input the normalized
   image (0, 1 per channel), post-ReLU unit activations a = ReLU(y), y ~ N(beta, Sigma_y) with the
   correlations of the producer's folded filters under the propagated input variances
   (:func:`lbyl_jax.pruning.moments.preactivation`, 'diag' Sx), whose closed-form moments give E[a] and the
   channel covariance C = E[a a^T] - E[a] E[a]^T (:func:`lbyl_jax.pruning.moments.second_moment_matrices`);
   max-pools as the max of 4 iid copies (correlations kept, variances replaced), 2x2 average pools
   dividing the covariance by 4 (``spatial='independent'``) or not (``'shared'``).
   In the compressed network the same formulas read the compressed variables: only the kept
   channels exist, with their own (beta, gamma) -- :func:`lbyl_jax.pruning.moments.propagate` reads every
   width off the arrays, so it runs unchanged on pruned variables;
2. a BN's input is z = sum_t K_t^T x_{p+t} + b, the layer feeding it (kernel taps t, K_t of shape
   C x O) applied to such an activation x (mean m, covariance C per position). Positions are
   independent under the model (``spatial='independent'``) or fully correlated (``'shared'``),
   and zero padding removes the taps that fall outside the input. For each pattern u of valid taps
   (interior, edges, corners; weight w_u = its share of the output positions):

     E[z | u] = sum_{t in u} K_t^T m + b,
     Var[z | u] = sum_{t in u} diag(K_t^T C K_t)                  (independent)
                = diag((sum_{t in u} K_t)^T C (sum_{t in u} K_t))  (shared),

   and the BN's statistics pool the positions: mean = sum_u w_u E[z | u],
   var = sum_u w_u Var[z | u] + sum_u w_u (E[z | u] - mean)^2. A dense layer is the one-position
   case (after an NCHW flatten, each channel's positions are its taps);
3. applied to the COMPRESSED kernel (the delivery folded into the consumer, the kept rows of the
   producer, quantized weights), (2) is what the BN's input now has under the model. For a consumer
   with kept inputs K and delivery K'_K = K_K + S_P^T K_P, the change of the mean is
   -sum_u w_u sum_{t in u} K_{t,P}^T (E[a_P] - S_P E[a_K]), the pruned channels' undelivered mean
   (what the data-free bias correction of BN_MOMENTS.md folds), and the change of the variance is
   that of the delivered signal (the regression-dilution shrinkage of every least-squares delivery
   and of UDFC's rescale).

``anchor=False`` (``'absolute'``) sets the BN statistics to (2) of the compressed network directly.
Real activations are correlated across positions and channels in ways the model ignores, so the
absolute level of (2) can be far off; ``anchor=True`` (the default) uses only the model's change
between the original and the compressed kernels (see above). Because (1) depends only on BN
parameters and kernels, never on running statistics, the moments route is idempotent.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbyl_jax.core import trees
from lbyl_jax.core import units as units_lib
from lbyl_jax.core.bn import BN_EPS
from lbyl_jax.core.options import Options, number, option
from lbyl_jax.experimental import distill as distill_lib
from lbyl_jax.models import archs
from lbyl_jax.pruning import moments as moments_lib
from lbyl_jax.pruning import solvers
from lbyl_jax.pruning import terms
from lbyl_jax.pruning.problem import UnitProblem

SOURCES = ('moments', 'distilled', 'images')
MODES = ('sequential', 'all_at_once')
SPATIAL = ('independent', 'shared')
DISTILL_FROM = ('original', 'compressed')
_VAR_FLOOR = 1e-6   # relative to the original running variance
_POOL_WINDOW = 4    # every pool between a unit and its consumer is 2x2 in lbyl_jax.models


# --------------------------------------------------------------------------------------------
# The BN layers of a network: forward order, the layer feeding each, its geometry.


@dataclasses.dataclass(frozen=True)
class BNLayer:
  """One BatchNorm and the layer that feeds it.

  Attributes:
    path: the BN's path in ``params`` / ``batch_stats``.
    layer: the conv / dense layer whose output is the BN's input.
    kind: 'conv' or 'dense'.
    input_hw: (H, W) of the layer's input (convs), None for dense layers.
    kernel_size, strides: conv geometry (None for dense layers).
    padding: ((top, bottom), (left, right)) explicit conv padding (None for dense layers).
  """

  path: str
  layer: str
  kind: str
  input_hw: tuple[int, int] | None = None
  kernel_size: tuple[int, int] | None = None
  strides: tuple[int, int] | None = None
  padding: tuple[tuple[int, int], tuple[int, int]] | None = None


@functools.lru_cache(maxsize=64)
def _bn_layers_cached(spec, widths: tuple[int, ...]) -> tuple[BNLayer, ...]:
  produced: dict[int, tuple[str, Any, Any]] = {}
  keep_alive: list[Any] = []
  found: list[BNLayer] = []

  def interceptor(next_fun, args, kwargs, ctx):
    if ctx.method_name != '__call__':
      return next_fun(*args, **kwargs)
    mod = ctx.module
    path = '/'.join(mod.path)
    if isinstance(mod, nn.BatchNorm):
      src = produced.get(id(args[0]))
      if src is None:
        raise ValueError(f'{spec.name}: BatchNorm {path} does not follow a conv or dense layer')
      lpath, lmod, x = src
      if isinstance(lmod, nn.Conv):
        pads = lmod.padding
        if isinstance(pads, str):
          raise ValueError(f'{lpath}: padding {pads!r} is not explicit; the models pad explicitly')
        found.append(BNLayer(path, lpath, 'conv', (int(x.shape[1]), int(x.shape[2])),
                             tuple(int(k) for k in lmod.kernel_size),
                             tuple(int(s) for s in lmod.strides),
                             tuple((int(a), int(b)) for a, b in pads)))
      else:
        found.append(BNLayer(path, lpath, 'dense'))
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    if isinstance(mod, (nn.Conv, nn.Dense)):
      keep_alive.append(y)  # ids stay unique while the trace lives
      produced[id(y)] = (path, mod, args[0])
    return y

  model = spec.build(widths)
  abstract = spec.abstract_variables(widths)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: model.apply(v, x), abstract, spec.dummy_input())
  return tuple(found)


def bn_layers(spec, variables: Mapping[str, Any]) -> tuple[BNLayer, ...]:
  """Every BatchNorm of the network in forward order, with the layer feeding it (an abstract trace,
  cached per widths)."""
  return _bn_layers_cached(spec, units_lib.widths_of(variables, spec.units))


# --------------------------------------------------------------------------------------------
# Statistics of every BN's input on given inputs (sources 'distilled' and 'images').


@functools.lru_cache(maxsize=32)
def _stats_fn(spec, widths: tuple[int, ...], mode: str):
  model = spec.build(widths)

  def run(variables, x):
    stats: dict[str, tuple[jax.Array, jax.Array]] = {}

    def interceptor(next_fun, args, kwargs, ctx):
      if ctx.method_name != '__call__' or not isinstance(ctx.module, nn.BatchNorm):
        return next_fun(*args, **kwargs)
      z = args[0].astype(jnp.float32)
      axes = tuple(range(z.ndim - 1))
      mu = jnp.mean(z, axes)
      var = jnp.mean(jnp.square(z - mu), axes)
      stats['/'.join(ctx.module.path)] = (mu, var)
      if mode == 'all_at_once':
        return next_fun(*args, **kwargs)
      p = ctx.module.variables['params']
      return (z - mu) * jax.lax.rsqrt(var + ctx.module.epsilon) * p['scale'] + p['bias']

    with nn.intercept_methods(interceptor):
      model.apply(variables, x)
    return stats

  return jax.jit(run)


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')


def _check_batch_size(batch_size) -> None:
  if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size
                                 or batch_size < 1):
    raise ValueError(f'batch_size must be a positive integer or None, got {batch_size!r}')


def batch_statistics(spec, variables: Mapping[str, Any], inputs: np.ndarray, *,
                     mode: str = 'sequential', batch_size: int | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{BN path: (mean, var)} float64 of every BN's input on already-normalized ``inputs``.

  Args:
    spec, variables: the network (any widths).
    inputs: float NHWC (or the model's input shape) batch, already normalized.
    mode: 'sequential' (each BN normalizes with its own batch statistics while the batch passes:
      every BN sees re-estimated upstream BNs) or 'all_at_once' (one pass with the running
      statistics).
    batch_size: chunk size (None: one chunk). Chunks are pooled exactly; see the module docstring.
  """
  _check_mode(mode)
  _check_batch_size(batch_size)
  x = np.asarray(inputs, np.float32)
  if x.ndim != 1 + len(spec.input_shape) or tuple(x.shape[1:]) != tuple(spec.input_shape):
    raise ValueError(f'inputs must have shape (n, {", ".join(map(str, spec.input_shape))}) for '
                     f'{spec.name}, got {x.shape}')
  if x.shape[0] < 2:
    raise ValueError(f'batch statistics need at least 2 inputs, got {x.shape[0]}')
  widths = units_lib.widths_of(variables, spec.units)
  fn = _stats_fn(spec, widths, mode)
  dev_vars = jax.tree_util.tree_map(jnp.asarray, dict(variables))
  step = x.shape[0] if batch_size is None else int(batch_size)
  sums: dict[str, list[np.ndarray]] = {}
  total = 0
  for s in range(0, x.shape[0], step):
    chunk = x[s:s + step]
    out = fn(dev_vars, jnp.asarray(chunk))
    k = chunk.shape[0]
    for path, (mu, var) in out.items():
      mu = np.asarray(mu, np.float64)
      second = np.asarray(var, np.float64) + mu * mu
      if path in sums:
        sums[path][0] += k * mu
        sums[path][1] += k * second
      else:
        sums[path] = [k * mu, k * second]
    total += k
  stats = {}
  for path, (s1, s2) in sums.items():
    mean = s1 / total
    stats[path] = (mean, np.maximum(s2 / total - mean * mean, 0.0))
  return stats


_BATCH_MEMO: collections.OrderedDict = collections.OrderedDict()


def _original_batch_statistics(spec, variables, x, mode, batch_size):
  """:func:`batch_statistics` of the anchor network, memoized by a digest of its variables and the
  inputs (one original network is anchored against many compressed ones on the same inputs)."""
  h = hashlib.sha1(_params_digest(variables).encode())
  h.update(np.ascontiguousarray(x).tobytes())
  key = (spec.name, mode, batch_size, x.shape, h.hexdigest())
  if key not in _BATCH_MEMO:
    _BATCH_MEMO[key] = batch_statistics(spec, variables, x, mode=mode, batch_size=batch_size)
    while len(_BATCH_MEMO) > 4:
      _BATCH_MEMO.popitem(last=False)
  _BATCH_MEMO.move_to_end(key)
  return {k: (m.copy(), v.copy()) for k, (m, v) in _BATCH_MEMO[key].items()}


# --------------------------------------------------------------------------------------------
# The moments route.


def _unit_problems(spec, variables):
  """UnitProblems of ``variables`` with every channel kept (for the activation model)."""
  out = []
  for u in spec.units:
    W = np.asarray(terms.filters(variables, u), np.float64)
    n = W.shape[0]
    out.append(UnitProblem(u, W, terms.bn_terms(variables, u), np.arange(n), np.zeros(0, int)))
  return out


def _post_activation(spec, variables, moments, spatial: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{consumer path: (E[a], Cov(a))} of each BN unit's (pooled) post-ReLU activations."""
  probs = [p for p in _unit_problems(spec, variables) if p.unit.bn is not None]
  prepared = [moments_lib.preactivation(p, moments[p.unit.name], cov_model='diag')[:2] for p in probs]
  out = {}
  for p, (beta, cov), (e, m2) in zip(probs, prepared, moments_lib.second_moment_matrices(prepared)):
    c = m2 - np.outer(e, e)
    c = 0.5 * (c + c.T)
    if p.unit.pool == 'max':
      pe, pv = moments_lib.relu_mean_var(beta, np.diagonal(cov), _POOL_WINDOW)
      d = np.sqrt(np.maximum(np.diagonal(c), 0.0))
      scale = np.where(d > 0, np.sqrt(pv) / np.where(d > 0, d, 1.0), 0.0)
      c = scale[:, None] * c * scale[None, :]
      np.fill_diagonal(c, pv)
      e = pe
    elif p.unit.pool == 'avg' and spatial == 'independent':
      c = c / _POOL_WINDOW
    out[p.unit.consumer] = (e, c)
  return out


def _layer_inputs(spec, variables, spatial: str, input_mean: float, input_var: float
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{layer path: (mean (C,), covariance (C, C) or variances (C,))} of every layer's input that
  feeds a BN, under the model with every upstream BN re-estimated."""
  moments = moments_lib.propagate(spec, variables, input_mean=input_mean, input_var=input_var)
  out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  c = spec.input_shape[-1]
  out['conv1'] = (np.full(c, float(input_mean)), np.full(c, float(input_var)))  # stem (ResNets)
  if spec.family in ('vgg_cifar', 'vgg'):
    out['conv0'] = out.pop('conv1')
  for u in spec.units:
    m = moments[u.name]
    out[u.producer] = (m.mean, m.var)
    blk, _, leaf = u.producer.rpartition('/')
    if leaf == 'conv1' and blk:
      out[f'{blk}/downsample_conv'] = (m.mean, m.var)  # the shortcut reads the block input
  out.update(_post_activation(spec, variables, moments, spatial))  # consumers take precedence
  return out


def _valid_taps(size: int, k: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
  """(out, k) bool: whether kernel offset a reads inside [0, size) at output index i."""
  n_out = (size + pad[0] + pad[1] - k) // stride + 1
  idx = np.arange(n_out)[:, None] * stride - pad[0] + np.arange(k)[None, :]
  return (idx >= 0) & (idx < size)


def _tap_patterns(bn: BNLayer) -> list[tuple[np.ndarray, float]]:
  """[(valid taps (kh*kw,) bool, share of output positions)] for a conv's zero padding."""
  pats = []
  per_axis = []
  for a in range(2):
    v = _valid_taps(bn.input_hw[a], bn.kernel_size[a], bn.strides[a], bn.padding[a])
    rows, counts = np.unique(v, axis=0, return_counts=True)
    per_axis.append((rows, counts / counts.sum()))
  for r0, w0 in zip(*per_axis[0]):
    for r1, w1 in zip(*per_axis[1]):
      pats.append((np.outer(r0, r1).reshape(-1), float(w0 * w1)))
  return pats


def layer_output_moments(kernel: np.ndarray, bias: np.ndarray | None, mean: np.ndarray,
                         cov: np.ndarray, patterns: list[tuple[np.ndarray, float]], *,
                         spatial: str = 'independent') -> tuple[np.ndarray, np.ndarray]:
  """Mean and variance (over positions) of z = sum_t K_t^T x_t + b (step 2 of the derivation).

  Args:
    kernel: (T, C, O) taps of a conv (kh*kw in row-major order) or the positions of a dense layer.
    bias: (O,) or None.
    mean: (C,) input mean per channel; cov: (C, C) covariance or (C,) variances.
    patterns: [(valid taps (T,) bool, weight)] whose weights sum to 1.
    spatial: 'independent' or 'shared' positions.
  """
  K = np.asarray(kernel, np.float64)
  mean = np.asarray(mean, np.float64)
  cov = np.asarray(cov, np.float64)
  T, C, O = K.shape
  if mean.shape != (C,) or cov.shape not in ((C,), (C, C)):
    raise ValueError(f'input moments of shapes {mean.shape}, {cov.shape} do not match a kernel '
                     f'reading {C} channels')
  b = np.zeros(O) if bias is None else np.asarray(bias, np.float64)
  km = np.einsum('tco,c->to', K, mean)
  # Quadratic forms k^T cov k per output channel as (cov @ k) * k summed over c: BLAS products
  # (a plain three-operand einsum loops over c, d and o: seconds per ResNet-50 layer).
  if spatial == 'independent':
    kv = (np.einsum('tco,c->to', K * K, cov) if cov.ndim == 1
          else np.einsum('tco,tco->to', np.matmul(cov, K), K))
  elif spatial != 'shared':
    raise ValueError(f'spatial must be one of {SPATIAL}, got {spatial!r}')
  means, variances, weights = [], [], []
  for valid, w in patterns:
    means.append(km[valid].sum(0) + b)
    if spatial == 'independent':
      variances.append(kv[valid].sum(0))
    else:
      ks = K[valid].sum(0)
      variances.append(np.einsum('co,c->o', ks * ks, cov) if cov.ndim == 1
                       else np.einsum('co,co->o', cov @ ks, ks))
    weights.append(w)
  w = np.asarray(weights)[:, None]
  means, variances = np.asarray(means), np.asarray(variances)
  mu = np.sum(w * means, 0)
  return mu, np.maximum(np.sum(w * variances, 0) + np.sum(w * (means - mu) ** 2, 0), 0.0)


_MODEL_MEMO: collections.OrderedDict = collections.OrderedDict()
_MODEL_MEMO_SIZE = 8
_PENDING: dict = {}  # memo key -> Future of a computation prefetch() started


def _params_digest(params: Mapping[str, Any]) -> str:
  h = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(params))[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def model_statistics(spec, variables: Mapping[str, Any], *, spatial: str = 'independent',
                     input_mean: float = 0.0, input_var: float = 1.0
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{BN path: (mean, var)} of every BN's input under the BN-moments model (module docstring).

  Works on original and pruned variables alike (every width is read off the arrays); depends only
  on kernels, biases and BN affine parameters, never on running statistics. The last few results
  are memoized by a digest of ``params`` (an original network is anchored against many times);
  one that :func:`prefetch` started is waited for instead of computed again.
  """
  key = _memo_key(spec, variables, spatial, input_mean, input_var)
  pending = _PENDING.pop(key, None)
  if pending is not None:
    pending.result()  # its error, if any, is the one computing it here would raise
  return _memoized(key, spec, variables, spatial, input_mean, input_var)


def _memo_key(spec, variables, spatial, input_mean, input_var) -> tuple:
  if spatial not in SPATIAL:
    raise ValueError(f'spatial must be one of {SPATIAL}, got {spatial!r}')
  if spec.family == 'mlp' or 'batch_stats' not in variables:
    raise ValueError(f'{spec.name} has no BatchNorm layer to re-estimate')
  return (spec.name, spatial, float(input_mean), float(input_var),
          _params_digest(variables['params']))


def _memoized(key, spec, variables, spatial, input_mean, input_var):
  if key in _MODEL_MEMO:
    _MODEL_MEMO.move_to_end(key)
    return {k: (m.copy(), v.copy()) for k, (m, v) in _MODEL_MEMO[key].items()}
  out = _model_statistics(spec, variables, spatial, input_mean, input_var)
  _MODEL_MEMO[key] = out
  while len(_MODEL_MEMO) > _MODEL_MEMO_SIZE:
    _MODEL_MEMO.popitem(last=False)
  return {k: (m.copy(), v.copy()) for k, (m, v) in out.items()}


def _model_statistics(spec, variables, spatial, input_mean, input_var):
  inputs = _layer_inputs(spec, variables, spatial, input_mean, input_var)
  out = {}
  for bn in bn_layers(spec, variables):
    if bn.layer not in inputs:
      raise ValueError(f'{spec.name}: no moment model for the input of {bn.layer} (feeds {bn.path})')
    mean, cov = inputs[bn.layer]
    layer = trees.get_path(variables['params'], bn.layer)
    k = np.asarray(layer['kernel'], np.float64)
    bias = np.asarray(layer['bias'], np.float64) if 'bias' in layer else None
    if bn.kind == 'conv':
      K = k.reshape(-1, k.shape[2], k.shape[3])
      pats = _tap_patterns(bn)
    else:
      c = mean.shape[0]
      if k.shape[0] % c:
        raise ValueError(f'{bn.layer}: {k.shape[0]} inputs do not split into {c} channels')
      r = k.shape[0] // c
      K = np.transpose(k.reshape(c, r, k.shape[1]), (1, 0, 2))  # NCHW flatten: channel-major
      pats = [(np.ones(r, bool), 1.0)]
    out[bn.path] = layer_output_moments(K, bias, mean, cov, pats, spatial=spatial)
  return out


# --------------------------------------------------------------------------------------------
# Anchoring: channel correspondence and the differential update.


def channel_map(original: Mapping[str, Any], compressed: Mapping[str, Any], path: str,
                layer: str | None = None) -> tuple[np.ndarray, float]:
  """Original channel index of every channel of the compressed BN ``path``, and the worst relative
  mismatch of the matched BN scales.

  Same widths: the identity. A pruned producer's BN: surgery slices its scale gamma unchanged
  (quantization and UDFC's mean shift move only kernels and beta), so the assignment minimising
  the summed relative differences of gamma (scipy's ``linear_sum_assignment``) recovers the kept
  channels. Where ``layer`` (the conv feeding the BN) reads the same inputs in both networks,
  1e-3 times the relative distance of its output filters breaks ties between equal scales.
  """
  go = np.asarray(trees.get_path(original['params'], path)['scale'], np.float64)
  gc = np.asarray(trees.get_path(compressed['params'], path)['scale'], np.float64)
  if gc.size == go.size:
    return np.arange(go.size), 0.0
  if gc.size > go.size:
    raise ValueError(f'{path}: the compressed BN has {gc.size} channels, more than the original '
                     f'{go.size}')
  rel = np.abs(gc[:, None] - go[None, :]) / np.maximum(np.abs(go[None, :]), 1e-12)
  cost = rel.copy()
  if layer is not None:
    ko = np.asarray(trees.get_path(original['params'], layer)['kernel'], np.float64)
    kc = np.asarray(trees.get_path(compressed['params'], layer)['kernel'], np.float64)
    if ko.shape[:-1] == kc.shape[:-1]:
      ko = ko.reshape(-1, ko.shape[-1]).T
      kc = kc.reshape(-1, kc.shape[-1]).T
      d = np.sqrt(np.maximum(np.sum(kc * kc, 1)[:, None] + np.sum(ko * ko, 1)[None, :]
                             - 2.0 * kc @ ko.T, 0.0))
      cost += 1e-3 * d / np.maximum(np.linalg.norm(ko, axis=1)[None, :], 1e-12)
  import scipy.optimize  # pylint: disable=import-outside-toplevel  (0.1-0.3 s to import)
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  idx = np.empty(gc.size, np.int64)
  idx[rows] = cols
  return idx, float(rel[rows, cols].max()) if rows.size else 0.0


def _anchored(ref_mean, ref_var, m_c, v_c, m_o, v_o) -> tuple[np.ndarray, np.ndarray]:
  mean = ref_mean + (m_c - m_o)
  ok = v_o > 1e-12 * np.maximum(ref_var, 1e-30)
  var = np.where(ok, ref_var * v_c / np.where(ok, v_o, 1.0), ref_var + v_c - v_o)
  return mean, np.maximum(var, _VAR_FLOOR * ref_var)


# --------------------------------------------------------------------------------------------
# Entry point.


def _prepare_images(spec, images) -> np.ndarray:
  x = np.asarray(images)
  if x.dtype == np.uint8:
    if x.ndim == 3 and spec.input_shape[-1] == 1:
      x = x[..., None]
    x = np.asarray(archs.normalize_fn(spec)(x))
  elif not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'images must be uint8 pixels or already-normalized floats, got {x.dtype}')
  if x.ndim != 4 or tuple(x.shape[1:]) != tuple(spec.input_shape):
    raise ValueError(f'images must have shape (n, {", ".join(map(str, spec.input_shape))}) for '
                     f'{spec.name}, got {np.shape(images)}')
  if x.shape[0] < 2:
    raise ValueError(f'images: at least 2 are needed to estimate statistics, got {x.shape[0]}')
  if not np.all(np.isfinite(x)):
    raise ValueError('images contain non-finite values')
  return x.astype(np.float32)


def _check_int(value, name: str, lo: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ValueError(f'{name} must be an integer >= {lo}, got {value!r}')
  return int(value)


def _check_networks(spec, original, compressed, widths) -> tuple[int, ...]:
  for name, v in (('original_variables', original), ('compressed_variables', compressed)):
    if not isinstance(v, Mapping) or 'params' not in v:
      raise ValueError(f"{name} must be a mapping with a 'params' collection")
  if spec.family == 'mlp' or 'batch_stats' not in original or 'batch_stats' not in compressed:
    raise ValueError(f'{spec.name} has no BatchNorm layer to re-estimate')
  try:
    have = units_lib.widths_of(compressed, spec.units)
    orig_w = units_lib.widths_of(original, spec.units)
  except (KeyError, TypeError) as e:
    raise ValueError(f'variables do not match {spec.name}: missing {e}') from None
  if widths is not None and tuple(int(w) for w in widths) != have:
    raise ValueError(f'widths {tuple(widths)} do not match the compressed variables {have}')
  bad = [u.name for u, a, b in zip(spec.units, have, orig_w) if a > b]
  if bad:
    raise ValueError(f'compressed widths exceed the original ones at {", ".join(bad[:3])}')
  return have


def reestimate(spec, original_variables: Mapping[str, Any], compressed_variables: Mapping[str, Any],
               widths=None, *, source: str = 'moments', images: np.ndarray | None = None,
               inputs: np.ndarray | None = None, n: int = 128, steps: int = 200, lr: float = 0.1,
               seed: int = 0, mode: str = 'sequential', anchor: bool = True,
               spatial: str = 'independent', distill_from: str = 'original',
               batch_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """New running statistics for every BN of a compressed network (module docstring).

  Args:
    spec: the :class:`lbyl_jax.models.archs.ArchSpec`.
    original_variables: the uncompressed checkpoint (its BN statistics are the anchor and the
      distillation target).
    compressed_variables: the compressed network (same class, possibly smaller widths); not
      modified.
    widths: the compressed widths, checked against the variables (None: read off them).
    source: 'moments' (data-free, model), 'distilled' (data-free, BN-distilled inputs) or
      'images' (the caller's unlabelled ``images``; not data-free).
    images: for 'images' only: uint8 pixels (N, H, W, C) (normalized with the preset's mean /
      std) or already-normalized floats.
    inputs: for 'distilled' only: precomputed distilled inputs (normalized floats, e.g. from
      :func:`lbyl_jax.experimental.distill.distill` of the original network with the same ``n``, ``steps``,
      ``lr``, ``seed``), to share one distillation between several networks; None distills.
    n, steps, lr, seed: the distillation (:func:`lbyl_jax.experimental.distill.distill`).
    mode: 'sequential' or 'all_at_once' (input-driven sources).
    anchor: differential update on the original statistics (True) or absolute statistics.
    spatial: 'independent' or 'shared' positions (moments source).
    distill_from: distill from the 'original' checkpoint's BN statistics or from the
      'compressed' network's (its stale ones).
    batch_size: chunk size of the statistics pass (None: all inputs at once).

  Returns:
    (new_variables, report): ``new_variables`` is ``compressed_variables`` with new
    ``batch_stats`` mean / var (float32) for every BN; the report has ``source``, ``data_free``,
    the options used, ``seconds`` (total) with its parts, the distillation loss, and per BN the
    largest mean shift in old standard deviations and the range of var_new / var_old.

  Raises:
    ValueError: an unknown source / mode / spatial model, images given to a data-free source or
      missing for 'images', bad n / steps / lr / seed / batch_size, variables that do not match
      ``spec`` or ``widths``, a network without BatchNorm.
  """
  t_start = time.perf_counter()
  if source not in SOURCES:
    raise ValueError(f'source must be one of {SOURCES}, got {source!r}')
  _check_mode(mode)
  _check_batch_size(batch_size)
  if spatial not in SPATIAL:
    raise ValueError(f'spatial must be one of {SPATIAL}, got {spatial!r}')
  if distill_from not in DISTILL_FROM:
    raise ValueError(f'distill_from must be one of {DISTILL_FROM}, got {distill_from!r}')
  if not isinstance(anchor, (bool, np.bool_)):
    raise ValueError(f'anchor must be True or False, got {anchor!r}')
  if source == 'images' and images is None:
    raise ValueError("source='images' needs images (unlabelled, uint8 pixels or normalized floats)")
  if source != 'images' and images is not None:
    raise ValueError(f"images are only read by source='images' (got source={source!r}); the "
                     'data-free sources use none')
  if source != 'distilled' and inputs is not None:
    raise ValueError(f"inputs (precomputed distilled inputs) only apply to source='distilled', "
                     f'got source={source!r}')
  if source == 'distilled':
    _check_int(n, 'n', 2)
    _check_int(steps, 'steps', 0)
    if not (isinstance(lr, (int, float, np.floating)) and np.isfinite(lr) and lr > 0):
      raise ValueError(f'lr must be a finite number > 0, got {lr!r}')
  _check_int(seed, 'seed', 0)
  have = _check_networks(spec, original_variables, compressed_variables, widths)

  report: dict[str, Any] = dict(source=source, data_free=source != 'images', anchor=bool(anchor),
                                widths=list(have))
  t0 = time.perf_counter()
  if source == 'moments':
    report.update(spatial=spatial)
    new_c = model_statistics(spec, compressed_variables, spatial=spatial)
    new_o = model_statistics(spec, original_variables, spatial=spatial) if anchor else None
    report['seconds_statistics'] = time.perf_counter() - t0
  else:
    report.update(mode=mode, batch_size=batch_size)
    if source == 'images':
      x = _prepare_images(spec, images)
    elif inputs is not None:
      x = _prepare_images(spec, inputs)
      if not np.issubdtype(np.asarray(inputs).dtype, np.floating):
        raise ValueError('inputs must be already-normalized floats (distilled inputs)')
      report.update(n=int(x.shape[0]), distilled='supplied by the caller')
    else:
      target = original_variables if distill_from == 'original' else compressed_variables
      x, info = distill_lib.distill(spec, target, n=int(n), steps=int(steps), lr=float(lr),
                                seed=int(seed))
      report.update(n=int(n), steps=int(steps), lr=float(lr), seed=int(seed),
                    distill_from=distill_from, distill_loss_start=info['loss_start'],
                    distill_loss_end=info['loss_end'],
                    seconds_distill=time.perf_counter() - t0)
    report['n_inputs'] = int(x.shape[0])
    t1 = time.perf_counter()
    new_c = batch_statistics(spec, compressed_variables, x, mode=mode, batch_size=batch_size)
    new_o = (_original_batch_statistics(spec, original_variables, x, mode, batch_size)
             if anchor else None)
    report['seconds_statistics'] = time.perf_counter() - t1

  new_variables = dict(compressed_variables)
  stats_tree = _copy(compressed_variables['batch_stats'])  # fresh containers and arrays
  layers, worst_map = [], 0.0
  for bn in bn_layers(spec, compressed_variables):
    old = trees.get_path(compressed_variables['batch_stats'], bn.path)
    old_mean = np.asarray(old['mean'], np.float64)
    old_var = np.asarray(old['var'], np.float64)
    m_c, v_c = new_c[bn.path]
    if anchor:
      idx, mismatch = channel_map(original_variables, compressed_variables, bn.path, bn.layer)
      if mismatch > 1e-3:
        raise ValueError(f'{bn.path}: the compressed BN channels do not match original ones (BN '
                         f'scales differ by {mismatch:.3g} relative); anchor=True needs the '
                         'original network the compressed one was made from')
      worst_map = max(worst_map, mismatch)
      ref = trees.get_path(original_variables['batch_stats'], bn.path)
      m_o, v_o = new_o[bn.path]
      mean, var = _anchored(np.asarray(ref['mean'], np.float64)[idx],
                            np.asarray(ref['var'], np.float64)[idx], m_c, v_c, m_o[idx], v_o[idx])
    else:
      mean, var = m_c, np.maximum(v_c, _VAR_FLOOR * old_var)
    if mean.shape != old_mean.shape:
      raise ValueError(f'{bn.path}: statistics of shape {mean.shape} for a BN of {old_mean.shape}')
    trees.set_path(stats_tree, bn.path, dict(old, mean=mean.astype(np.float32),
                                                 var=var.astype(np.float32)))
    sd = np.sqrt(old_var + BN_EPS)
    ratio = var / old_var
    layers.append(dict(name=bn.path, mean_shift_max=float(np.max(np.abs(mean - old_mean) / sd)),
                       var_ratio_min=float(ratio.min()), var_ratio_median=float(np.median(ratio)),
                       var_ratio_max=float(ratio.max())))
  new_variables['batch_stats'] = stats_tree
  report.update(layers=layers, n_bn=len(layers), channel_map_mismatch=worst_map,
                seconds=time.perf_counter() - t_start)
  return new_variables, report


def _copy(tree):
  if isinstance(tree, Mapping):
    return {k: _copy(v) for k, v in tree.items()}
  return np.array(tree)


# --------------------------------------------------------------------------------------------
# The opt-in post-compression stage: options (command-line flags) and the call on a result.

RECIPES = ('none', 'moments', 'distilled')


@dataclasses.dataclass(frozen=True)
class BNReestimation(Options):
  """Re-estimation of every BN's running statistics after compression (opt-in; default off).

  The defaults of the distilled route (64 inputs, 50 Adam steps, distilled from the original
  checkpoint, statistics gathered layer by layer, anchored) and the moments route's 'shared'
  positions were chosen on the development split (CIFAR-10 test images 0-4999; recipe
  ``d64x50a`` and ``mom_shared`` of ``benchmarks/bn_reestimate.py``'s docstring).
  ``calibrate_bn`` is the real-image oracle: NOT data-free, marked so in the report.
  """

  stage: ClassVar[str] = 'BN re-estimation'

  bn_reestimate: str = option(
      'none', choices=RECIPES,
      help="after compression, give every BatchNorm the statistics its input now has, without"
           " data: 'moments' (the BN-moments model, no inputs) or 'distilled' (inputs"
           " distilled from the original checkpoint's BN statistics)")
  bn_distill_inputs: int = option(64, check=number(2, integer=True), metavar='N',
                                  help="--bn-reestimate distilled: number of distilled inputs")
  bn_distill_steps: int = option(50, check=number(0, integer=True), metavar='S',
                                 help='--bn-reestimate distilled: Adam steps of the distillation')
  calibrate_bn: int | None = option(
      None, check=number(2, integer=True), metavar='N',
      help='NOT data-free: re-estimate every BN from the first N unlabelled images of'
           ' --calib-data instead (the real-image oracle of --bn-reestimate)',
      default_text='off')
  bn_distill_lr: float = option(0.1, check=number(0.0, lo_open=True), advanced=True,
                                help='--bn-reestimate distilled: Adam step size')
  bn_seed: int = option(0, check=number(0, integer=True), advanced=True,
                        help='--bn-reestimate distilled: seed of the distillation start')
  bn_anchor: bool = option(True, flag='--bn-absolute', advanced=True,
                           help='BN re-estimation: set the statistics measured on the compressed'
                                ' network directly instead of adding their change between the'
                                ' original and the compressed network to the original ones')
  bn_mode: str = option('sequential', choices=MODES, advanced=True,
                        help="BN re-estimation from inputs: 'sequential' (layer by layer) or"
                             " 'all_at_once' (one pass with the stale statistics)")
  bn_spatial: str = option('shared', choices=SPATIAL, advanced=True,
                           help="--bn-reestimate moments: positions 'shared' (fully correlated)"
                                " or 'independent'")

  def __post_init__(self):
    super().__post_init__()
    if self.calibrate_bn is not None and self.bn_reestimate != 'none':
      raise ValueError(f'--calibrate-bn (real images) and --bn-reestimate {self.bn_reestimate}'
                       ' (data-free) are two ways of doing the same thing; give one')

  @property
  def enabled(self) -> bool:
    return self.bn_reestimate != 'none' or self.calibrate_bn is not None

  @property
  def source(self) -> str:
    """'none', 'moments', 'distilled' or 'images'."""
    return 'images' if self.calibrate_bn is not None else self.bn_reestimate

  @property
  def recipe(self) -> str:
    """Short name of the recipe, as in the development-split tables: ``d64x50a`` (distilled, 64
    inputs, 50 steps, anchored), ``mom_shared_a``, ``img1000a``; no 'a': absolute."""
    a = 'a' if self.bn_anchor else ''
    mode = '' if self.bn_mode == 'sequential' else '_all'
    if self.source == 'moments':
      return f'mom_{self.bn_spatial}_{a}'.rstrip('_')
    if self.source == 'distilled':
      extra = ''.join([mode, '' if self.bn_distill_lr == 0.1 else f'_lr{self.bn_distill_lr:g}',
                       '' if self.bn_seed == 0 else f'_s{self.bn_seed}'])
      return f'd{self.bn_distill_inputs}x{self.bn_distill_steps}{a}{extra}'
    if self.source == 'images':
      return f'img{self.calibrate_bn}{a}{mode}'
    return 'none'


def _float_tree(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)


_DISTILL_MEMO: collections.OrderedDict = collections.OrderedDict()


def distilled_inputs(spec, original_variables: Mapping[str, Any], recipe: BNReestimation
                     ) -> tuple[np.ndarray, dict[str, Any]]:
  """The recipe's distilled inputs of the ORIGINAL network (memoized by a digest of its variables:
  one distillation serves every compressed network of a sweep). Returns (inputs, info) where info
  has the losses and the seconds the distillation took when it ran (0 when memoized)."""
  key = (spec.name, recipe.bn_distill_inputs, recipe.bn_distill_steps, recipe.bn_distill_lr,
         recipe.bn_seed, _params_digest(original_variables))
  if key in _DISTILL_MEMO:
    _DISTILL_MEMO.move_to_end(key)
    x, info = _DISTILL_MEMO[key]
    return x, dict(info, seconds=0.0, memoized=True)
  t0 = time.perf_counter()
  x, info = distill_lib.distill(spec, original_variables, n=recipe.bn_distill_inputs,
                                steps=recipe.bn_distill_steps, lr=recipe.bn_distill_lr,
                                seed=recipe.bn_seed)
  info = dict(info, seconds=time.perf_counter() - t0, memoized=False)
  _DISTILL_MEMO[key] = (x, info)
  while len(_DISTILL_MEMO) > 2:
    _DISTILL_MEMO.popitem(last=False)
  return x, info


def prefetch(spec, original_variables: Mapping[str, Any], recipe: BNReestimation | None):
  """Starts, in the precompile threads, the one part of the moments route that depends on the
  original network alone: its model statistics (the anchor). A command calls it before
  compressing, so the computation overlaps the compression; :func:`model_statistics` (called by
  :func:`reestimate_compressed`) waits for it and takes its memoized result instead of computing
  it again. The results are the same either way. Returns the future, or None where there is
  nothing to start (another route, no anchor, no BatchNorm, already memoized or started)."""
  if (recipe is None or recipe.source != 'moments' or not recipe.bn_anchor
      or spec.family == 'mlp' or 'batch_stats' not in original_variables):
    return None
  key = _memo_key(spec, original_variables, recipe.bn_spatial, 0.0, 1.0)
  if key in _MODEL_MEMO or key in _PENDING:
    return None
  future = solvers.in_background(_memoized, key, spec, original_variables, recipe.bn_spatial,
                                 0.0, 1.0)
  _PENDING[key] = future
  return future


def reestimate_compressed(compressed, original_variables: Mapping[str, Any],
                          recipe: BNReestimation | None = None, *, images: np.ndarray | None = None,
                          **options):
  """The post-compression stage: a copy of a :class:`lbyl_jax.pipeline.Compressed` whose BN
  running statistics are re-estimated by ``recipe``.

  The result is the same network class with the same widths and parameters; only ``batch_stats``
  mean / var change (in ``variables`` and, for a quantized result, in the stored ``qtree``, whose
  BN statistics are float). Its report gets ``bn_reestimate``: the recipe and its options,
  ``data_free``, ``seconds`` (distillation included; 0 distillation seconds when the inputs were
  memoized from an earlier call on the same original) and the per-BN changes
  (:func:`reestimate`).

  Args:
    compressed: the result of :func:`lbyl_jax.pipeline.compress` (or :func:`lbyl_jax.compress`).
    original_variables: the uncompressed variables it was made from.
    recipe: a :class:`BNReestimation`; or flat options instead
      (``bn_reestimate='distilled'``, ``calibrate_bn=1000``, ...).
    images: unlabelled uint8 images (N, H, W, C), at least ``recipe.calibrate_bn`` of them (the
      first ``calibrate_bn`` are used); only with ``calibrate_bn``.

  Returns:
    The new result (``compressed`` itself when the recipe is 'none').
  """
  if recipe is None:
    recipe = BNReestimation.from_flat(options)
  elif options:
    raise ValueError('pass a BNReestimation or flat options, not both')
  if not isinstance(recipe, BNReestimation):
    raise ValueError(f'recipe must be a BNReestimation, got {type(recipe).__name__}')
  if recipe.enabled and getattr(compressed, 'act_meta', None) is not None:
    raise ValueError('BN re-estimation of a result with quantized activations (--act-bits): the '
                     'activation ranges were taken from the statistics before the re-estimation; '
                     'use one of the two')
  if recipe.source == 'images':
    if images is None:
      raise ValueError('--calibrate-bn needs unlabelled images (--calib-data)')
    if len(images) < recipe.calibrate_bn:
      raise ValueError(f'--calibrate-bn {recipe.calibrate_bn}: --calib-data has only '
                       f'{len(images)} images')
    images = np.asarray(images)[:recipe.calibrate_bn]
  elif images is not None:
    raise ValueError('images are read only by calibrate_bn (the real-image oracle)')
  if not recipe.enabled:
    return compressed
  spec = compressed.spec
  t0 = time.perf_counter()
  extra: dict[str, Any] = {}
  kwargs: dict[str, Any] = dict(source=recipe.source, anchor=recipe.bn_anchor)
  if recipe.source == 'moments':
    kwargs['spatial'] = recipe.bn_spatial
  else:
    kwargs['mode'] = recipe.bn_mode
  if recipe.source == 'distilled':
    x, info = distilled_inputs(spec, original_variables, recipe)
    kwargs['inputs'] = x
    extra = dict(n=recipe.bn_distill_inputs, steps=recipe.bn_distill_steps,
                 lr=recipe.bn_distill_lr, seed=recipe.bn_seed, distill_from='original',
                 distill_loss_start=info['loss_start'], distill_loss_end=info['loss_end'],
                 seconds_distill=info['seconds'], distill_memoized=info['memoized'])
  elif recipe.source == 'images':
    kwargs['images'] = images
  new_vars, rep = reestimate(spec, original_variables, compressed.variables, compressed.widths,
                             **kwargs)
  rep.pop('distilled', None)
  rep.update(extra, recipe=recipe.recipe, options=recipe.describe(),
             seconds=time.perf_counter() - t0)
  qtree = compressed.qtree
  if qtree is not None:
    qtree = dict(qtree, batch_stats=_float_tree(new_vars['batch_stats']))
  report = dict(compressed.report, bn_reestimate=rep)
  return dataclasses.replace(compressed, variables=new_vars, report=report, qtree=qtree)

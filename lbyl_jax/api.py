"""The one-call Python API: ``lbyl_jax.pruning``, ``lbyl_jax.load``, ``lbyl_jax.preprocess``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from lbyl_jax import pipeline
from lbyl_jax.experimental import bn_reestimate as bn_lib
from lbyl_jax.core.units import DEFAULT_POLICY, Discovery
from lbyl_jax.models import custom
from lbyl_jax.models import discover as discover_lib
from lbyl_jax.io import checkpoint
from lbyl_jax.io import weights as weights_lib
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan
from lbyl_jax.quant import actquant


def compress(arch: str | archs.ArchSpec | nn.Module, variables: Mapping[str, Any] | None = None,
             example_shape: Sequence[int] | None = None, *, weights: str | None = None,
             plan: Plan | None = None, download: bool = True,
             model_options: Mapping[str, Any] | None = None,
             bn_reestimate: str | bn_lib.BNReestimation | None = None,
             calib_images: np.ndarray | None = None, **options) -> pipeline.Compressed:
  """Prunes, compensates and optionally quantizes a preset, or any flax.linen CNN, in one call.

  Args:
    arch: preset name (``lbyl_jax.models.archs.names()``), an ArchSpec, or a flax.linen Module
      of the user's (its prunable units are discovered by tracing; see :func:`discover`).
    variables: original-width float variables (required for a Module; for a preset, instead of
      ``weights``).
    example_shape: a Module's input shape WITH the batch axis, e.g. (1, 32, 32, 3).
    weights: for a preset, where the weights come from when ``variables`` is not given: a
      checkpoint file, an lbyl_jax checkpoint directory, 'random', or None (the preset's cached /
      downloaded file).
    model_options: for a Module, :func:`lbyl_jax.models.custom.custom_spec` options (policy,
      width_fields, apply_kwargs, hparams, mean, std, name).
    plan: a :class:`~lbyl_jax.plan.Plan`; or flat options instead, e.g. ``method='nm',
      ratio=0.4, quant_method='udfc', bits=4`` (see ``python -m lbyl_jax.restore --help-all``).
    download: allow a verified download of the preset's weights.
    bn_reestimate: opt-in, after compression: 'moments' or 'distilled' (data-free; the
      development-split defaults of :class:`~lbyl_jax.experimental.bn_reestimate.BNReestimation`)
      or a ``BNReestimation`` (e.g. ``BNReestimation(calibrate_bn=1000)``, real images: not
      data-free); the new BN statistics fold into the variables, the report gets
      ``bn_reestimate`` (recipe, ``data_free``, seconds). None: off.
    calib_images: unlabelled uint8 NHWC images, for ``calibrate_bn`` or for activation ranges
      observed on them (``act_bits=N, act_ranges='calibration'``: NOT data-free; the report's
      ``act_quant`` says ``data_free: False``); refused where nothing uses them.

  Returns:
    :class:`~lbyl_jax.pipeline.Compressed`: ``.model`` (the same class with smaller widths, or an
    equivalent module), ``.variables``, ``.report``, ``.apply(uint8_images) -> logits`` and
    ``.save(directory)`` (presets: reload with :func:`load`).
  """
  spec = _spec(arch, variables, example_shape, model_options)
  if plan is None:
    plan = Plan.from_options(**options)
  elif options:
    raise ValueError('pass a Plan or flat options, not both')
  if variables is None:
    if spec.family == 'custom':
      raise ValueError('a user module needs its variables')
    variables, _ = weights_lib.load_weights(spec, weights, download=download, progress=False)
  elif weights is not None:
    raise ValueError('pass weights or variables, not both')
  if isinstance(bn_reestimate, str):
    bn_reestimate = bn_lib.BNReestimation(bn_reestimate=bn_reestimate)
  elif bn_reestimate is not None and not isinstance(bn_reestimate, bn_lib.BNReestimation):
    raise ValueError(f'bn_reestimate must be a recipe name or a BNReestimation, got '
                     f'{type(bn_reestimate).__name__}')
  if plan.activations.needs_images:
    if bn_reestimate is not None:
      raise ValueError('bn_reestimate with act_bits: the activation ranges are taken from the '
                       'statistics before the re-estimation; use one of the two')
    return pipeline.compress(spec, variables, plan, calib_images=calib_images)
  bn_lib.prefetch(spec, variables, bn_reestimate)  # overlaps the compression
  result = pipeline.compress(spec, variables, plan)
  if bn_reestimate is None and calib_images is None:
    return result
  return bn_lib.reestimate_compressed(result, variables,
                                      bn_reestimate or bn_lib.BNReestimation(), images=calib_images)


def _spec(arch, variables, example_shape, model_options) -> archs.ArchSpec:
  if isinstance(arch, nn.Module):
    if example_shape is None:
      raise ValueError('a user module needs example_shape (its input shape with the batch axis)')
    return custom.custom_spec(arch, example_shape, **dict(model_options or {}))
  if example_shape is not None or model_options:
    raise ValueError('example_shape / model_options apply to a user module, not to a preset')
  return archs.get(arch) if isinstance(arch, str) else arch


def discover(module: nn.Module, variables: Mapping[str, Any] | None = None,
             example_shape: Sequence[int] = (1, 32, 32, 3), **model_options) -> Discovery:
  """The prunable units of any flax.linen CNN (``print()`` it for a table): producers, their
  BatchNorm, activation and consumers, what compensation applies, what is coupled or unprunable
  and why. ``variables`` may be omitted (shapes are traced) or abstract."""
  if variables is not None:
    return discover_lib.discover(module, variables, example_shape,
                                 apply_kwargs=model_options.get('apply_kwargs'),
                                 policy=model_options.get('policy', DEFAULT_POLICY))
  return custom.custom_spec(module, example_shape, **model_options).discovery


load_factory = custom.load_factory


def load(path, **kwargs) -> checkpoint.Loaded:
  """A saved run or converted checkpoint: ``.model``, ``.variables``, ``.meta``,
  ``.apply(uint8_images) -> logits``. A run saved with activation quantization (``--act-bits``)
  comes back as :class:`lbyl_jax.quant.actquant.ActLoaded`, whose ``apply`` fake-quantizes the
  activations with the stored ranges."""
  return actquant.restore(checkpoint.load(path, **kwargs))


def preprocess(arch: str | archs.ArchSpec, images) -> np.ndarray:
  """uint8 NHWC images -> the normalized float input the preset's weights expect."""
  spec = archs.get(arch) if isinstance(arch, str) else arch
  return np.asarray(archs.normalize_fn(spec)(images))

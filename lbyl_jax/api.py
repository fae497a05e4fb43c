"""The one-call Python API: ``lbyl_jax.pruning``, ``lbyl_jax.load``, ``lbyl_jax.preprocess``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lbyl_jax import pipeline
from lbyl_jax.io import checkpoint
from lbyl_jax.io import weights as weights_lib
from lbyl_jax.models import archs
from lbyl_jax.plan import Plan


def compress(arch: str | archs.ArchSpec, *, weights: str | None = None,
             variables: Mapping[str, Any] | None = None, plan: Plan | None = None,
             download: bool = True, **options) -> pipeline.Compressed:
  """Prunes, compensates and optionally quantizes a preset in one call.

  Args:
    arch: preset name (``lbyl_jax.models.archs.names()``) or an ArchSpec.
    weights: where the weights come from when ``variables`` is not given: a checkpoint file, an
      lbyl_jax checkpoint directory, 'random', or None (the preset's cached / downloaded file).
    variables: original-width float variables (instead of ``weights``).
    plan: a :class:`~lbyl_jax.plan.Plan`; or flat options instead, e.g. ``method='nm',
      ratio=0.4, quant_method='udfc', bits=4`` (see ``python -m lbyl_jax.restore --help-all``).
    download: allow a verified download of the preset's weights.

  Returns:
    :class:`~lbyl_jax.pipeline.Compressed`: ``.model``, ``.variables``, ``.report``,
    ``.apply(uint8_images) -> logits`` and ``.save(directory)``.
  """
  spec = archs.get(arch) if isinstance(arch, str) else arch
  if plan is None:
    plan = Plan.from_options(**options)
  elif options:
    raise ValueError('pass a Plan or flat options, not both')
  if variables is None:
    variables, _ = weights_lib.load_weights(spec, weights, download=download, progress=False)
  elif weights is not None:
    raise ValueError('pass weights or variables, not both')
  return pipeline.compress(spec, variables, plan)


def load(path) -> checkpoint.Loaded:
  """A saved run or converted checkpoint: ``.model``, ``.variables``, ``.meta``,
  ``.apply(uint8_images) -> logits``."""
  return checkpoint.load(path)


def preprocess(arch: str | archs.ArchSpec, images) -> np.ndarray:
  """uint8 NHWC images -> the normalized float input the preset's weights expect."""
  spec = archs.get(arch) if isinstance(arch, str) else arch
  return np.asarray(archs.normalize_fn(spec)(images))

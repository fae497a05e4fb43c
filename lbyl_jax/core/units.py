"""Prunable units: producer -> (BN) -> ReLU -> (pool) -> consumer (docs/README.md, "Units").

A unit names the producing layer whose output channels are removed, the BN that follows it, and
the consumer whose input channels receive the compensation. Shortcuts, stems, expansion convs and
heads are never producers. The unit name doubles as the model's width slot.

Paths are '/'-joined keys into ``variables['params']`` (and ``variables['batch_stats']`` for BN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from lbyl_jax.core import trees


@dataclasses.dataclass(frozen=True)
class Unit:
  """One prunable unit.

  Attributes:
    name: width-slot name, equal to ``producer``.
    producer: path of the conv/dense whose output channels are pruned.
    bn: path of the BatchNorm after the producer, or None (MLP: the bias is a filter coordinate).
    consumer: path of the conv/dense that reads the producer's channels.
    consumer_kind: 'conv' (HWIO kernel) or 'dense' ((in, out) kernel).
    flatten: spatial positions per channel seen by a dense consumer after an NCHW flatten.
    pool: 'max' or 'avg' if a pool sits between the activation and the consumer.
  """

  name: str
  producer: str
  bn: str | None
  consumer: str
  consumer_kind: str
  flatten: int = 1
  pool: str | None = None


def width_of(variables: Mapping[str, Any], unit: Unit) -> int:
  return int(np.shape(trees.get_path(variables['params'], unit.producer)['kernel'])[-1])


def widths_of(variables: Mapping[str, Any], units: tuple[Unit, ...]) -> tuple[int, ...]:
  """The width tuple of a (possibly pruned) variable tree, in unit order."""
  return tuple(width_of(variables, u) for u in units)

"""Delivery methods: each is a frozen options dataclass that owns its hyper-parameters.

A method receives one :class:`~lbyl_jax.pruning.problem.UnitProblem` per prunable unit and
returns, per unit, the delivery rows S_P and an optional constant
(:class:`~lbyl_jax.pruning.problem.UnitSolution`). Adding a method is one module with a subclass
of :class:`Method` decorated with :func:`register` (its options become CLI flags by themselves);
import it from :mod:`lbyl_jax.pruning.methods`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lbyl_jax.core.options import Options
from lbyl_jax.core.registry import Registry
from lbyl_jax.pruning.problem import UnitProblem, UnitSolution


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method may need beyond its own options: the corrections that follow it.

  Attributes:
    bias_correction: the resolved bias-correction mode of the plan ('off', 'on', 'auto', 'blend');
      a method that fits its own constant (bnm) reads it, the others ignore it.
    bias_fold: 'padding_aware' or 'all_taps' (how constants meet zero padding).
  """

  bias_correction: str = 'off'
  bias_fold: str = 'padding_aware'


@dataclasses.dataclass(frozen=True)
class Method(Options):
  """Base of every delivery method (register subclasses with :func:`register`)."""

  name: ClassVar[str] = ''
  summary: ClassVar[str] = ''

  def deliver(self, spec, variables: Mapping[str, Any], problems: Sequence[UnitProblem],
              context: Context) -> list[UnitSolution]:
    raise NotImplementedError

  def default_bias_correction(self) -> str:
    """The bias-correction mode this method gets when the plan does not set one."""
    return 'off'

  def depthwise_options(self, spec) -> dict[str, Any]:
    """This method's options on units whose compensation is 'depthwise' (an inverted residual's
    expanded channels, compensated by :mod:`lbyl_jax.pruning.depthwise`, docs/mobilenet_v2.md).
    A method without a form derived there raises ValueError naming it."""
    del spec
    raise ValueError(f'method {self.name!r} has no form for depthwise units (docs/mobilenet_v2.md'
                     ' derives prune, nm, lbyl and bnm)')

  def solver_dims(self, units: Sequence[Any], dims: Sequence[tuple[int, int, int]]
                  ) -> list[tuple[str, int, int, int]]:
    """(kind, m, p, D) of the systems :meth:`deliver` will hand to
    :func:`lbyl_jax.pruning.solvers.solve` for these units, whose problems have (m kept, p pruned,
    filter length D) ``dims`` -- shapes only, for :func:`~lbyl_jax.pruning.solvers.precompile`.
    [] (the default) for a method that solves nothing batched or cannot tell in advance."""
    del units, dims
    return []

  def preset(self, name: str) -> dict[str, Any]:
    """Option values of a named preset (e.g. 'reference_code'); {} when it does not apply."""
    del name
    return {}


REGISTRY: Registry[type[Method]] = Registry('method')


def register(cls: type[Method]) -> type[Method]:
  """Class decorator: registers a :class:`Method` subclass under its ``name``."""
  cls.stage = f'method {cls.name!r}'  # type: ignore[misc]
  REGISTRY.add(cls.name, cls)
  return cls


def get(name: str) -> type[Method]:
  return REGISTRY.get(name)


def names() -> list[str]:
  return REGISTRY.names()

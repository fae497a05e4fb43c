"""Weight quantizers: each is a frozen options dataclass that owns its options.

A quantizer turns float variables into a quantized tree (integers + steps, see
:mod:`lbyl_jax.quant.uniform`) and a JSON description. A *joint* quantizer (UDFC with LBYL) also
computes the pruning delivery itself, because its delivery targets the quantized kept filters.
Adding a quantizer is one module with a subclass of :class:`Quantizer` decorated with
:func:`register`; import it from :mod:`lbyl_jax.quant`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lbyl_jax.core.options import Options, option
from lbyl_jax.core.registry import Registry
from lbyl_jax.quant import uniform


def _bits(v):
  return uniform.check_bits(v, where='weight bits')


@dataclasses.dataclass(frozen=True)
class QuantResult:
  """A quantizer's output: ``uniform.dequantize_tree(qtree, qmeta)`` are the float variables."""

  qtree: dict[str, Any]
  qmeta: dict[str, Any]
  report: dict[str, Any]
  output_stats: dict[str, dict[str, Any]] | None = None
  """For a quantizer that folds the BNs into the layers (DFQ): layer path -> {'mean', 'std'} of
  the folded layer's output as it tracked them, for the BN range rule of activation quantization
  (:func:`lbyl_jax.quant.actquant.dfq_bn_gaussians`); None otherwise."""


@dataclasses.dataclass(frozen=True)
class Quantizer(Options):
  """Base of every weight quantizer (register subclasses with :func:`register`)."""

  name: ClassVar[str] = ''
  summary: ClassVar[str] = ''
  # True for a quantizer that treats every kernel on its own (RTN, OMSE, SQuant): it runs on any
  # model; False for those that assume the presets' one-consumer units (DFQ, UDFC, DF-MPC).
  per_layer: ClassVar[bool] = False

  bits: int = option(8, help='quantize the weights to N bits, 2-8', flag='--weight-bits',
                   check=_bits, metavar='N', default_text='float weights; 8 in the API')
  per_channel: bool = option(True, help='one range per tensor instead of per output channel',
                             flag='--per-tensor')
  symmetric: bool = option(True, help='asymmetric ranges with a zero point', flag='--asymmetric')
  keep_8bit_ends: bool = option(True, help='also quantize the first layer and the classifier to'
                                ' N bits (default: they stay at 8 bits)', flag='--quantize-ends')

  def joint_with(self, method_name: str) -> bool:
    """Whether this quantizer computes the pruning delivery itself for ``method_name``."""
    del method_name
    return False

  def unsupported_units(self, spec) -> list[str]:
    """Names of the units of ``spec`` this quantizer cannot handle (empty: it runs).

    Per-layer quantizers handle everything; the others, by default, units with one plain
    consumer (no several consumers, channel offsets, per-channel layers in between, NHWC flatten
    or consumer scale). A quantizer that handles more overrides this."""
    if self.per_layer:
      return []
    return [u.name for u in spec.units
            if len(u.consumers) != 1 or u.through or u.consumers[0].offset
            or u.consumers[0].flatten_order != 'nchw' or u.consumers[0].scale != 1.0]

  def unsupported_message(self, spec, names: Sequence[str]) -> str:
    """The error for :meth:`unsupported_units` ``names`` (non-empty)."""
    return (f'--quant-method {self.name} handles units with one plain consumer; {spec.name} has '
            'units with several consumers, channel offsets or per-channel layers in between '
            f'({", ".join(names[:4])}); use --quant-method rtn, omse or squant')

  def quantize(self, spec, variables: Mapping[str, Any], *, keep_8bit: Sequence[str],
               context: Mapping[str, Any]) -> QuantResult:
    """Quantizes (already pruned) float variables; ``context`` carries the plan's selection
    options and the original variables for quantizers that need them."""
    raise NotImplementedError


REGISTRY: Registry[type[Quantizer]] = Registry('quantization method')


def register(cls: type[Quantizer]) -> type[Quantizer]:
  """Class decorator: registers a :class:`Quantizer` subclass under its ``name``."""
  cls.stage = f'quantizer {cls.name!r}'  # type: ignore[misc]
  REGISTRY.add(cls.name, cls)
  return cls


def get(name: str) -> type[Quantizer]:
  return REGISTRY.get(name)


def names() -> list[str]:
  return REGISTRY.names()

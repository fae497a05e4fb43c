"""Round to nearest: the plain uniform quantizer on every kernel (docs/quantization.md)."""

from __future__ import annotations

import dataclasses

from lbyl_jax.quant import uniform
from lbyl_jax.quant.base import QuantResult, Quantizer, register


@register
@dataclasses.dataclass(frozen=True)
class RTN(Quantizer):
  """Round-to-nearest weights, no compensation."""

  name = 'rtn'
  summary = 'round to nearest'
  per_layer = True

  def quantize(self, spec, variables, *, keep_8bit, context):
    del spec, context
    qtree, qmeta = uniform.quantize_tree(variables, bits=self.bits, per_channel=self.per_channel,
                                         symmetric=self.symmetric, keep_8bit=keep_8bit)
    return QuantResult(qtree, qmeta, {})

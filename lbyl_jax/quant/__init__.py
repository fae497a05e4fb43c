"""Weight quantization: the uniform quantizer and stored trees (:mod:`.uniform`) and the
quantizer stages of a plan (:mod:`.rtn`, :mod:`.omse`, :mod:`.squant`, :mod:`.dfq`, :mod:`.udfc`,
:mod:`.dfmpc`), registered in :mod:`.base`."""

from lbyl_jax.quant import dfmpc, dfq, omse, rtn, squant, udfc  # noqa: F401  (registration)
from lbyl_jax.quant.base import Quantizer, QuantResult, get, names, register  # noqa: F401

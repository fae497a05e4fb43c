"""The typed compression plan: selection -> delivery (the method) -> corrections -> surgery ->
quantization (docs/README.md, "The plan").

Each stage owns its options (a frozen dataclass, :mod:`lbyl_jax.core.options`):

- :class:`~lbyl_jax.pruning.selection.Selection`: criterion, ratio (per unit), kept-count
  rounding, seed, the BN sigma of the algebra;
- the method, a registered :class:`~lbyl_jax.pruning.methods.Method` (prune, nm, lbyl, bnm) with
  its own hyper-parameters;
- :class:`Corrections`: the data-free bias correction and its fold, the research guard;
- the quantizer, a registered :class:`~lbyl_jax.quant.Quantizer` (rtn, omse, squant, dfq, dfmpc,
  udfc), or None;
- :class:`~lbyl_jax.quant.actquant.ActQuant`: activation quantization (``--act-bits``), off by
  default.

:meth:`Plan.from_options` builds a plan from flat ``name=value`` options (the command line's, a
benchmark row's) and refuses an option that no stage of the plan uses; :meth:`Plan.__post_init__`
refuses combinations that would silently do nothing (the joint UDFC path computes its own
delivery, so LBYL's lambdas, its reference form, the guard and the per-layer rules are errors
there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from lbyl_jax.core.options import Options, flag_of, option, split_flat
from lbyl_jax.pruning import bias as bias_lib
from lbyl_jax.pruning import methods
from lbyl_jax.pruning.selection import Selection
from lbyl_jax import quant
from lbyl_jax.quant.actquant import ActQuant

BIAS_MODES = ('off', 'on', 'auto', 'blend')
PRESETS = ('reference_code',)


@dataclasses.dataclass(frozen=True)
class Corrections(Options):
  """Adjustments of a method's delivery before surgery (docs/bias_correction.md)."""

  stage: ClassVar[str] = 'corrections'

  bias_correction: str | None = option(
      None, choices=(None,) + BIAS_MODES,
      help="fold the pruned channels' modelled mean activation into the consumer ('off' runs the"
           " published algorithms; 'auto' / 'blend': experimental per-layer rules)",
      default_text="'on' for lbyl and nm, 'off' for prune and bnm")
  bias_fold: str = option('padding_aware', choices=bias_lib.FOLDS, advanced=True,
                          help="how constants meet zero padding ('all_taps': the BN-moments"
                               " prototype's fold)")
  guard: str = option('off', choices=('off', 'moments'), advanced=True,
                      help="experimental: shrink each delivery row by its least-squares factor in"
                           ' [0, 1] under the BN-moments model')
  moment_cov: str = option('diag', choices=('diag', 'identity'), advanced=True,
                           help="input covariance of the BN-moments model behind --guard and the"
                                " 'auto' / 'blend' rules ('identity' needs no network-level"
                                ' propagation, so it also works on users\' models)')


def _stage_classes() -> list[type[Options]]:
  return ([Selection, Corrections] + [methods.get(n) for n in methods.names()]
          + [quant.get(n) for n in quant.names()])


@dataclasses.dataclass(frozen=True)
class Plan:
  """One compression: every stage with its options (see the module docstring).

  Attributes:
    method: the delivery method with its options (default: LBYL with its defaults).
    selection: the selection stage's options.
    corrections: bias correction / guard options.
    quantizer: the weight quantizer with its options, or None (float weights).
    activations: activation quantization (off by default: ``act_bits=None``).
  """

  method: methods.Method = dataclasses.field(default_factory=lambda: methods.get('lbyl')())
  selection: Selection = dataclasses.field(default_factory=Selection)
  corrections: Corrections = dataclasses.field(default_factory=Corrections)
  quantizer: quant.Quantizer | None = None
  activations: ActQuant = dataclasses.field(default_factory=ActQuant)

  def __post_init__(self):
    if not isinstance(self.method, methods.Method):
      raise ValueError(f'method must be a registered Method instance, got {self.method!r}')
    if not isinstance(self.selection, Selection) or not isinstance(self.corrections, Corrections):
      raise ValueError('selection / corrections must be Selection / Corrections instances')
    if self.quantizer is not None and not isinstance(self.quantizer, quant.Quantizer):
      raise ValueError(f'quantizer must be a registered Quantizer instance, got {self.quantizer!r}')
    if not isinstance(self.activations, ActQuant):
      raise ValueError(f'activations must be an ActQuant instance, got {self.activations!r}')
    if self.joint:
      bad = []
      if self.bias_correction not in ('on', 'off'):
        bad.append(f'--bias-correction {self.bias_correction}')
      if self.corrections.guard != 'off':
        bad.append('--guard')
      for name in ('lambda1', 'lambda2'):
        if getattr(self.method, name) is not None:
          bad.append(f'--{name}')
      if self.method.lbyl_mode != 'consistent':
        bad.append(f'--lbyl-mode {self.method.lbyl_mode}')
      if bad:
        raise ValueError(
            f'--quant-method {self.quantizer.name} with --method {self.method.name} computes its own'
            f' pruning delivery (LBYL closed form on the quantized kept filters, lambdas'
            f' --a1 / --a2), so {", ".join(bad)} would do nothing there; drop them, or quantize'
            ' with --quant-method rtn after the restore')

  @property
  def joint(self) -> bool:
    """Whether the quantizer computes the pruning delivery (UDFC with LBYL, something pruned)."""
    prunes = self.selection.ratio > 0 or any(r > 0 for _, r in self.selection.ratio_overrides)
    return (self.quantizer is not None and self.quantizer.joint_with(self.method.name)
            and prunes)

  @property
  def bias_correction(self) -> str:
    """The resolved mode: the explicit setting, else the method's default."""
    if self.corrections.bias_correction is not None:
      return self.corrections.bias_correction
    return self.method.default_bias_correction()

  @classmethod
  def from_options(cls, method: str = 'lbyl', quant_method: str | None = None,
                   preset: str | None = None, **options) -> Plan:
    """A plan from flat options, e.g. ``Plan.from_options(method='nm', ratio=0.4, nm_t=0.2,
    quant_method='rtn', bits=4)``.

    Args:
      method: registered method name.
      quant_method: registered quantizer name, or None for float weights (quantizer options such
        as ``bits`` need one).
      preset: 'reference_code': the official codes' forms (LBYL / NM reference normal equations,
        the raw running variance as BN sigma, round for the kept count); explicit options win.
      **options: any stage option by name (see ``python -m lbyl_jax.restore --help-all``).
    """
    method_cls = methods.get(method)
    quant_cls = quant.get(quant_method) if quant_method is not None else None
    values = dict(options)
    if preset is not None:
      if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}; known: {", ".join(PRESETS)}')
      defaults = dict(bn_sigma='variance', keep_rounding='round', **method_cls().preset(preset))
      values = {**defaults, **values}
    owners = [Selection, Corrections, method_cls, ActQuant] + ([quant_cls] if quant_cls else [])
    elsewhere = {}
    for other in _stage_classes():
      if other not in owners:
        for name, field in other.option_fields().items():
          elsewhere.setdefault(name, (other.stage, flag_of(field)))
    if quant_cls is None:
      for name, field in quant.Quantizer.option_fields().items():
        elsewhere[name] = ('weight quantization (give --weight-bits / quant_method)',
                           flag_of(field))
    parts = split_flat(values, owners, elsewhere=elsewhere)
    return cls(method=method_cls(**parts[2]), selection=Selection(**parts[0]),
               corrections=Corrections(**parts[1]), activations=ActQuant(**parts[3]),
               quantizer=quant_cls(**parts[4]) if quant_cls else None)

  def to_options(self) -> dict[str, Any]:
    """Flat options (every value, defaults included) that :meth:`from_options` turns back into
    this plan, plus ``method`` and ``quant_method``."""
    out: dict[str, Any] = dict(method=self.method.name,
                               quant_method=None if self.quantizer is None else self.quantizer.name)
    for stage in (self.selection, self.corrections, self.method, self.activations,
                  self.quantizer):
      if stage is not None:
        out.update(stage.to_flat())
    return out

  def describe(self) -> dict[str, Any]:
    """JSON-ready description: every stage with its options, and the resolved values."""
    return dict(
        selection=self.selection.describe(),
        method=dict(name=self.method.name, **self.method.describe()),
        corrections=dict(self.corrections.describe(), resolved_bias_correction=self.bias_correction),
        quantizer=None if self.quantizer is None else dict(name=self.quantizer.name,
                                                           **self.quantizer.describe()),
        joint=self.joint,
        activations=self.activations.describe(),
    )


def stages() -> Mapping[str, list[type[Options]]]:
  """Every registered stage class by kind, for the command line and the docs."""
  return dict(selection=[Selection], corrections=[Corrections],
              methods=[methods.get(n) for n in methods.names()],
              quantizers=[quant.get(n) for n in quant.names()], activations=[ActQuant])

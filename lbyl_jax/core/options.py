"""Typed, self-describing options: every stage of the compression plan owns a frozen dataclass.

A field made with :func:`option` carries its help text, its fixed choices, its command-line flag
and whether it is an advanced (research) knob. From that one declaration:

- the dataclass validates itself on construction (choices and checks, errors name the flag);
- the command line builds its flags (defaults shown, choices fixed, advanced flags in their own
  listing), so adding a method or quantizer never touches the CLI;
- a flat ``name=value`` mapping (the CLI's, a sweep row's) is split among the stages that own
  each name, and a name that no stage of the plan owns is refused, never ignored.

Field names are unique across all stages (``nm_t``, ``lbyl_mode``, ``bnm_cov``), so a flat name
is the field name. The flag defaults to ``--<field name with '-'>``; a boolean whose default is
True needs an explicit flag that turns it off (``per_channel`` <- ``--per-tensor``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np


def option(default: Any, *, help: str, choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
           flag: str | None = None, advanced: bool = False,
           check: Callable[[Any], Any] | None = None, metavar: str | None = None,
           default_text: str | None = None) -> Any:
  """A dataclass field with the metadata described in the module docstring.

  Args:
    default: default value (None often means "the preset's / method's default").
    help: one line for ``--help``.
    choices: the allowed values (or a callable returning them, for registries filled later).
    flag: the command-line flag; default ``--<field name with '-'>``.
    advanced: listed only by ``--help-all`` (research and reproduction knobs).
    check: called with the value; returns the normalized value or raises ValueError.
    metavar: shown in the help instead of the type.
    default_text: how ``--help`` describes the default (e.g. when None means "per preset").
  """
  meta = dict(help=help, choices=choices, flag=flag, advanced=advanced, check=check, metavar=metavar,
              default_text=default_text)
  if isinstance(default, (list, dict, set)):
    raise TypeError('mutable option defaults are not allowed; use a tuple')
  return dataclasses.field(default=default, metadata=meta)


def _choices(meta: Mapping[str, Any]) -> Sequence[Any] | None:
  c = meta.get('choices')
  return c() if callable(c) else c


def flag_of(field: dataclasses.Field) -> str:
  return field.metadata.get('flag') or '--' + field.name.replace('_', '-')


@dataclasses.dataclass(frozen=True)
class Options:
  """Base of every stage config (frozen dataclass with :func:`option` fields)."""

  stage: ClassVar[str] = 'options'   # what the options belong to, for messages ('method lbyl')

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if not f.metadata:
        continue
      value = getattr(self, f.name)
      flag = flag_of(f)
      choices = _choices(f.metadata)
      if choices is not None and value not in choices:
        shown = ', '.join('none' if c is None else str(c) for c in choices)
        raise ValueError(f'{flag} must be one of {shown}; got {value!r}')
      check = f.metadata.get('check')
      if check is not None and value is not None:
        try:
          value = check(value)
        except ValueError as e:
          raise ValueError(f'{flag}: {e}') from None
        object.__setattr__(self, f.name, value)

  @classmethod
  def option_fields(cls) -> dict[str, dataclasses.Field]:
    """{name: field} of the fields declared with :func:`option`."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata}

  @classmethod
  def from_flat(cls, values: Mapping[str, Any]):
    """An instance from flat names (see the module docstring); unknown names are an error."""
    fields = cls.option_fields()
    unknown = sorted(set(values) - set(fields))
    if unknown:
      raise ValueError(f'{cls.stage} has no option {", ".join(unknown)}')
    return cls(**dict(values))

  def to_flat(self, *, changed_only: bool = False) -> dict[str, Any]:
    """{flat name: value}; ``changed_only`` keeps only values that differ from the defaults."""
    out = {}
    for name, f in self.option_fields().items():
      v = getattr(self, f.name)
      if changed_only and v == f.default:
        continue
      out[name] = v
    return out

  def describe(self) -> dict[str, Any]:
    """JSON-ready field values (tuples as lists)."""
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(v: Any) -> Any:
  if isinstance(v, (tuple, list)):
    return [_jsonable(x) for x in v]
  if isinstance(v, np.generic):
    return v.item()
  return v


def split_flat(values: Mapping[str, Any], owners: Iterable[type[Options]], *,
               elsewhere: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
  """Splits flat options among ``owners`` (one dict per owner, in order).

  A name owned by none of them is refused; ``elsewhere`` maps names owned by stages that are not
  in this plan to (a phrase for the message, the option's flag), e.g.
  ``{'nm_t': ("method 'nm'", '--nm-t')}``.
  """
  owners = list(owners)
  out: list[dict[str, Any]] = [{} for _ in owners]
  where = {}
  for i, cls in enumerate(owners):
    for name in cls.option_fields():
      where.setdefault(name, i)
  for name, value in values.items():
    if name in where:
      out[where[name]][name] = value
      continue
    other = (elsewhere or {}).get(name)
    if other is not None:
      used = ', '.join(c.stage for c in owners)
      raise ValueError(f'{other[1]} ({name}) belongs to {other[0]}, which this run does not use'
                       f' ({used})')
    raise ValueError(f'unknown option {name!r}')
  return out


# --------------------------------------------------------------------------------------------
# Checks.


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False) -> Callable[[Any], Any]:
  """A check for a finite number in [lo, hi] (open ends as given)."""

  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
      raise ValueError(f'expected a number, got {v!r}')
    if integer and int(v) != v:
      raise ValueError(f'expected an integer, got {v!r}')
    if not math.isfinite(float(v)):
      raise ValueError(f'expected a finite number, got {v!r}')
    bad = ((lo is not None and (v < lo or (lo_open and v == lo)))
           or (hi is not None and (v > hi or (hi_open and v == hi))))
    if bad:
      if hi is None:
        raise ValueError(f'expected a value {">" if lo_open else ">="} {lo}, got {v!r}')
      if lo is None:
        raise ValueError(f'expected a value {"<" if hi_open else "<="} {hi}, got {v!r}')
      left = '(' if lo_open else '['
      right = ')' if hi_open else ']'
      raise ValueError(f'expected a value in {left}{lo}, {hi}{right}, got {v!r}')
    return int(v) if integer else float(v)

  return check


NONNEG = number(0.0)
RATIO = number(0.0, 1.0, hi_open=True)

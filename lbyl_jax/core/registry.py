"""One registry helper for every extension point (presets, criteria, methods, quantizers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar('T')


class Registry(Generic[T]):
  """Name -> object, with errors that list the known names.

  Attributes:
    kind: what is registered ('architecture', 'criterion', 'method', ...), used in messages.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def add(self, name: str, obj: T) -> T:
    """Registers ``obj``; a second registration of the same name is an error."""
    if not isinstance(name, str) or not name:
      raise ValueError(f'{self.kind} name must be a non-empty string, got {name!r}')
    if name in self._items:
      raise ValueError(f'{self.kind} {name!r} is already registered')
    self._items[name] = obj
    return obj

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator form of :meth:`add`."""
    return lambda obj: self.add(name, obj)

  def get(self, name: str) -> T:
    """The object called ``name``; a ValueError listing the known names otherwise."""
    try:
      return self._items[name]
    except (KeyError, TypeError):
      raise ValueError(f'unknown {self.kind} {name!r}; known: {", ".join(self.names())}') from None

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

"""The converters' error types (a module of their own, so every reader can raise them)."""

from __future__ import annotations


class CheckpointError(ValueError):
  """A file that is not a readable PyTorch checkpoint, or that does not fit an architecture."""


class UnsafePickleError(CheckpointError):
  """The pickle references a global, a call or a state change outside the allow-list."""

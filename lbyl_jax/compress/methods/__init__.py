"""Delivery methods (registered in :mod:`.base`): prune, nm, lbyl, bnm."""

from lbyl_jax.compress.methods import bnm, lbyl, nm, prune  # noqa: F401  (registration)
from lbyl_jax.compress.methods.base import Context, Method, get, names, register  # noqa: F401

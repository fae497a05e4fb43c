"""Delivery methods (registered in :mod:`.base`): prune, nm, lbyl, bnm."""

from lbyl_jax.pruning.methods import bnm, lbyl, nm, prune  # noqa: F401  (registration)
from lbyl_jax.pruning.methods.base import Context, Method, get, names, register  # noqa: F401

"""lbyl_jax: data-free, fine-tuning-free compression of pretrained CNNs in JAX/Flax.

``import lbyl_jax`` is light: the public functions import their modules on first use.
"""

from lbyl_jax.core.version import __version__


def load(path):
  """Loads a checkpoint directory written by :func:`lbyl_jax.io.checkpoint.save` (see there)."""
  from lbyl_jax.io import checkpoint  # pylint: disable=import-outside-toplevel  (light import)

  return checkpoint.load(path)

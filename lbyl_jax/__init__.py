"""lbyl_jax: data-free, fine-tuning-free compression of pretrained CNNs in JAX/Flax."""

__version__ = '0.1.0'


def load(path):
  """Loads a checkpoint directory written by :func:`lbyl_jax.checkpoint.save` (see there)."""
  from lbyl_jax import checkpoint  # pylint: disable=import-outside-toplevel

  return checkpoint.load(path)

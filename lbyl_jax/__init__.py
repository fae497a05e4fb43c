"""lbyl_jax: data-free, fine-tuning-free compression of pretrained CNNs in JAX/Flax.

``import lbyl_jax`` is light: :func:`compress`, :func:`discover`, :func:`load` and
:func:`preprocess` (see :mod:`lbyl_jax.api`) import the library on first use.
"""

from lbyl_jax.core.version import __version__

__all__ = ['__version__', 'compress', 'discover', 'load', 'load_factory', 'preprocess']


def __getattr__(name):
  if name in ('compress', 'discover', 'load', 'load_factory', 'preprocess'):
    from lbyl_jax import api  # pylint: disable=import-outside-toplevel  (keeps the import light)

    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

"""lbyl_jax: data-free, fine-tuning-free compression of pretrained CNNs in JAX/Flax."""

__version__ = '0.1.0'

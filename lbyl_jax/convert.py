"""``python -m lbyl_jax.convert``: the weight converter (see :mod:`lbyl_jax.cli.convert`)."""

from lbyl_jax.cli.convert import main

if __name__ == '__main__':
  main()

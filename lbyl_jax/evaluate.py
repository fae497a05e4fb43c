"""``python -m lbyl_jax.evaluate``: the evaluation command (see :mod:`lbyl_jax.cli.evaluate`)."""

from lbyl_jax.cli.evaluate import main

if __name__ == '__main__':
  main()

"""``python -m lbyl_jax.evaluate``: the evaluation command (see :mod:`lbyl_jax.evaluation`)."""

from lbyl_jax.evaluation import main

if __name__ == '__main__':
  main()

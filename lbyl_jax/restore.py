"""``python -m lbyl_jax.restore``: the compression command (see :mod:`lbyl_jax.cli.restore`)."""

from lbyl_jax.cli.restore import main

if __name__ == '__main__':
  main()

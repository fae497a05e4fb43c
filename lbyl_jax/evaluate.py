"""``python -m lbyl_jax.evaluate``: the evaluation command (see :mod:`lbyl_jax.cli.evaluate`)."""

from lbyl_jax.cli import common
from lbyl_jax.cli.evaluate import main


def console() -> None:
  """The ``lbyl-evaluate`` console script: :func:`main` as the program (no interpreter teardown,
  :func:`lbyl_jax.cli.common.exit_without_teardown`)."""
  common.exit_without_teardown(main)


if __name__ == '__main__':
  console()

"""``python -m lbyl_jax.convert``: the weight converter (see :mod:`lbyl_jax.cli.convert`)."""

from lbyl_jax.cli import common
from lbyl_jax.cli.convert import main


def console() -> None:
  """The ``lbyl-convert`` console script: :func:`main` as the program (no interpreter teardown,
  :func:`lbyl_jax.cli.common.exit_without_teardown`)."""
  common.exit_without_teardown(main)


if __name__ == '__main__':
  console()

"""``python -m lbyl_jax.restore``: the compression command (see :mod:`lbyl_jax.cli.restore`)."""

from lbyl_jax.cli import common
from lbyl_jax.cli.restore import main


def console() -> None:
  """The ``lbyl-restore`` console script: :func:`main` as the program (no interpreter teardown,
  :func:`lbyl_jax.cli.common.exit_without_teardown`)."""
  common.exit_without_teardown(main)


if __name__ == '__main__':
  console()

"""``python -m checkpoints_convert``: an alias of ``fkv convert`` (see :mod:`fkv_jax.cli.convert`)."""

from __future__ import annotations

import sys

from fkv_jax.cli.convert import DESCRIPTION, EPILOG, build_parser, run_args  # noqa: F401 - the alias' names


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the process exit code (0 ok, 2 bad input, 130 interrupted: nothing written)."""
    from fkv_jax.cli.convert import main as _main

    return _main(argv, prog="python -m checkpoints_convert")


if __name__ == "__main__":
    sys.exit(main())

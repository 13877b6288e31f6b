"""``python -m fkv_jax.decode``: an alias of ``fkv decode`` (see :mod:`fkv_jax.cli.decode`)."""

from __future__ import annotations

import sys

from fkv_jax.cli.decode import build_parser, run  # noqa: F401 - the alias' public names


def main(argv=None) -> int:
    from fkv_jax.cli.decode import main as _main

    return _main(argv, prog="python -m fkv_jax.decode")


if __name__ == "__main__":
    sys.exit(main())

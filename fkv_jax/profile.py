"""``python -m fkv_jax.profile``: an alias of ``fkv profile`` (see :mod:`fkv_jax.cli.profile`)."""

from __future__ import annotations

import sys

from fkv_jax.cli.profile import build_parser, run  # noqa: F401 - the alias' public names


def main(argv=None) -> int:
    from fkv_jax.cli.profile import main as _main

    return _main(argv, prog="python -m fkv_jax.profile")


if __name__ == "__main__":
    sys.exit(main())

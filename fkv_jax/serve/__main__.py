"""``python -m fkv_jax.serve``: an alias of ``fkv serve`` (see :mod:`fkv_jax.cli.serve`)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from fkv_jax.cli.serve import main as _main

    return _main(argv, prog="python -m fkv_jax.serve")


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fkv_jax.eval``: an alias of ``fkv eval`` (see :mod:`fkv_jax.cli.eval`)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from fkv_jax.cli.eval import main as _main

    return _main(argv, prog="python -m fkv_jax.eval")


if __name__ == "__main__":
    sys.exit(main())

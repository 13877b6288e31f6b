"""``python -m fkv_jax.generate``: an alias of ``fkv generate`` (see :mod:`fkv_jax.cli.generate`).

    python -m fkv_jax.generate                          # embedded toy-world model -> outputs/*.mp4 (CPU, < 1 min)
    python -m fkv_jax.generate "a green triangle and a cyan cross" --seeds 0,1,2
    python -m fkv_jax.generate --checkpoint DIR --text-embeddings ctx.npy --frames 21 --save-latents out.npy

Run with ``--help`` for every option.
"""

from __future__ import annotations

import sys

from fkv_jax.cli.generate import build_parser, run  # noqa: F401 - the alias' public names


def main(argv=None) -> int:
    from fkv_jax.cli.generate import main as _main

    return _main(argv, prog="python -m fkv_jax.generate")


if __name__ == "__main__":
    sys.exit(main())

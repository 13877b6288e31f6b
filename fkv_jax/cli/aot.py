"""``fkv aot [options]``: ahead-of-time compilation for a TPU / GPU target (the command of ``python -m fkv_jax.aot``,
with the CLI's one-line errors for a bad command line)."""

from __future__ import annotations

from fkv_jax.cli import Parser, run_cli


def build_parser(prog: str = "fkv aot") -> Parser:
    from fkv_jax import aot

    p = aot.build_parser()
    p.__class__ = Parser  # same parser, argparse errors become one `error:` line (Parser only overrides error())
    p.prog = prog
    return p


def main(argv=None, prog: str = "fkv aot") -> int:
    from fkv_jax import aot

    return run_cli(lambda: build_parser(prog), aot.run, argv)

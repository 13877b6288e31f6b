"""The command-line layer: ``fkv SUBCOMMAND`` and the ``python -m`` aliases (generate, decode, profile, eval,
checkpoints_convert). Library modules import nothing from here.

Every command ends the same way: bad input is one ``error: ...`` line on stderr and exit code 2 (found before
any heavy work), Ctrl-C is exit code 130, success is 0. This module stays light: it imports no subcommand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, before any heavy work."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a :class:`UsageError` (one ``error:`` line, no usage dump)."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        extra = message.partition("unrecognized arguments: ")[2]
        if extra and not any(w.startswith("-") for w in extra.split()):
            raise UsageError(f'{message}: quote a prompt of several words, e.g. "a red circle and a blue square"')
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def one_line(e: BaseException) -> str:
    """An exception's message; a multi-line one (the converter's listings) keeps its indented detail lines."""
    text = str(e).strip() or type(e).__name__
    return text


def run_cli(
    build_parser: Callable, run: Callable, argv=None, errors: tuple[type[BaseException], ...] = (UsageError,)
) -> int:
    """Parse ``argv``, call ``run(args)``; :class:`UsageError` and any of ``errors`` become ``error: ...`` on
    stderr and exit code 2, Ctrl-C exit code 130. ``--help`` returns 0."""
    try:
        args = build_parser().parse_args(argv)
        run(args)
    except (UsageError, *errors) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help / --version, or a plain argparse parser's error
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return 0


__all__ = ["Parser", "UsageError", "run_cli"]

"""Shared command-line plumbing: bad input is one ``error: ...`` line and exit code 2, Ctrl-C is 130."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, before any heavy work."""


def run_cli(build_parser: Callable, run: Callable, argv=None,
            errors: tuple[type[BaseException], ...] = (UsageError,)) -> int:
    """Parse ``argv``, call ``run(args)``; any of ``errors`` becomes ``error: ...`` and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

"""The one exception type of the converter: bad input, reported as ``error: ...`` with exit code 2."""

from __future__ import annotations


class ConvertError(ValueError):
    """A checkpoint (or an option) the converter cannot use; the message names the file or key at fault."""

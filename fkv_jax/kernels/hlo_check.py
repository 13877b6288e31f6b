"""Finding cache-sized ops outside kernels in a lowered (StableHLO) module's text.

A kernel must read the KV cache in place: in the module that calls it, the cache may appear only as a
function argument and as an operand of the kernel's custom call. :func:`large_ops_outside_kernels` lists
every other op that takes or produces an array of at least ``min_elements`` elements (a copy, reshape,
transpose, convert or gather of the cache).
"""

from __future__ import annotations

import math
import re

_TENSOR = re.compile(r"tensor<((?:\d+x)+)[a-z]\w*>")


def tensor_elements(text: str) -> list[int]:
    """Element counts of the ranked tensor types in ``text``."""
    return [math.prod(int(x) for x in m.group(1).rstrip("x").split("x")) for m in _TENSOR.finditer(text)]


def large_ops_outside_kernels(module: str, min_elements: int) -> list[str]:
    """Op lines (truncated) of ``module`` that touch an array of >= ``min_elements`` elements, custom calls
    (kernels) excepted."""
    found = []
    for line in module.splitlines():
        s = line.strip()
        if " = " not in s or "custom_call" in s or s.startswith(("func.func", "module")):
            continue
        if any(n >= min_elements for n in tensor_elements(s)):
            found.append(s[:240])
    return found


__all__ = ["large_ops_outside_kernels", "tensor_elements"]


_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\(?([a-z]\w*)\[([\d,]*)\][^ ]*\s+([\w\-]+)\(")
_FREE = ("parameter", "custom-call", "bitcast", "get-tuple-element", "tuple", "constant")


def large_hlo_ops_outside_kernels(hlo: str, min_elements: int) -> list[str]:
    """Instructions (truncated) of an optimised HLO module's text that produce an array of >= ``min_elements``
    elements, other than parameters, custom calls (kernels) and free ops (bitcast, tuple plumbing).

    A computation other than ENTRY whose ROOT is a custom call (XLA:GPU's dynamic-slice fusion: its slices
    only compute the kernel's operand addresses) is the kernel's own and is skipped."""
    found, block = [], []

    def flush():
        entry = any(ln.startswith("ENTRY") for ln in block)
        wraps_kernel = any(ln.lstrip().startswith("ROOT") and "custom-call(" in ln for ln in block)
        if entry or not wraps_kernel:
            for ln in block:
                m = _HLO_OP.match(ln)
                if (
                    m
                    and m.group(3) not in _FREE
                    and math.prod(int(x) for x in m.group(2).split(",") if x) >= min_elements
                ):
                    found.append(ln.strip()[:240])
        block.clear()

    for line in hlo.splitlines():
        if line.strip() == "}":
            flush()
        else:
            block.append(line)
    flush()
    return found


__all__ += ["large_hlo_ops_outside_kernels"]

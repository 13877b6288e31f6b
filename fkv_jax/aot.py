"""Compile the real chunk step for a TPU without the hardware, and read what the compiler produced.

    python -m fkv_jax.aot --target tpu-v5e --model-preset wan2.1-t2v-1.3b --frames 21 --policy forcing_kv \\
        --attention-backend pallas_tpu --dtype bfloat16

libtpu compiles deviceless for a topology description (``jax.experimental.topologies``); parameters, cache
and inputs are abstract (``ShapeDtypeStruct`` with a sharding on the topology's devices), so nothing large
is allocated. Pieces usable on their own:

* :func:`parse_hlo`, :func:`cache_sized_ops`: which ops of a compiled module (``compiled.as_text()``) produce
  a cache-sized buffer outside the attention kernels (relayouts, reshape copies, gathers, upcasts);
* :func:`program_cost`: FLOPs and HBM bytes of a compiled module with every loop body multiplied by its
  trip count (XLA's ``cost_analysis()`` counts a ``while`` body once, whatever its trip count), kernels
  counted by their declared ``pl.CostEstimate``;
* :func:`tpu_device`, :func:`compile_chunk_step`: the deviceless compile itself.

Nothing here is a time measurement: times are roofline estimates (:mod:`fkv_jax.roofline`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

from fkv_jax.cli import UsageError, run_cli

# ---- HLO text -------------------------------------------------------------------------------------------

_ITEMSIZE = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([0-9,]*)\](\{[^{}]*\})?")
_KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu", "__gpu$xla.gpu.triton", "triton_kernel_call")
# ops that move no data of their own (buffer plumbing, control flow whose bodies are visited separately)
_PLUMBING = {
    "parameter",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "constant",
    "while",
    "conditional",
    "call",
    "copy-done",
    "after-all",
    "opt-barrier",
    "partition-id",
    "replica-id",
    "add-dependency",
    "domain",
    "send-done",
    "recv-done",
    "all-reduce-done",
    "all-gather-done",
    "collective-permute-done",
}


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    type: str  # result type text, e.g. "bf16[1,12,21,1560,128]{4,3,2,1,0:T(8,128)(2,1)}" or a tuple
    opcode: str
    operands: tuple[str, ...]
    attrs: str  # everything after the operand list
    root: bool
    args: str = ""  # the operand list as written (e.g. "0" for parameter(0))

    @property
    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, dims) of every array in the result type (several for a tuple)."""
        return [(dt, tuple(int(x) for x in dims.split(",") if x)) for dt, dims, _ in _ARRAY.findall(self.type)]

    def array_bytes(self) -> list[int]:
        return [math.prod(dims) * _itemsize(dt) for dt, dims in self.arrays]

    @property
    def nbytes(self) -> int:
        return sum(self.array_bytes())

    @property
    def hbm_bytes(self) -> int:
        """Bytes of the result arrays that live in HBM (layout without an on-chip memory space ``S(n)``)."""
        return sum(
            math.prod(int(x) for x in dims.split(",") if x) * _itemsize(dt)
            for dt, dims, layout in _ARRAY.findall(self.type)
            if not re.search(r"S\([1-9]\d*\)", layout)
        )

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{re.escape(key)}=(%?[\w.\-]+)", self.attrs)
        return m.group(1).lstrip("%") if m else None


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    instrs: list[Instr]

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}

    @property
    def root(self) -> Instr:
        return next((i for i in self.instrs if i.root), self.instrs[-1])


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 1)  # f8 variants: 1 byte


def _balanced(s: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``s[start]``."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "(":
            depth += 1
        elif s[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(s)


def _parse_instr(line: str) -> Instr | None:
    m = re.match(r"\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        typ, rest = rest[:end], rest[end:].lstrip()
    else:
        typ, _, rest = rest.partition(" ")
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    end = _balanced(rest, om.end() - 1)
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[om.end() : end - 1]))
    return Instr(
        name=m.group(2),
        type=typ,
        opcode=om.group(1),
        operands=operands,
        attrs=rest[end:],
        root=bool(m.group(1)),
        args=rest[om.end() : end - 1],
    )


def parse_hlo(text: str) -> dict[str, Computation]:
    """Computations of an HLO module's text (``compiled.as_text()``), by name."""
    comps: dict[str, Computation] = {}
    cur = None
    for line in text.splitlines():
        if cur is None:
            m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
            if m and not line.startswith(" "):
                cur = Computation(name=m.group(2), entry=bool(m.group(1)), instrs=[])
            continue
        if line.startswith("}"):
            cur.__post_init__()
            comps[cur.name] = cur
            cur = None
            continue
        ins = _parse_instr(line)
        if ins is not None:
            cur.instrs.append(ins)
    return comps


def _entry(comps: dict[str, Computation]) -> Computation:
    try:
        return next(c for c in comps.values() if c.entry)
    except StopIteration:
        raise ValueError("no ENTRY computation in the HLO text") from None


def _constant(comp: Computation, name: str) -> int | None:
    ins = comp.by_name.get(name)
    if ins is None or ins.opcode != "constant":
        return None
    try:
        return int(ins.args.strip())
    except ValueError:
        return None


def _trip_count(comps: dict[str, Computation], parent: Computation, ins: Instr) -> int | None:
    """A ``while``'s trip count: XLA's ``known_trip_count``, else read from its condition ``i < bound`` with
    ``bound`` a constant (in the condition, or the constant the loop's init tuple starts that element with);
    None when the bound is computed at run time."""
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', ins.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(ins.attr("condition") or "")
    if cond is None or cond.root.opcode != "compare" or len(cond.root.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", cond.root.attrs)
    if not direction or direction.group(1) not in ("LT", "GT"):
        return None
    init = parent.by_name.get(ins.operands[0]) if ins.operands else None

    def value(name: str) -> tuple[int | None, int | None]:  # (constant value, tuple index)
        c = _constant(cond, name)
        if c is not None:
            return c, None
        x = cond.by_name.get(name)
        if x is not None and x.opcode == "get-tuple-element":
            idx = int(re.search(r"index=(\d+)", x.attrs).group(1))
            if init is not None and init.opcode == "tuple" and idx < len(init.operands):
                return _constant(parent, init.operands[idx]), idx
            return None, idx
        return None, None

    a, b = cond.root.operands
    (va, ia), (vb, ib) = value(a), value(b)
    if direction.group(1) == "GT":
        (va, ia), (vb, ib) = (vb, ib), (va, ia)
    if vb is None or ia is None:  # need "counter < constant bound"
        return None
    start = va if va is not None else 0
    return max(vb - start, 0)


def _called(ins: Instr) -> list[str]:
    """Non-fused computations an instruction runs (loop bodies, branches, calls)."""
    if ins.opcode == "while":
        return [x for x in (ins.attr("body"), ins.attr("condition")) if x]
    if ins.opcode == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
        if m:
            return re.findall(r"%?([\w.\-]+)", m.group(1))
        return [x for x in (ins.attr("true_computation"), ins.attr("false_computation")) if x]
    if ins.opcode == "call":
        return [x for x in (ins.attr("to_apply"),) if x]
    return []


def executed(comps: dict[str, Computation]) -> dict[str, tuple[int, bool]]:
    """Non-fused computations reachable from ENTRY -> (executions per program run, trip counts all known).

    A ``while`` body runs its known trip count times (its condition too, give or take one); each branch of
    a ``conditional`` is counted as if it ran (an upper bound).
    """
    out: dict[str, tuple[int, bool]] = {}
    stack = [(_entry(comps).name, 1, True)]
    while stack:
        name, mult, known = stack.pop()
        if name not in comps:
            continue
        prev = out.get(name, (0, True))
        out[name] = (prev[0] + mult, prev[1] and known)
        for ins in comps[name].instrs:
            sub = _called(ins)
            if not sub:
                continue
            n = _trip_count(comps, comps[name], ins) if ins.opcode == "while" else 1
            for s in sub:
                stack.append((s, mult * (n or 1), known and (n is not None)))
    return out


def _is_kernel(ins: Instr) -> bool:
    if ins.opcode != "custom-call":
        return False
    m = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    return bool(m) and any(m.group(1).startswith(t) for t in _KERNEL_TARGETS)


_IN_PLACE = ("dynamic-update-slice", "scatter")


def _fused_root_in_place(comps: dict[str, Computation], ins: Instr) -> bool:
    """A fusion whose root is a dynamic-update-slice or scatter (or a tuple of them): it updates its first
    operand's buffer in place (the cache write into the donated cache)."""
    body = comps.get(ins.attr("calls") or "")
    if body is None:
        return False
    root = body.root
    if root.opcode in _IN_PLACE:
        return True
    if root.opcode == "tuple":
        return all(body.by_name[o].opcode in _IN_PLACE for o in root.operands if o in body.by_name)
    return False


def _memory_space_transfer(ins: Instr) -> bool:
    """An asynchronous move between memory spaces (HBM <-> on-chip VMEM) that XLA's memory-space assignment
    adds for small buffers: ``copy-start`` / ``slice-start`` whose destination and source differ only in
    their memory space, and the ``ConcatBitcast`` that reassembles such slices. No relayout, no HBM copy
    of a cache that does not fit on chip."""
    if ins.opcode == "custom-call":
        return 'custom_call_target="ConcatBitcast"' in ins.attrs
    if ins.opcode not in ("copy-start", "slice-start"):
        return False
    layouts = re.findall(r"\{([^{}]*)\}", ins.type)
    strip = [re.sub(r"S\(\d+\)", "", x) for x in layouts if ":" in x or "," in x]
    spaces = [re.search(r"S\((\d+)\)", x) for x in layouts if ":" in x or "," in x]
    return len(strip) >= 2 and strip[0] == strip[1] and any(spaces[:2])


@dataclasses.dataclass(frozen=True)
class HloOp:
    computation: str
    name: str
    opcode: str
    type: str
    bytes: int  # the largest array the op produces
    runs: int  # executions per program run (loop trip counts multiplied)


def _carries_slots(dims: tuple[int, ...], slots: int, frame_tokens: int) -> bool:
    """Whether an array's dims hold a cache's slot axis: (..., N, T, ...) adjacent, or a dim of N * T."""
    if slots * frame_tokens in dims:
        return True
    return any(dims[i] == slots and dims[i + 1] == frame_tokens for i in range(len(dims) - 1))


def cache_sized_ops(
    hlo_text: str, cache_bytes: int, *, fraction: float = 0.5, slots: int | None = None, frame_tokens: int | None = None
) -> list[HloOp]:
    """Ops outside the attention kernels that produce a buffer of at least ``fraction * cache_bytes``.

    ``cache_bytes``: the size of one cache array as the kernel sees it (one layer's ``k_cache``, per device).
    Skipped: the kernels' custom calls (Mosaic TPU, Triton, Mosaic GPU), parameters and buffer plumbing
    (tuple, get-tuple-element, bitcast, constant, loop/branch ops themselves: their bodies are scanned),
    the second half of an async op (``copy-done``, ``slice-done``), in-place updates
    (``dynamic-update-slice``, ``scatter`` and fusions whose root is one: the cache write into the donated
    buffer), and moves between HBM and on-chip memory that only change the memory space (XLA prefetching a
    small cache into VMEM; see :func:`_memory_space_transfer`). Everything else counts: copies, transposes,
    reshapes that move data, fusions (an upcast, a gather, a per-layer slice, a rotation of the cache),
    gathers, ``copy-start`` with a relayout. Fused computations are not scanned (their values are never
    materialised).

    With ``slots`` (N) and ``frame_tokens`` (T) an array counts only if its dims also hold the cache's slot
    axis (N next to T, or N*T): this keeps chunk-sized activations of a model whose cache holds few slots
    (e.g. 5 slots against a 3-frame chunk) from being reported. It also means a gathered copy of K < N
    slots is then not reported; the size-only mode (the default) reports it when K >= fraction * N.
    """
    comps = parse_hlo(hlo_text)
    runs = executed(comps)
    limit = fraction * cache_bytes
    found = []
    for cname, (n, _) in runs.items():
        for ins in comps[cname].instrs:
            if (
                ins.opcode in _PLUMBING
                or _is_kernel(ins)
                or ins.opcode in _IN_PLACE
                or ins.opcode == "slice-done"
                or _memory_space_transfer(ins)
            ):
                continue
            if ins.opcode == "fusion" and _fused_root_in_place(comps, ins):
                continue
            big = [
                b
                for (dt, dims), b in zip(ins.arrays, ins.array_bytes())
                if b >= limit and (slots is None or frame_tokens is None or _carries_slots(dims, slots, frame_tokens))
            ]
            if big:
                found.append(HloOp(cname, ins.name, ins.opcode, re.sub(r"\{[^}]*\}", "", ins.type), max(big), n))
    return found


# ---- cost with loop trip counts ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    flops: float  # matmul FLOPs (dot / convolution, 2 per multiply-add) + kernels' declared FLOPs
    bytes: float  # HBM bytes: operands + results of every materialised op, kernels' declared bytes
    kernel_flops: float  # the part declared by kernels (pl.CostEstimate)
    kernel_bytes: float
    kernels: int  # kernel calls per program run
    trip_counts_known: bool  # False if some loop's trip count was unknown (counted once)


def _dims_of(comp: Computation, name: str) -> tuple[int, ...] | None:
    ins = comp.by_name.get(name)
    if ins is None or not ins.arrays:
        return None
    return ins.arrays[0][1]


def _matmul_flops(comp: Computation, ins: Instr) -> float:
    out = ins.arrays[0][1] if ins.arrays else ()
    if ins.opcode == "dot":
        lhs = _dims_of(comp, ins.operands[0]) if ins.operands else None
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if (lhs and m) else 1
        return 2.0 * math.prod(out) * k
    if ins.opcode == "convolution":
        # multiply-adds per output element: input features x, per spatial dim, the window positions that can
        # overlap the input (XLA TPU writes some batched matmuls as convolutions whose window runs mostly
        # over padding; counting the padded window would overcount them)
        lhs = _dims_of(comp, ins.operands[0]) if ins.operands else None
        kern = _dims_of(comp, ins.operands[1]) if len(ins.operands) > 1 else None
        m = re.search(r"dim_labels=([^_]+)_([^-]+)->", ins.attrs)
        if not lhs or not kern or not m or "i" not in m.group(2):
            return 0.0
        lhs_l, kern_l = m.group(1), m.group(2)
        dil = re.search(r"lhs_dilate=([0-9x]+)", ins.attrs)
        dil = [int(x) for x in dil.group(1).split("x")] if dil else None
        macs = kern[kern_l.index("i")]
        spatial = [pos for pos, label in enumerate(kern_l) if label.isdigit()]
        for d, pos in enumerate(spatial):
            label = kern_l[pos]
            w = kern[pos]
            size_in = lhs[lhs_l.index(label)] if label in lhs_l else w
            step = dil[d] if dil and d < len(dil) else 1
            macs *= min(w, -(-w // step), size_in)  # a dilated input has a real value every `step` positions
        return 2.0 * math.prod(out) * macs
    return 0.0


def _fusion_flops(comps: dict[str, Computation], name: str, seen=()) -> float:
    comp = comps.get(name)
    if comp is None or name in seen:
        return 0.0
    total = 0.0
    for ins in comp.instrs:
        total += _matmul_flops(comp, ins)
        if ins.opcode == "fusion":
            total += _fusion_flops(comps, ins.attr("calls") or "", seen + (name,))
    return total


def _param_read_bytes(
    comps: dict[str, Computation], body: Computation, index: int, full: float, scale: float = 1.0, depth: int = 0
) -> float:
    """Bytes a fused computation reads of its parameter ``index`` (an operand of ``full`` bytes): the slices
    when it is used only through (dynamic-)slices or gathers (also through nested fusions), nothing when it
    is only the buffer of an in-place update, else all of it. ``full``: the operand's HBM bytes; ``scale``:
    its HBM fraction (0 for an operand in on-chip memory), applied to slices."""
    param = next((p for p in body.instrs if p.opcode == "parameter" and p.args.strip() == str(index)), None)
    if param is None or depth > 8:
        return full
    total = 0.0
    for u in body.instrs:
        if param.name not in u.operands:
            continue
        if u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == param.name:
            total += u.nbytes * scale
        elif u.opcode in _IN_PLACE and u.operands[0] == param.name and u.operands.count(param.name) == 1:
            continue
        elif u.opcode == "fusion" and u.attr("calls") in comps:
            nested = comps[u.attr("calls")]
            total += sum(
                _param_read_bytes(comps, nested, i, full, scale, depth + 1)
                for i, o in enumerate(u.operands)
                if o == param.name
            )
        else:
            return full
    return min(total, full)


def _fusion_operand_bytes(comps: dict[str, Computation], parent: Computation, ins: Instr) -> float:
    """Bytes a fusion reads (see :func:`_param_read_bytes`)."""
    body = comps.get(ins.attr("calls") or "")
    total = 0.0
    for i, opname in enumerate(ins.operands):
        src = parent.by_name.get(opname)
        full = float(src.hbm_bytes) if src is not None else 0.0
        scale = full / src.nbytes if src is not None and src.nbytes else 0.0
        total += full if body is None else _param_read_bytes(comps, body, i, full, scale)
    return total


def _result_bytes(comps: dict[str, Computation], ins: Instr) -> float:
    if ins.opcode == "fusion" and _fused_root_in_place(comps, ins):
        body = comps[ins.attr("calls")]
        root = body.root
        roots = [root] if root.opcode in _IN_PLACE else [body.by_name[o] for o in root.operands]
        upd = [r.operands[1 if r.opcode == "dynamic-update-slice" else -1] for r in roots if len(r.operands) >= 2]
        scale = ins.hbm_bytes / ins.nbytes if ins.nbytes else 0.0
        return scale * float(sum(body.by_name[u].nbytes for u in upd if u in body.by_name))
    return float(ins.hbm_bytes)


def program_cost(hlo_text: str) -> ProgramCost:
    """FLOPs and HBM bytes of one run of a compiled module, loop bodies multiplied by their trip counts.

    * FLOPs: ``dot`` and ``convolution`` (also inside fusions), 2 per multiply-add, plus each kernel custom
      call's declared ``cost_estimate``. Elementwise work is not counted.
    * bytes: per materialised op, what it reads and writes in HBM: its operands (a fusion operand used only
      through slices counts the slices) and its result (an in-place update counts the update), counting
      only arrays whose layout places them in HBM (XLA TPU's memory-space assignment keeps many
      intermediates in on-chip VMEM, marked ``S(1)``); kernel calls count their declared
      ``bytes_accessed``; buffer plumbing counts nothing; an async copy counts its HBM side(s).

    A model of traffic, not a measurement: a fusion that reads an operand twice counts it once, and a kernel's
    declared bytes are its static-budget upper bound.
    """
    comps = parse_hlo(hlo_text)
    runs = executed(comps)
    flops = bytes_ = kflops = kbytes = 0.0
    kernels = 0
    known = all(k for _, k in runs.values())
    for cname, (n, _) in runs.items():
        comp = comps[cname]
        for ins in comp.instrs:
            if ins.opcode in _PLUMBING:
                continue
            if _is_kernel(ins):
                m = re.search(r'"cost_estimate"\s*:\s*\{([^}]*)\}', ins.attrs)
                f = b = 0.0
                if m:
                    fm = re.search(r'"flops"\s*:\s*"?(\d+)', m.group(1))
                    bm = re.search(r'"bytes_accessed"\s*:\s*"?(\d+)', m.group(1))
                    f = float(fm.group(1)) if fm else 0.0
                    b = float(bm.group(1)) if bm else 0.0
                else:  # no declared cost: its operands and result
                    b = sum(float(comp.by_name[o].hbm_bytes) for o in ins.operands if o in comp.by_name) + ins.hbm_bytes
                flops, bytes_, kflops, kbytes, kernels = (
                    flops + n * f,
                    bytes_ + n * b,
                    kflops + n * f,
                    kbytes + n * b,
                    kernels + n,
                )
                continue
            if ins.opcode == "fusion":
                flops += n * _fusion_flops(comps, ins.attr("calls") or "")
                bytes_ += n * (_fusion_operand_bytes(comps, comp, ins) + _result_bytes(comps, ins))
                continue
            flops += n * _matmul_flops(comp, ins)
            src = comp.by_name.get(ins.operands[0]) if ins.operands else None
            if ins.opcode in ("dynamic-slice", "slice-start"):
                frac = src.hbm_bytes / src.nbytes if src is not None and src.nbytes else 0.0
                b = (
                    ins.nbytes * frac + ins.hbm_bytes
                    if ins.opcode == "dynamic-slice"
                    else ins.array_bytes()[-1] * frac + ins.hbm_bytes - (src.hbm_bytes if src is not None else 0)
                )
            elif ins.opcode in _IN_PLACE:
                upd = (
                    comp.by_name.get(ins.operands[-1 if ins.opcode == "scatter" else 1])
                    if len(ins.operands) > 1
                    else None
                )
                frac = ins.hbm_bytes / ins.nbytes if ins.nbytes else 0.0
                b = 2.0 * frac * (upd.nbytes if upd is not None else 0)
            elif ins.opcode == "copy-start":  # (destination, source, context): read one, write the other
                b = float(ins.hbm_bytes)
            elif ins.opcode in ("slice-done", "custom-call") and "ConcatBitcast" in ins.attrs + ins.opcode:
                b = 0.0
            else:
                b = ins.hbm_bytes + sum(float(comp.by_name[o].hbm_bytes) for o in ins.operands if o in comp.by_name)
            bytes_ += n * b
    return ProgramCost(
        flops=flops, bytes=bytes_, kernel_flops=kflops, kernel_bytes=kbytes, kernels=kernels, trip_counts_known=known
    )


# ---- deviceless TPU compile ---------------------------------------------------------------------------------


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def tpu_devices(topology: str):
    """The devices of a TPU topology description (e.g. ``"v5e:2x2"``), built without a TPU."""
    import os

    from jax.experimental import topologies

    # A deviceless compile touches no TPU: let several processes (parallel test runs) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # libtpu's errors are RuntimeError / XlaRuntimeError with long texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"libtpu refused topology {topology!r}: {first}") from None


def memory_summary(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program (``memory_analysis()``) and their total."""
    ma = compiled.memory_analysis()
    d = dict(
        arguments=int(ma.argument_size_in_bytes),
        outputs=int(ma.output_size_in_bytes),
        aliased=int(ma.alias_size_in_bytes),
        temporaries=int(ma.temp_size_in_bytes),
        code=int(ma.generated_code_size_in_bytes),
    )
    d["total"] = d["arguments"] + d["outputs"] - d["aliased"] + d["temporaries"] + d["code"]
    return d


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


# ---- the command line ----------------------------------------------------------------------------------------

DESCRIPTION = """\
Compile the chunk step (model + KV policy + attention backend + cache: every denoising pass and the clean
pass of one AR chunk) for a TPU target without a TPU, from abstract parameters (nothing large is allocated),
and report per device: HBM for parameters, cache and temporaries against the chip's HBM, FLOPs and HBM
bytes per chunk, the number of cache-sized ops outside the attention kernels, and roofline estimates of
ms per chunk and FPS on v5e, v5p, v6e, H100 and H200.

Every time printed is an ESTIMATE from compiled cost: max(FLOPs / peak, bytes / HBM bandwidth) for the whole
chunk program with the vendors' published peaks (fkv_jax/roofline.py, docs/accelerators.md). It is a lower
bound on the time; nothing is measured.

FLOPs and bytes are counted on the compiled HLO with every loop body multiplied by its trip count (XLA's own
cost_analysis counts a loop body once; both are reported). Kernels count their declared pl.CostEstimate,
which assumes the static (maximum) budget: a chunk whose cache is full."""

EPILOG = """\
targets:
  tpu-v5e[:TOPO]  tpu-v5p[:TOPO]  tpu-v6e[:TOPO]   compile with libtpu for that TPU (default topologies
                   v5e:2x2, v5p:2x2x1, v6e:2x2; TOPO e.g. 2x4); one device unless --mesh
  h200             with jaxlib's CUDA plugin installed (pip install --no-deps jax-cuda12-plugin==0.10.2
                   jax-cuda12-pjrt==0.10.2; no GPU or driver needed): compiled by XLA:GPU for a deviceless
                   H200, backends xla, triton (also needs jax-triton), mosaic_gpu or auto (default auto)
  h100, h200       without that plugin: the program is compiled for tpu-v5p and the roofline and HBM check
                   use the GPU's peaks (said so in the report)

example:
  python -m fkv_jax.aot --target tpu-v5e --model-preset wan2.1-t2v-1.3b --frames 21 --policy forcing_kv \\
      --attention-backend pallas_tpu --dtype bfloat16 --json report.json
"""


def build_parser(prog: str = "python -m fkv_jax.aot") -> argparse.ArgumentParser:
    try:  # a bad command line as one error line, like the other commands
        from fkv_jax.cli import Parser
    except ImportError:
        Parser = argparse.ArgumentParser
    p = Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--target",
        default="tpu-v5e",
        help="tpu-v5e|tpu-v5p|tpu-v6e[:TOPOLOGY], or h100|h200 (roofline only; see below) (default: tpu-v5e)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", help="model preset, e.g. wan2.1-t2v-1.3b, tiny, mid (default: wan2.1-t2v-1.3b)")
    g.add_argument(
        "--checkpoint",
        type=Path,
        help="converted checkpoint directory: its config and stored dtype (the weights are not read)",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="compute dtype of the weights (default: the checkpoint's, else bfloat16)",
    )
    g.add_argument("--cache-dtype", choices=("float32", "bfloat16"), help="KV cache dtype (default: --dtype)")
    g.add_argument("--latent-size", help="latent HxW, e.g. 60x104 (default: the preset's; 60x104 = 480x832 video)")
    g = p.add_argument_group("video and cache")
    g.add_argument(
        "--frames", type=int, default=21, help="latent frames of the video (sizes a global cache; default 21)"
    )
    g.add_argument(
        "--sampler-preset", default="self_forcing", help="self_forcing | longlive | causvid (default: self_forcing)"
    )
    g.add_argument(
        "--local-attn-size",
        type=int,
        help="-1 = global cache; N = rolling window of N frames (also sets a policy's local_attn_size if it has one)",
    )
    g.add_argument("--sink-size", type=int, help="sink frames of a rolling window (also a policy's sink_size)")
    g.add_argument(
        "--policy",
        help="KV selection policy (fkv_jax.policies), e.g. full, sink_window, forcing_kv, "
        "focused_forcing (default: the plain cache)",
    )
    g.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE", help="policy option (repeatable)")
    g.add_argument("--head-table", help="Forcing-KV head table (JSON file or packaged name, e.g. selfforcing)")
    g.add_argument("--head-importance", type=Path, help="Focused Forcing head importance JSON")
    g.add_argument(
        "--attention-backend",
        help="TPU: xla, pallas_tpu or auto (default pallas_tpu); H200 with the CUDA plugin: xla, triton, "
        "mosaic_gpu or auto (default auto)",
    )
    g = p.add_argument_group("devices and output")
    g.add_argument("--mesh", help="shard over the topology's devices, e.g. data=1,model=4 (default: one device)")
    g.add_argument("--batch", type=int, default=1, help="videos per chunk step (default 1)")
    g.add_argument("--json", type=Path, help="write the report as JSON here")
    g.add_argument("--hlo", type=Path, help="write the compiled HLO text here")
    return p


TPU_TARGETS = {"tpu-v5e": "v5e", "tpu-v5p": "v5p", "tpu-v6e": "v6e"}
VAE_STRIDE = 4  # Wan2.1's VAE: each latent frame after the first decodes to 4 video frames
GPU_TARGETS = ("h100", "h200")


def parse_target(target: str) -> tuple[str, str, bool]:
    """``--target`` -> (chip name in fkv_jax.roofline.CHIPS, libtpu topology, compiled for the chip itself)."""
    from fkv_jax.roofline import CHIPS

    name, _, topo = target.strip().lower().partition(":")
    if name in GPU_TARGETS:
        if topo:
            raise UsageError(f"--target {target}: a GPU target takes no topology")
        return name, CHIPS["tpu-v5p"].topology, False
    if name not in TPU_TARGETS:
        raise UsageError(
            f"--target must be one of {', '.join([*TPU_TARGETS, *GPU_TARGETS])} (TPU ones with an "
            f"optional :TOPOLOGY such as tpu-v5e:2x4), got {target!r}"
        )
    if topo and not re.fullmatch(r"\d+x\d+(x\d+)?", topo):
        raise UsageError(f"--target {target}: topology must look like 2x2 or 2x2x1, got {topo!r}")
    return name, f"{TPU_TARGETS[name]}:{topo}" if topo else CHIPS[name].topology, True


def _cuda_plugin() -> bool:
    from fkv_jax.kernels.gpu_aot import cuda_pjrt_available

    return cuda_pjrt_available()


def _dtype(name):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def compile_chunk_step(args) -> dict:
    """Build the Sampler for the flags with abstract inputs, compile its chunk step and measure the result."""
    from fkv_jax.config import model_preset, sampler_preset

    chip_name, topology, native = parse_target(args.target)
    gpu = chip_name == "h200" and _cuda_plugin()  # a real XLA:GPU compile for a deviceless H200
    if gpu:
        topology, native = "h200 (deviceless, jaxlib's CUDA plugin)", True
    if args.attention_backend is None:
        args.attention_backend = "auto" if gpu else "pallas_tpu"
    # -- model config and dtype
    if args.checkpoint is not None and args.model_preset is not None:
        raise UsageError("--checkpoint and --model-preset are two different models; give one")
    stored = None
    if args.checkpoint is not None:
        from fkv_jax.checkpoint import CheckpointError, read_info

        try:
            info = read_info(args.checkpoint)
        except CheckpointError as e:
            raise UsageError(f"--checkpoint: {e}") from None
        cfg, stored, model_name = info.cfg, info.dtype, str(args.checkpoint)
    else:
        model_name = args.model_preset or "wan2.1-t2v-1.3b"
        try:
            cfg = model_preset(model_name)
        except ValueError as e:
            raise UsageError(f"--model-preset: {e}") from None
    dtype_name = args.dtype or stored or "bfloat16"
    dtype, cache_dtype = _dtype(dtype_name), _dtype(args.cache_dtype or dtype_name)
    if args.latent_size:
        try:
            latent_hw = tuple(int(x) for x in args.latent_size.lower().split("x"))
            assert len(latent_hw) == 2 and min(latent_hw) > 0
        except (ValueError, AssertionError):
            raise UsageError(f"--latent-size must look like 60x104, got {args.latent_size!r}") from None
    else:
        latent_hw = tuple(cfg.latent_hw)
    try:
        cfg.grid_hw(latent_hw)
    except ValueError as e:
        raise UsageError(f"--latent-size: {e}") from None
    if args.frames < 1:
        raise UsageError(f"--frames must be >= 1, got {args.frames}")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    # -- sampler config, policy, backend
    try:
        sc = sampler_preset(args.sampler_preset)
    except ValueError as e:
        raise UsageError(f"--sampler-preset: {e}") from None
    over = {
        k: v for k, v in (("local_attn_size", args.local_attn_size), ("sink_size", args.sink_size)) if v is not None
    }
    sc = dataclasses.replace(sc, **over)
    if args.frames % sc.frames_per_block:
        raise UsageError(f"--frames {args.frames} must be a multiple of frames_per_block={sc.frames_per_block}")
    from fkv_jax.attention import BACKENDS

    import fkv_jax.kernels  # noqa: F401  (registers the kernel backends)

    allowed = ("xla", "triton", "mosaic_gpu", "auto") if gpu else ("xla", "pallas_tpu", "auto")
    if args.attention_backend not in allowed:
        raise UsageError(
            f"--attention-backend must be {', '.join(allowed[:-1])} or auto for a "
            f"{'GPU' if gpu else 'TPU'} compile, got {args.attention_backend!r} (available backends: "
            f"{', '.join(sorted(BACKENDS))})"
        )
    gpu_target = dict(platform="cuda", device_kind="NVIDIA H200", compute_capability="9.0")
    try:  # a backend that cannot take these shapes / dtypes on a TPU: one error before any compile
        from fkv_jax.attention.backends import resolve_backend
    except ImportError:
        resolve_backend = None
    if resolve_backend is not None:
        gh, gw = cfg.grid_hw(latent_hw)
        try:
            resolve_backend(
                args.attention_backend,
                **(gpu_target if gpu else {"platform": "tpu"}),
                dtype=dtype,
                cache_dtype=cache_dtype,
                head_dim=cfg.head_dim,
                tokens_per_frame=gh * gw,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
    policy = None
    if args.policy:
        from fkv_jax.policies import POLICIES, make_policy, parse_options

        if args.policy not in POLICIES:
            raise UsageError(f"unknown --policy {args.policy!r}; available: {', '.join(sorted(POLICIES))}")
        try:
            opts = parse_options(args.policy_opt)
            fields = {f.name for f in dataclasses.fields(POLICIES[args.policy])}
            opts = {**{k: v for k, v in over.items() if k in fields}, **opts}
            policy = make_policy(
                args.policy,
                opts,
                num_layers=cfg.num_layers,
                num_heads=cfg.num_heads,
                head_table=args.head_table,
                head_importance=args.head_importance,
            )
        except (ValueError, OSError) as e:
            raise UsageError(f"--policy {args.policy}: {e}") from None
    elif args.policy_opt or args.head_table or args.head_importance:
        raise UsageError("--policy-opt, --head-table and --head-importance need --policy")
    if gpu:
        from fkv_jax.attention.backends import target as backend_target
        from fkv_jax.kernels.gpu_aot import h200_device

        if args.mesh:
            raise UsageError("--mesh: the deviceless H200 target has one device")
        devices = [h200_device()]
        on_target = backend_target(**gpu_target)
    else:
        if not libtpu_available():
            raise UsageError("libtpu is not installed: pip install -e '.[tpu]' (jax[tpu] at the pinned jax version)")
        try:
            devices = tpu_devices(topology)
        except ValueError as e:
            raise UsageError(str(e)) from None

        try:  # resolve attention backends for the TPU, not for this CPU host
            from fkv_jax.attention.backends import target as backend_target

            on_target = backend_target("tpu", device_kind=devices[0].device_kind)
        except ImportError:
            on_target = contextlib.nullcontext()
    with on_target:
        return _compile(
            args,
            cfg,
            sc,
            policy,
            dtype,
            cache_dtype,
            dtype_name,
            model_name,
            latent_hw,
            chip_name,
            topology,
            native,
            devices,
        )


def _compile(
    args, cfg, sc, policy, dtype, cache_dtype, dtype_name, model_name, latent_hw, chip_name, topology, native, devices
) -> dict:
    import inspect

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    from fkv_jax.cache.kv_cache import init_cache
    from fkv_jax.model.build import abstract_model
    from fkv_jax.roofline import CHIPS, estimate
    from fkv_jax.sampling.rollout import Sampler

    graphdef, params = nnx.split(abstract_model(cfg, dtype), nnx.Param)
    kw = dict(
        batch=args.batch,
        latent_hw=latent_hw,
        num_frames=args.frames,
        policy=policy,
        attention_backend=args.attention_backend,
    )
    sig = inspect.signature(Sampler.__init__).parameters
    if "cache_dtype" in sig:
        kw["cache_dtype"] = cache_dtype
    if "dtype" in sig:
        kw["dtype"] = dtype
    mesh = None
    try:
        if args.mesh:
            from fkv_jax.parallel import ShardedSampler
            from fkv_jax.parallel.mesh import make_mesh
            from fkv_jax.parallel.shardings import param_shardings

            mesh = make_mesh(args.mesh, devices=devices)
            sampler = ShardedSampler(graphdef, cfg, sc, mesh=mesh, **kw)
            pshard = param_shardings(params, mesh)
            rep = NamedSharding(mesh, P())
            cache_sh = sampler.cache_sharding
        else:
            sampler = Sampler(graphdef, cfg, sc, **kw)
            rep = SingleDeviceSharding(devices[0])
            pshard = jax.tree.map(lambda _: rep, params)
            cache_sh = None
        sampler.check_length(args.frames)
    except ValueError as e:
        raise UsageError(str(e)) from None

    def put(tree, sh):
        if not isinstance(sh, (SingleDeviceSharding, NamedSharding)):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)

    params_a = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, pshard)
    cache_a = jax.eval_shape(lambda: init_cache(sampler.geom))  # K/V in the sampler's cache dtype (geom.dtype)
    cache_a = put(cache_a, cache_sh if cache_sh is not None else rep)
    state_a = put(jax.eval_shape(lambda: sampler.policy.init_state(sampler.geom)), rep)
    ctx = jax.ShapeDtypeStruct((args.batch, cfg.text_len, cfg.text_dim), getattr(sampler, "dtype", jnp.float32))
    ctx_kv = jax.eval_shape(
        sampler._context_kv.__wrapped__ if hasattr(sampler._context_kv, "__wrapped__") else sampler._context_kv,
        params,
        ctx,
    )
    step_sh = getattr(sampler, "shardings", None)
    if mesh is not None and step_sh is not None:  # the Sampler's own step shardings
        ctx_kv = put(ctx_kv, step_sh.context)
        state_a = put(state_a, step_sh.state)
        xsh, esh = step_sh.chunk, step_sh.steps
    elif mesh is not None:
        from fkv_jax.parallel.shardings import CONTEXT_KV, batch_sharding

        ctx_kv = put(ctx_kv, NamedSharding(mesh, CONTEXT_KV))
        xsh, esh = batch_sharding(mesh, 5), batch_sharding(mesh, 6, batch_axis=1)
    else:
        ctx_kv = put(ctx_kv, rep)
        xsh = esh = rep
    c, n = sc.frames_per_block, sampler.schedule.num_steps
    x = jax.ShapeDtypeStruct((args.batch, c, cfg.in_dim, *latent_hw), jnp.float32, sharding=xsh)
    eps = jax.ShapeDtypeStruct((n - 1, args.batch, c, cfg.in_dim, *latent_hw), jnp.float32, sharding=esh)
    start = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)

    t0 = time.perf_counter()
    try:
        lowered = sampler.chunk_step.lower(params_a, cache_a, state_a, ctx_kv, x, eps, start)
        compiled = lowered.compile()
    except Exception as e:  # a compile error of this configuration: one line, the compiler's first
        msg = str(e).strip().splitlines()
        raise UsageError(f"compile failed for {args.target}: {type(e).__name__}: {msg[0] if msg else ''}") from None
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    if args.hlo:
        args.hlo.write_text(hlo)

    geom = sampler.geom
    k_layer = cache_a["k"]
    shard = k_layer.sharding.shard_shape(k_layer.shape)
    layer_cache_bytes = math.prod(shard[1:]) * k_layer.dtype.itemsize  # one layer's k_cache on one device
    copies = cache_sized_ops(hlo, layer_cache_bytes, slots=geom.num_slots, frame_tokens=geom.tokens_per_frame)
    mem = memory_summary(compiled)
    cost = program_cost(hlo)
    xla = compiled.cost_analysis() or {}
    if isinstance(xla, list):
        xla = xla[0] if xla else {}
    chip = CHIPS[chip_name]
    frames_per_chunk = c
    roof = {}
    for name, ch in CHIPS.items():
        e = estimate(cost.flops, cost.bytes, ch)
        fps = frames_per_chunk / e.seconds if e.seconds else None
        roof[name] = dict(
            ms_per_chunk=e.seconds * 1e3,
            fps=fps,
            video_fps=None if fps is None else VAE_STRIDE * fps,
            bound=e.bound,
            compute_ms=e.compute_s * 1e3,
            memory_ms=e.memory_s * 1e3,
        )
    params_bytes = per_device_bytes(params_a)
    cache_bytes = per_device_bytes([cache_a[x] for x in ("k", "v") if x in cache_a] or cache_a)  # K and V
    # every parameter counts as resident (the program's own arguments leave out weights it never reads, e.g.
    # the text projections whose output, the text K/V, is an input of the chunk step)
    hbm = {
        "params": params_bytes,
        "cache": cache_bytes,
        "other_arguments": max(0, mem["arguments"] - params_bytes - cache_bytes),
        "temporaries": mem["temporaries"],
        "outputs_not_aliased": mem["outputs"] - mem["aliased"],
        "code": mem["code"],
    }
    hbm["total"] = sum(hbm.values())
    hbm["program_total"] = mem["total"]  # memory_analysis(): arguments + outputs - aliased + temporaries + code
    hbm["chip"] = chip.hbm_bytes
    notes = []
    if not native:
        notes.append(
            f"{chip_name}: no GPU compile on this machine; FLOPs, bytes and HBM are from the XLA TPU "
            f"compile for {topology} (pallas_tpu / XLA TPU fusions), and the roofline uses "
            f"{chip_name}'s published peaks"
        )
    if devices[0].platform != "tpu" and cost.kernels and not cost.kernel_flops:
        notes.append(
            "the GPU kernels' custom calls declare no cost: their FLOPs are not counted and their bytes are "
            "their whole operands (the stacked cache of every layer, on every call), so this roofline misstates "
            "attention; memory, fit and the cache-copy count are exact. For FLOPs and bytes use a TPU target "
            "(pallas_tpu declares its cost) or --attention-backend xla"
        )
    if mesh is not None:
        notes.append(
            "sharded program: FLOPs, bytes and HBM are per device; inter-device collectives are not in the roofline"
        )
    if args.batch > 1:
        notes.append(f"FPS is per video; the step makes {args.batch} videos' chunks at once")
    if not cost.trip_counts_known:
        notes.append("some loop trip counts were unknown; those loop bodies are counted once")
    return {
        "target": args.target,
        "chip": chip_name,
        "compiled_for": topology,
        "device_kind": devices[0].device_kind,
        "devices": 1 if mesh is None else int(mesh.devices.size),
        "mesh": args.mesh,
        "model": model_name,
        "dtype": dtype_name,
        "cache_dtype": jnp.dtype(cache_dtype).name,
        "latent_hw": list(latent_hw),
        "tokens_per_frame": geom.tokens_per_frame,
        "frames": args.frames,
        "frames_per_chunk": frames_per_chunk,
        "denoising_steps": n,
        "model_passes_per_chunk": n + 1,
        "policy": args.policy or "plain cache",
        "attention_backend": args.attention_backend,
        "local_attn_size": sc.local_attn_size,
        "sink_size": sc.sink_size,
        "cache_slots": geom.num_slots,
        "compile_seconds": round(compile_s, 1),
        "hbm": hbm,
        "fits": bool(hbm["total"] <= chip.hbm_bytes),
        "flops_per_chunk": cost.flops,
        "bytes_per_chunk": cost.bytes,
        "kernel_flops_per_chunk": cost.kernel_flops,
        "kernel_bytes_per_chunk": cost.kernel_bytes,
        "kernel_calls_per_chunk": cost.kernels,
        "xla_cost_analysis": {
            "flops": float(xla.get("flops", 0.0)),
            "bytes": float(xla.get("bytes accessed", 0.0)),
            "note": "XLA's cost_analysis(): every loop body counted once",
        },
        "cache_copies": len(copies),
        "cache_copy_ops": [dataclasses.asdict(o) for o in copies[:20]],
        "layer_cache_bytes": layer_cache_bytes,
        "roofline": roof,
        "estimate": roof[chip_name],
        "notes": notes,
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def format_report(r: dict) -> str:
    h = r["hbm"]
    lines = [
        f"target {r['target']} ({r['device_kind']}, compiled for {r['compiled_for']}, {r['devices']} device(s)); "
        f"compile {r['compile_seconds']} s",
        f"model {r['model']} {r['dtype']} (cache {r['cache_dtype']}), latent {r['latent_hw'][0]}x{r['latent_hw'][1]} "
        f"({r['tokens_per_frame']} tokens/frame), {r['frames']} frames, chunk {r['frames_per_chunk']} frames x "
        f"{r['model_passes_per_chunk']} model passes",
        f"policy {r['policy']}, backend {r['attention_backend']}, cache {r['cache_slots']} slots "
        f"(local_attn_size {r['local_attn_size']}, sink {r['sink_size']})",
        f"HBM per device: params {_gb(h['params'])} + cache {_gb(h['cache'])} + other inputs "
        f"{_gb(h['other_arguments'])} + temporaries {_gb(h['temporaries'])} + outputs {_gb(h['outputs_not_aliased'])}"
        f" + code {_gb(h['code'])} = {_gb(h['total'])} of {_gb(h['chip'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"per chunk: {r['flops_per_chunk'] / 1e12:.2f} TFLOP, {r['bytes_per_chunk'] / 1e9:.2f} GB HBM traffic "
        f"(attention kernels: {r['kernel_flops_per_chunk'] / 1e12:.2f} TFLOP, "
        f"{r['kernel_bytes_per_chunk'] / 1e9:.2f} GB in {r['kernel_calls_per_chunk']} calls)",
        f"cache-sized ops outside kernels: {r['cache_copies']}",
        "roofline ESTIMATES (max(FLOPs/peak, bytes/bandwidth), published peaks; not measured; the DiT chunk step "
        f"only, no VAE or text encoder; video FPS = {VAE_STRIDE} x latent FPS):",
    ]
    for name, x in r["roofline"].items():
        mark = " <- target" if name == r["chip"] else ""
        lines.append(
            f"  {name:8s} {x['ms_per_chunk']:9.2f} ms/chunk  {x['fps']:8.1f} latent FPS  "
            f"{x['video_fps']:8.1f} video FPS  ({x['bound']}-bound){mark}"
        )
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def run(args) -> dict:
    report = compile_chunk_step(args)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


def main(argv=None, prog: str = "python -m fkv_jax.aot") -> int:
    return run_cli(lambda: build_parser(prog), run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Loop-aware roofline cost of a compiled program, read from its HLO text.

XLA's cost_analysis() visits each while-loop body once (layer scan, micro-batch scan, decode loop, the loops
XLA adds for FSDP matmuls). This walks the compiled HLO instead, with every loop at its trip count, and costs
each top-level op the way the compiler's roofline does: max(matmul FLOPs / peak, HBM bytes / bandwidth). HBM
bytes are the op's operands and result, except buffers in other memory spaces (S(n) layouts: VMEM, ...), and
slices only for dynamic-slice / dynamic-update-slice (a KV-cache write moves one slot, not the cache).
Collectives count as HBM traffic, as in the compiler's estimate (ICI time is not modelled).

Why a parser and not cost_analysis() times the config's trip counts: the loops nest (micro-batches > layers >
log-prob chunks; decode steps > layers) and XLA adds loops of its own (windowed FSDP matmuls), so one
program-level figure with each body once cannot be scaled back to the whole program; the per-op walk can.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence

import numpy as np

# XLA's cost_analysis() visits each while-loop body once. This walks the compiled HLO instead, with every
# loop at its trip count, and costs each top-level op the way the compiler's roofline does: max(matmul
# FLOPs / peak, HBM bytes / bandwidth). HBM bytes are the op's operands and result, except buffers in other
# memory spaces (S(n) layouts: VMEM, ...), and slices only for dynamic-slice / dynamic-update-slice (a
# KV-cache write moves one slot, not the cache). Collectives count as HBM traffic, as in the compiler's
# estimate (ICI time is not modelled).

_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# Ops that move no data themselves (structure, aliasing, or the second half of an async pair).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional", "after-all",
         "partition-id", "replica-id", "opt-barrier", "copy-done", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "async-done", "send-done", "recv-done"}


def _balanced(text: str, start: int = 0) -> int:
    """Index just past the bracket group opening at text[start] ('(', '[' or '{')."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "([{"
        depth -= text[i] in ")]}"
        if depth == 0:
            return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    """Splits at commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str
    attrs: str


def _parse_hlo(text: str) -> dict[str, list[_Instr]]:
    """HLO module text -> {computation: instructions}; the entry computation is also '__entry__'."""
    comps: dict[str, list[_Instr]] = {}
    current: list[_Instr] | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = comps.setdefault(header.group(2), [])
            if header.group(1):
                comps["__entry__"] = current
            continue
        if line.rstrip() == "}":  # a computation ends; "}}, metadata=..." continues a multi-line instruction
            current = None
            continue
        m = _INSTR.match(line) if current is not None else None
        if not m:
            continue
        rest = m.group(2)
        cut = _balanced(rest) if rest.startswith("(") else rest.find(" ")
        shape, rest = rest[:cut], rest[cut:].lstrip()
        paren = rest.find("(")
        if paren < 0:
            continue
        end = _balanced(rest, paren)
        args = re.sub(r"/\*.*?\*/", "", rest[paren + 1:end - 1])
        operands = [a.split()[-1].lstrip("%") for a in _split_top(args) if a.strip()]
        current.append(_Instr(m.group(1), shape, rest[:paren].strip(), operands, args, rest[end:]))
    return comps


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _hbm_bytes(shape: str) -> float:
    """Bytes of the arrays of a (tuple) shape that live in HBM (layouts without an S(n) memory space)."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES and not re.search(r"S\(\d+\)", layout):
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


@functools.lru_cache(maxsize=None)
def _window_pairs(out: int, window: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window position) pairs of one spatial dim that land on a real input element
    (not padding, not a hole of an lhs dilation): XLA expresses batched matmuls as such convolutions."""
    pos = np.arange(out)[:, None] * stride - pad_lo + np.arange(window)[None, :] * rhs_dilate
    return int(np.sum((pos >= 0) & (pos <= (size - 1) * lhs_dilate) & (pos % lhs_dilate == 0)))


def _matmul_flops(ins: _Instr, shapes: dict[str, str]) -> float:
    """2 * multiply-adds of a dot or convolution; 0 for other ops."""
    if ins.opcode == "dot":
        lhs = _dims(shapes[ins.operands[0]])
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        contract = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m else 1
        return 2.0 * math.prod(_dims(ins.shape)) * contract
    if ins.opcode == "custom-call":
        return _splash_flops(ins, shapes)
    if ins.opcode != "convolution":
        return 0.0
    lhs, rhs, out = _dims(shapes[ins.operands[0]]), _dims(shapes[ins.operands[1]]), _dims(ins.shape)
    lhs_l, rhs_l, out_l = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs).groups()
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    attrs = dict(kv.split("=", 1) for kv in window.group(1).split()) if window else {}
    spatial = sum(ch.isdigit() for ch in out_l)

    def field(name: str, default: str) -> list[str]:
        return attrs[name].split("x") if name in attrs else [default] * spatial

    stride, pad = field("stride", "1"), field("pad", "0_0")
    lhs_dilate, rhs_dilate = field("lhs_dilate", "1"), field("rhs_dilate", "1")
    macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
    for k in range(spatial):
        d = str(k)
        macs *= _window_pairs(out[out_l.index(d)], rhs[rhs_l.index(d)], lhs[lhs_l.index(d)], int(stride[k]),
                              int(pad[k].split("_")[0]), int(lhs_dilate[k]), int(rhs_dilate[k]))
    return 2.0 * macs


# Pallas splash attention kernels (custom calls named after the kernel, `splash_mha_fwd_segmented_residuals` ...):
# XLA sees no FLOPs in them. Matmuls per visited (q block, kv block) pair and query head: forward QKᵀ, PV; dq kernel
# QKᵀ, dO·Vᵀ, dS·K; dkv kernel QKᵀ, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q.
_SPLASH = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)")
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _splash_flops(ins: _Instr, shapes: dict[str, str]) -> float:
    """2 * multiply-adds of a splash attention kernel under a causal mask (the decoder's only mask): its first
    operand is the block map [heads, q blocks, kv blocks] and its first float operand q [..., H, T, Dh]; the
    kernel computes every block pair that the causal mask does not hide entirely."""
    phase = _SPLASH.match(ins.name)
    q = next((_dims(shapes[o]) for o in ins.operands if re.match(r"(bf16|f16|f32)\[", shapes[o])), None)
    if not phase or not q or len(q) < 3:
        return 0.0
    *batch, heads, length, head_dim = q
    q_blocks, kv_blocks = _dims(shapes[ins.operands[0]])[-2:]
    bq, bkv = length // q_blocks, length // kv_blocks
    pairs = sum(min(kv_blocks, -(-(i + 1) * bq // bkv)) for i in range(q_blocks))
    return 2.0 * _SPLASH_MATMULS[phase.group(1)] * math.prod(batch) * heads * pairs * bq * bkv * head_dim


def _constant_value(name: str, defs: dict[str, _Instr]) -> int | None:
    """Integer value of a scalar constant, looking through copies and bitcasts."""
    ins = defs.get(name)
    while ins is not None and ins.opcode in ("copy", "bitcast", "convert") and ins.operands:
        ins = defs.get(ins.operands[0])
    if ins is None or ins.opcode != "constant":
        return None
    m = re.fullmatch(r"\s*(-?\d+)\s*", ins.args)
    return int(m.group(1)) if m else None


def _called(ins: _Instr, key: str) -> list[str]:
    return re.findall(rf"\b{key}=%?([\w.\-]+)", ins.attrs)


def _through_fusion(ins: _Instr, opcode: str, comps: dict[str, list[_Instr]]) -> _Instr | None:
    """`ins` if it is an `opcode` op, or the `opcode` root of the fusion `ins` with its operands mapped to
    the fusion's operands; None otherwise."""
    if ins.opcode == opcode:
        return ins
    inner = comps.get(next(iter(_called(ins, "calls")), "")) if ins.opcode == "fusion" else None
    if not inner or inner[-1].opcode != opcode:
        return None
    params = {i.name: int(i.args) for i in inner if i.opcode == "parameter"}
    if any(o not in params for o in inner[-1].operands):
        return None
    return dataclasses.replace(inner[-1], operands=[ins.operands[params[o]] for o in inner[-1].operands])


def _trip_count(loop: _Instr, comps: dict[str, list[_Instr]], defs: dict[str, _Instr]) -> int | None:
    """Iterations of a counted loop: condition `counter < constant`, the counter starting at a constant and
    the body adding a constant (1 for `lax.scan` / `fori_loop`, 2 for XLA's bidirectional windowed matmuls);
    None for any other loop (e.g. one that stops on data)."""
    cond, body = (comps.get(next(iter(_called(loop, key)), "")) for key in ("condition", "body"))
    compare = _through_fusion(cond[-1], "compare", comps) if cond else None
    direction = re.search(r"direction=(\w+)", compare.attrs) if compare else None
    if not direction or direction.group(1) not in ("LT", "LE") or not body or body[-1].opcode != "tuple":
        return None
    counter, bound = defs.get(compare.operands[0]), _constant_value(compare.operands[1], defs)
    if counter is None or counter.opcode != "get-tuple-element" or bound is None:
        return None
    index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
    init, update = defs.get(loop.operands[0]), defs.get(body[-1].operands[index])
    if init is None or init.opcode != "tuple" or update is None:
        return None
    add = _through_fusion(update, "add", comps)
    steps = [_constant_value(o, defs) for o in add.operands] if add else []
    start, step = _constant_value(init.operands[index], defs), next((v for v in steps if v is not None), None)
    if start is None or not step or step < 0:
        return None
    return max(0, -(-(bound - start + (direction.group(1) == "LE")) // step))


def _sliced_read_bytes(body: list[_Instr], param: str, comps: dict[str, list[_Instr]]) -> float | None:
    """HBM bytes a fusion computation reads of its parameter `param` when it only dynamic-slices it or updates
    it in place (also inside nested fusions): the slices; None when some use reads it whole."""
    uses = [(i, pos) for i in body for pos, o in enumerate(i.operands) if o == param]
    total = 0.0
    for use, pos in uses:
        if use.opcode in ("dynamic-slice", "dynamic-update-slice") and pos == 0:
            total += _hbm_bytes(use.shape) if use.opcode == "dynamic-slice" else 0.0
            continue
        inner = comps.get(next(iter(_called(use, "calls")), "")) if use.opcode == "fusion" else None
        inner_param = next((i.name for i in inner or [] if i.opcode == "parameter" and int(i.args) == pos), None)
        sliced = _sliced_read_bytes(inner, inner_param, comps) if inner_param is not None else None
        if sliced is None:
            return None
        total += sliced
    return total if uses else None


def _op_bytes(ins: _Instr, shapes: dict[str, str], comps: dict[str, list[_Instr]]) -> float:
    """HBM bytes an op reads and writes; a fusion reads only the slices it dynamic-slices out of a
    parameter (also in a nested fusion), and writes only the update of a dynamic-update-slice root (its
    buffer is aliased)."""
    if ins.opcode == "dynamic-slice":
        return 2 * _hbm_bytes(ins.shape)
    if ins.opcode == "dynamic-update-slice":
        return 2 * _hbm_bytes(shapes[ins.operands[1]])
    if ins.opcode == "copy-start":  # (destination, source, context): read the source, write the destination
        return _hbm_bytes(shapes[ins.operands[0]]) + _hbm_bytes(_split_top(ins.shape[1:-1])[0])
    reads = [_hbm_bytes(shapes[o]) for o in ins.operands]
    written = _hbm_bytes(ins.shape)
    body = comps.get(next(iter(_called(ins, "calls")), "")) if ins.opcode == "fusion" else None
    if body:
        for name, index in ((i.name, int(i.args)) for i in body if i.opcode == "parameter"):
            sliced = _sliced_read_bytes(body, name, comps)
            if sliced is not None and index < len(reads):
                reads[index] = sliced
        local = {i.name: i for i in body}
        roots = [local[o] for o in body[-1].operands] if body[-1].opcode == "tuple" else [body[-1]]
        if any(r.opcode == "dynamic-update-slice" for r in roots):
            written = sum(_hbm_bytes(local[r.operands[1]].shape if r.opcode == "dynamic-update-slice" else r.shape)
                          for r in roots)
    return sum(reads) + written


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Per-device cost of a compiled program. `*_once`: every loop body once (what cost_analysis() counts);
    the others: loops at their trip counts (`unknown_loops` of them, which stop on data, at the given bound).
    `kernel_flops_once`: the part of `flops_once` in Pallas kernels, which cost_analysis() does not count."""

    flops_once: float
    seconds_once: float
    flops: float
    seconds: float
    unknown_loops: int
    kernel_flops_once: float = 0.0


def program_cost(hlo_text: str, peak_flops: float, hbm_bandwidth: float,
                 unknown_trip_count: int | Sequence[int] = 1) -> ProgramCost:
    """Roofline cost of compiled HLO text (see the section comment), walking loops from the entry. A loop
    that stops on data runs `unknown_trip_count` times; a sequence gives the count by nesting (its first
    entry for the outermost such loop, the next for one inside it, ...)."""
    counts = (unknown_trip_count,) if isinstance(unknown_trip_count, int) else tuple(unknown_trip_count)
    comps = _parse_hlo(hlo_text)
    defs = {ins.name: ins for name, instrs in comps.items() if name != "__entry__" for ins in instrs}
    shapes = {name: ins.shape for name, ins in defs.items()}

    def flops_of(ins: _Instr) -> float:
        """Matmul FLOPs of an op, including those inside the computations a fusion calls."""
        inner = [i for c in _called(ins, "calls") for i in comps.get(c, [])] if ins.opcode == "fusion" else []
        return _matmul_flops(ins, shapes) + sum(flops_of(i) for i in inner)

    totals = np.zeros(4)  # flops once, seconds once, flops, seconds
    kernel_flops_once = 0.0
    unknown = 0
    stack = [("__entry__", 1, 0)]  # (computation, times it runs, data-dependent loops around it)
    while stack:
        comp, mult, depth = stack.pop()
        for ins in comps.get(comp, []):
            if ins.opcode == "while":
                count = _trip_count(ins, comps, defs)
                unknown += count is None
                inner = depth + (count is None)
                times = counts[min(depth, len(counts) - 1)] if count is None else count
                stack.extend((c, mult * times, inner) for c in _called(ins, "body"))
                stack.extend((c, mult, depth) for c in _called(ins, "condition"))
            elif ins.opcode == "call":
                stack.extend((c, mult, depth) for c in _called(ins, "to_apply"))
            elif ins.opcode == "conditional":
                for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs):
                    stack.extend((c, mult, depth) for c in re.findall(r"%?([\w.\-]+)", group))
                stack.extend((c, mult, depth) for key in ("true_computation", "false_computation")
                             for c in _called(ins, key))
            if ins.opcode in _FREE:
                continue
            flops = flops_of(ins)
            seconds = max(flops / peak_flops, _op_bytes(ins, shapes, comps) / hbm_bandwidth)
            totals += (flops, seconds, flops * mult, seconds * mult)
            kernel_flops_once += flops if ins.opcode == "custom-call" else 0.0
    return ProgramCost(*totals.tolist(), unknown_loops=unknown, kernel_flops_once=kernel_flops_once)

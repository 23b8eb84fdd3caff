"""Ahead-of-time compilation of a run's device programs for a real TPU slice, on any CPU host (libtpu).

    python -m prime_jax.aot --config=configs/qwen7b.py --topology=v5p:2x2x2 [--config.a.b=v ...]
    python -m prime_jax.aot --config=configs/qwen7b.py --topology=v5p-32      # slice name: its SHARDING plan
    python -m prime_jax.aot --config=configs/qwen7b.py --smallest=v5p          # smallest v5p slice that fits
    python -m prime_jax.aot --config=configs/qwen7b.py --table=v5p-8,v5p-16    # markdown rows (docs/aot.md)

No weights and no TPU: the policy, PRM and reference are ShapeDtypeStructs sharded over a mesh of the
topology's compile-only devices (`jax.experimental.topologies`), and the four programs of a PRIME step,
built exactly as the trainer builds them, are lowered and compiled by libtpu with the config's real
shapes: sampler prefill (`insert`: the most prompts one prefill takes, prompt data.max_prompt_length,
into a cache of rollout.prompts_per_call x rollout.n_samples rows in flight) and decode
(rollout.steps_per_sync steps of those rows, response rollout.max_response_length), PRM step and PPO step
(B = batch_size * n rows). Everything else runs on the CPU backend (JAX_PLATFORMS=cpu is fine; the topology API ignores it).

Per program and per device: the compiler's argument / output / temporary / generated-code / alias bytes,
plus the bytes of the other states that stay resident on the device while it runs (e.g. the PRM and its
Adam moments during sampling). peak = arguments + outputs - aliased + temporaries + code + resident;
it fits when peak <= the chip's HBM.

The sampler programs are compiled for `rollout.prompts_per_call` prompts in flight (at most and by
default train.batch_size), the shape of every sampler the trainer runs.

Cost: XLA's `cost_analysis()` visits the body of every while loop once (layer scan, micro-batch scan,
decode loop...), so its FLOPs and seconds describe one pass through each loop. `program_cost` walks the
compiled HLO with every loop at its trip count (the decode loop, which stops on data, at its limit: all
rows run to max length) and costs each op as the compiler's roofline does, max(matmul FLOPs / peak,
HBM bytes / bandwidth); with loops once it lands within 20% of the compiler's optimal_seconds on the
v5p 7B programs (libtpu's v4 and v5e cost models report negative seconds). Estimated seconds are that
roofline (ICI not modelled, no overlap): a lower bound on time, so MFU = matmul FLOPs / (seconds * peak
bf16 FLOP/s) is an upper bound (rematerialisation counted as FLOPs).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prime_jax.memory_plan import architecture
from prime_jax.mesh import batch_sharding, make_mesh, state_shardings
from prime_jax.models import ModelConfig, abstract_model
from prime_jax.programs import make_programs, optimizers, rows_per_step, sampler_prompts, validate_programs
from prime_jax.rl.optim import TrainState, init_train_state, train_state_shardings
from prime_jax.sampling import decode, empty_state, insert, sampler_state_shardings

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. hbm_bytes: HBM per chip; peak_flops: dense bf16 FLOP/s per chip; hbm_bandwidth:
    bytes/s per chip; cores: TensorCores per chip (v4/v5p slice names count cores); chip_config: libtpu's
    chip_config_name ("megacore": one JAX device per chip, as on a real v4/v5p VM)."""

    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    cores: int
    chip_config: str
    slice_prefix: str


# Public Cloud TPU figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GIB, 275e12, 1.2e12, cores=2, chip_config="megacore", slice_prefix="v4"),
    "v5p": Chip(95 * GIB, 459e12, 2.765e12, cores=2, chip_config="megacore", slice_prefix="v5p"),
    "v5e": Chip(16 * GIB, 197e12, 0.819e12, cores=1, chip_config="default", slice_prefix="v5litepod"),
    "v6e": Chip(32 * GIB, 918e12, 1.64e12, cores=1, chip_config="default", slice_prefix="v6e"),
}
_3D = ("v4", "v5p")  # generations with a 3-D torus; v5e / v6e are 2-D
PROGRAMS = ("sampler_prefill", "sampler_decode", "prm_step", "ppo_step")


# --- topologies ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: generation, chip grid (e.g. (2, 2, 2)) and its names."""

    generation: str
    dims: tuple[int, ...]

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def num_chips(self) -> int:
        return math.prod(self.dims)

    @property
    def name(self) -> str:
        """libtpu's topology name, e.g. "v5p:2x2x2"."""
        return f"{self.generation}:{'x'.join(map(str, self.dims))}"

    @property
    def slice_name(self) -> str:
        """Cloud TPU accelerator type, e.g. "v5p-16" (v4/v5p count TensorCores, v5e/v6e chips)."""
        return f"{self.chip.slice_prefix}-{self.num_chips * self.chip.cores}"

    def devices(self) -> list[Any]:
        """Compile-only devices of this slice (one per chip), from libtpu."""
        from jax.experimental import topologies

        # No chip is ever opened: several processes may load libtpu at once, and libtpu's start-up is told
        # there are no TPU workers to look for (it would warn that it cannot find them). Restored after.
        quiet = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_ACCELERATOR_TYPE": self.slice_name,
                 "TPU_WORKER_HOSTNAMES": "localhost"}
        saved = {k: os.environ.get(k) for k in quiet}
        os.environ.update({k: v for k, v in quiet.items() if saved[k] is None})
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=self.name,
                                                chip_config_name=self.chip.chip_config)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
        if len(desc.devices) != self.num_chips:
            raise RuntimeError(f"libtpu gave {len(desc.devices)} devices for {self.name}, expected {self.num_chips}")
        return list(desc.devices)


def slice_dims(generation: str, num_chips: int) -> tuple[int, ...]:
    """The standard chip grid of a slice: from 2x2x1 (3-D) or 2x2 (2-D), double the smallest dim (the
    last such), e.g. v5p: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4; v5e: 8 -> 2x4, 16 -> 4x4."""
    dims = [2, 2, 1] if generation in _3D else [2, 2]
    if num_chips < math.prod(dims) or num_chips & (num_chips - 1):
        raise ValueError(f"topology: {num_chips} chips is not a power of two >= {math.prod(dims)}")
    while math.prod(dims) < num_chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return tuple(dims)


def parse_topology(text: str) -> Topology:
    """"v5p:2x2x2" (libtpu) or "v5p-16" / "v4-64" / "v5litepod-8" / "v6e-8" (slice name) -> Topology."""
    m = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", text.strip())
    if m:
        gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        if gen not in CHIPS:
            raise ValueError(f"topology {text!r}: unknown generation {gen!r} (known: {sorted(CHIPS)})")
        if len(dims) != (3 if gen in _3D else 2):
            raise ValueError(f"topology {text!r}: {gen} needs {3 if gen in _3D else 2} dimensions")
        return Topology(gen, dims)
    m = re.fullmatch(r"(v\w+?)-(\d+)", text.strip())
    if m:
        by_prefix = {c.slice_prefix: g for g, c in CHIPS.items()} | {g: g for g in CHIPS}
        if m.group(1) not in by_prefix:
            raise ValueError(f"topology {text!r}: unknown generation {m.group(1)!r} (known: {sorted(by_prefix)})")
        gen = by_prefix[m.group(1)]
        count = int(m.group(2))
        if count % CHIPS[gen].cores:
            raise ValueError(f"topology {text!r}: a {gen} slice counts {CHIPS[gen].cores} cores per chip")
        return Topology(gen, slice_dims(gen, count // CHIPS[gen].cores))
    raise ValueError(f"topology {text!r}: expected e.g. 'v5p:2x2x2' or 'v5p-16'")


# --- abstract states -----------------------------------------------------------------------------

def model_config(c: ml_collections.ConfigDict, param_dtype: str) -> ModelConfig:
    """The architecture with the run's dtypes and memory knobs, as `components.build` loads it."""
    m = c.model
    return architecture(c).replace(param_dtype=param_dtype, dtype=m.compute_dtype, remat=m.remat,
                                   logits_chunk=m.logits_chunk)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs (inside nnx Variables or bare) given their shardings."""
    def one(x: Any, s: NamedSharding) -> Any:
        if isinstance(x, nnx.Variable):
            v = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass
class AbstractRun:
    """Everything a PRIME step holds on the mesh, as sharded ShapeDtypeStructs."""

    graphdef: nnx.GraphDef
    policy: TrainState
    prm: TrainState
    ref_params: nnx.State


def abstract_run(c: ml_collections.ConfigDict, mesh: Mesh) -> AbstractRun:
    """Policy and PRM train states (params + Adam) and the frozen reference, sharded as `components.build`
    shards them."""
    graphdef, params = nnx.split(abstract_model(model_config(c, c.model.param_dtype)))
    _, ref = nnx.split(abstract_model(model_config(c, c.model.ref_dtype)))
    params = _with_shardings(params, state_shardings(params, mesh))
    policy_tx, prm_tx, _ = optimizers(c, mesh)

    def train_state(tx):
        state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
        return _with_shardings(state, train_state_shardings(state, mesh))

    ref = _with_shardings(ref, state_shardings(ref, mesh))
    return AbstractRun(graphdef, train_state(policy_tx), train_state(prm_tx), ref)


def bytes_per_device(tree: Any) -> int:
    """Bytes of one device's shards of every sharded ShapeDtypeStruct in `tree`."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * x.dtype.itemsize
    return total


def _key(mesh: Mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


def _batch(mesh: Mesh, rows: int, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, jax.ShapeDtypeStruct]:
    """{name: (row shape, dtype)} -> [rows, *row shape] arrays split over the data axes."""
    return {k: jax.ShapeDtypeStruct((rows, *s), d, sharding=batch_sharding(mesh, 1 + len(s)))
            for k, (s, d) in shapes.items()}


# --- loop-aware cost of a compiled program -------------------------------------------------------
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
        if line.startswith("}"):
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
    the others: loops at their trip counts (`unknown_loops` of them, which stop on data, at the given bound)."""

    flops_once: float
    seconds_once: float
    flops: float
    seconds: float
    unknown_loops: int


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
    return ProgramCost(*totals.tolist(), unknown_loops=unknown)


# --- compiling ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ProgramReport:
    """Per-device figures of one compiled program. resident_bytes: other states live on the device meanwhile."""

    name: str
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    alias_bytes: int = 0
    resident_bytes: int = 0
    cost: ProgramCost | None = None  # loop-aware roofline (program_cost)
    compiler_flops: float = 0.0      # cost_analysis() as reported: every loop body once
    compiler_seconds: float = 0.0    # its "optimal_seconds", likewise
    compile_seconds: float = 0.0
    error: str = ""               # the compiler's message when it ran out of HBM: then the argument bytes
                                  # are the inputs' shards, temp_bytes what the message says, peak a lower bound

    @property
    def peak_bytes(self) -> int:
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
                + self.resident_bytes)

    def fits(self, chip: Chip) -> bool:
        return not self.error and self.peak_bytes <= chip.hbm_bytes

    @property
    def flops(self) -> float:
        return self.cost.flops if self.cost else 0.0

    @property
    def seconds(self) -> float:
        return self.cost.seconds if self.cost else 0.0

    def mfu(self, chip: Chip) -> float:
        """Matmul FLOPs / (estimated seconds * peak): per chip, so the same over the slice."""
        return self.flops / (self.seconds * chip.peak_flops) if self.seconds > 0 else 0.0


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_temp_bytes(message: str) -> int:
    """Bytes an out-of-HBM compiler message says the program needed ('the total memory required for HLO
    temporaries (130.08G) exceeds ...' or 'Used 120.5G of 95.74G hbm'); 0 when it gives no figure."""
    m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", message) or \
        re.search(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


def compile_program(name: str, fn: Any, args: tuple, kwargs: dict[str, Any], chip: Chip, resident: int,
                    unknown_trip_count: int | Sequence[int] = 1, hlo_dir: str = "") -> tuple[ProgramReport, Any, Any]:
    """Lowers `fn(*args, **kwargs)` and compiles it -> (report, lowered, compiled); compiled is None when the
    compiler ran out of device memory (the report then carries its message). Loops that stop on data run
    `unknown_trip_count` times in the cost estimate. With `hlo_dir`, the compiled HLO is written to
    <hlo_dir>/<name>.hlo.txt."""
    report = ProgramReport(name, resident_bytes=resident)
    t0 = time.perf_counter()
    lowered = fn.lower(*args, **kwargs)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        report.compile_seconds = time.perf_counter() - t0
        report.error = " ".join(message.split())[:300]
        arrays = [x for x in jax.tree.leaves(args) if isinstance(x, jax.ShapeDtypeStruct)]  # not the graphdef
        report.argument_bytes = bytes_per_device(arrays)
        report.temp_bytes = _oom_temp_bytes(message)
        return report, lowered, None
    report.compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.compiler_flops = float(cost.get("flops", 0.0))
    report.compiler_seconds = float(cost.get("optimal_seconds", 0.0))
    text = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    report.cost = program_cost(text, chip.peak_flops, chip.hbm_bandwidth, unknown_trip_count)
    return report, lowered, compiled


def stand_in_stop_ids(cfg: ModelConfig) -> tuple[int, ...]:
    """Stop ids come from the tokenizer at run time; their values do not change the programs, so the
    architecture's eos id stands in (or the last vocab id)."""
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else cfg.vocab_size - 1
    return tuple(eos) if isinstance(eos, tuple) else (int(eos),)


def compile_run(c: ml_collections.ConfigDict, topology: Topology, programs: Sequence[str] = PROGRAMS,
                hlo_dir: str = "", log: Callable[[str], None] = lambda s: None) -> list[ProgramReport]:
    """Compiles the run's programs for `topology`; one report per program (in PROGRAMS order)."""
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"--programs: unknown {unknown} (known: {list(PROGRAMS)})")
    mesh = make_mesh(dict(c.mesh), devices=topology.devices())
    validate_programs(c, mesh)
    run = abstract_run(c, mesh)
    cfg = model_config(c, c.model.param_dtype)
    progs = make_programs(c, mesh, run.graphdef, run.policy, run.prm, run.ref_params, stop_ids=stand_in_stop_ids(cfg),
                          pad_id=0)
    rows, p_len, r_len = rows_per_step(c), c.data.max_prompt_length, c.rollout.max_response_length
    train_batch = _batch(mesh, rows, {"prompt_tokens": ((p_len,), jnp.int32), "prompt_mask": ((p_len,), jnp.int32),
                                      "tokens": ((r_len,), jnp.int32), "mask": ((r_len,), jnp.float32),
                                      "old_logp": ((r_len,), jnp.float32), "acc": ((), jnp.float32)})
    ppo_batch = {**train_batch, **_batch(mesh, rows, {"advantages": ((r_len,), jnp.float32)})}
    sampler = progs.sampler.cfg
    prompts = sampler.max_prefill  # the largest prefill batch of the sampler
    prompt_batch = _batch(mesh, prompts, {"tokens": ((p_len,), jnp.int32), "lens": ((), jnp.int32)})
    replicated = NamedSharding(mesh, P())
    slots = jax.ShapeDtypeStruct((sampler.n, prompts), jnp.int32, sharding=replicated)
    policy_rest = bytes_per_device((run.policy.opt_state, run.policy.step))
    prm_all, ref_all = bytes_per_device(run.prm), bytes_per_device(run.ref_params)
    policy_all = bytes_per_device(run.policy)
    key = _key(mesh)
    sampler_resident = prm_all + ref_all + policy_rest  # the policy params are the sampler's argument
    reports: dict[str, ProgramReport] = {}

    def done(report: ProgramReport) -> None:
        reports[report.name] = report
        log(format_report(report, topology.chip))

    chip = topology.chip
    if "sampler_prefill" in programs or "sampler_decode" in programs:
        with jax.set_mesh(mesh):  # as the sampler runs them: its state constrained to the batch axes
            state = jax.eval_shape(lambda: empty_state(cfg, sampler, p_len))
            state = _with_shardings(state, sampler_state_shardings(state, mesh))
            if "sampler_prefill" in programs:
                log("compiling sampler_prefill ...")
                done(compile_program("sampler_prefill", insert, (run.graphdef, run.policy.params, state,
                                     prompt_batch["tokens"], prompt_batch["lens"], slots, slots, key), {}, chip,
                                     sampler_resident, hlo_dir=hlo_dir)[0])
            if "sampler_decode" in programs:
                log("compiling sampler_decode ...")
                # Costed as one whole response of every row: the calls of steps_per_sync steps (a loop that stops
                # on data) that max_new_tokens - 1 steps take, each step reading the cache blocks filled halfway
                # through the response (the attention's two block loops, prompt and ring, also stop on data:
                # each is costed at the mean of their block counts).
                block = sampler.block(p_len)
                blocks = -(-(-(-p_len // block) + -(-r_len // (2 * block)) + 1) // 2)
                report = compile_program("sampler_decode", decode, (run.graphdef, run.policy.params, state), {},
                                         chip, sampler_resident, (sampler.steps_per_sync, blocks), hlo_dir)[0]
                if report.cost is not None:
                    calls = -(-(r_len - 1) // sampler.steps_per_sync)
                    report.cost = dataclasses.replace(report.cost, flops=report.cost.flops * calls,
                                                      seconds=report.cost.seconds * calls)
                done(report)
    if "prm_step" in programs:
        log("compiling prm_step ...")
        done(compile_program("prm_step", progs.prm_step, (run.prm, run.ref_params, train_batch), {}, chip, policy_all,
                             hlo_dir=hlo_dir)[0])
    if "ppo_step" in programs:
        log("compiling ppo_step ...")
        done(compile_program("ppo_step", progs.ppo_step, (run.policy, ppo_batch, key), {}, chip, prm_all + ref_all,
                             hlo_dir=hlo_dir)[0])
    return [reports[p] for p in PROGRAMS if p in reports]


# --- output ------------------------------------------------------------------------------------

def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def format_report(r: ProgramReport, chip: Chip) -> str:
    """One line of per-device figures (GiB) of a compiled program, or what the compiler said when it did not fit."""
    if r.error:
        return (f"{r.name:<16} args {_gib(r.argument_bytes):>6}  temp {_gib(r.temp_bytes):>6}  resident "
                f"{_gib(r.resident_bytes):>6}  peak >= {_gib(r.peak_bytes)} GiB/device  fits=no  ({r.error})")
    return (f"{r.name:<16} args {_gib(r.argument_bytes):>6}  out {_gib(r.output_bytes):>6}  "
            f"temp {_gib(r.temp_bytes):>6}  "
            f"code {_gib(r.code_bytes):>5}  alias {_gib(r.alias_bytes):>6}  resident {_gib(r.resident_bytes):>6}  "
            f"peak {_gib(r.peak_bytes):>6} GiB/device  fits={'yes' if r.fits(chip) else 'no'}  "
            f"{r.flops / 1e12:9.1f} TFLOP/device  ~{r.seconds:8.2f} s  MFU {100 * r.mfu(chip):5.1f}%  "
            f"{f'({r.cost.unknown_loops} data-dependent loop(s) at their limit) ' if r.cost.unknown_loops else ''}"
            f"(loop bodies once: {r.cost.flops_once / 1e12:.2f} TFLOP, {r.cost.seconds_once:.3g} s; compiler's "
            f"cost_analysis: {r.compiler_flops / 1e12:.2f} TFLOP, {r.compiler_seconds:.3g} s; "
            f"compile {r.compile_seconds:.0f} s)")


def summary_line(topology: Topology, reports: Sequence[ProgramReport]) -> str:
    """`AOT <topology>: fits=<yes|no> peak_bytes_per_device=<int> hbm_bytes=<int>` for the worst program."""
    hbm = topology.chip.hbm_bytes
    worst = max(r.peak_bytes for r in reports)
    fits = all(r.fits(topology.chip) for r in reports)
    return f"AOT {topology.name}: fits={'yes' if fits else 'no'} peak_bytes_per_device={worst} hbm_bytes={hbm}"


def markdown_rows(c: ml_collections.ConfigDict, topology: Topology, reports: Sequence[ProgramReport]) -> list[str]:
    """One markdown table row per program (columns: see TABLE_HEADER)."""
    chip = topology.chip
    mesh = ", ".join(f"{k}={v}" for k, v in c.mesh.items())
    micro = f"{c.prm.micro_batch_size}/{c.actor.micro_batch_size}"
    rows = []
    for r in reports:
        cells = [topology.slice_name, f"`{topology.name}`", mesh, micro, str(sampler_prompts(c)), r.name,
                 _gib(r.argument_bytes), _gib(r.temp_bytes), _gib(r.resident_bytes)]
        if r.error:
            why = "compiler: out of HBM" if "RESOURCE_EXHAUSTED" in r.error else r.error
            cells += [f">= {_gib(r.peak_bytes)}", f"{chip.hbm_bytes // GIB}", f"**no** ({why})", "-", "-", "-"]
        else:
            cells += [_gib(r.peak_bytes), f"{chip.hbm_bytes // GIB}", "yes" if r.fits(chip) else "**no**",
                      f"{r.flops / 1e12:.0f}", f"{r.seconds:.1f}", f"{100 * r.mfu(chip):.0f}%"]
        rows.append("| " + " | ".join(cells + [f"{r.compile_seconds:.0f}"]) + " |")
    return rows


TABLE_HEADER = ("| slice | topology | mesh | micro-batch PRM/actor | prompts/call | program | args GiB | temp GiB | "
                "resident GiB | peak GiB/chip | HBM GiB | fits | TFLOP/chip | est. s | est. MFU | compile s |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def load_config_file(path: str) -> tuple[ml_collections.ConfigDict, dict[str, dict[str, Any]]]:
    """A configs/*.py file's `get_config()` and its `SHARDING` plans: slice name -> flattened config overrides
    (e.g. {"mesh.fsdp": 8, "actor.micro_batch_size": 16})."""
    spec = importlib.util.spec_from_file_location("_aot_config", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise ValueError(f"--config: cannot load {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plans = getattr(module, "SHARDING", {})
    for name, plan in plans.items():
        parse_topology(name)
        if not isinstance(plan, dict):
            raise ValueError(f"{path}: SHARDING[{name!r}] must be a dict of config overrides, got {plan!r}")
    return module.get_config(), plans


def config_for(base: ml_collections.ConfigDict, plan: dict[str, Any],
               overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """`base` with a sharding plan applied, then the command line's overrides again (they win)."""
    from prime_jax.config import validate

    c = ml_collections.ConfigDict(base.to_dict())
    for key in plan:
        section, _, name = key.rpartition(".")
        node = c[section] if section else c
        if name not in node:
            raise ValueError(f"SHARDING plan: config key {key!r} does not exist")
    c.update_from_flattened_dict(dict(plan))
    c.update_from_flattened_dict(dict(overrides))
    validate(c)
    return c


def run_topology(base: ml_collections.ConfigDict, plans: dict[str, dict[str, Any]], overrides: dict[str, Any],
                 topology: Topology, programs: Sequence[str], use_plan: bool = True, hlo_dir: str = "",
                 log: Callable[[str], None] = print) -> tuple[ml_collections.ConfigDict, list[ProgramReport]]:
    """Compiles the programs for one slice (with its SHARDING plan when there is one) and logs them."""
    plan = plans.get(topology.slice_name, {}) if use_plan else {}
    c = config_for(base, plan, overrides)
    chip = topology.chip
    log(f"AOT {topology.slice_name} ({topology.name}: {topology.num_chips} chips, {chip.hbm_bytes / GIB:.0f} GiB HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each); mesh {dict(c.mesh)}; plan {plan or 'none'}")
    log(f"  {sampler_prompts(c)} prompts x {c.rollout.n_samples} samples per sampler call, "
        f"prompt {c.data.max_prompt_length} + response {c.rollout.max_response_length}; "
        f"micro-batch PRM {c.prm.micro_batch_size} / actor {c.actor.micro_batch_size}")
    reports = compile_run(c, topology, programs, hlo_dir, log=lambda s: log("  " + s))
    return c, reports


def main(argv: Sequence[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    del argv
    FLAGS = flags.FLAGS
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the topology API needs no TPU, and nothing else runs on one
    _, plans = load_config_file(config_flags.get_config_filename(FLAGS["config"]))
    overrides = config_flags.get_override_values(FLAGS["config"])
    programs = [p for p in FLAGS.programs.split(",") if p]

    def run(topology: Topology,
            log: Callable[[str], None] = print) -> tuple[ml_collections.ConfigDict, list[ProgramReport]]:
        hlo_dir = os.path.join(FLAGS.hlo_dir, topology.slice_name) if FLAGS.hlo_dir else ""
        return run_topology(FLAGS.config, plans, overrides, topology, programs, FLAGS.plan, hlo_dir, log)

    if FLAGS.table:  # markdown on stdout, progress on stderr
        print(TABLE_HEADER, flush=True)
        for name in FLAGS.table.split(","):
            topology = parse_topology(name)
            c, reports = run(topology, log=lambda s: print(s, file=sys.stderr, flush=True))
            print("\n".join(markdown_rows(c, topology, reports)), flush=True)
        return
    if FLAGS.smallest:
        if FLAGS.smallest not in CHIPS:
            raise ValueError(f"--smallest: unknown generation {FLAGS.smallest!r} (known: {sorted(CHIPS)})")
        chips = 4
        while True:
            topology = Topology(FLAGS.smallest, slice_dims(FLAGS.smallest, chips))
            line = summary_line(topology, run(topology)[1])
            if "fits=yes" in line or chips * 2 > FLAGS.max_chips:
                print(line)
                return
            print(f"{topology.slice_name} does not fit: {line}", flush=True)
            chips *= 2
    topology = parse_topology(FLAGS.topology)
    print(summary_line(topology, run(topology)[1]))


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)
    flags.DEFINE_string("topology", "v5p:2x2x2", "libtpu topology ('v5p:2x2x2', 'v4:2x4x4') or slice name ('v5p-16')")
    flags.DEFINE_string("programs", ",".join(PROGRAMS), f"comma-separated subset of {','.join(PROGRAMS)}")
    flags.DEFINE_bool("plan", True, "apply the config's SHARDING plan for the slice, when it has one "
                      "(--config.* overrides still win)")
    flags.DEFINE_string("table", "", "comma-separated slices/topologies: print markdown table rows (docs/aot.md)")
    flags.DEFINE_string("smallest", "", "a generation (v5p, v4, v5e, v6e): compile on ever larger slices "
                        "until one fits")
    flags.DEFINE_integer("max_chips", 256, "largest slice --smallest tries")
    flags.DEFINE_string("hlo_dir", "", "write each compiled program's HLO to <hlo_dir>/<slice>/<program>.hlo.txt")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)

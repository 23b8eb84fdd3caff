"""Per-program reports and what the AOT tool prints: one line per compiled program, the summary line,
markdown table rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


from prime_jax.aot.hlo_cost import ProgramCost
from prime_jax.aot.topology import GIB, Chip, Topology
from prime_jax.settings import RunSettings


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
            f"(loop bodies once: {r.cost.flops_once / 1e12:.2f} TFLOP"
            f"{f' ({r.cost.kernel_flops_once / 1e12:.2f} in Pallas kernels)' if r.cost.kernel_flops_once else ''}, "
            f"{r.cost.seconds_once:.3g} s; compiler's "
            f"cost_analysis: {r.compiler_flops / 1e12:.2f} TFLOP, {r.compiler_seconds:.3g} s; "
            f"compile {r.compile_seconds:.0f} s)")


def summary_line(topology: Topology, reports: Sequence[ProgramReport], step_s: float | None = None) -> str:
    """`AOT <topology>: fits=<yes|no> peak_bytes_per_device=<int> hbm_bytes=<int>[ step_s=<float>]` for the worst
    program; step_s (the whole step's roofline seconds at the config's length mix) when every program compiled."""
    hbm = topology.chip.hbm_bytes
    worst = max(r.peak_bytes for r in reports)
    fits = all(r.fits(topology.chip) for r in reports)
    step = "" if step_s is None else f" step_s={step_s:.1f}"
    return f"AOT {topology.name}: fits={'yes' if fits else 'no'} peak_bytes_per_device={worst} hbm_bytes={hbm}{step}"


def markdown_rows(s: RunSettings, topology: Topology, reports: Sequence[ProgramReport]) -> list[str]:
    """One markdown table row per program (columns: see TABLE_HEADER); the mesh is the program's (with a sampler mesh
    of its own, the sampler's programs run on it, with their chip count)."""
    chip = topology.chip
    micro = f"{s.prm.micro_batch_size}/{s.ppo.micro_batch_size}"
    rows = []
    for r in reports:
        mesh = s.rollout_mesh if r.name.startswith("sampler") else s.mesh
        where = "" if s.rollout_mesh is s.mesh else f" ({mesh.devices.size} chips)"
        cells = [topology.slice_name, f"`{topology.name}`",
                 ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + where, micro, str(s.prompts_per_call), r.name,
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

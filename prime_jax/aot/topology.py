"""TPU generations and slices: chip figures, libtpu topology names, Cloud slice names, compile-only devices."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. hbm_bytes: HBM per chip; peak_flops: dense bf16 FLOP/s per chip; hbm_bandwidth:
    bytes/s per chip; ici_bandwidth: inter-chip interconnect bytes/s one chip sends (or receives), all its links
    together; cores: TensorCores per chip (v4/v5p slice names count cores); chip_config: libtpu's
    chip_config_name ("megacore": one JAX device per chip, as on a real v4/v5p VM)."""

    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float
    cores: int
    chip_config: str
    slice_prefix: str


# Public Cloud TPU figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm). ICI, one direction per chip:
# v5p 600 GB/s (docs/v5p: "bidirectional ICI bandwidth per chip 1200 GBps"); v6e 400 GB/s (docs/v6e: bidirectional
# 800 GBps, "ICI bandwidth 3200 Gbps"); v5e 200 GB/s (docs/v6e's v5e column: 1600 Gbps); v4 300 GB/s (6 links of
# 400 Gbps each way: the Gemini report, 2023; docs/v4 gives no per-chip figure).
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GIB, 275e12, 1.2e12, 300e9, cores=2, chip_config="megacore", slice_prefix="v4"),
    "v5p": Chip(95 * GIB, 459e12, 2.765e12, 600e9, cores=2, chip_config="megacore", slice_prefix="v5p"),
    "v5e": Chip(16 * GIB, 197e12, 0.819e12, 200e9, cores=1, chip_config="default", slice_prefix="v5litepod"),
    "v6e": Chip(32 * GIB, 918e12, 1.64e12, 400e9, cores=1, chip_config="default", slice_prefix="v6e"),
}
_3D = ("v4", "v5p")  # generations with a 3-D torus; v5e / v6e are 2-D




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

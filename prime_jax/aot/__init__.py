"""Ahead-of-time compilation of a run's device programs for a real TPU slice, on any CPU host (libtpu).

    python -m prime_jax.aot --config=configs/qwen7b.py --topology=v5p:2x2x2 [--config.a.b=v ...]

No weights and no TPU: the policy, PRM and reference are ShapeDtypeStructs sharded over a mesh of the
topology's compile-only devices (`jax.experimental.topologies`), and the programs of a PRIME step, built
exactly as the trainer builds them (`prime_jax.programs`), are lowered and compiled by libtpu with the
config's real shapes. Per program and per device: the compiler's argument / output / temporary / code /
alias bytes plus the other states resident meanwhile (peak = args + out - aliased + temp + code +
resident; it fits when peak <= HBM), and a loop-aware roofline cost (`hlo_cost`). With `rollout.devices` = a the
slice's first a chips sample on a mesh of their own and the rest train, as a run splits its devices; with
rollout.max_staleness >= 1 a step's seconds overlap the two (`step`).

- `topology`: chips, slices and their compile-only devices;   - `plans`: config files and SHARDING plans;
- `compile`: abstract states, compiling, per-program reports; - `hlo_cost`: loop-aware roofline of HLO;
- `report`: printed lines and markdown rows;                  - `step`: one whole step's seconds;
- `__main__`: the command line.
"""

from prime_jax.aot.compile import PROGRAMS, compile_run, topology_settings
from prime_jax.aot.report import ProgramReport
from prime_jax.aot.hlo_cost import ProgramCost, program_cost
from prime_jax.aot.plans import config_for, load_config_file
from prime_jax.aot.report import TABLE_HEADER, format_report, markdown_rows, summary_line
from prime_jax.aot.topology import CHIPS, GIB, Chip, Topology, parse_topology, slice_dims

__all__ = ["CHIPS", "GIB", "PROGRAMS", "TABLE_HEADER", "Chip", "ProgramCost", "ProgramReport", "Topology",
           "compile_run", "config_for", "format_report", "load_config_file", "markdown_rows", "parse_topology",
           "program_cost", "slice_dims", "summary_line", "topology_settings"]

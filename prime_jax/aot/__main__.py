"""`python -m prime_jax.aot`: compile a config's programs for TPU slices and report per-device memory and cost.

    python -m prime_jax.aot --config=configs/qwen7b.py --topology=v5p:2x2x2 [--config.a.b=v ...]
    python -m prime_jax.aot --config=configs/qwen7b.py --topology=v5p-32      # slice name: its SHARDING plan
    python -m prime_jax.aot --config=configs/qwen7b.py --smallest=v5p          # smallest v5p slice that fits
    python -m prime_jax.aot --config=configs/qwen7b.py --table=v5p-8,v5p-16    # markdown rows (docs/aot.md)
    python -m prime_jax.aot --config=configs/qwen7b.py --topology=v5p-32 --noplan \
        --config.rollout.devices=8 --config.rollout.max_staleness=1            # 8 chips sample, 8 train, overlapped
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from prime_jax import cli
from prime_jax.aot.compile import PROGRAMS, compile_run, topology_settings
from prime_jax.aot.plans import config_for, load_config_file
from prime_jax.aot.report import TABLE_HEADER, ProgramReport, markdown_rows, summary_line
from prime_jax.aot.step import SAMPLER_PROGRAMS, TRAINER_PROGRAMS, published_bytes, step_seconds
from prime_jax.aot.topology import CHIPS, GIB, Topology, parse_topology, slice_dims
from prime_jax.settings import RunSettings

def run_topology(base: ml_collections.ConfigDict, plans: dict[str, dict[str, Any]], overrides: dict[str, Any],
                 topology: Topology, programs: Sequence[str], use_plan: bool = True, hlo_dir: str = "",
                 log: Callable[[str], None] = print) -> tuple[RunSettings, list[ProgramReport], float | None]:
    """Compiles the programs for one slice (with its SHARDING plan when there is one) and logs them; returns the
    settings used, the reports and the whole step's roofline seconds at the length mix (None without every
    program)."""
    plan = plans.get(topology.slice_name, {}) if use_plan else {}
    s = topology_settings(config_for(base, plan, overrides), topology)
    chip = topology.chip
    split = "" if s.rollout_mesh is s.mesh else (f" on the last {s.mesh.devices.size} chips, sampler mesh "
                                                  f"{dict(s.rollout_mesh.shape)} on the first "
                                                  f"{s.rollout_mesh.devices.size}")
    log(f"AOT {topology.slice_name} ({topology.name}: {topology.num_chips} chips, {chip.hbm_bytes / GIB:.0f} GiB HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each); mesh {dict(s.mesh.shape)}{split}; plan {plan or 'none'}")
    log(f"  {s.prompts_per_call} prompts x {s.collect.n} samples per sampler call, "
        f"prompt {s.data.max_prompt_length} + response {s.sampler.max_new_tokens}; "
        f"micro-batch PRM {s.prm.micro_batch_size} / actor {s.ppo.micro_batch_size}")
    reports = compile_run(s, topology, programs, hlo_dir, log=lambda line: log("  " + line))
    step = step_seconds(s, reports, chip)
    if step is not None:
        log(f"  one step at the length mix ({s.length_mix.describe()}): {describe_step(s, step)}")
    return s, reports, None if step is None else step["step"]


def describe_step(s: RunSettings, step: dict[str, float]) -> str:
    """`step_seconds`' figures as a sum (one mesh), or the sampler's and trainer's sums and how they combine."""
    def parts(names: Sequence[str]) -> str:
        return " + ".join(f"{name} {step[name]:.1f}" for name in names)

    if "transfer" not in step:
        return f"{parts([name for name in step if name != 'step'])} = {step['step']:.1f} s"
    sampler, trainer, x = step["sampler"], step["trainer"], step["transfer"]
    combined = (f"max({sampler:.1f}, {trainer:.1f} + {x:.3f})" if s.max_staleness
                else f"{sampler:.1f} + {trainer:.1f} + {x:.3f}")
    return (f"sampler ({s.rollout_mesh.devices.size} chips) {parts(SAMPLER_PROGRAMS)} = {sampler:.1f} s; trainer "
            f"({s.mesh.devices.size} chips) {parts(TRAINER_PROGRAMS)} = {trainer:.1f} s; policy to the sampler "
            f"{published_bytes(s) / GIB:.2f} GiB over ICI {x:.3f} s; rollout.max_staleness={s.max_staleness}: "
            f"{combined} = {step['step']:.1f} s")


def main(argv: Sequence[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the topology API needs no TPU, and nothing else runs on one
    _, plans = load_config_file(config_flags.get_config_filename(FLAGS["config"]))
    overrides = config_flags.get_override_values(FLAGS["config"])
    programs = [p for p in FLAGS.programs.split(",") if p]

    def run(topology: Topology, log: Callable[[str], None] = print
            ) -> tuple[RunSettings, list[ProgramReport], float | None]:
        hlo_dir = os.path.join(FLAGS.hlo_dir, topology.slice_name) if FLAGS.hlo_dir else ""
        return run_topology(FLAGS.config, plans, overrides, topology, programs, FLAGS.plan, hlo_dir, log)

    if FLAGS.table:  # markdown on stdout, progress on stderr
        print(TABLE_HEADER, flush=True)
        for name in FLAGS.table.split(","):
            topology = parse_topology(name)
            s, reports, _ = run(topology, log=lambda line: print(line, file=sys.stderr, flush=True))
            print("\n".join(markdown_rows(s, topology, reports)), flush=True)
        return
    if FLAGS.smallest:
        if FLAGS.smallest not in CHIPS:
            raise ValueError(f"--smallest: unknown generation {FLAGS.smallest!r} (known: {sorted(CHIPS)})")
        chips = 4
        while True:
            topology = Topology(FLAGS.smallest, slice_dims(FLAGS.smallest, chips))
            _, reports, step_s = run(topology)
            line = summary_line(topology, reports, step_s)
            if "fits=yes" in line or chips * 2 > FLAGS.max_chips:
                print(line)
                return
            print(f"{topology.slice_name} does not fit: {line}", flush=True)
            chips *= 2
    topology = parse_topology(FLAGS.topology)
    _, reports, step_s = run(topology)
    print(summary_line(topology, reports, step_s))


def _define_flags() -> None:
    cli.config_flag()
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
    _define_flags()
    cli.run(main)

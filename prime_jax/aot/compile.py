"""Compiling a run's device programs for a TPU slice with abstract (weightless, sharded) states, and the
compiler's per-device memory figures plus the loop-aware cost of each program."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from prime_jax.aot.hlo_cost import program_cost
from prime_jax.aot.report import ProgramReport, format_report
from prime_jax.aot.topology import Chip, Topology
from prime_jax.mesh import batch_sharding, state_shardings
from prime_jax.models import ModelConfig, abstract_model, in_compute_dtype
from prime_jax.programs import make_programs, optimizers
from prime_jax.rl.optim import TrainState, init_train_state, layout_sharding, train_state_shardings
from prime_jax.rl.packing import LAYOUT_KEYS, PREFIX_KEYS, PackSpec
from prime_jax.sampling import decode, empty_state, insert, sampler_state_shardings
from prime_jax.settings import LengthMix, RunSettings, meshes, resolve

PROGRAMS = ("sampler_prefill", "sampler_decode", "prm_step", "ppo_step")



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


def abstract_run(s: RunSettings) -> AbstractRun:
    """Policy and PRM train states (params + Adam) and the frozen reference, sharded as `components.build`
    shards them."""
    mesh = s.mesh
    graphdef, params = nnx.split(abstract_model(s.model.config(s.model.param_dtype)))
    _, ref = nnx.split(abstract_model(s.model.config(s.model.ref_dtype)))
    params = _with_shardings(params, state_shardings(params, mesh))
    policy_tx, prm_tx, _ = optimizers(s)

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


def _key(mesh: Any) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


def _slots(mesh: Any, spec: PackSpec, num_minibatches: int, p_len: int, r_len: int,
           shape: tuple[int, int] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """A step's slots [M, k, r, L] at the packed (k, r) `shape`, by default the largest `spec` allows (shared
    prompt: as many prompt rows as responses, the most a micro-batch can need)."""
    k, r = shape or (spec.shapes()[-1] if spec.packed else
                     (spec.mini_batch_size // spec.micro_batch_size, spec.micro_batch_size))
    width = {"packed": spec.row_length, "padded": p_len + r_len, "shared_prompt": r_len}[spec.layout]
    shapes = dict.fromkeys(LAYOUT_KEYS, (num_minibatches, k, r, width))
    if spec.layout == "shared_prompt":
        prompts = (num_minibatches, k, r, max(p_len - 1, 1))
        shapes.update(zip(PREFIX_KEYS, (prompts, prompts, (num_minibatches, k, r, r))))
    return {key: jax.ShapeDtypeStruct(v, jnp.int32, sharding=layout_sharding(mesh)) for key, v in shapes.items()}


def mix_shape(spec: PackSpec, mix: LengthMix) -> tuple[int, int]:
    """The packed (k, r) of a mini-batch whose sequences have the mix's mean lengths, packed without gaps (a
    lower bound on the rows first-fit-decreasing needs)."""
    rows = math.ceil(spec.mini_batch_size * (mix.prompt_tokens + mix.response_tokens) / spec.row_length)
    return spec.shape_for(rows)


def _batch(mesh: Any, rows: int, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, jax.ShapeDtypeStruct]:
    """{name: (row shape, dtype)} -> [rows, *row shape] arrays split over the data axes."""
    return {k: jax.ShapeDtypeStruct((rows, *s), d, sharding=batch_sharding(mesh, 1 + len(s)))
            for k, (s, d) in shapes.items()}


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


def topology_settings(c: Any, topology: Topology) -> RunSettings:
    """The run's settings on meshes over the slice's devices (the TPU platform: its attention kernels), split as a
    run splits its devices (`settings.meshes`): with rollout.devices = a, the slice's first a chips sample on a
    mesh of their own and the others train; else one mesh over every chip."""
    mesh, rollout_mesh = meshes(c, topology.devices())
    return resolve(c, mesh, rollout_mesh=rollout_mesh)


def compile_run(s: RunSettings, topology: Topology, programs: Sequence[str] = PROGRAMS,
                hlo_dir: str = "", log: Callable[[str], None] = lambda s: None) -> list[ProgramReport]:
    """Compiles the run's programs (settings resolved on the slice's meshes, `topology_settings`) for `topology`:
    the sampler's on the sampler mesh, the PRM and PPO steps on the training mesh; one report per program (in
    PROGRAMS order)."""
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"--programs: unknown {unknown} (known: {list(PROGRAMS)})")
    mesh, smesh = s.mesh, s.rollout_mesh
    run = abstract_run(s)
    cfg = s.model.config(s.model.param_dtype)
    progs = make_programs(s, run.graphdef, run.policy, run.prm, run.ref_params, stop_ids=stand_in_stop_ids(cfg),
                          pad_id=0)
    rows, p_len, r_len = s.rows_per_step, s.data.max_prompt_length, s.sampler.max_new_tokens
    train_batch = _batch(mesh, rows, {"mask": ((r_len,), jnp.float32), "acc": ((), jnp.float32),
                                      "unpack": ((r_len,), jnp.int32)})
    ppo_batch = _batch(mesh, rows, {k: ((r_len,), jnp.float32) for k in ("mask", "old_logp", "advantages")})
    sampler = progs.sampler.cfg
    prompts = sampler.max_prefill  # the largest prefill batch of the sampler
    prompt_batch = _batch(smesh, prompts, {"tokens": ((p_len,), jnp.int32), "lens": ((), jnp.int32)})
    replicated = NamedSharding(smesh, P())
    slots = jax.ShapeDtypeStruct((sampler.n, prompts + 1), jnp.int32, sharding=replicated)  # + the held prompt
    hold = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)  # insert's `hold`, decode's `until_free`
    prm_all, ref_all = bytes_per_device(run.prm), bytes_per_device(run.ref_params)
    policy_all = bytes_per_device(run.policy)
    key = _key(smesh)
    if s.max_staleness or smesh is not mesh:  # the sampler reads the copies the trainer publishes (`Trainer.publish`)
        published = jax.eval_shape(lambda p: in_compute_dtype(p, s.model.compute_dtype), run.policy.params)
        params = _with_shardings(published, state_shardings(published, smesh))
        # Beside it: the next version, published while rollouts run ahead; on a shared mesh, every training state.
        sampler_resident = ((bytes_per_device(params) if s.max_staleness else 0)
                            + (prm_all + ref_all + policy_all if smesh is mesh else 0))
    else:  # the synchronous loop: the sampler reads the policy params in place, beside every other state
        params = run.policy.params
        sampler_resident = prm_all + ref_all + bytes_per_device((run.policy.opt_state, run.policy.step))
    reports: dict[str, ProgramReport] = {}

    def done(report: ProgramReport) -> None:
        reports[report.name] = report
        log(format_report(report, topology.chip))

    chip = topology.chip
    if "sampler_prefill" in programs or "sampler_decode" in programs:
        with jax.set_mesh(smesh):  # as the sampler runs them: its state constrained to the batch axes
            state = jax.eval_shape(lambda: empty_state(cfg, sampler, p_len))
            state = _with_shardings(state, sampler_state_shardings(state, smesh))
            if "sampler_prefill" in programs:
                log("compiling sampler_prefill ...")
                done(compile_program("sampler_prefill", insert, (run.graphdef, params, state,
                                     prompt_batch["tokens"], prompt_batch["lens"], slots, slots, hold, key), {}, chip,
                                     sampler_resident, hlo_dir=hlo_dir)[0])
            if "sampler_decode" in programs:
                log("compiling sampler_decode ...")
                # Costed as one whole response of every row: the calls of steps_per_sync steps (a loop that stops
                # on data) that max_new_tokens - 1 steps take, each step reading the cache blocks filled halfway
                # through the response (the attention's two block loops, prompt and ring, also stop on data:
                # each is costed at the mean of their block counts).
                block = sampler.block(p_len)
                blocks = -(-(-(-p_len // block) + -(-r_len // (2 * block)) + 1) // 2)
                report = compile_program("sampler_decode", decode, (run.graphdef, params, state, hold), {},
                                         chip, sampler_resident, (sampler.steps_per_sync, blocks), hlo_dir)[0]
                if report.cost is not None:
                    calls = -(-(r_len - 1) // sampler.steps_per_sync)
                    report.cost = dataclasses.replace(report.cost, flops=report.cost.flops * calls,
                                                      seconds=report.cost.seconds * calls)
                done(report)
    # The training steps at their largest packed shape (memory), and, packed, again at the length mix's shape
    # (what a typical step computes: `<name>@mix`, for the whole-step seconds).
    mix = s.length_mix
    steps = (("prm_step", s.prm_pack, rows // s.prm.mini_batch_size,
              lambda slots: (run.prm, run.ref_params, train_batch, slots), policy_all),
             ("ppo_step", s.ppo_pack, s.ppo.updates_per_iteration(rows),
              lambda slots: (run.policy, ppo_batch, slots), prm_all + ref_all))
    for name, spec, minibatches, args, resident in steps:
        if name not in programs:
            continue
        largest = spec.shapes()[-1] if spec.packed else None
        for label, shape in ((name, largest), (f"{name}@mix", mix_shape(spec, mix) if spec.packed else largest)):
            if label != name and shape == largest:
                continue
            log(f"compiling {label} ...")
            slots = _slots(mesh, spec, minibatches, p_len, r_len, shape)
            done(compile_program(label, getattr(progs, name), args(slots), {}, chip, resident, hlo_dir=hlo_dir)[0])
    return [reports[p] for p in (*PROGRAMS, "prm_step@mix", "ppo_step@mix") if p in reports]

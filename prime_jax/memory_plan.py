"""Analytic memory plan of a run, per device, from its settings alone (no weights loaded).

Three parts, in GiB per device:
- resident, for the whole run: policy and PRM params + fp32 Adam moments, the frozen reference (neither PRM nor
  reference for outcome-only RL, which does not load them);
- sampling, during a sampler call: the KV cache of `rollout.prompts_per_call` prompts in flight, and the params
  `decode` gathers (`rollout.gather_params`) or, in the per-layer CPU layout, the layer weights it copies once per
  call in the compute dtype (`prime_jax.sampling.programs.layer_weights`);
- update, during a PRM or PPO step: the compiler's temporaries, the gradients and the optimiser's update of them,
  two copies of the params (what XLA's memory analysis of both steps reports at Qwen2.5-0.5B dimensions,
  docs/benchmarks.md; activations at the micro-batch are not counted).
The peak is resident + the larger of the other two. The exact per-program figures come from the compiler
(`python -m prime_jax.aot`); this is the quick check `--config.dry_run=True` prints and `preflight` applies off TPU.
"""

from __future__ import annotations

import dataclasses

from prime_jax.settings import RunSettings, describe

GIB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """GiB per device of each item, by phase (the module docstring)."""

    resident: dict[str, float]
    sampling: dict[str, float]
    update: dict[str, float]

    @property
    def peak(self) -> float:
        """Resident + the larger phase, GiB per device."""
        return sum(self.resident.values()) + max(sum(self.sampling.values()), sum(self.update.values()))


def plan(s: RunSettings) -> MemoryPlan:
    """The plan of `s`: params fully sharded over the mesh, the cache over the data axes."""
    m, arch = s.model, s.model.arch
    params, per_device = arch.num_params, 1 / (s.mesh.size * GIB)
    trainable = params * (_BYTES[m.param_dtype] + 8) * per_device  # params + Adam mu, nu in fp32
    resident = {"policy (params + adam)": trainable}
    if s.runs_prm:
        resident.update({"prm (params + adam)": trainable, "reference": params * _BYTES[m.ref_dtype] * per_device})
    sampling = {"sampler kv cache": s.sampler.cache_bytes(arch.replace(dtype=m.compute_dtype), s.data.max_prompt_length)
                * per_device}
    if s.sampler.gather_params:  # replicated on every device while decoding
        sampling["sampler params (gathered)"] = params * _BYTES[m.compute_dtype] / GIB
    elif s.sampler.per_layer:
        sampling["sampler layer weights (copy)"] = arch.layer_params * _BYTES[m.compute_dtype] * per_device
    update = {"update temporaries (2 x params)": 2 * params * _BYTES[m.param_dtype] * per_device}
    return MemoryPlan(resident, sampling, update)


def print_plan(s: RunSettings) -> None:
    p = plan(s)
    print(f"memory plan: {describe(s)}")
    for phase, items in (("resident", p.resident), ("while sampling", p.sampling), ("while updating", p.update)):
        print(f"  {phase}:")
        for k, v in items.items():
            print(f"    {k:<36}{v:8.2f} GiB/device")
    print(f"  {'peak (resident + larger phase)':<38}{p.peak:8.2f} GiB/device (exact figures: prime_jax.aot)")

"""Analytic memory plan of a run, per device, from its settings alone (no weights loaded).

Three parts, in GiB per device:
- resident, for the whole run: policy and PRM params + fp32 Adam moments, the frozen reference (neither PRM nor
  reference for outcome-only RL, which does not load them);
- sampling, during a sampler call: the KV cache of `rollout.prompts_per_call` prompts in flight, and the params
  `decode` gathers (`rollout.gather_params`) or, in the per-layer CPU layout, the layer weights it copies once per
  call in the compute dtype (`prime_jax.sampling.programs.layer_weights`);
- update, during a PRM or PPO step: the compiler's temporaries, the larger of two moments: the optimiser's update
  (gradients and the update of them: two copies of the params), and the backward pass of a micro-batch (the
  gradients, one copy of the params, beside the fp32 logits of `model.logits_chunk` tokens a device, held 3 times in
  the PPO step, which also takes the entropy, and twice in the PRM step, and what remat keeps: the layer inputs, and
  the matmul outputs with `model.remat_saves=dots`), as XLA's
  memory analysis of both steps reports them (docs/benchmarks.md). Without remat the activations the backward keeps
  are larger than the layer inputs counted here.
The peak is resident + the larger of the other two. The exact per-program figures come from the compiler
(`python -m prime_jax.aot`); this is the quick check `--config.dry_run=True` prints and `preflight` applies off TPU.
"""

from __future__ import annotations

import dataclasses

from prime_jax.rl.packing import PackSpec
from prime_jax.settings import RunSettings, describe

GIB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# On CPU the devices' memory is the process's heap, which also holds what XLA:CPU's compiler allocated while compiling
# a step: glibc keeps it after the compile (reused by the next compile, not returned by malloc_trim; measured in
# docs/benchmarks.md); the host check counts it once.
CPU_COMPILER_HEAP_BYTES = int(0.4 * GIB)


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
    label, update_bytes = update_temporaries(s)
    return MemoryPlan(resident, sampling, {label: update_bytes * per_device})


def update_temporaries(s: RunSettings) -> tuple[str, int]:
    """(label, bytes over the mesh) of the larger update step's temporaries (the module docstring): the optimiser's
    two copies of the params, or the backward pass's gradients + logits chunks + what remat keeps, whichever is
    larger."""
    m, arch = s.model, s.model.arch
    param_bytes = arch.num_params * _BYTES[m.param_dtype]
    # what each layer keeps per token for the backward under remat: its input, and with remat_saves="dots" its matmul
    # outputs (q, k, v, the output projection, gate, up)
    dots = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim + arch.hidden_size + 2 * arch.intermediate_size
    kept_per_token = (arch.hidden_size + (dots if m.remat_saves == "dots" else 0)) if m.remat else 0

    def backward(spec: PackSpec, logits_copies: int) -> int:
        tokens = spec.micro_batch_tokens
        logits = logits_copies * min(m.logits_chunk * spec.data_parallel, tokens) * arch.vocab_size * 4   # a chunk a device
        return param_bytes + logits + arch.num_layers * tokens * kept_per_token * _BYTES[m.compute_dtype]

    passes = {"ppo": backward(s.ppo_pack, 3), **({"prm": backward(s.prm_pack, 2)} if s.runs_prm else {})}
    name, worst = max(passes.items(), key=lambda kv: kv[1])
    if worst <= 2 * param_bytes:
        return "update temporaries (2 x params)", 2 * param_bytes
    return f"update temporaries ({name}: grads + logits chunks)", worst


def print_plan(s: RunSettings) -> None:
    p = plan(s)
    print(f"memory plan: {describe(s)}")
    for phase, items in (("resident", p.resident), ("while sampling", p.sampling), ("while updating", p.update)):
        print(f"  {phase}:")
        for k, v in items.items():
            print(f"    {k:<48}{v:8.2f} GiB/device")
    print(f"  {'peak (resident + larger phase)':<50}{p.peak:8.2f} GiB/device (exact figures: prime_jax.aot)")

"""Analytic memory plan of a run, per device, from its settings alone (no weights loaded).

Counts what must live on the mesh: policy and PRM params + fp32 Adam moments, the frozen reference (neither PRM
nor reference for outcome-only RL, which does not load them), and the
sampler's KV cache for one sampler call (`rollout.prompts_per_call` prompts in flight, default the whole batch).
The exact per-program figures come from the compiler (`python -m prime_jax.aot`); this is the quick check
`--config.dry_run=True` prints and `preflight` applies off TPU.
"""

from __future__ import annotations

from prime_jax.settings import RunSettings, describe

GIB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def plan(s: RunSettings) -> dict[str, float]:
    """GiB per device of each resident item (params fully sharded over the mesh; the cache over the data axes)."""
    m = s.model
    params = m.arch.num_params
    trainable = params * (_BYTES[m.param_dtype] + 8) / GIB  # params + Adam mu, nu in fp32
    kv = s.sampler.cache_bytes(m.arch.replace(dtype=m.compute_dtype), s.data.max_prompt_length) / GIB
    out = {"policy (params + adam)": trainable}
    if s.runs_prm:
        out.update({"prm (params + adam)": trainable, "reference": params * _BYTES[m.ref_dtype] / GIB})
    out["sampler kv cache"] = kv
    out = {k: v / s.mesh.size for k, v in out.items()}
    if s.sampler.gather_params:  # replicated on every device while decoding
        out["sampler params (gathered)"] = params * _BYTES[m.compute_dtype] / GIB
    return out


def print_plan(s: RunSettings) -> None:
    items = plan(s)
    print(f"memory plan: {describe(s)}")
    for k, v in items.items():
        print(f"  {k:<26}{v:8.2f} GiB/device")
    print(f"  {'total resident':<26}{sum(items.values()):8.2f} GiB/device (+ activations; exact figures: prime_jax.aot)")

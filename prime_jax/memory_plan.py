"""Analytic memory plan of a run, per device, from the architecture alone (no weights loaded).

Counts what must live on the mesh: policy and PRM params + fp32 Adam moments, the frozen reference,
and the sampler's KV cache for one sampler call (`rollout.prompts_per_call`, default the whole batch).
The exact per-program figures come from the compiler (`python -m prime_jax.aot`); this is the quick check
`--config.dry_run=True` prints.
"""

from __future__ import annotations

import math
import os

import ml_collections

from prime_jax.models import ModelConfig, read_hf_config
from prime_jax.programs import sampler_prompts

GIB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def architecture(c: ml_collections.ConfigDict) -> ModelConfig:
    """The policy architecture: `model.path`/config.json when present, else the config's inline `model.arch`,
    else (the built-in synthetic run, before its warm start) `warm_start.arch` at the synthetic vocabulary."""
    if c.model.path and os.path.isfile(os.path.join(c.model.path, "config.json")):
        return read_hf_config(c.model.path)
    if not c.model.path and c.data.source == "synthetic" and c.warm_start.arch:
        return ModelConfig(model_type="qwen2", vocab_size=c.synthetic.vocab_size, attention_bias=True,
                           **c.warm_start.arch.to_dict())
    if "arch" not in c.model or not c.model.arch:
        raise ValueError(f"config.model.path: no config.json at {c.model.path!r} and no model.arch given")
    return ModelConfig.from_hf(c.model.arch.to_dict())


def plan(c: ml_collections.ConfigDict, num_devices: int) -> dict[str, float]:
    """GiB per device of each resident item (params fully sharded over the mesh; cache over data axes)."""
    cfg = architecture(c)
    params = cfg.num_params
    trainable = params * (_BYTES[c.model.param_dtype] + 8) / GIB  # params + Adam mu, nu in fp32
    rows = sampler_prompts(c) * c.rollout.n_samples
    seq = c.data.max_prompt_length + c.rollout.max_response_length
    kv = 2 * cfg.num_layers * rows * seq * cfg.num_kv_heads * cfg.head_dim * _BYTES[c.model.compute_dtype] / GIB
    out = {"policy (params + adam)": trainable, "prm (params + adam)": trainable,
           "reference": params * _BYTES[c.model.ref_dtype] / GIB, "sampler kv cache": kv}
    out = {k: v / num_devices for k, v in out.items()}
    if c.rollout.gather_params:  # replicated on every device while decoding
        out["sampler params (gathered)"] = params * _BYTES[c.model.compute_dtype] / GIB
    return out


def print_plan(c: ml_collections.ConfigDict) -> None:
    import jax

    cfg = architecture(c)
    n = math.prod(v for v in c.mesh.values() if v > 0) if -1 not in c.mesh.values() else jax.device_count()
    items = plan(c, n)
    print(f"memory plan: {cfg.model_type} {cfg.num_params / 1e9:.2f}B params, {n} devices, "
          f"{c.train.batch_size}x{c.rollout.n_samples} rollouts of {c.data.max_prompt_length}+{c.rollout.max_response_length} tokens, "
          f"{sampler_prompts(c)} prompts per sampler call")
    for k, v in items.items():
        print(f"  {k:<24}{v:8.2f} GiB/device")
    print(f"  {'total resident':<24}{sum(items.values()):8.2f} GiB/device (+ activations; exact figures: prime_jax.aot)")

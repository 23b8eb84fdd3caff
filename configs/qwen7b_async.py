"""configs/qwen7b.py with rollouts one step ahead of training on a v5p-16 (docs/aot.md, "Rollouts ahead on a sampler
mesh of its own"): the slice's first 4 chips sample, the other 4 train (FSDP, keeping the matmul outputs for the
backward), the sampler one policy version behind (rollout.max_staleness=1).

    python -m prime_jax.main --config=configs/qwen7b_async.py
    JAX_PLATFORMS=cpu python -m prime_jax.aot --config=configs/qwen7b_async.py --topology=v5p-16

At the roofline it ties with qwen7b's synchronous v5p-16 plan (bound by the 4 training chips); its idle sampler
absorbs what the roofline leaves out (refills, late long responses, host-side verification). On a v5p-32 the shared
mesh wins, and 128 prompts a sampler call is the most that fits on 4 chips. Figures: docs/aot.md.
"""

import os

import ml_collections

from prime_jax.config import config_module


def get_config() -> ml_collections.ConfigDict:
    c = config_module(os.path.join(os.path.dirname(__file__), "qwen7b.py")).get_config()   # the paper's recipe, 7B
    c.workdir = "runs/qwen7b_async"
    c.rollout.devices = 4               # the sampler's chips; the other 4 of a v5p-16 train (mesh.fsdp=-1: 4)
    c.rollout.max_staleness = 1
    c.rollout.prompts_per_call = 128    # 512 rows in flight on the 4 sampling chips (28 GiB of KV cache each)
    c.rollout.gather_params = True      # decode reads the bf16 policy gathered once a call, as qwen7b's v5p-16 plan
    c.model.remat_saves = "dots"        # the 4 training chips have the HBM to keep the matmul outputs
    return c

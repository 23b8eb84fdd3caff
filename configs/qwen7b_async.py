"""configs/qwen7b.py with rollouts one step ahead of training on a v5p-16, the split that beats its synchronous step
at the roofline (docs/aot.md, "Rollouts ahead on a sampler mesh of its own"): the slice's first 4 chips sample,
the other 4 train (FSDP), the sampler one policy version behind (rollout.max_staleness=1).

    python -m prime_jax.main --config=configs/qwen7b_async.py
    JAX_PLATFORMS=cpu python -m prime_jax.aot --config=configs/qwen7b_async.py --topology=v5p-16

step_s 149.3 s against 152.2 s synchronous (jax 0.12.1, libtpu 0.0.52), bound by the 4 training chips (149.3 s;
sampling 62.3 s). Only v5p-16: on a v5p-32 the synchronous step (78.3 s) beats 8 + 8 chips (91.2 s). 128 prompts
a sampler call: 256 (1024 rows on 4 chips) make decode ask for 133 GiB of temporaries.
"""

import importlib.util
import os

import ml_collections


def _qwen7b() -> ml_collections.ConfigDict:
    """configs/qwen7b.py: the paper's recipe on Qwen2.5-Math-7B."""
    path = os.path.join(os.path.dirname(__file__), "qwen7b.py")
    spec = importlib.util.spec_from_file_location("_qwen7b_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = _qwen7b()
    c.workdir = "runs/qwen7b_async"
    c.rollout.devices = 4               # the sampler's chips; the other 4 of a v5p-16 train (mesh.fsdp=-1: 4)
    c.rollout.max_staleness = 1
    c.rollout.prompts_per_call = 128    # 512 rows in flight on the 4 sampling chips (28 GiB of KV cache each)
    c.rollout.gather_params = True      # decode reads the bf16 policy gathered once a call, as qwen7b's v5p-16 plan
    return c

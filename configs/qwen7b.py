"""The paper's recipe (Eurus-2-7B-PRIME, docs/prime_spec.md §3.1-3.2) for Qwen2.5-Math-7B / Eurus-2-7B-SFT.

256 prompts x 4 samples per step, prompt 1024 / response 3072 tokens, beta 0.05, policy lr 5e-7,
PRM lr 1e-6, RLOO on process + outcome rewards, online filter 0.2-0.8, 592 steps.
Sized for a TPU v5p-16 (8 chips, 95 GiB HBM each) or larger, or a v5p-8 sampling 64 prompts per call
(SHARDING below); see README "Run on a TPU pod"
and the AOT table (`python -m prime_jax.aot --config=configs/qwen7b.py`).
    python -m prime_jax.main --config=configs/qwen7b.py --config.model.path=/path/to/Eurus-2-7B-SFT \
        --config.data.train_files=/path/to/Eurus-2-RL-Data/train.parquet --config.data.val_files=...
"""

import ml_collections

from prime_jax.config import base_config

# Qwen2.5-Math-7B (the base of Eurus-2-7B-SFT): used for dry runs and AOT without weights.
QWEN25_MATH_7B = dict(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu")


def get_config() -> ml_collections.ConfigDict:
    c = base_config()  # every default there is the paper's recipe
    c.workdir = "runs/qwen7b"
    c.model.path = "checkpoints/Eurus-2-7B-SFT"
    c.model.arch = ml_collections.ConfigDict(QWEN25_MATH_7B)
    c.data.source = "files"
    c.data.train_files = "data/eurus2_rl/train.parquet"
    c.data.val_files = "data/eurus2_rl/validation.parquet"
    c.verifier.num_workers = 64
    # v5p-16 (8 chips): FSDP over all chips. v5p-8 / v5p-32 / v4-64: see SHARDING below.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # The lengths of a real step, for the AOT whole-step roofline (docs/aot.md, step_s):
    # - response 1435 tokens: response_length/mean of the reference run's log (PRIME issue #57, step 3;
    #   docs/prime_spec.md §metrics); the SFT data it starts from averages 1,390 (the paper's App. D).
    # - prompt 256 tokens: the PRIME system prompt + question + suffix in the chat template measure 718
    #   characters on MATH-500 and 2216 on LeetCode (shared/data/benchmarks); weighted 94.4% math / 5.6% code
    #   as Eurus-2-RL-Data (455,261 / 26,758 rows) and at ~3.5 characters per Qwen2.5 token: ~229, rounded up.
    # - 5% of responses at the 3072 limit: assumed (no clip ratio is published for the run).
    c.length_mix = ml_collections.ConfigDict({"prompt_tokens": 256, "response_tokens": 1435, "clipped_fraction": 0.05})
    return c


# Sharding plans by TPU slice: config overrides proven by `python -m prime_jax.aot` (docs/aot.md), which
# applies the plan of the slice it compiles for. To train with one, pass the same keys to main, e.g.
# --config.mesh.data=2 --config.mesh.fsdp=8 --config.actor.micro_batch_size=16 --config.prm.micro_batch_size=16.
SHARDING = {
    "v5p-8": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1, "rollout.prompts_per_call": 64},
    "v5p-16": {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1, "rollout.gather_params": True,
               "model.remat_saves": "dots", "actor.micro_batch_size": 16, "prm.micro_batch_size": 16},
    "v5p-32": {"mesh.data": 2, "mesh.fsdp": 8, "mesh.tensor": 1, "actor.micro_batch_size": 16, "prm.micro_batch_size": 16},
    "v4-64": {"mesh.data": 1, "mesh.fsdp": 32, "mesh.tensor": 1, "actor.micro_batch_size": 32, "prm.micro_batch_size": 32},
}

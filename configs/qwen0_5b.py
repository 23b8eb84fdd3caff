"""PRIME for a 0.5B Qwen2.5 model (e.g. Qwen2.5-0.5B-Instruct): a quick real run.

Sized for one GPU (24 GB+) or a TPU v5e-4/v4-8: 64 prompts x 4, prompt 512 / response 1024.
"""

import ml_collections

from prime_jax.config import base_config

QWEN25_0_5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=32768, tie_word_embeddings=True, hidden_act="silu")


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = "runs/qwen0_5b"
    c.model.path = "checkpoints/Qwen2.5-0.5B-Instruct"
    c.model.arch = ml_collections.ConfigDict(QWEN25_0_5B)
    c.data.train_files = "data/eurus2_rl/train.parquet"
    c.data.val_files = "data/eurus2_rl/validation.parquet"
    c.data.max_prompt_length = 512
    c.rollout.max_response_length = 1024
    c.train.batch_size = 64
    c.actor.mini_batch_size = 64
    c.prm.mini_batch_size = 64
    c.actor.lr = 1e-6
    c.prm.lr = 2e-6
    c.verifier.num_workers = 16
    return c

"""PRIME for a 1.5B Qwen2.5 model (e.g. Qwen2.5-Math-1.5B after SFT): the paper's recipe at smaller scale.

Sized for one TPU v5p-8 / v4-8 host or a single 80 GB GPU: 128 prompts x 4, prompt 1024 / response 3072.
"""

import ml_collections

from prime_jax.config import base_config

QWEN25_MATH_1_5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=True, hidden_act="silu")


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = "runs/qwen1_5b"
    c.model.path = "checkpoints/Qwen2.5-Math-1.5B-SFT"
    c.model.arch = ml_collections.ConfigDict(QWEN25_MATH_1_5B)
    c.data.train_files = "data/eurus2_rl/train.parquet"
    c.data.val_files = "data/eurus2_rl/validation.parquet"
    c.train.batch_size = 128
    c.actor.mini_batch_size = 128
    c.prm.mini_batch_size = 128
    c.actor.lr = 1e-6
    c.prm.lr = 2e-6
    c.verifier.num_workers = 32
    return c

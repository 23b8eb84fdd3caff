"""The built-in CPU run: a small Qwen2-architecture model learns synthetic math and code with PRIME.

Sized for a 2-core CPU in under 10 minutes, no downloads: trains a sentencepiece tokenizer and a
supervised warm-start model on synthetic tasks (prime_jax/warm_start.py), then runs PRIME on
held-out-disjoint synthetic prompts and reports validation accuracy before and after.
    python -m prime_jax.main --config=configs/tiny.py
"""

import ml_collections

from prime_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = "runs/tiny"
    c.total_steps = 30
    c.model.param_dtype = "float32"
    c.model.ref_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.model.logits_chunk = 2048
    # 30 steps of a 1M-parameter model are compile-bound, and unrolled layers (model.layers=auto on CPU) compile
    # each packed shape longer than they save (docs/benchmarks.md), so this run keeps the scan.
    c.model.layers = "scan"
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.data.source = "synthetic"
    c.data.max_prompt_length = 96
    c.synthetic.train_size = 4000
    c.synthetic.val_size = 128
    c.synthetic.math_frac = 0.5
    # One operation per task ("Compute 7 * 3.", "Write a function f(x) that returns x * 3."): a 1M-parameter
    # model gets the format and the copying right in a 200-step warm start, but not all arithmetic facts.
    c.synthetic.difficulty = 1

    c.warm_start.steps = 200
    c.warm_start.batch_size = 32
    c.warm_start.lr = 3e-3
    c.warm_start.num_examples = 4000
    c.warm_start.arch = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        rope_theta=10000.0, max_position_embeddings=256))

    c.rollout.n_samples = 4
    c.rollout.max_response_length = 48
    c.rollout.steps_per_sync = 4
    c.train.batch_size = 32
    c.train.max_rounds = 3
    # A tiny model takes much larger steps than a 7B one; warmup keeps Adam's first, sign-like
    # updates (every weight moves by ~lr before the moment estimates settle) from undoing the warm start.
    c.actor.lr = 2e-4
    c.actor.warmup_steps = 5
    c.actor.mini_batch_size = 32
    c.actor.micro_batch_size = 32
    c.prm.lr = 1e-3
    c.prm.warmup_steps = 5
    c.prm.mini_batch_size = 64
    c.prm.micro_batch_size = 64

    c.verifier.num_workers = 2
    c.verifier.item_timeout_s = 10.0
    c.verifier.batch_timeout_s = 120.0
    # The synthetic questions contain their answer as an expression ("Compute 7 * 3."), and math-verify
    # rightly scores `\boxed{7 * 3}` as 21: left open, the policy learns to copy the question into the
    # box within ~13 PRIME steps. The built-in run therefore asks for number answers.
    c.verifier.literal_numbers = True
    c.eval.freq = 10
    c.eval.batch_size = 256
    # Held-out score = avg@4 at the sampling temperature: greedy decoding of the warm-start model already
    # copies code right, so greedy has little headroom at this scale (both are reported in the README).
    c.eval.k = 4
    c.eval.temperature = 1.0
    c.checkpoint.freq = 10
    c.checkpoint.keep = 2
    return c

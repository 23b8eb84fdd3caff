"""PRIME vs outcome-only RL in miniature (PAPER Fig. 3 / Table 4): the shared settings of every arm.

    python -m prime_jax.experiments.compare --config=configs/compare.py

Math-only synthetic chains of `synthetic.difficulty` operations ("Compute (17 + 5) * 3 - 4."), whose
warm-start solutions write one line per intermediate step ("17 + 5 = 22" ...) before `\\boxed{}`:
a wrong intermediate step makes the answer wrong, so there is step-level credit to assign. Every arm
(prime_jax/experiments/compare.py ARMS) starts from the same warm-start model and differs only in
the `algorithm` / `prm` keys its row of ARMS sets. Sized for a shared 2-core CPU (about an hour).
"""

import ml_collections

from prime_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = "runs/compare"       # <workdir>/sft (the one warm start), <workdir>/<arm>/seed<k> (each run)
    c.total_steps = 20
    c.model.param_dtype = "float32"
    c.model.ref_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.model.logits_chunk = 2048
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.data.source = "synthetic"
    c.data.max_prompt_length = 96
    c.synthetic.train_size = 4000
    c.synthetic.val_size = 128      # the held-out set (drawn from compare.heldout_seed, never trained on)
    c.synthetic.math_frac = 1.0
    c.synthetic.difficulty = 2
    # Operands 1..6 (multipliers 2..6): each step is a small-number fact a 1M-parameter model can learn
    # in a short warm start; with operands up to 20 it starts near 0% and RL has no signal to work with.
    c.synthetic.max_operand = 6

    c.warm_start.steps = 400
    c.warm_start.batch_size = 32
    c.warm_start.lr = 3e-3
    c.warm_start.num_examples = 4000
    c.warm_start.arch = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        rope_theta=10000.0, max_position_embeddings=256))

    c.rollout.n_samples = 4
    c.rollout.max_response_length = 48
    c.train.batch_size = 16
    c.train.max_rounds = 8   # sampling is cheap here (~0.3 s a round); fill the batch with groups that carry signal
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
    c.verifier.literal_numbers = True   # `\boxed{17 + 5}` would copy the question (see configs/tiny.py)
    # Held-out score: avg@k at the sampling temperature on the held-out prompts (every eval.freq steps).
    c.eval.freq = 5
    c.eval.batch_size = 128
    c.eval.k = 4
    c.eval.temperature = 1.0
    c.checkpoint.freq = 5
    c.checkpoint.keep = 1
    c.checkpoint.export_hf = False
    c.log.tensorboard = False
    c.log.plot = False

    c.compare = ml_collections.ConfigDict()
    c.compare.arms = "prime,rloo_outcome,grpo_prime,reinforce_prime,pure_min"  # names from compare.ARMS
    c.compare.seeds = "0,1,2"
    c.compare.heldout_seed = 1000       # synthetic tasks of the held-out set; same for every arm and seed
    c.compare.out_dir = "docs/experiments"
    c.compare.name = "compare"          # output file names: <out_dir>/<name>.{json,png,md}
    return c

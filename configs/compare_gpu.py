"""The comparison of configs/compare.py at GPU size: a ~20M-parameter model, 3-operation code chains, 64 prompts x 8
samples a step, 60 steps, 5 seeds (for the paired comparison's interval), every ablation on every seed.

    python -m prime_jax.experiments.compare --config=configs/compare_gpu.py

Same task family and recipe as the CPU miniature, scaled where a GPU has room: a wider, deeper model (hidden 512,
8 layers), longer chains (3 operations: more steps to credit), more samples per prompt (8: finer RLOO baselines),
a larger held-out set with more samples (less evaluation noise). bf16 compute, fp32 parameters, log-probs and
losses. Outputs `docs/experiments/compare_gpu.{json,png,md}`.
Not run yet (no GPU was lent to the session that wrote it). The warm start's length is the one guess to check first:
the miniature learns because its warm start lands at held-out ~0.24, a skill half known; read step 0's held-out score
in the log and adjust `warm_start.steps` until it lies between about 0.2 and 0.5 (the warm start is redone only when
`<workdir>/sft` is removed).
"""

import os

import ml_collections

from prime_jax.config import config_module


def get_config() -> ml_collections.ConfigDict:
    c = config_module(os.path.join(os.path.dirname(__file__), "compare.py")).get_config()
    c.workdir = "runs/compare_gpu"
    c.total_steps = 60
    c.model.compute_dtype = "bfloat16"

    c.synthetic.train_size = 20000
    c.synthetic.val_size = 512
    c.synthetic.difficulty = 3
    c.warm_start.steps = 400
    c.warm_start.batch_size = 64
    c.warm_start.num_examples = 20000
    c.warm_start.arch = ml_collections.ConfigDict(dict(
        hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
        rope_theta=10000.0, max_position_embeddings=256))

    c.rollout.n_samples = 8
    c.rollout.max_response_length = 96
    c.train.batch_size = 64                   # 512 rows a step
    c.actor.mini_batch_size = 128             # 4 PPO updates a step, as in the miniature
    c.actor.micro_batch_size = 128
    c.prm.mini_batch_size = 256               # 2 PRM updates a step, as in the miniature
    c.prm.micro_batch_size = 128
    c.actor.lr = 1e-4                         # a wider model takes smaller steps
    c.verifier.num_workers = 8
    c.eval.k = 8
    c.eval.batch_size = 512
    c.eval.freq = 10
    c.checkpoint.freq = 10

    c.compare.seeds = "0,1,2,3,4"
    c.compare.ablation_seeds = "0,1,2,3,4"
    # 4 PRM updates a step: mini-batches of 128 here (the ARMS row says 32, the miniature's quarter of a step)
    c.compare.ablations = "prime_beta0.5,prime_prm_lr1e-4,prime_shuffled_labels"
    c.compare.name = "compare_gpu"
    return c

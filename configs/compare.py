"""PRIME vs outcome-only RL in miniature (the paper's Fig. 3 / Table 4): the shared settings of every arm.

    python -m prime_jax.experiments.compare --config=configs/compare.py

Synthetic code tasks of 2 operations ("Write a function f(x) that returns (x + 5) * 3."), whose warm-start solutions
assign one operation a line (`x = x + 5`, `x = x * 3`, `return x`): a wrong step makes the function wrong, so there
is step-level credit to assign, and `prime_jax.data.steps` labels every step line right or wrong.
Why this regime learns: RL here sharpens a skill the 200-step warm start half knows (copying the question's operations
into step lines), where math chains' errors are arithmetic facts the model does not know; the runs that chose it are
in docs/experiments/history.md.
Every arm (prime_jax/experiments/compare.py ARMS) starts from the same warm-start model and differs only in the
config keys of its ARMS row; the ablations run after the arms, on seed 0.
"""

import os

import ml_collections

from prime_jax.config import config_module


def get_config() -> ml_collections.ConfigDict:
    # configs/tiny.py (the built-in run): the model, warm start, rollout and optimiser sizes shared here
    c = config_module(os.path.join(os.path.dirname(__file__), "tiny.py")).get_config()
    c.workdir = "runs/compare"       # <workdir>/sft (the one warm start), <workdir>/<arm>/seed<k> (each run)
    c.total_steps = 20

    c.synthetic.val_size = 128      # the held-out set (drawn from compare.heldout_seed, never trained on)
    c.synthetic.math_frac = 0.0
    c.synthetic.difficulty = 2
    c.synthetic.code_steps = True
    c.warm_start.steps = 200
    c.rollout.max_response_length = 64   # a step-by-step solution of 2 operations is ~30 tokens

    # configs/tiny.py's step: 32 prompts x 4 samples = 128 rows, 4 PPO updates (mini-batches of 32) and 2 PRM
    # updates (mini-batches of 64) a step, policy lr 2e-4, PRM lr 1e-3, beta 0.05.
    # Held-out score: avg@k at the sampling temperature (tiny's eval.k, eval.temperature) every eval.freq steps.
    c.eval.freq = 5
    c.eval.batch_size = 128
    c.checkpoint.freq = 5
    c.checkpoint.keep = 1
    c.checkpoint.export_hf = False
    c.log.tensorboard = False
    c.log.plot = False

    c.compare = ml_collections.ConfigDict()
    c.compare.arms = "prime,rloo_outcome,grpo_prime,reinforce_prime,pure_min"  # names from compare.ARMS, on every seed
    c.compare.seeds = "0,1,2"
    c.compare.ablations = "prime_prm_updates4,prime_beta0.5,prime_prm_lr1e-4,prime_shuffled_labels"  # after the arms
    c.compare.ablation_seeds = "0"
    c.compare.heldout_seed = 1000       # synthetic tasks of the held-out set; same for every arm and seed
    c.compare.out_dir = "docs/experiments"
    c.compare.name = "compare"          # output file names: <out_dir>/<name>.{json,png,md}
    return c

"""PRIME vs outcome-only RL in miniature (the paper's Fig. 3 / Table 4): the shared settings of every arm.

    python -m prime_jax.experiments.compare --config=configs/compare.py

Math-only synthetic chains of `synthetic.difficulty` operations ("Compute (17 + 5) * 3 - 4."), whose
warm-start solutions write one line per intermediate step ("17 + 5 = 22" ...) before `\\boxed{}`:
a wrong intermediate step makes the answer wrong, so there is step-level credit to assign. Every arm
(prime_jax/experiments/compare.py ARMS) starts from the same warm-start model and differs only in
the `algorithm` / `prm` keys its row of ARMS sets. All arms and seeds take about 8 minutes on a 2-core CPU
(8m17s on 2026-12-02; docs/benchmarks.md).
"""

import importlib.util
import os

import ml_collections


def _tiny() -> ml_collections.ConfigDict:
    """configs/tiny.py (the built-in run): the model, warm start, rollout and optimiser sizes shared here."""
    spec = importlib.util.spec_from_file_location("_tiny_config", os.path.join(os.path.dirname(__file__), "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = _tiny()
    c.workdir = "runs/compare"       # <workdir>/sft (the one warm start), <workdir>/<arm>/seed<k> (each run)
    c.total_steps = 20

    c.synthetic.val_size = 128      # the held-out set (drawn from compare.heldout_seed, never trained on)
    c.synthetic.math_frac = 1.0
    c.synthetic.difficulty = 2
    # Operands 1..6 (multipliers 2..6): each step is a small-number fact a 1M-parameter model can learn
    # in a short warm start; with operands up to 20 it starts near 0% and RL has no signal to work with.
    c.synthetic.max_operand = 6
    c.warm_start.steps = 400

    c.train.batch_size = 16
    c.train.max_rounds = 8   # up to 8 x 16 prompts offered a step (sampling is cheap here); fill the batch with groups that carry signal
    # verifier.literal_numbers stays on: `\boxed{17 + 5}` would copy the question (see configs/tiny.py).
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

"""PRIME vs outcome-only RL in miniature: PAPER Fig. 3 (dense vs sparse rewards) and Table 4 (other estimators).

    python -m prime_jax.experiments.compare --config=configs/compare.py [--config.compare.arms=prime,rloo_outcome]

Trains one warm-start (SFT) model, then runs every arm of ARMS for every seed from it with the trainer
of a normal run; arms differ only in the config keys of their ARMS row. Every run trains on the same
task pool (the held-out questions removed) in a seed-dependent order and is evaluated on the same
held-out set. A run whose metrics reach `total_steps` is skipped when the command is run again; an
interrupted one resumes from its last checkpoint. Writes `<compare.out_dir>/<compare.name>.{json,png,md}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from prime_jax.data.example import Example
from prime_jax.data.synthetic import make_tasks
from prime_jax.experiments import report
from prime_jax.metrics import read_metrics

# name -> (what it is, config overrides on top of the shared config)
ARMS: dict[str, tuple[str, dict[str, object]]] = {
    "prime": ("PRIME: RLOO on process + outcome rewards, online PRM", {}),
    "rloo_outcome": ("RLOO, outcome verifier only (no PRM)",
                     {"algorithm.process_coef": 0.0, "prm.update_mode": "none"}),
    "grpo_prime": ("GRPO on process + outcome rewards, online PRM", {"algorithm.adv_estimator": "grpo"}),
    "reinforce_prime": ("REINFORCE on process + outcome rewards, online PRM", {"algorithm.adv_estimator": "reinforce"}),
    "pure_min": ("RLOO, min-form process credit (PURE) + outcome, online PRM", {"algorithm.process_credit": "min"}),
    # PRIME with other PRM settings (what else was tried when PRIME did not beat outcome-only RLOO)
    "prime_beta0.5": ("PRIME, PRM beta 0.5 (10x)", {"prm.beta": 0.5}),
    "prime_prm_lr1e-4": ("PRIME, PRM lr 1e-4 (1/10)", {"prm.lr": 1e-4}),
    "prime_actor_lr2e-5": ("PRIME, policy lr 2e-5 (1/10)", {"actor.lr": 2e-5}),
    "rloo_outcome_actor_lr2e-5": ("RLOO outcome-only, policy lr 2e-5 (1/10)",
                                  {"algorithm.process_coef": 0.0, "prm.update_mode": "none", "actor.lr": 2e-5}),
}


def parse_list(text: str, key: str, cast=str) -> list:
    items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"config.{key}: empty")
    return items


def arm_config(c: ml_collections.ConfigDict, arm: str, seed: int) -> ml_collections.ConfigDict:
    """The run config of one arm and seed: the shared config, the arm's overrides, its own workdir."""
    if arm not in ARMS:
        raise ValueError(f"config.compare.arms: {arm!r} is not one of {', '.join(ARMS)}")
    rc = ml_collections.ConfigDict(c.to_dict())
    del rc["compare"]
    rc.seed = seed
    rc.workdir = os.path.join(c.workdir, arm, f"seed{seed}")
    rc.model.path = rc.model.path or os.path.join(c.workdir, "sft")
    rc.model.tokenizer = rc.model.tokenizer or os.path.join(rc.model.path, "tokenizer.model")
    for key, value in ARMS[arm][1].items():
        section, name = key.split(".")
        rc[section][name] = value
    return rc


def finished(workdir: str, total_steps: int) -> bool:
    """True when the run logged its last step with a held-out score."""
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return False
    last = read_metrics(workdir)[-1]
    return last["step"] >= total_steps and "val/test_score/all" in last


def task_sets(c: ml_collections.ConfigDict):
    """(training pool, held-out set): synthetic tasks of the configured difficulty; the held-out questions
    (seed `compare.heldout_seed`) are removed from the pool (and from the warm start's tasks)."""
    s = c.synthetic
    heldout = make_tasks(s.val_size, c.compare.heldout_seed, math_frac=s.math_frac, difficulty=s.difficulty,
                         max_operand=s.max_operand)
    pool = make_tasks(s.train_size, c.seed + 1, math_frac=s.math_frac, difficulty=s.difficulty, max_operand=s.max_operand)
    return without(pool, heldout), heldout


def without(tasks: list[Example], heldout: list[Example]) -> list[Example]:
    """`tasks` minus those asking a held-out question."""
    questions = {ex.question() for ex in heldout}
    return [ex for ex in tasks if ex.question() not in questions]


def run_one(rc: ml_collections.ConfigDict, train, heldout) -> None:
    """Trains one arm/seed to `total_steps` (resuming from its checkpoint), evaluating on `heldout`."""
    from prime_jax.components import build
    from prime_jax.config import validate
    from prime_jax.data.dataset import PromptDataset
    from prime_jax.mesh import make_mesh
    from prime_jax.programs import validate_programs
    from prime_jax.trainer import Trainer

    validate(rc)
    validate_programs(rc, make_mesh(dict(rc.mesh)))
    parts = build(rc)
    data = PromptDataset(train, parts.tokenizer, max_prompt_len=rc.data.max_prompt_length, seed=rc.seed)
    parts = dataclasses.replace(parts, train_data=data, val_examples=heldout)
    try:
        Trainer(parts).fit()
    finally:
        parts.pool.close()


def run(c: ml_collections.ConfigDict) -> dict:
    """Runs the missing arm/seed runs, then writes and returns the results (report.build_results)."""
    import jax

    from prime_jax.warm_start import sft_tasks, warm_start

    arms = parse_list(c.compare.arms, "compare.arms")
    seeds = parse_list(c.compare.seeds, "compare.seeds", int)
    for arm in arms:  # every arm's config is checked before the warm start spends any time
        arm_config(c, arm, seeds[0])
    os.makedirs(c.workdir, exist_ok=True)
    # Runs of one experiment compile the same programs; keep them on disk for the next run (and a resume).
    jax.config.update("jax_compilation_cache_dir", os.path.join(c.workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    train, heldout = task_sets(c)
    if not c.model.path:
        warm_start(c, os.path.join(c.workdir, "sft"), tasks=without(sft_tasks(c), heldout))
    for seed in seeds:  # seed-major: a cut-short experiment still compares every arm on its first seeds
        for arm in arms:
            rc = arm_config(c, arm, seed)
            if finished(rc.workdir, rc.total_steps):
                print(f"compare: {arm} seed {seed} already finished, skipped", flush=True)
                continue
            t0 = time.perf_counter()
            print(f"compare: {arm} seed {seed} -> {rc.workdir}", flush=True)
            run_one(rc, train, heldout)
            print(f"compare: {arm} seed {seed} done in {time.perf_counter() - t0:.0f}s", flush=True)
    runs = {arm: {seed: read_metrics(arm_config(c, arm, seed).workdir) for seed in seeds} for arm in arms}
    setup = {
        "task": f"synthetic math, {c.synthetic.difficulty}-operation chains, step-by-step warm-start solutions",
        "total_steps": c.total_steps, "prompts_per_step": c.train.batch_size, "samples_per_prompt": c.rollout.n_samples,
        "max_response_length": c.rollout.max_response_length, "train_pool": len(train),
        "heldout": {"prompts": len(heldout), "seed": c.compare.heldout_seed, "k": c.eval.k,
                    "temperature": c.eval.temperature, "every": c.eval.freq,
                    "measure": f"avg@{c.eval.k} at temperature {c.eval.temperature}: mean verifier score of "
                               f"{c.eval.k} samples per held-out prompt (sampler seed = run seed)"},
        "warm_start": {"steps": c.warm_start.steps, "examples": c.warm_start.num_examples,
                       "heldout_questions_removed_from_sft_data": len(sft_tasks(c)) - len(without(sft_tasks(c), heldout))},
        "beta": c.prm.beta, "prm_lr": c.prm.lr, "actor_lr": c.actor.lr,
        "arms": {arm: {"description": ARMS[arm][0], "overrides": ARMS[arm][1]} for arm in arms},
        "seeds": seeds,
    }
    results = report.build_results(runs, setup)
    report.write_outputs(results, c.compare.out_dir, c.compare.name)
    return results


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)
    try:
        results = run(flags.FLAGS.config)
    except ValueError as e:
        if str(e).startswith("config."):
            sys.exit(f"error: {e}")
        raise
    print(json.dumps(report.final_summary(results), indent=1))


if __name__ == "__main__":  # the flag is defined here only, so this module imports beside prime_jax.main
    config_flags.DEFINE_config_file("config", None, "path to configs/compare.py (or a variant)", lock_config=True)
    flags.mark_flag_as_required("config")
    app.run(main)

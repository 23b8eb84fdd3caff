"""PRIME vs outcome-only RL in miniature: the paper's Fig. 3 (dense vs sparse rewards) and Table 4 (other estimators).

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
import time

import ml_collections

from prime_jax import cli, settings
from prime_jax.data.example import Example
from prime_jax.data.synthetic import make_tasks
from prime_jax.experiments import report
from prime_jax.metrics import read_metrics
from prime_jax.settings import ExperimentSettings, RunSettings, SyntheticSettings

# name -> (what it is, config overrides on top of the shared config)
ARMS: dict[str, tuple[str, dict[str, object]]] = {
    "prime": ("PRIME: RLOO on process + outcome rewards, online PRM", {}),
    "rloo_outcome": ("RLOO, outcome verifier only (no PRM)",
                     {"algorithm.process_coef": 0.0, "prm.update_mode": "none"}),
    "grpo_prime": ("GRPO on process + outcome rewards, online PRM", {"algorithm.adv_estimator": "grpo"}),
    "reinforce_prime": ("REINFORCE on process + outcome rewards, online PRM", {"algorithm.adv_estimator": "reinforce"}),
    "pure_min": ("RLOO, min-form process credit (PURE) + outcome, online PRM", {"algorithm.process_credit": "min"}),
    # Ablations of PRIME's PRM (configs/compare.py: 128 rows a step, 2 PRM updates of 64 rows, beta 0.05, lr 1e-3)
    "prime_prm_updates4": ("PRIME, 4 PRM updates a step (mini-batches of 32)",
                           {"prm.mini_batch_size": 32, "prm.micro_batch_size": 32}),
    "prime_beta0.5": ("PRIME, PRM beta 0.5 (10x)", {"prm.beta": 0.5}),
    "prime_prm_lr1e-4": ("PRIME, PRM lr 1e-4 (1/10)", {"prm.lr": 1e-4}),
    # The control: a PRM trained on shuffled outcome labels gives rewards without information about the responses,
    # so what it gains over outcome-only RLOO is not credit assignment.
    "prime_shuffled_labels": ("PRIME, PRM trained on shuffled outcome labels (control)", {"prm.shuffle_labels": True}),
}


def arm_config(x: ExperimentSettings, shared: RunSettings, arm: str, seed: int) -> ml_collections.ConfigDict:
    """The run config of one arm and seed: the shared config, the arm's overrides, its own workdir, the shared
    warm-start model."""
    rc = ml_collections.ConfigDict(x.base.to_dict())
    rc.update_from_flattened_dict(dict(ARMS[arm][1]))
    rc.seed = seed
    rc.workdir = os.path.join(x.workdir, arm, f"seed{seed}")
    rc.model.path, rc.model.tokenizer = shared.model.path, shared.model.tokenizer
    return rc


def finished(workdir: str, total_steps: int) -> bool:
    """True when the run logged its last step with a held-out score."""
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return False
    last = read_metrics(workdir)[-1]
    return last["step"] >= total_steps and "val/test_score/all" in last


def task_sets(shared: RunSettings, heldout_seed: int):
    """(training pool, held-out set): synthetic tasks of the configured difficulty; the held-out questions
    (seed `compare.heldout_seed`) are removed from the pool (and from the warm start's tasks)."""
    s = shared.data.synthetic
    heldout = make_tasks(s.val_size, heldout_seed, math_frac=s.math_frac, difficulty=s.difficulty,
                         max_operand=s.max_operand)
    pool = make_tasks(s.train_size, shared.seed + 1, math_frac=s.math_frac, difficulty=s.difficulty,
                      max_operand=s.max_operand)
    return without(pool, heldout), heldout


def without(tasks: list[Example], heldout: list[Example]) -> list[Example]:
    """`tasks` minus those asking a held-out question."""
    questions = {ex.question() for ex in heldout}
    return [ex for ex in tasks if ex.question() not in questions]


def task_description(s: SyntheticSettings) -> str:
    """One line naming the experiment's tasks, for the JSON and the figure."""
    kinds = {"math": s.math_frac, "code (step-by-step solutions)" if s.code_steps else "code": 1.0 - s.math_frac}
    mix = " + ".join(f"{kind}" if share == 1.0 else f"{share:.0%} {kind}" for kind, share in kinds.items() if share > 0)
    operands = f", operands up to {s.max_operand}" if s.max_operand else ""
    return f"synthetic {mix}, {s.difficulty}-operation chains{operands}"


def run_one(rs: RunSettings, train, heldout) -> None:
    """Trains one arm/seed to `total_steps` (resuming from its checkpoint), evaluating on `heldout`."""
    from prime_jax.components import build
    from prime_jax.data.dataset import PromptDataset
    from prime_jax.trainer import Trainer

    parts = build(rs)
    data = PromptDataset(train, parts.tokenizer, max_prompt_len=rs.data.max_prompt_length, seed=rs.seed)
    parts = dataclasses.replace(parts, train_data=data, val_examples=heldout)
    try:
        Trainer(parts).fit()
    finally:
        parts.pool.close()


def run(c: ml_collections.ConfigDict) -> dict:
    """Runs the missing arm/seed runs, then writes and returns the results (report.build_results)."""
    import jax

    from prime_jax.warm_start import sft_tasks, warm_start

    x = settings.resolve_experiment(c, tuple(ARMS))
    shared = settings.resolve(x.base)
    for arm, seed in x.runs:  # every run's config is checked before the warm start spends any time
        settings.check(arm_config(x, shared, arm, seed))
    os.makedirs(x.workdir, exist_ok=True)
    # Runs of one experiment compile the same programs; keep them on disk for the next run (and a resume).
    jax.config.update("jax_compilation_cache_dir", os.path.join(x.workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    train, heldout = task_sets(shared, x.heldout_seed)
    sft = without(sft_tasks(shared), heldout)
    if shared.warm_start.needed:
        warm_start(shared, shared.model.path, tasks=sft)
        shared = settings.resolve(x.base, shared.mesh, rollout_mesh=shared.rollout_mesh)
    for arm, seed in x.runs:
        rs = settings.resolve(arm_config(x, shared, arm, seed), shared.mesh, rollout_mesh=shared.rollout_mesh)
        if finished(rs.workdir, rs.total_steps):
            print(f"compare: {arm} seed {seed} already finished, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"compare: {arm} seed {seed} -> {rs.workdir}", flush=True)
        run_one(rs, train, heldout)
        print(f"compare: {arm} seed {seed} done in {time.perf_counter() - t0:.0f}s", flush=True)
    runs: dict[str, dict[int, list]] = {}
    for arm, seed in x.runs:
        runs.setdefault(arm, {})[seed] = read_metrics(os.path.join(x.workdir, arm, f"seed{seed}"))
    e = shared.eval
    setup = {
        "task": task_description(shared.data.synthetic),
        "total_steps": shared.total_steps, "prompts_per_step": shared.collect.batch_size,
        "samples_per_prompt": shared.collect.n, "max_response_length": shared.sampler.max_new_tokens,
        "train_pool": len(train),
        "heldout": {"prompts": len(heldout), "seed": x.heldout_seed, "k": e.k, "temperature": e.temperature,
                    "every": e.freq, "measure": f"avg@{e.k} at temperature {e.temperature}: mean verifier score of "
                                                f"{e.k} samples per held-out prompt (sampler seed = run seed)"},
        "warm_start": {"steps": shared.warm_start.steps, "examples": shared.warm_start.num_examples,
                       "heldout_questions_removed_from_sft_data": len(sft_tasks(shared)) - len(sft)},
        "beta": shared.prm.beta, "prm_lr": shared.prm_optim.lr, "actor_lr": shared.actor_optim.lr,
        "arms": {arm: {"description": ARMS[arm][0], "overrides": ARMS[arm][1]} for arm in x.arms + x.ablations},
        "seeds": list(x.seeds), "ablations": list(x.ablations), "ablation_seeds": list(x.ablation_seeds),
    }
    results = report.build_results(runs, setup)
    report.write_outputs(results, x.out_dir, x.name)
    return results


def main(argv) -> None:
    del argv
    results = run(cli.load_config(_CONFIG))
    print(json.dumps(report.final_summary(results), indent=1))


if __name__ == "__main__":  # the flag is defined here only, so this module imports beside prime_jax.main
    _CONFIG = cli.config_flag("path to configs/compare.py (or a variant)")
    cli.run(main)

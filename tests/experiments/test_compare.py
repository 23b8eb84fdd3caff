"""The comparison command end to end at toy size: one warm start, two arms, resumable, sanity figures."""

import json
import math
import os

import pytest

from prime_jax import settings
from prime_jax.experiments import compare
from prime_jax.metrics import read_metrics
from tests.fixtures import load_config



def toy_config(tmp_path):
    c = load_config("compare")
    c.workdir, c.compare.out_dir = str(tmp_path / "runs"), str(tmp_path / "out")
    c.compare.arms, c.compare.seeds = "prime,rloo_outcome", "0"
    c.compare.ablations, c.compare.ablation_seeds = "prime_shuffled_labels", "0"
    c.total_steps, c.eval.freq, c.checkpoint.freq = 1, 1, 1
    c.synthetic.train_size, c.synthetic.val_size, c.eval.k = 64, 4, 1
    c.warm_start.steps, c.warm_start.num_examples = 2, 64
    c.warm_start.arch.update(dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                  head_dim=16))
    c.train.batch_size, c.train.max_rounds, c.rollout.max_response_length = 2, 1, 8
    c.train.filter_accuracy = False  # the toy model is rarely right: keep every group
    c.actor.mini_batch_size = c.actor.micro_batch_size = 8
    c.prm.mini_batch_size = c.prm.micro_batch_size = 8
    return c


def test_arms_share_the_warm_start_and_outcome_only_runs_no_prm(tmp_path, capsys):
    c = toy_config(tmp_path)
    results = compare.run(c)
    prime, outcome = results["sanity"]["prime"]["0"], results["sanity"]["rloo_outcome"]["0"]
    assert prime["step1_prm_loss"] == pytest.approx(math.log(2), abs=1e-6)  # PRM == reference at step 1
    assert prime["prm_seconds"] > 0 and "reward_model/dpo_acc_before" in prime["reward_model_metrics"]
    assert outcome["reward_model_metrics"] == [] and outcome["prm_seconds"] == 0.0
    # The PRM's step diagnostics on the synthetic math rows (every group kept here), from its pre-update rewards: at
    # step 1 PRM == reference, every reward 0, so every comparison is a tie
    step1 = read_metrics(os.path.join(c.workdir, "prime", "seed0"))[1]
    assert step1["reward_model/dpo_acc_before_tie_neutral"] == 0.5
    assert {"prm/steps_right", "prm/steps_wrong", "prm/steps_malformed", "prm/first_error_rows"} <= set(step1)
    assert step1.get("prm/step_auroc", 0.5) == 0.5 and step1.get("prm/first_error_top1") == step1.get(
        "prm/first_error_chance")
    assert not [k for k in read_metrics(os.path.join(c.workdir, "rloo_outcome", "seed0"))[1] if k.startswith("prm/")]
    # same warm start, same held-out set, same sampler seed: identical step-0 scores
    assert results["runs"]["prime"]["0"][0] == results["runs"]["rloo_outcome"]["0"][0]
    out = tmp_path / "out"
    assert json.loads((out / "compare.json").read_text()) == results
    assert (out / "compare.png").is_file() and "RLOO, outcome verifier only" in (out / "compare.md").read_text()
    x = settings.resolve_experiment(c, tuple(compare.ARMS))
    train, heldout = compare.task_sets(settings.resolve(x.base), x.heldout_seed)
    assert results["setup"]["train_pool"] == len(train) and not {t.question() for t in train} & {h.question() for h in heldout}
    capsys.readouterr()
    # the ablation ran after the arms, with the label-shuffled PRM
    assert list(results["runs"]) == ["prime", "rloo_outcome", "prime_shuffled_labels"]
    shuffled = read_metrics(os.path.join(c.workdir, "prime_shuffled_labels", "seed0"))
    assert "reward_model/prm_loss" in shuffled[1] and results["setup"]["ablations"] == ["prime_shuffled_labels"]
    capsys.readouterr()
    assert compare.run(c) == results  # resumable: finished runs are skipped, results unchanged
    assert capsys.readouterr().out.count("already finished, skipped") == 3


def test_unknown_arm_is_a_config_error(tmp_path):
    c = toy_config(tmp_path)
    c.compare.arms = "prime,ppo"
    with pytest.raises(ValueError, match="config.compare.arms: 'ppo' is not one of"):
        compare.run(c)
    c = toy_config(tmp_path)
    c.compare.ablations = "prime,pure_min"
    with pytest.raises(ValueError, match=r"config.compare.ablations: \['prime'\] also in compare.arms"):
        compare.run(c)
    c = toy_config(tmp_path)
    c.compare.ablation_seeds = ""
    with pytest.raises(ValueError, match="config.compare.ablation_seeds: empty"):
        compare.run(c)


def test_runs_are_the_arms_seed_by_seed_then_the_ablations(tmp_path):
    c = toy_config(tmp_path)
    c.compare.arms, c.compare.seeds = "prime,rloo_outcome", "0,1"
    c.compare.ablations, c.compare.ablation_seeds = "prime_beta0.5,prime_shuffled_labels", "0"
    assert settings.resolve_experiment(c, tuple(compare.ARMS)).runs == (
        ("prime", 0), ("rloo_outcome", 0), ("prime", 1), ("rloo_outcome", 1), ("prime_beta0.5", 0),
        ("prime_shuffled_labels", 0))
    c.compare.ablations = ""
    assert settings.resolve_experiment(c, tuple(compare.ARMS)).ablations == ()


@pytest.mark.parametrize("name", ["compare", "compare_gpu"])
def test_experiment_configs_resolve_and_every_run_checks(name, tmp_path):
    c = load_config(name)
    c.workdir = str(tmp_path)
    x = settings.resolve_experiment(c, tuple(compare.ARMS))
    shared = settings.resolve(x.base)
    assert shared.data.synthetic.code_steps and shared.warm_start.needed
    for arm, seed in x.runs:
        settings.check(compare.arm_config(x, shared, arm, seed))
    assert {arm for arm, _ in x.runs} >= {"prime", "rloo_outcome", "prime_shuffled_labels"}

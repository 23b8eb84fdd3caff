"""The comparison's table and figure, from a small hand-made results JSON with hand-computed figures."""

import json

import pytest

from prime_jax.experiments import report


def point(step, heldout, wall, dpo=None, auroc=None):
    return {"step": step, "heldout": heldout, "train_verify": 0.5, "dpo_acc": dpo, "dpo_acc_tie_neutral": dpo,
            "step_auroc": auroc, "first_error_top1": None, "first_error_chance": None, "response_length": 20.0,
            "wall_s": wall}


@pytest.fixture
def results():
    return {
        "setup": {"total_steps": 10, "seeds": [0, 1], "task": "t", "heldout": {"k": 4, "temperature": 1.0},
                  "arms": {"prime": {"description": "PRIME"}, "rloo_outcome": {"description": "RLOO outcome-only"}}},
        "runs": {
            # seed means: step 0 0.2, step 5 0.35, step 10 0.5; finals 0.4 and 0.6
            # step AUROC run means: 0.7 and 0.6
            "prime": {"0": [point(0, 0.2, 0), point(5, 0.3, 10, 0.6, 0.6), point(10, 0.4, 20, 0.7, 0.8)],
                      "1": [point(0, 0.2, 0), point(5, 0.4, 12, 0.6, 0.5), point(10, 0.6, 24, 0.9, 0.7)]},
            # seed means: 0.2, 0.25, 0.3; finals 0.25 and 0.35
            "rloo_outcome": {"0": [point(0, 0.2, 0), point(5, 0.2, 5), point(10, 0.25, 10)],
                             "1": [point(0, 0.2, 0), point(5, 0.3, 5), point(10, 0.35, 10)]},
        },
        "sanity": {},
    }


def test_final_summary_and_steps_to_reach(results):
    s = report.final_summary(results)
    assert s["prime"]["mean"] == pytest.approx(0.5) and s["prime"]["spread"] == pytest.approx(0.1)
    assert (s["prime"]["min"], s["prime"]["max"]) == (pytest.approx(0.4), pytest.approx(0.6))
    assert s["rloo_outcome"]["mean"] == pytest.approx(0.3) and s["rloo_outcome"]["spread"] == pytest.approx(0.05)
    assert report.steps_to_reach(results, "prime", 0.3) == 5      # 0.35 >= 0.3 at step 5
    assert report.steps_to_reach(results, "rloo_outcome", 0.3) == 10
    assert report.steps_to_reach(results, "rloo_outcome", 0.31) is None
    assert report.steps_to_reach(results, "rloo_outcome", 0.1) == 5  # RL steps only: step 0 is the warm start


def test_table_numbers_come_from_the_json(results):
    table = report.table_markdown(results)
    prime_row = next(line for line in table.splitlines() if line.startswith("| PRIME"))
    cells = [c.strip() for c in prime_row.strip("|").split("|")]
    # start, final mean ± spread, min–max, paired gain over RLOO, steps to reach RLOO's final, train score, dpo_acc,
    # step AUROC, s/step. Paired: finals 0.4 - 0.25, 0.6 - 0.35 = 0.15, 0.25: mean 0.2, sd 0.0707, se 0.05,
    # t(0.975, 1 df) = 12.706 -> 0.2 ± 0.635
    assert cells[1:] == ["0.200", "0.500 ± 0.100", "0.400–0.600", "+0.200 [-0.435, +0.835] (2/2)", "5", "0.500",
                         "0.800", "0.650", "2.2"]
    rloo_row = next(line for line in table.splitlines() if line.startswith("| RLOO outcome-only"))
    assert "– (no PRM)" in rloo_row and "| 10 |" in rloo_row
    assert "RLOO goes from 0.200 (step 0) to 0.300 (mean over seeds, step 10); its gain per seed: +0.050, +0.150. " \
           "PRIME first reaches that score (seed mean) at step 5 of 10 (2.0x fewer steps; the paper: 2.5x) and ends " \
           "at 0.500; paired by seed, PRIME - RLOO = +0.200 [-0.435, +0.835] (2/2) seeds above." in table
    assert "no gain to reach sooner" not in table


def test_outputs_are_written_and_reloadable(results, tmp_path):
    report.write_outputs(results, str(tmp_path))
    assert json.loads((tmp_path / "compare.json").read_text()) == results
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "compare.md").read_text().strip() == report.table_markdown(results)


def test_evaluated_points_average_the_window_since_the_last_evaluation():
    records = [{"step": 0, "val/test_score/all": 0.1},
               {"step": 1, "train_verify_score/all": 0.2, "reward_model/dpo_acc_before": 0.5, "response_length/mean": 10, "timing/step": 3.0,
                "reward_model/dpo_acc_before_tie_neutral": 0.5, "prm/step_auroc": 0.5, "prm/first_error_top1": 0.25,
                "prm/first_error_chance": 0.25},
               {"step": 2, "train_verify_score/all": 0.4, "reward_model/dpo_acc_before": 0.7, "response_length/mean": 20, "timing/step": 1.0,
                "reward_model/dpo_acc_before_tie_neutral": 0.6, "prm/first_error_top1": 0.75, "prm/first_error_chance": 0.5,
                "val/test_score/all": 0.3},
               {"step": 3, "train_verify_score/all": 0.6, "response_length/mean": 30, "timing/step": 2.0, "val/test_score/all": 0.5}]
    points = report.evaluated_points(records)
    none = dict.fromkeys(("train_verify", "dpo_acc", "dpo_acc_tie_neutral", "step_auroc", "first_error_top1",
                          "first_error_chance", "response_length"))
    assert points[0] == {"step": 0, "heldout": 0.1, **none, "wall_s": 0.0}
    # means over steps 1-2 of what each logged: step_auroc only at step 1 (a step without first errors leaves it out)
    assert points[1] == {"step": 2, "heldout": 0.3, "train_verify": pytest.approx(0.3), "dpo_acc": pytest.approx(0.6),
                         "dpo_acc_tie_neutral": pytest.approx(0.55), "step_auroc": 0.5,
                         "first_error_top1": pytest.approx(0.5), "first_error_chance": pytest.approx(0.375),
                         "response_length": 15.0, "wall_s": 4.0}
    assert points[2] == {"step": 3, "heldout": 0.5, **none, "train_verify": pytest.approx(0.6), "response_length": 30.0,
                         "wall_s": 6.0}
    s = report.sanity(records)
    assert s["reward_model_metrics"] == ["reward_model/dpo_acc_before", "reward_model/dpo_acc_before_tie_neutral"]
    assert s["prm_seconds"] == 0.0


def test_paired_differences_by_hand(results):
    p = report.paired(results, "prime")
    assert p["per_seed"] == {"0": pytest.approx(0.15), "1": pytest.approx(0.25)}
    assert p["mean"] == pytest.approx(0.2) and p["seeds_above"] == 2 and p["seeds"] == 2
    assert p["ci95"] == [pytest.approx(0.2 - 12.7062047 * 0.05), pytest.approx(0.2 + 12.7062047 * 0.05)]
    one = {"runs": {arm: {"0": by_seed["0"]} for arm, by_seed in results["runs"].items()}}
    assert report.paired(one, "prime")["ci95"] is None                    # one seed: no interval
    assert report.paired({"runs": {"prime": {"0": []}, "rloo_outcome": {"1": []}}}, "prime") is None


def test_credit_vs_gain_by_hand(results):
    got = report.credit_vs_gain(results)
    assert got["runs"] == [{"arm": "prime", "seed": 0, "gain": pytest.approx(0.2), "step_auroc": pytest.approx(0.7),
                            "first_error_lift": None},
                           {"arm": "prime", "seed": 1, "gain": pytest.approx(0.4), "step_auroc": pytest.approx(0.6),
                            "first_error_lift": None}]
    assert got["spearman_gain_step_auroc"] is None                        # two runs: no correlation
    results["runs"]["pure_min"] = {"0": [point(0, 0.2, 0), point(10, 0.5, 9, auroc=0.9)]}
    # gains 0.2, 0.4, 0.3 against AUROC 0.7, 0.6, 0.9: ranks (1, 3, 2) vs (2, 1, 3) -> d = -1, 2, -1, rho = 1 - 6 * 6 / (3 * 8) = -0.5
    assert report.credit_vs_gain(results)["spearman_gain_step_auroc"] == pytest.approx(-0.5)

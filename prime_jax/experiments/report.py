"""Results of an arm comparison: the JSON record, the Table-4-style markdown table and the held-out figure.

Everything shown is computed from the results JSON (`build_results`), so `python -m
prime_jax.experiments.report docs/experiments/compare.json` re-renders the table and figure from it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BASELINE = "rloo_outcome"   # the paper's "RLOO w/ outcome verifier only"
PRIME = "prime"
HELDOUT = "val/test_score/all"


def _mean(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return float(np.mean(values)) if values else None


# A point's train-side figures: its key -> the metric it averages over the window (absent in every step: None).
WINDOW_MEANS = {"train_verify": "train_verify_score/all", "dpo_acc": "reward_model/dpo_acc_before",
                "dpo_acc_tie_neutral": "reward_model/dpo_acc_before_tie_neutral", "step_auroc": "prm/step_auroc",
                "first_error_top1": "prm/first_error_top1", "first_error_chance": "prm/first_error_chance",
                "response_length": "response_length/mean"}


def evaluated_points(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per step with a held-out score. Train-side figures (`WINDOW_MEANS`: train verifier score, PRM
    dpo_acc and its tie-neutral form, the PRM's step-credit diagnostics, response length) are means over the steps
    since the previous evaluation that logged them; wall_s is the summed training step time (`timing/step`: sampling,
    verifying, PRM, update; not evaluation) up to the step."""
    points, window, wall = [], [], 0.0
    for r in records:
        if r["step"] > 0:
            window.append(r)
            wall += r.get("timing/step", 0.0)
        if HELDOUT in r:
            points.append({"step": r["step"], "heldout": r[HELDOUT],
                           **{key: _mean(window, metric) for key, metric in WINDOW_MEANS.items()},
                           "wall_s": round(wall, 2)})
            window = []
    return points


def sanity(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Whether the run did PRM work at all, and its step-1 PRM loss / dpo_acc / mean summed process reward
    (ln 2, 0.5 and 0 expected: the PRM starts equal to the reference)."""
    first = next((r for r in records if r["step"] == 1), {})
    return {"reward_model_metrics": sorted({k for r in records for k in r if k.startswith("reward_model/")}),
            "prm_seconds": round(sum(r.get("timing/reward_model", 0.0) for r in records), 3),
            "step1_prm_loss": first.get("reward_model/prm_loss"), "step1_dpo_acc": first.get("reward_model/dpo_acc_before"),
            "step1_process_reward": first.get("train_reward/reward_model")}


def build_results(runs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]], setup: Mapping[str, Any]) -> dict:
    """runs: arm -> seed -> metrics records (read_metrics) -> the results JSON object."""
    return {"setup": dict(setup),
            "runs": {arm: {str(seed): evaluated_points(recs) for seed, recs in by_seed.items()} for arm, by_seed in runs.items()},
            "sanity": {arm: {str(seed): sanity(recs) for seed, recs in by_seed.items()} for arm, by_seed in runs.items()}}


def curve(results: Mapping[str, Any], arm: str, key: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], values [seeds, S]) of one arm, over the steps every seed evaluated."""
    by_seed = [{p["step"]: p[key] for p in points} for points in results["runs"][arm].values()]
    steps = sorted(set.intersection(*(set(s) for s in by_seed)))
    return np.array(steps), np.array([[s[t] for t in steps] for s in by_seed], float)


def steps_to_reach(results: Mapping[str, Any], arm: str, target: float) -> int | None:
    """First evaluated RL step (> 0) where the arm's seed-mean held-out score is >= target (None: never)."""
    steps, values = curve(results, arm)
    hits = np.flatnonzero((values.mean(axis=0) >= target - 1e-9) & (steps > 0))
    return int(steps[hits[0]]) if len(hits) else None


def final_summary(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per arm: final held-out mean, half min-max range, min, max over seeds, and the per-seed values."""
    out = {}
    for arm in results["runs"]:
        _, values = curve(results, arm)
        final = values[:, -1]
        out[arm] = {"mean": float(final.mean()), "spread": float((final.max() - final.min()) / 2),
                    "min": float(final.min()), "max": float(final.max()), "per_seed": [float(v) for v in final],
                    "start": float(values[:, 0].mean())}
    return out


def table_markdown(results: Mapping[str, Any]) -> str:
    """Table 4 of the paper in miniature: final held-out score per arm (mean ± half the min-max range over
    seeds), its gain over outcome-only RLOO, when the arm first reaches RLOO's final score, and cost."""
    setup, summary = results["setup"], final_summary(results)
    base = summary.get(BASELINE)
    lines = ["| arm | held-out, step 0 | held-out, final (mean ± spread) | min–max | Δ vs RLOO outcome-only "
             "| steps to reach RLOO outcome-only final | train score, last window | PRM dpo_acc, last window | train s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        last = [points[-1] for points in results["runs"][arm].values()]
        dpo = [p["dpo_acc"] for p in last if p["dpo_acc"] is not None]
        per_step = np.mean([p["wall_s"] / p["step"] for p in last])
        reach = steps_to_reach(results, arm, base["mean"]) if base else None
        lines.append(" | ".join([
            f"| {setup['arms'][arm]['description'] if arm in setup.get('arms', {}) else arm}",
            f"{s['start']:.3f}", f"{s['mean']:.3f} ± {s['spread']:.3f}", f"{s['min']:.3f}–{s['max']:.3f}",
            f"{s['mean'] - base['mean']:+.3f}" if base else "–",
            ("never" if reach is None else str(reach)) if base else "–",
            f"{np.mean([p['train_verify'] for p in last]):.3f}",
            f"{np.mean(dpo):.3f}" if dpo else "– (no PRM)", f"{per_step:.1f} |"]))
    text = "\n".join(lines)
    if base and PRIME in summary:
        reach = steps_to_reach(results, PRIME, base["mean"])
        total = setup["total_steps"]
        text += (f"\n\nOutcome-only RLOO goes from {base['start']:.3f} (step 0) to {base['mean']:.3f} (mean over seeds, "
                 f"step {total}); PRIME "
                 + (f"first reaches that score (seed mean) at step {reach} of {total}" if reach is not None else "never reaches it")
                 + f" and ends at {summary[PRIME]['mean']:.3f}.")
        if base["mean"] <= base["start"]:
            text += " Outcome-only RLOO ends at or below its starting score, so there is no gain to reach sooner."
    return text


def plot(results: Mapping[str, Any], path: str) -> str:
    """Held-out score vs step: seed mean (line) and min-max band per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm in results["runs"]:
        steps, values = curve(results, arm)
        label = setup["arms"][arm]["description"] if arm in setup.get("arms", {}) else arm
        (line,) = ax.plot(steps, values.mean(axis=0), marker="o", label=label)
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    h = setup.get("heldout", {})
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"held-out score (avg@{h.get('k', '?')}, T={h.get('temperature', '?')})")
    ax.set_title(f"{setup.get('task', '')}\n{len(setup.get('seeds', []))} seeds: mean and min–max band", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(results: Mapping[str, Any], out_dir: str, name: str = "compare") -> None:
    """<out_dir>/<name>.json, .png (held-out curves) and .md (the table)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out_dir, f"{name}.png"))
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table_markdown(results) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m prime_jax.experiments.report RESULTS.json")
    with open(sys.argv[1]) as f:
        loaded = json.load(f)
    write_outputs(loaded, os.path.dirname(sys.argv[1]) or ".", os.path.splitext(os.path.basename(sys.argv[1]))[0])

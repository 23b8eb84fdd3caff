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
    """runs: arm -> seed -> metrics records (read_metrics) -> the results JSON object (with the paired differences
    from outcome-only RLOO and the gain-vs-credit figures, for readers of the JSON)."""
    out = {"setup": dict(setup),
           "runs": {arm: {str(seed): evaluated_points(recs) for seed, recs in by_seed.items()} for arm, by_seed in runs.items()},
           "sanity": {arm: {str(seed): sanity(recs) for seed, recs in by_seed.items()} for arm, by_seed in runs.items()}}
    if BASELINE in runs:
        out["paired_vs_baseline"] = {arm: paired(out, arm) for arm in runs if arm != BASELINE}
    out["credit_vs_gain"] = credit_vs_gain(out)
    return out


def curve(results: Mapping[str, Any], arm: str, key: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], values [seeds, S]) of one arm, over the steps every seed evaluated."""
    by_seed = [{p["step"]: np.nan if p.get(key) is None else p[key] for p in points}
               for points in results["runs"][arm].values()]
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


def run_mean(points: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Mean of a window figure over a run's evaluated points that have it (None: none has)."""
    values = [p[key] for p in points if p.get(key) is not None]
    return float(np.mean(values)) if values else None


def paired(results: Mapping[str, Any], arm: str, base: str = BASELINE) -> dict[str, Any] | None:
    """`arm`'s final held-out score minus `base`'s, seed by seed: runs of one seed share the warm start, the step-0
    score, the task order and the sampler seed, so the difference removes what the seeds share. Per-seed
    differences, their mean, a 95% Student-t interval of the mean (None with one seed) and the seeds where `arm` is
    above; None when the two share no seed."""
    from scipy import stats

    seeds = sorted(set(results["runs"][arm]) & set(results["runs"][base]), key=int)
    if not seeds:
        return None
    d = np.array([results["runs"][arm][s][-1]["heldout"] - results["runs"][base][s][-1]["heldout"] for s in seeds])
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
    mean = float(d.mean())
    return {"per_seed": dict(zip(seeds, d.tolist())), "mean": mean, "ci95": None if half is None else
            [mean - half, mean + half], "seeds_above": int(np.sum(d > 0)), "seeds": len(d)}


def credit_vs_gain(results: Mapping[str, Any]) -> dict[str, Any]:
    """Does an arm's held-out gain follow its PRM's step credit? Per run of an arm with a PRM: gain (final - step 0
    held-out) and the run's mean `step_auroc` and `first_error_top1 - first_error_chance`; Spearman's rank
    correlation of gain with step_auroc over those runs (None with fewer than 3)."""
    from scipy import stats

    runs = []
    for arm, by_seed in results["runs"].items():
        for seed, points in by_seed.items():
            auroc, top1, chance = (run_mean(points, k) for k in ("step_auroc", "first_error_top1", "first_error_chance"))
            if auroc is not None:
                runs.append({"arm": arm, "seed": int(seed), "gain": points[-1]["heldout"] - points[0]["heldout"],
                             "step_auroc": auroc, "first_error_lift": None if top1 is None else top1 - chance})
    rho = None
    if len(runs) >= 3:
        rho = float(stats.spearmanr([r["gain"] for r in runs], [r["step_auroc"] for r in runs]).statistic)
    return {"runs": runs, "spearman_gain_step_auroc": None if rho is None or np.isnan(rho) else rho}


def table_markdown(results: Mapping[str, Any]) -> str:
    """Table 4 of the paper in miniature: final held-out score per arm (mean ± half the min-max range over
    seeds), its paired difference from outcome-only RLOO, when the arm first reaches RLOO's final score, the PRM's
    credit figures and cost; then the answer in sentences (`answer`)."""
    setup, summary = results["setup"], final_summary(results)
    base = summary.get(BASELINE)
    lines = ["| arm | held-out, step 0 | held-out, final (mean ± spread) | min–max | Δ vs RLOO outcome-only, paired: mean "
             "[95% CI] (seeds above) | steps to reach RLOO outcome-only final | train score, last window "
             "| PRM dpo_acc, last window | PRM step AUROC, run mean | train s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        runs = list(results["runs"][arm].values())
        last = [points[-1] for points in runs]
        dpo = [p["dpo_acc"] for p in last if p["dpo_acc"] is not None]
        auroc = [a for a in (run_mean(points, "step_auroc") for points in runs) if a is not None]
        per_step = np.mean([p["wall_s"] / p["step"] for p in last])
        reach = steps_to_reach(results, arm, base["mean"]) if base else None
        lines.append(" | ".join([
            f"| {setup['arms'][arm]['description'] if arm in setup.get('arms', {}) else arm}",
            f"{s['start']:.3f}", f"{s['mean']:.3f} ± {s['spread']:.3f}", f"{s['min']:.3f}–{s['max']:.3f}",
            _paired_cell(paired(results, arm)) if base and arm != BASELINE else "–",
            ("never" if reach is None else str(reach)) if base else "–",
            f"{np.mean([p['train_verify'] for p in last]):.3f}",
            f"{np.mean(dpo):.3f}" if dpo else "– (no PRM)", f"{np.mean(auroc):.3f}" if auroc else "–",
            f"{per_step:.1f} |"]))
    return "\n".join(lines) + "\n\n" + answer(results)


def _paired_cell(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "–"
    ci = "" if p["ci95"] is None else f" [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
    return f"{p['mean']:+.3f}{ci} ({p['seeds_above']}/{p['seeds']})"


def answer(results: Mapping[str, Any]) -> str:
    """The comparison's answer in sentences, every number from `results`: outcome-only RLOO's gain seed by seed, when
    PRIME reaches RLOO's final score (the paper's 2.5x claim), PRIME's paired difference, and whether the gains follow
    the PRM's step credit."""
    setup, summary = results["setup"], final_summary(results)
    base, total = summary.get(BASELINE), setup["total_steps"]
    if base is None:
        return ""
    starts = {s: points[0]["heldout"] for s, points in results["runs"][BASELINE].items()}
    gains = {s: points[-1]["heldout"] - starts[s] for s, points in results["runs"][BASELINE].items()}
    text = (f"Outcome-only RLOO goes from {base['start']:.3f} (step 0) to {base['mean']:.3f} (mean over seeds, step "
            f"{total}); its gain per seed: " + ", ".join(f"{g:+.3f}" for g in gains.values()) + ".")
    if PRIME in summary:
        reach = steps_to_reach(results, PRIME, base["mean"])
        text += (" PRIME " + (f"first reaches that score (seed mean) at step {reach} of {total} ({total / reach:.1f}x "
                              "fewer steps; the paper: 2.5x)" if reach is not None else "never reaches it")
                 + f" and ends at {summary[PRIME]['mean']:.3f}")
        p = paired(results, PRIME)
        if p is not None:
            text += f"; paired by seed, PRIME - RLOO = {_paired_cell(p)} seeds above."
        if base["mean"] <= base["start"]:
            text += " Outcome-only RLOO ends at or below its starting score, so there is no gain to reach sooner."
    credit = credit_vs_gain(results)
    if credit["spearman_gain_step_auroc"] is not None:
        text += (f" Over the {len(credit['runs'])} runs with a PRM, the Spearman correlation of held-out gain with the "
                 f"PRM's mean step AUROC is {credit['spearman_gain_step_auroc']:+.2f}.")
    return text


def plot(results: Mapping[str, Any], path: str) -> str:
    """Left: held-out score vs step; right: the PRM's step AUROC (window means) vs step, for the arms with a PRM;
    seed mean (line) and min-max band per arm, one colour per arm in both; ablations dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    fig, (ax, credit) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    ablations = set(setup.get("ablations", []))
    for i, arm in enumerate(results["runs"]):
        label = setup["arms"][arm]["description"] if arm in setup.get("arms", {}) else arm
        color, style = f"C{i % 10}", "--" if arm in ablations else "-"
        steps, values = curve(results, arm)
        ax.plot(steps, values.mean(axis=0), marker="o", color=color, linestyle=style, label=label)
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15)
        steps, values = curve(results, arm, "step_auroc")
        keep = ~np.isnan(values).any(axis=0) & (steps > 0)
        if keep.any():
            credit.plot(steps[keep], values[:, keep].mean(axis=0), marker="o", color=color, linestyle=style)
            credit.fill_between(steps[keep], values[:, keep].min(axis=0), values[:, keep].max(axis=0), color=color,
                                alpha=0.15)
    h = setup.get("heldout", {})
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"held-out score (avg@{h.get('k', '?')}, T={h.get('temperature', '?')})")
    seeds = f"{len(setup.get('seeds', []))} seeds: mean and min–max band"
    if ablations:
        seeds += f"; ablations (dashed): seeds {', '.join(map(str, setup.get('ablation_seeds', [])))}"
    ax.set_title(f"{setup.get('task', '')}\n{seeds}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    credit.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    credit.set_xlabel("RL step")
    credit.set_ylabel("PRM step AUROC (right vs first wrong step)")
    credit.set_title("process credit: 0.5 = the PRM cannot tell the first wrong step", fontsize=9)
    credit.grid(alpha=0.3)
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

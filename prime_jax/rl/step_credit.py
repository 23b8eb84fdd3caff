"""Step-credit diagnostics of the implicit PRM: does its process reward single out the step that went wrong?

Host-side numpy, on a step's batch, from the token rewards the PRM gave before its update on each row's mini-batch
(`PrmStepOutput.before`, what reward_model/dpo_acc_before reads). Only rows with step labels take part: the trained
rows of synthetic math and code tasks (`prime_jax.data.steps`); real datasets have no step labels and are left out. A step's reward is the sum of the token rewards of the tokens its line covers (`step_rewards`).

Metrics (`credit_metrics`), each left out when it has nothing to average:
- prm/step_auroc: AUROC of step rewards, right steps (those before their response's first wrong step, or all of a
  response's right steps when it has none) against first wrong steps (`step_auroc`); 0.5 = no separation.
- prm/first_error_top1: over responses with a first wrong step, how often their lowest-reward step is that one;
  prm/first_error_chance: the same for a uniformly random pick, mean of 1 / steps (`first_error_top1`).
  Malformed lines are no candidates in either (they have no arithmetic to be right or wrong).
- prm/steps_right, prm/steps_wrong, prm/steps_malformed: step lines of each label over the labelled rows;
  prm/first_error_rows: the responses with a first wrong step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from prime_jax.data.steps import LABELS, StepLabels, label_steps
from prime_jax.data.synthetic import task_chain
from prime_jax.models.tokenizer import token_char_ends
from prime_jax.rl.collect import Experience


def step_rewards(rewards: np.ndarray, ends: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Reward of each step line: rewards [T'] float (T' >= T, one row's token rewards), ends [T] int (its tokens'
    `token_char_ends`), spans [S, 2] int (the lines' character spans) -> [S] float64, the sum over the tokens whose
    text overlaps the line. A token straddling two lines counts for both; a token without text (the EOS) for none."""
    starts = np.concatenate([[0], ends[:-1]])
    covers = (starts[None, :] < spans[:, 1:]) & (ends[None, :] > spans[:, :1])      # [S, T]
    return covers @ np.asarray(rewards[:len(ends)], np.float64)


def step_auroc(right: np.ndarray, wrong: np.ndarray) -> float | None:
    """P(reward of a right step > reward of a first wrong step), ties counting half, over all pairs: right [P],
    wrong [N] -> AUROC in [0, 1]; None when either is empty. Sorted counts, O((P + N) log N)."""
    if not len(right) or not len(wrong):
        return None
    w = np.sort(wrong)
    below = np.searchsorted(w, right, "left")
    tied = np.searchsorted(w, right, "right") - below
    return float(np.sum(below + 0.5 * tied) / (len(right) * len(w)))


def first_error_top1(rewards: Sequence[np.ndarray], first_wrong: Sequence[int]) -> tuple[float, float] | None:
    """(top-1 rate, chance rate) of locating the first error by the lowest step reward; None without responses.

    rewards: per response [S_i] float, its candidate steps' rewards; first_wrong: the index of its first wrong step
    among them. A response scores 1 when that step alone has the lowest reward, 1/m when it is one of m steps tied
    at the lowest (the expectation of a random tie-break, so all-equal rewards score exactly the chance rate), else
    0. Chance: a uniformly random step, 1/S_i. Both are means over the responses.
    """
    if not len(rewards):
        return None
    hits, chance = [], []
    for r, k in zip(rewards, first_wrong):
        lowest = r == r.min()
        hits.append(lowest[k] / lowest.sum())
        chance.append(1.0 / len(r))
    return float(np.mean(hits)), float(np.mean(chance))


@dataclasses.dataclass(frozen=True)
class LabelledRow:
    """A batch row with step labels: row index, its `StepLabels`, its tokens' `token_char_ends` [T]."""

    row: int
    steps: StepLabels
    ends: np.ndarray


def label_rows(exp: Experience, decode: Callable[[Sequence[int]], str]) -> list[LabelledRow]:
    """The trained rows of synthetic tasks in `exp`, their responses (valid tokens, `decode`d) labelled against
    the task's chain; [] when the batch has none."""
    out = []
    for g, prompt in enumerate(exp.prompts):
        chain = task_chain(prompt.example)
        if chain is None:
            continue
        for row in range(g * exp.n, (g + 1) * exp.n):
            if exp.trained[row]:
                ids = exp.tokens[row, :int(exp.mask[row].sum())].tolist()
                out.append(LabelledRow(row, label_steps(chain, decode(ids)), token_char_ends(decode, ids)))
    return out


def credit_metrics(rows: Sequence[LabelledRow], rewards: np.ndarray) -> dict[str, float]:
    """The module's metrics over `rows` (`label_rows`) from the PRM's token rewards [B, R] float32 of the batch."""
    right, first_wrong, candidates, first_index = [], [], [], []
    for lr in rows:
        labels = np.array(lr.steps.labels, dtype=str)
        r = step_rewards(rewards[lr.row], lr.ends, lr.steps.spans)
        stop = len(labels) if lr.steps.first_wrong is None else lr.steps.first_wrong
        right.append(r[:stop][labels[:stop] == "right"])
        if lr.steps.first_wrong is not None:
            formed = labels != "malformed"
            first_wrong.append(r[stop])
            candidates.append(r[formed])
            first_index.append(int(np.sum(formed[:stop])))
    metrics = {f"prm/steps_{label}": float(sum(lr.steps.count(label) for lr in rows)) for label in LABELS}
    metrics["prm/first_error_rows"] = float(len(first_wrong))
    auroc = step_auroc(np.concatenate([np.zeros(0), *right]), np.array(first_wrong))
    if auroc is not None:
        metrics["prm/step_auroc"] = auroc
    top1 = first_error_top1(candidates, first_index)
    if top1 is not None:
        metrics["prm/first_error_top1"], metrics["prm/first_error_chance"] = top1
    return metrics

"""Shared by the peer runners (trl_grpo.py, tunix_grpo.py), which run in their own virtualenvs: the workload file,
the math-verify reward both peers grade with, per-step timers and the one JSON line a runner prints.

Needs only the standard library and math-verify (each peer's requirements pin math-verify==0.9.0).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time

RESULT_PREFIX = "PEER_RESULT "  # the line vs_peers.py reads: this prefix, then one JSON object


def load_workload(path: str) -> dict:
    """The workload vs_peers.py wrote: model dir, prompts (chat messages + ground truth), n, lengths, lr, steps."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def math_reward(completions: list[str], solutions: list[str]) -> list[float]:
    """1.0 where math-verify finds the completion's answer equal to the ground truth, else 0.0.

    The comparison of TRL's `trl.rewards.accuracy_reward` (math-verify's documented use): the ground truth parsed
    from `\\boxed{truth}`, the completion parsed with LaTeX extraction (a `\\boxed{}` first, no un-anchored
    guesses), `verify` of the two; math-verify's SIGALRM timeouts in the main thread (10 s parse, 5 s verify).
    """
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    main = threading.current_thread() is threading.main_thread()
    parse_timeout, verify_timeout = (10, 5) if main else (None, None)
    if not main:
        logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
        logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    extraction = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                        try_extract_without_anchor=False)]
    rewards = []
    for text, truth in zip(completions, solutions, strict=True):
        gold = parse("\\boxed{" + truth + "}", parsing_timeout=parse_timeout)
        if not gold:
            rewards.append(0.0)
            continue
        answer = parse(text, extraction_config=extraction, extraction_mode="first_match", parsing_timeout=parse_timeout)
        rewards.append(float(verify(gold, answer, timeout_seconds=verify_timeout)))
    return rewards


class StepClock:
    """Wall-clock seconds per step and per named phase within it. `begin_step()` opens step k (closing k-1);
    `phase(name)` adds the seconds of a block to the open step; `end()` closes the last step."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.steps: list[dict[str, float]] = []
        self._t0: float | None = None

    def begin_step(self) -> None:
        now = time.perf_counter()
        if self._t0 is not None:
            self._close(now)
        self.steps.append({})
        self._t0 = now

    def end(self) -> None:
        if self._t0 is not None and "step" not in self.steps[-1]:
            self._close(time.perf_counter())
        self._t0 = None

    def _close(self, now: float) -> None:
        s = self.steps[-1]
        s["step"] = now - self._t0
        print(f"[peer] step {len(self.steps)}/{self.total} s {s['step']:.3g} gen {s.get('gen', 0.0):.3g} "
              f"grade {s.get('grade', 0.0):.3g} tokens {s.get('gen_tokens', 0.0):.0f}", flush=True)

    def add(self, name: str, value: float) -> None:
        if self.steps:
            self.steps[-1][name] = self.steps[-1].get(name, 0.0) + value

    def timed(self, name: str, fn):
        """`fn` wrapped so that each call's wall seconds add to phase `name` of the open step."""

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)

        return wrapper


def summarize(steps: list[dict[str, float]], warmup: int) -> dict:
    """Medians over the steps after `warmup`: step, gen, grade (all exposed: the peers grade after generating),
    train (= step - gen - grade: everything else in the step, the policy update included) and generated tokens."""
    timed = steps[warmup:]
    if not timed:
        raise SystemExit(f"no timed steps: {len(steps)} steps ran, {warmup} of them warm-up")

    def med(key: str) -> float:
        return float(statistics.median(s.get(key, 0.0) for s in timed))

    for s in timed:
        s["train"] = s["step"] - s.get("gen", 0.0) - s.get("grade", 0.0)
    return {"step_s": med("step"), "gen_s": med("gen"), "grade_s": med("grade"), "grade_exposed_s": med("grade"),
            "train_s": med("train"), "gen_tokens": med("gen_tokens"), "timed_steps": len(timed),
            "per_step": steps}


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)

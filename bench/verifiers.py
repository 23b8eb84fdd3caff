"""Verifier throughput: verifications/s through VerifierPool vs the single-process direct call.

Math: the 500 MATH-500 reference solutions (a boxed answer at the end of worked text), each
against its expected answer and against the next problem's answer (1000 verifications). Code: the 164 HumanEval canonical solutions and 399 MBPP reference
solutions against their tests (each one sandboxed run). Prints, for each, verifications/s through
the pool (`--workers`, default 2) and through a plain loop calling `math.score` / `code.score`
in this process, and their ratio. Pool start-up and one warm-up call per path are excluded; the
two paths alternate over `--slices` slices of the rows so that both see the same background load.
Code start-up: the same code rows, direct, in this process's reused sandbox (a waiting interpreter
that forks per item, the default) against a fresh sandbox and interpreter per item (`reuse_sandbox=False`,
how every item ran before), alternating slices likewise; prints ms per item for both and their ratio.
Run: `python bench/verifiers.py [--workers 2 --math-rows 1000 --code-rows 563] [--startup-only]` (`--startup-only`:
the code start-up comparison alone). Prints which interpreter ran (`sys.prefix`): one under /tmp (e.g. a fresh
clone's .venv there) shows that its runs still fork from the reused sandbox.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from prime_jax.verifiers import code as code_verifier  # noqa: E402
from prime_jax.verifiers import math as math_verifier  # noqa: E402
from prime_jax.verifiers.pool import VerifierPool, VerifyItem  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "benchmarks"


def math_items() -> list[VerifyItem]:
    """Each MATH-500 solution against its own answer and against the next problem's (a wrong
    answer, which takes the full math-verify comparison as most wrong responses do), interleaved."""
    table = json.loads((BENCH / "math500.json").read_text())
    keys = sorted(table["solution"], key=int)
    items = []
    for k, other in zip(keys, keys[1:] + keys[:1]):
        items.append(VerifyItem(table["solution"][k], "math", table["expected_answer"][k]))
        items.append(VerifyItem(table["solution"][k], "math", table["expected_answer"][other]))
    return items


def code_items() -> list[VerifyItem]:
    items = []
    with gzip.open(BENCH / "humaneval.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            truth = {"prelude": r["test"], "asserts": [f"check({r['entry_point']})"]}
            response = f"```python\n{r['prompt']}{r['canonical_solution']}\n```"
            items.append(VerifyItem(response, "code", json.dumps(truth)))
    for r in json.loads((BENCH / "mbpp.json").read_text()):
        truth = {"prelude": "\n".join(r["test_imports"]), "asserts": r["test_list"]}
        items.append(VerifyItem(f"```python\n{r['code']}\n```", "code", json.dumps(truth)))
    return items


def direct(items: list[VerifyItem], **code_options: bool) -> tuple[float, np.ndarray]:
    """(seconds, scores) of calling the verifier in this process, one item after another."""
    if items[0].ability == "math":
        score = math_verifier.score
    else:
        score = functools.partial(code_verifier.score, **code_options)
    start = time.perf_counter()
    scores = np.array([score(item.response, item.ground_truth) for item in items], np.float32)
    return time.perf_counter() - start, scores


def pooled(pool: VerifierPool, items: list[VerifyItem]) -> tuple[float, np.ndarray]:
    """(seconds, scores) of one score_batch call over `items`."""
    start = time.perf_counter()
    result = pool.score_batch(items)
    seconds = time.perf_counter() - start
    failures = {k: v for k, v in result.counts.items() if v}
    if failures:
        print(f"  (pool counted failures: {failures})")
    return seconds, result.scores


def pool_vs_direct(sets: dict[str, list[VerifyItem]], workers: int, slices: int) -> None:
    """Prints verifications/s through the pool and through the direct call, for each set of items."""
    with VerifierPool(workers, item_timeout_s=120.0, batch_timeout_s=3600.0) as pool:
        for name, items in sets.items():
            if not items:
                continue
            pool.score_batch(items[:workers])  # warm-up: every worker has scored once
            direct(items[:1])
            # Alternating slices make both paths see the same background load on a shared host.
            times, scores = {"pool": 0.0, "direct": 0.0}, {"pool": [], "direct": []}
            for part in np.array_split(np.arange(len(items)), slices):
                chunk = [items[i] for i in part]
                for path, (seconds, got) in (("pool", pooled(pool, chunk)), ("direct", direct(chunk))):
                    times[path] += seconds
                    scores[path].append(got)
            pool_scores, direct_scores = np.concatenate(scores["pool"]), np.concatenate(scores["direct"])
            pool_rate, direct_rate = len(items) / times["pool"], len(items) / times["direct"]
            print(
                f"{name}: {pool_rate:7.1f} verifications/s through VerifierPool({workers} workers) | "
                f"single-process direct {name}.score: {direct_rate:7.1f}/s | ratio {pool_rate / direct_rate:.2f}x "
                f"({len(items)} rows, mean score {pool_scores.mean():.3f}, "
                f"{int((pool_scores != direct_scores).sum())} scores differ between the two, {os.cpu_count()} CPUs)"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--math-rows", type=int, default=1000)
    ap.add_argument("--code-rows", type=int, default=563)
    ap.add_argument("--slices", type=int, default=5, help="pool and direct alternate over this many slices")
    ap.add_argument("--startup-only", action="store_true", help="only the code start-up comparison (reused vs fresh)")
    args = ap.parse_args()
    sets = {"math": math_items()[: args.math_rows], "code": code_items()[: args.code_rows]}
    if not args.startup_only:
        pool_vs_direct(sets, args.workers, args.slices)
    code = sets["code"]
    if code:
        times, scores = {"reused": 0.0, "fresh": 0.0}, {"reused": [], "fresh": []}
        direct(code[:1], reuse_sandbox=False)
        for part in np.array_split(np.arange(len(code)), args.slices):
            chunk = [code[i] for i in part]
            for path in ("reused", "fresh"):
                seconds, got = direct(chunk, reuse_sandbox=path == "reused")
                times[path] += seconds
                scores[path].append(got)
        reused, fresh = (1000 * times[p] / len(code) for p in ("reused", "fresh"))
        differ = int((np.concatenate(scores["reused"]) != np.concatenate(scores["fresh"])).sum())
        print(f"interpreter: {sys.prefix}")
        print(f"code start-up: {reused:6.1f} ms/item in the reused sandbox | {fresh:6.1f} ms/item with a fresh sandbox "
              f"per item | ratio {fresh / reused:.2f}x faster ({len(code)} rows, {differ} scores differ)")


if __name__ == "__main__":
    main()

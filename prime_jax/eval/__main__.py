"""pass@1 (greedy) and avg@k (sampled) of a checkpoint on PRIME's benchmarks, printed in the paper's Table 1 layout.

    python -m prime_jax.eval --model=DIR --benchmarks=math500,aime24 --data_root=../shared/data/benchmarks \\
        [--k=16 --temperature=0.3 --top_p=0.95] [--max_new_tokens=0 --limit=0 --memory_gb=4]

`--k=16 --temperature=0.3 --top_p=0.95` is the avg@16 mode PRIME's authors recommend next to greedy pass@1.
`--benchmarks=validation --config=configs/tiny.py` is the validation set of that run (for the built-in run,
its synthetic held-out prompts) with the run's verifier settings.
A response counts as solved when its verifier score is 1.0 (math: the answer is right; code: every test the
code verifier runs passes; like the reference's training reward it runs a problem's first 10 tests, so
LiveCodeBench problems with more tests are judged on their first 10, public ones first). Each benchmark
answers with its paper token limit (`MAX_NEW_TOKENS`) unless `--max_new_tokens` is given.
Writes `<output_dir>/<UTC time>/results.json` and `table.md`.

Prompts longer than the model's context (`--context`, default `max_position_embeddings`) minus
`--min_response_tokens` are skipped and counted; prompts per sampler call are the most whose estimated sampler
buffers fit in `--memory_gb` (see `scoring`, which does the sampling and scoring, shared with the trainer).
Bad flags or missing benchmark files stop the command with one line before any model is loaded.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from prime_jax import cli
from prime_jax import settings as settings_lib
from prime_jax.data.benchmarks import MAX_NEW_TOKENS, TABLE1, benchmark_path
from prime_jax.eval.scoring import VALIDATION, Scored, score_examples
from prime_jax.sampling import generate
from prime_jax.verifiers.pool import VerifierPool

GIB = 2**30


def check_request(benchmarks: Sequence[str], data_root: str, *, k: int, temperature: float, top_p: float,
                  max_new_tokens: int, limit: int, batch_size: int, memory_gb: float, min_response_tokens: int,
                  context: int = 0, has_config: bool) -> None:
    """One-line ValueError / FileNotFoundError naming the flag or file that is wrong, before any model is loaded."""
    if not benchmarks:
        raise ValueError("--benchmarks is empty")
    rules = (("k", k, k >= 1, ">= 1"), ("temperature", temperature, temperature >= 0, ">= 0 (0 = greedy)"),
             ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
             ("max_new_tokens", max_new_tokens, max_new_tokens >= 0, ">= 0 (0 = per-benchmark default)"),
             ("limit", limit, limit >= 0, ">= 0 (0 = all)"), ("batch_size", batch_size, batch_size >= 1, ">= 1"),
             ("memory_gb", memory_gb, memory_gb >= 0, ">= 0 (0 = no budget)"),
             ("min_response_tokens", min_response_tokens, min_response_tokens >= 1, ">= 1"),
             ("context", context, context >= 0, ">= 0 (0 = the model's max_position_embeddings)"))
    for name, value, ok, rule in rules:
        if not ok:
            raise ValueError(f"--{name} must be {rule}, got {value}")
    for name in benchmarks:
        if name == VALIDATION:
            if not has_config:
                raise ValueError("--benchmarks=validation needs --config (the run whose validation set to use)")
        else:
            benchmark_path(name, data_root)


def benchmark_result(scored: Scored, k: int, seconds: float) -> dict:
    """The results-JSON entry of one benchmark; scores in percent, `score` is pass@1 (k = 1) or avg@k of solved."""
    solved = scored.scores >= 1.0
    pct = lambda x: 100.0 * float(np.mean(x, dtype=np.float64)) if len(scored.examples) else None  # noqa: E731
    return {"metric": "pass@1" if k == 1 else f"avg@{k}", "score": pct(solved), "pass@1": pct(solved[:, 0]),
            "mean_verifier_score": pct(scored.scores),
            "mean_response_tokens": float(np.mean(scored.lengths)) if len(scored.examples) else None,
            "scored": len(scored.examples), "skipped_too_long": scored.skipped,
            "max_new_tokens": scored.max_new_tokens, "prompts_per_call": scored.prompts_per_call,
            "verifier_faults": scored.faults, "seconds": round(seconds, 1)}


def table1_row(results: dict[str, dict]) -> dict[str, float | None]:
    """Table 1 columns (None where the benchmark was not run or nothing was scored) and their average."""
    row = {heading: (results[name]["score"] if name in results else None) for heading, name in TABLE1}
    present = [v for v in row.values() if v is not None]
    row["Avg"] = float(np.mean(present)) if present else None
    return row


def render_tables(label: str, results: dict[str, dict]) -> str:
    """Markdown: the paper's Table 1 layout, then any other benchmarks run; one decimal, "–" where not run."""
    cell = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    row = table1_row(results)
    metric = next(iter(results.values()))["metric"] if results else "pass@1"
    lines = [f"| model ({metric}) | " + " | ".join(row) + " |", "|---" * (len(row) + 1) + "|",
             f"| {label} | " + " | ".join(cell(v) for v in row.values()) + " |"]
    averaged = sum(v is not None for v in row.values()) - (row["Avg"] is not None)
    if 0 < averaged < len(TABLE1):
        lines.append(f"\nAvg over the {averaged} of {len(TABLE1)} Table 1 benchmarks run.")
    others = [name for name in results if name not in dict(TABLE1).values()]
    if others:
        lines += ["", f"| model ({metric}) | " + " | ".join(others) + " |", "|---" * (len(others) + 1) + "|",
                  f"| {label} | " + " | ".join(cell(results[n]["score"]) for n in others) + " |"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    from absl import flags

    f = flags.FLAGS
    names = [n.strip() for n in f.benchmarks.split(",") if n.strip()]
    try:
        check_request(names, f.data_root, k=f.k, temperature=f.temperature, top_p=f.top_p, max_new_tokens=f.max_new_tokens,
                      limit=f.limit, batch_size=f.batch_size, memory_gb=f.memory_gb,
                      min_response_tokens=f.min_response_tokens, context=f.context, has_config=f.config is not None)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"prime_jax.eval: {exc}")

    from prime_jax.data.benchmarks import load_benchmark
    from prime_jax.mesh import make_mesh
    from prime_jax.models import load_pretrained
    from prime_jax.models.tokenizer import load_tokenizer

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    run = settings_lib.resolve(f.config, mesh) if f.config is not None else None  # --benchmarks=validation's run
    model = load_pretrained(f.model, mesh=mesh, compute_dtype=f.compute_dtype)
    tokenizer = load_tokenizer(f.tokenizer or f.model)
    sample = functools.partial(generate, model, stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, mesh=mesh)
    context = f.context or model.cfg.max_position_embeddings
    settings = {"k": f.k, "temperature": f.temperature, "top_p": f.top_p, "seed": f.seed, "context": context,
                "min_response_tokens": f.min_response_tokens, "memory_gb": f.memory_gb, "batch_size": f.batch_size,
                "limit": f.limit, "compute_dtype": f.compute_dtype, "max_new_tokens": f.max_new_tokens or "per benchmark",
                "literal_numbers": bool(run and run.verifier.literal_numbers)}
    print(f"model: {os.path.abspath(f.model)}  context {context} tokens; {settings}", flush=True)
    results: dict[str, dict] = {}
    with VerifierPool(f.workers, item_timeout_s=30.0, batch_timeout_s=3600.0,
                      literal_numbers=settings["literal_numbers"]) as pool:
        for name in names:
            t0 = time.perf_counter()
            if name == VALIDATION:
                from prime_jax.components import read_examples

                examples = read_examples(run.data, run.seed, "validation").examples
                limit = run.eval.max_response_length
            else:
                examples, limit = load_benchmark(name, f.data_root), MAX_NEW_TOKENS[name]
            examples = examples[: f.limit or None]
            scored = score_examples(sample, model.cfg, tokenizer, examples, pool,
                                    max_new_tokens=f.max_new_tokens or limit, k=f.k, temperature=f.temperature,
                                    top_p=f.top_p, seed=f.seed, batch_size=f.batch_size, context=context, min_response_tokens=f.min_response_tokens,
                                    memory_bytes=f.memory_gb * GIB,
                                    progress=lambda line, name=name: print(f"{name}: {line}", file=sys.stderr, flush=True))
            if scored.skipped:
                print(f"{name}: skipped {scored.skipped} of {len(examples)} prompts longer than "
                      f"{context - f.min_response_tokens} tokens (context {context} - {f.min_response_tokens} "
                      "response tokens)", flush=True)
            results[name] = benchmark_result(scored, f.k, time.perf_counter() - t0)
            r = results[name]
            score = "–" if r["score"] is None else f"{r['score']:.1f}"
            print(f"{name}: {r['metric']} {score} on {r['scored']} prompts ({r['skipped_too_long']} skipped), "
                  f"max_new_tokens {r['max_new_tokens']}, {r['prompts_per_call']} prompts per call, {r['seconds']:.0f} s",
                  flush=True)
    table = render_tables(f.model, results)
    out_dir = os.path.join(f.output_dir, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as fp:
        json.dump({"model": os.path.abspath(f.model), "tokenizer": os.path.abspath(f.tokenizer or f.model),
                   "settings": settings, "benchmarks": results, "table1": table1_row(results)}, fp, indent=2)
    with open(os.path.join(out_dir, "table.md"), "w") as fp:
        fp.write(table)
    print("\n" + table + f"\nresults: {os.path.join(out_dir, 'results.json')}  table: {os.path.join(out_dir, 'table.md')}")


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("model", None, "HF model directory (e.g. an exported policy)", required=True)
    flags.DEFINE_string("tokenizer", "", "tokenizer directory or .model file (default: --model)")
    flags.DEFINE_string("benchmarks", ",".join(name for _, name in TABLE1),
                        "comma-separated: " + ", ".join(sorted(MAX_NEW_TOKENS)) + ", validation (with --config)")
    flags.DEFINE_string("data_root", "../shared/data/benchmarks", "folder with the benchmark files")
    cli.config_flag("a run's configs/*.py: its validation set is --benchmarks=validation, and its verifier "
                    "settings apply")
    flags.DEFINE_integer("k", 1, "samples per problem (avg@k); pass@1 is the first sample")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling")
    flags.DEFINE_integer("max_new_tokens", 0, "response length limit (0: the paper's per-benchmark limit)")
    flags.DEFINE_integer("limit", 0, "first N problems per benchmark (0 = all)")
    flags.DEFINE_integer("context", 0, "prompt + response token limit (0: the model's max_position_embeddings)")
    flags.DEFINE_integer("min_response_tokens", 64, "prompts longer than context - this are skipped and counted")
    flags.DEFINE_float("memory_gb", 4.0, "budget for one sampler call's KV cache + prefill attention scores (0: none)")
    flags.DEFINE_integer("batch_size", 256, "most prompts per sampler call")
    flags.DEFINE_integer("workers", 4, "verifier processes")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_string("compute_dtype", "float32", "float32 | bfloat16")
    flags.DEFINE_string("output_dir", "eval_results", "results.json and table.md go to <output_dir>/<UTC time>/")
    cli.run(main, needs_config=False)

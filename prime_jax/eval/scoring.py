"""pass@1 (greedy) and avg@k (sampled) of a checkpoint on PRIME's benchmarks, printed in the paper's Table 1 layout.

    python -m prime_jax.eval.scoring --model=DIR --benchmarks=math500,aime24 --data_root=../shared/data/benchmarks \
        [--k=16 --temperature=0.3 --top_p=0.95] [--max_new_tokens=0 --limit=0 --memory_gb=4]

`--k=16 --temperature=0.3 --top_p=0.95` is the avg@16 mode PRIME's authors recommend next to greedy pass@1.
`--benchmarks=validation --config=configs/tiny.py` is the validation set of that run (for the built-in run,
its synthetic held-out prompts) with the run's verifier settings.
A response counts as solved when its verifier score is 1.0 (math: the answer is right; code: every test the
code verifier runs passes; like the reference's training reward it runs a problem's first 10 tests, so
LiveCodeBench problems with more tests are judged on their first 10, public ones first). Each benchmark
answers with its paper token limit (`MAX_NEW_TOKENS`) unless `--max_new_tokens` is given.
Writes `<output_dir>/<UTC time>/results.json` and `table.md`.

Memory: a prompt longer than the model's context (`--context`, default `max_position_embeddings`) minus
`--min_response_tokens` is skipped and counted, as the reference filters prompts by length; each response
stops where the context ends. Prompts per sampler call are the most whose estimated sampler buffers
(`sampler_call_bytes`: KV cache and one layer's prefill attention scores) fit in `--memory_gb`.

The trainer's periodic validation runs the same `score_examples` (same sampler, same verifier pool).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prime_jax.data.benchmarks import MAX_NEW_TOKENS, TABLE1, benchmark_path
from prime_jax.data.example import Example
from prime_jax.rl.collect import Prompt, verify
from prime_jax.models import Decoder, ModelConfig
from prime_jax.models.tokenizer import Tokenizer
from prime_jax.verifiers.pool import VerifierPool
from prime_jax.sampling import SamplerConfig, SamplingParams, generate, length_buckets

GIB = 2**30
# Sampler call c draws with seed + c * SEED_STRIDE: one call draws exactly what `generate(seed=seed)` draws.
SEED_STRIDE = 1_000_003
VALIDATION = "validation"  # the validation set of the run given by --config (the built-in run: synthetic held-out)


@dataclasses.dataclass
class Scored:
    """Result of `score_examples`: the examples whose prompt fits the context, their scores [len(examples), k]
    (verifier scores in [0, 1]) and response lengths [len(examples), k] (tokens, cut at the context), how
    many examples were skipped as too long, verifier failure counts, and the sampler settings used."""

    examples: list[Example]
    scores: np.ndarray
    lengths: np.ndarray
    skipped: int
    faults: dict[str, int]
    max_new_tokens: int = 0
    prompts_per_call: int = 0


def sampler_call_bytes(cfg: ModelConfig, prompts: int, prompt_len: int, max_new_tokens: int, n: int) -> dict[str, int]:
    """Bytes of the largest buffers of a sampler with `prompts` x n rows in flight, for prompts padded to
    `prompt_len` tokens (model params not counted):

    kv_cache: the sampler's cache of every row, prompt slots + a ring of max_new_tokens (`SamplerConfig`);
    prefill_kv_cache: one insert's prefill keys/values [L, max_prefill, K, prompt_len, Dh] before they are
      copied into the rows' slots;
    attention_scores: one layer's prefill scores [max_prefill, H, prompt_len, prompt_len] fp32, three copies
      (scores, masked, softmax), plus the bool mask: the prompt-length^2 term, and the largest single buffer.
    """
    sampler = SamplerConfig(n=n, max_new_tokens=max_new_tokens, sampling=SamplingParams(), rows=prompts * n)
    b = sampler.max_prefill
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return {"kv_cache": sampler.cache_bytes(cfg, prompt_len), "prefill_kv_cache": b * prompt_len * per_slot,
            "attention_scores": b * prompt_len * prompt_len * (3 * 4 * cfg.num_heads + 1)}


def prompts_per_call(cfg: ModelConfig, limit: int, prompt_len: int, max_new_tokens: int, n: int,
                     memory_bytes: float) -> int:
    """The most prompts (1 ... limit) whose `sampler_call_bytes` sum to at most `memory_bytes` (0: no budget)."""
    if memory_bytes <= 0:
        return limit
    per_prompt = sum(sampler_call_bytes(cfg, 1, prompt_len, max_new_tokens, n).values())
    return max(1, min(limit, int(memory_bytes // per_prompt)))


def score_examples(model: Decoder, tokenizer: Tokenizer, examples: Sequence[Example], pool: VerifierPool, *,
                   max_new_tokens: int, k: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 64, mesh: Mesh | None = None, context: int = 0, min_response_tokens: int = 1,
                   memory_bytes: float = 0, progress: Callable[[str], None] | None = None) -> Scored:
    """Samples k responses per example and scores them with the verifier pool.

    Prompts longer than `context` (0: the model's max_position_embeddings) minus `min_response_tokens` are
    skipped; a response is cut where the context ends (prompt + response <= context). Prompts go to the
    sampler in calls of at most `batch_size` (fewer if `memory_bytes` > 0 says so), each padded to the same
    shape; call c samples with seed + c * SEED_STRIDE. `progress` gets a line first, then one per call.
    """
    context = context or model.cfg.max_position_embeddings
    prompts = [Prompt(ex, tuple(tokenizer.encode(tokenizer.apply_chat_template(ex.prompt)))) for ex in examples]
    kept = [p for p in prompts if len(p.ids) <= context - min_response_tokens]
    skipped = len(prompts) - len(kept)
    if not kept:
        return Scored([], np.zeros((0, k), np.float32), np.zeros((0, k), np.int32), skipped, {})
    longest = max(len(p.ids) for p in kept)
    buckets = length_buckets(max(1024, longest))
    max_new = min(max_new_tokens, context - min(len(p.ids) for p in kept))
    per_call = prompts_per_call(model.cfg, min(batch_size, len(kept)), min(b for b in buckets if b >= longest),
                                max_new, k, memory_bytes)
    # Rows may not run past the context: [rows] response tokens allowed.
    allowed = np.repeat([context - len(p.ids) for p in kept], k)
    acc, lengths, faults = [], [], collections.Counter()
    t0 = time.perf_counter()
    if progress is not None:
        progress(f"{len(kept)} prompts x {k} in {-(-len(kept) // per_call)} sampler calls of {per_call}, "
                 f"up to {max_new} new tokens")
    for c, start in enumerate(range(0, len(kept), per_call)):
        chunk = kept[start:start + per_call]
        ids = [list(p.ids) for p in chunk]
        ids += [ids[0]] * (per_call - len(chunk))  # same call shape for the last call: one compile per bucket
        rollout = generate(model, ids, n=k, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                           stop_ids=tokenizer.eos_ids, seed=seed + c * SEED_STRIDE, pad_id=tokenizer.pad_id, mesh=mesh,
                           buckets=buckets, prompts_per_call=per_call)
        rows = len(chunk) * k  # verify reads rows 0 ... rows-1 (the padding copies are dropped)
        cut = np.minimum(rollout.lengths[:rows], allowed[start * k:start * k + rows])
        rollout = dataclasses.replace(rollout, lengths=cut)
        chunk_acc, counts = verify(rollout, chunk, k, tokenizer.decode, pool)
        acc.append(chunk_acc)
        lengths.append(rollout.lengths)
        faults.update(counts)
        if progress is not None:
            done = start + len(chunk)
            progress(f"generated and verified {done}/{len(kept)} prompts x {k} ({time.perf_counter() - t0:.0f} s)")
    return Scored([p.example for p in kept], np.concatenate(acc).reshape(len(kept), k),
                  np.concatenate(lengths).reshape(len(kept), k), skipped, {key: v for key, v in faults.items() if v},
                  max_new_tokens=max_new, prompts_per_call=per_call)


def summarize(examples: Sequence[Example], scores: np.ndarray, prefix: str = "val/test_score") -> dict[str, float]:
    """Mean score per data source and over all examples: {prefix/<source>: x, prefix/all: x}."""
    by_source: dict[str, list[float]] = collections.defaultdict(list)
    for ex, s in zip(examples, scores.mean(axis=1)):
        by_source[ex.data_source].append(float(s))
    out = {f"{prefix}/{src}": float(np.mean(v)) for src, v in sorted(by_source.items())}
    out[f"{prefix}/all"] = float(np.mean(scores)) if len(scores) else 0.0
    return out


# --- the command line ----------------------------------------------------------------------------------

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
        sys.exit(f"evaluate: {exc}")

    from prime_jax.data.benchmarks import load_benchmark
    from prime_jax.mesh import make_mesh
    from prime_jax.models import load_pretrained
    from prime_jax.models.tokenizer import load_tokenizer

    c = f.config
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = load_pretrained(f.model, mesh=mesh, compute_dtype=f.compute_dtype)
    tokenizer = load_tokenizer(f.tokenizer or f.model)
    context = f.context or model.cfg.max_position_embeddings
    settings = {"k": f.k, "temperature": f.temperature, "top_p": f.top_p, "seed": f.seed, "context": context,
                "min_response_tokens": f.min_response_tokens, "memory_gb": f.memory_gb, "batch_size": f.batch_size,
                "limit": f.limit, "compute_dtype": f.compute_dtype, "max_new_tokens": f.max_new_tokens or "per benchmark",
                "literal_numbers": bool(c and c.verifier.literal_numbers)}
    print(f"model: {os.path.abspath(f.model)}  context {context} tokens; {settings}", flush=True)
    results: dict[str, dict] = {}
    with VerifierPool(f.workers, item_timeout_s=30.0, batch_timeout_s=3600.0,
                      literal_numbers=settings["literal_numbers"]) as pool:
        for name in names:
            t0 = time.perf_counter()
            if name == VALIDATION:
                from prime_jax.components import read_examples

                examples = read_examples(c, "validation").examples
                limit = c.eval.max_response_length or c.rollout.max_response_length
            else:
                examples, limit = load_benchmark(name, f.data_root), MAX_NEW_TOKENS[name]
            examples = examples[: f.limit or None]
            scored = score_examples(model, tokenizer, examples, pool, max_new_tokens=f.max_new_tokens or limit, k=f.k,
                                    temperature=f.temperature, top_p=f.top_p, seed=f.seed, batch_size=f.batch_size,
                                    mesh=mesh, context=context, min_response_tokens=f.min_response_tokens,
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
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("model", None, "HF model directory (e.g. an exported policy)", required=True)
    flags.DEFINE_string("tokenizer", "", "tokenizer directory or .model file (default: --model)")
    flags.DEFINE_string("benchmarks", ",".join(name for _, name in TABLE1),
                        "comma-separated: " + ", ".join(sorted(MAX_NEW_TOKENS)) + ", validation (with --config)")
    flags.DEFINE_string("data_root", "../shared/data/benchmarks", "folder with the benchmark files")
    config_flags.DEFINE_config_file("config", None, "a run's configs/*.py: its validation set is "
                                    "--benchmarks=validation, and its verifier settings apply")
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
    app.run(main)

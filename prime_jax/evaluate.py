"""pass@1 (greedy) and avg@k (sampled) of a checkpoint on benchmark files, with the PRIME prompt.

    python -m prime_jax.evaluate --model=DIR --benchmarks=math500,humaneval \
        --data_root=../shared/data/benchmarks [--k=1 --temperature=0 --max_new_tokens=4096 --limit=0]

The trainer's periodic validation uses the same `score_examples`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from prime_jax.data.example import Example
from prime_jax.experience import Prompt, verify
from prime_jax.models import Decoder
from prime_jax.models.tokenizer import Tokenizer
from prime_jax.rewards.pool import VerifierPool
from prime_jax.sampling import generate, length_buckets


def score_examples(model: Decoder, tokenizer: Tokenizer, examples: Sequence[Example], pool: VerifierPool, *,
                   max_new_tokens: int, k: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 64, mesh: Mesh | None = None) -> np.ndarray:
    """Outcome score of k responses per example, `batch_size` prompts per sampler call. -> [len(examples), k]"""
    if not examples:
        return np.zeros((0, k), np.float32)
    prompts = [Prompt(ex, tuple(tokenizer.encode(tokenizer.apply_chat_template(ex.prompt)))) for ex in examples]
    longest = max(len(p.ids) for p in prompts)
    rollout = generate(model, [list(p.ids) for p in prompts], n=k, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, stop_ids=tokenizer.eos_ids, seed=seed,
                       pad_id=tokenizer.pad_id, mesh=mesh, buckets=length_buckets(max(1024, longest)),
                       prompts_per_call=batch_size)
    acc, _ = verify(rollout, prompts, k, tokenizer.decode, pool)
    return acc.reshape(len(examples), k)


def summarize(examples: Sequence[Example], scores: np.ndarray, prefix: str = "val/test_score") -> dict[str, float]:
    """Mean score per data source and over all examples: {prefix/<source>: x, prefix/all: x}."""
    by_source: dict[str, list[float]] = collections.defaultdict(list)
    for ex, s in zip(examples, scores.mean(axis=1)):
        by_source[ex.data_source].append(float(s))
    out = {f"{prefix}/{src}": float(np.mean(v)) for src, v in sorted(by_source.items())}
    out[f"{prefix}/all"] = float(np.mean(scores)) if len(scores) else 0.0
    return out


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from prime_jax.data.benchmarks import load_benchmark
    from prime_jax.mesh import make_mesh
    from prime_jax.models import load_pretrained
    from prime_jax.models.tokenizer import load_tokenizer

    f = flags.FLAGS
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = load_pretrained(f.model, mesh=mesh, compute_dtype=f.compute_dtype)
    tokenizer = load_tokenizer(f.tokenizer or f.model)
    rows = []
    with VerifierPool(f.workers, item_timeout_s=30.0, batch_timeout_s=3600.0) as pool:
        for name in f.benchmarks.split(","):
            examples = load_benchmark(name, f.data_root)[: f.limit or None]
            scores = score_examples(model, tokenizer, examples, pool, max_new_tokens=f.max_new_tokens, k=f.k,
                                    temperature=f.temperature, top_p=f.top_p, seed=f.seed, batch_size=f.batch_size, mesh=mesh)
            rows.append((name, len(examples), 100 * float(scores[:, 0].mean()), 100 * float(scores.mean())))
    print(f"model: {os.path.abspath(f.model)}  k={f.k} temperature={f.temperature} max_new_tokens={f.max_new_tokens}")
    print(f"{'benchmark':<16}{'n':>6}{'pass@1':>10}{f'avg@{f.k}':>10}")
    for name, n, p1, avg in rows:
        print(f"{name:<16}{n:>6}{p1:>10.1f}{avg:>10.1f}")
    if rows:
        print(f"{'average':<16}{'':>6}{np.mean([r[2] for r in rows]):>10.1f}{np.mean([r[3] for r in rows]):>10.1f}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", None, "HF model directory (e.g. an exported policy)", required=True)
    flags.DEFINE_string("tokenizer", "", "tokenizer directory or .model file (default: --model)")
    flags.DEFINE_string("benchmarks", "math500,aime,amc,minerva,olympiadbench,humaneval,mbpp,leetcode", "comma-separated")
    flags.DEFINE_string("data_root", "../shared/data/benchmarks", "folder with the benchmark files")
    flags.DEFINE_integer("k", 1, "samples per problem (avg@k); pass@1 is the first sample")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling")
    flags.DEFINE_integer("max_new_tokens", 4096, "response length limit")
    flags.DEFINE_integer("limit", 0, "first N problems per benchmark (0 = all)")
    flags.DEFINE_integer("batch_size", 64, "prompts per generate call")
    flags.DEFINE_integer("workers", 4, "verifier processes")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_string("compute_dtype", "float32", "float32 | bfloat16")
    app.run(main)

"""Scoring a model on a set of examples: k sampled responses per example, each scored by the verifier pool.

`score_examples` is shared by the trainer's periodic validation and the benchmark command line
(`python -m prime_jax.eval`, in `__main__.py`, which the trainer never imports): same sampler, same verifier
pool. `summarize` turns its scores into per-source means.

Memory: a prompt longer than the model's context minus `min_response_tokens` is skipped and counted, as the
reference filters prompts by length; each response stops where the context ends. Prompts per sampler call are
the most whose estimated sampler buffers (`sampler_call_bytes`: KV cache and one layer's prefill attention
scores) fit in the memory budget (`prompts_per_call`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from prime_jax.data.example import Example
from prime_jax.models import ModelConfig
from prime_jax.models.tokenizer import Tokenizer
from prime_jax.rl.collect import Prompt
from prime_jax.sampling import Rollout, SamplerConfig, SamplingParams, length_buckets
from prime_jax.verifiers.pool import VerifierPool
from prime_jax.verifiers.streaming import verify

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


# (prompts, *, n, max_new_tokens, temperature, top_p, seed, buckets, prompts_per_call) -> Rollout: the trainer's
# `Programs.eval_sample` (the training sampler's knobs), or `generate` bound to a model for the command line.
Sample = Callable[..., Rollout]


def score_examples(sample: Sample, model_cfg: ModelConfig, tokenizer: Tokenizer, examples: Sequence[Example],
                   pool: VerifierPool, *, max_new_tokens: int, k: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0, batch_size: int = 64, context: int = 0, min_response_tokens: int = 1,
                   memory_bytes: float = 0, progress: Callable[[str], None] | None = None) -> Scored:
    """Samples k responses per example with `sample` and scores them with the verifier pool.

    Prompts longer than `context` (0: the model's max_position_embeddings) minus `min_response_tokens` are
    skipped; a response is cut where the context ends (prompt + response <= context). Prompts go to the
    sampler in calls of at most `batch_size` (fewer if `memory_bytes` > 0 says so), each padded to the same
    shape; call c samples with seed + c * SEED_STRIDE. `progress` gets a line first, then one per call.
    """
    context = context or model_cfg.max_position_embeddings
    prompts = [Prompt(ex, tuple(tokenizer.encode(tokenizer.apply_chat_template(ex.prompt)))) for ex in examples]
    kept = [p for p in prompts if len(p.ids) <= context - min_response_tokens]
    skipped = len(prompts) - len(kept)
    if not kept:
        return Scored([], np.zeros((0, k), np.float32), np.zeros((0, k), np.int32), skipped, {})
    longest = max(len(p.ids) for p in kept)
    buckets = length_buckets(max(1024, longest))
    max_new = min(max_new_tokens, context - min(len(p.ids) for p in kept))
    per_call = prompts_per_call(model_cfg, min(batch_size, len(kept)), min(b for b in buckets if b >= longest),
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
        rollout = sample(ids, n=k, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                         seed=seed + c * SEED_STRIDE, buckets=buckets, prompts_per_call=per_call)
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

"""Scoring (`prime_jax.eval.scoring`): prompts longer than a tiny Qwen2's context are skipped and counted while short
ones are sampled and scored as they are alone; the memory estimate against the compiled prefill; `summarize` groups
by source. (The command line: test_cli.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax.data.example import Example
from prime_jax.eval.scoring import prompts_per_call, sampler_call_bytes, score_examples, summarize
from prime_jax.models import Decoder, load_pretrained
from prime_jax.models.tokenizer import load_tokenizer
from prime_jax.sampling import SamplerConfig, SamplingParams, empty_state, generate, insert
from prime_jax.verifiers.pool import VerifierPool
from tests.fixtures import EVAL_CORPUS, tiny_config, write_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A transformers-made tiny Qwen2 checkpoint (context 256) with its tokenizer."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_eval"), EVAL_CORPUS)


def _math(question, i):
    return Example(prompt=[{"role": "user", "content": question}], ability="math", ground_truth="21",
                   data_source="toy", uid=f"toy/{i}")


def test_prompts_longer_than_the_context_are_skipped_and_short_ones_scored(tiny_dir):
    model, tokenizer = load_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    assert model.cfg.max_position_embeddings == 256
    short = [_math(f"Compute 7 * {i}.", i) for i in range(5)]
    long = [_math("What is 12 + 5? " * 60 + f"({i})", 10 + i) for i in range(3)]
    mixed = [long[0], short[0], short[1], long[1], short[2], short[3], long[2], short[4]]
    encode = lambda ex: tokenizer.encode(tokenizer.apply_chat_template(ex.prompt))  # noqa: E731
    assert max(len(encode(e)) for e in short) < 40 and min(len(encode(e)) for e in long) > 256
    lines = []
    sample = functools.partial(generate, model, stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    with VerifierPool(1, item_timeout_s=30.0, batch_timeout_s=300.0) as pool:
        scored = score_examples(sample, model.cfg, tokenizer, mixed, pool, max_new_tokens=300, batch_size=2,
                                min_response_tokens=16, progress=lines.append)
        alone = score_examples(sample, model.cfg, tokenizer, short, pool, max_new_tokens=300, batch_size=2,
                               min_response_tokens=16)
    assert scored.skipped == 3 and alone.skipped == 0
    assert [e.uid for e in scored.examples] == [e.uid for e in short]
    assert scored.scores.shape == scored.lengths.shape == (5, 1)
    # The response limit is clipped to the context left after the shortest prompt; no row runs past the context.
    assert scored.max_new_tokens == 256 - min(len(encode(e)) for e in short)
    for ex, n in zip(short, scored.lengths[:, 0]):
        assert 1 <= n <= 256 - len(encode(ex))
    # Greedy: the short prompts get what they get without the long ones, and what generate() gives them directly.
    np.testing.assert_array_equal(scored.lengths, alone.lengths)
    np.testing.assert_array_equal(scored.scores, alone.scores)
    ref = generate(model, [encode(e) for e in short[:2]], max_new_tokens=scored.max_new_tokens, temperature=0.0,
                   stop_ids=tokenizer.eos_ids, seed=0, pad_id=tokenizer.pad_id)
    np.testing.assert_array_equal(scored.lengths[:2, 0], np.minimum(ref.lengths, [256 - len(encode(e)) for e in short[:2]]))
    assert lines[0] == f"5 prompts x 1 in 3 sampler calls of 2, up to {scored.max_new_tokens} new tokens"
    assert lines[-1].startswith("generated and verified 5/5 prompts x 1") and len(lines) == 4


@pytest.mark.parametrize("b,p,r,n", [(8, 256, 64, 1), (4, 512, 512, 4)])
def test_memory_estimate_matches_the_compiled_insert(b, p, r, n):
    """The sampler's cache and one insert (prefill) of its largest batch, as XLA allocates them on CPU."""
    cfg = tiny_config()
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    sampler = SamplerConfig(n=n, max_new_tokens=r, sampling=SamplingParams(temperature=0.0), rows=b * n)
    state = empty_state(cfg, sampler, p)
    batch = sampler.max_prefill
    index = jnp.zeros((n, batch + 1), jnp.int32)
    compiled = insert.lower(graphdef, params, state, jnp.zeros((batch, p), jnp.int32), jnp.ones((batch,), jnp.int32),
                            index, index, jnp.int32(batch), jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    allocated = memory.temp_size_in_bytes + memory.output_size_in_bytes
    estimate = sampler_call_bytes(cfg, b, p, r, n)
    # k, v x L x rows x K x (prompt + ring slots) x Dh x fp32
    assert estimate["kv_cache"] == 2 * 2 * b * n * 2 * sampler.cache_len(p) * 8 * 4
    assert 0.8 * allocated <= sum(estimate.values()) <= 2.0 * allocated, (estimate, allocated)
    # The budget picks the most prompts that fit: per prompt the sum is linear in the prompt count.
    per_prompt = sum(sampler_call_bytes(cfg, 1, p, r, n).values())
    assert prompts_per_call(cfg, 64, p, r, n, 3.5 * per_prompt) == 3
    assert prompts_per_call(cfg, 64, p, r, n, 0.5 * per_prompt) == 1 and prompts_per_call(cfg, 64, p, r, n, 0) == 64


def test_summarize_means_per_source_and_overall():
    ex = lambda src: Example(prompt=[], ability="math", ground_truth="1", data_source=src, uid=src)  # noqa: E731
    examples = [ex("a"), ex("a"), ex("b")]
    scores = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
    assert summarize(examples, scores) == {"val/test_score/a": 0.75, "val/test_score/b": 0.0,
                                           "val/test_score/all": 0.5}

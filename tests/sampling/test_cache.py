"""The KV-cache layouts (`prime_jax.sampling.cache`): one-token decode steps over either layout give the full
forward's logits, and the sampler draws the same rows from the stacked cache as from the per-layer one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax.models import in_compute_dtype, load_pretrained
from prime_jax.sampling import (KVCache, LayerKV, PromptKV, SamplerConfig, SamplingParams, decode_step, engine, generate,
                                layer_weights)
from prime_jax.sampling.cache import put_prompts
from prime_jax.sampling.config import per_layer_decode
from tests.fixtures import SAMPLED, model_logits, random_prompts
from tests.fixtures import SAMPLED_PROMPTS as PROMPTS


@pytest.mark.parametrize("per_layer", [False, True])
def test_decode_steps_over_either_layout_give_the_full_forward_logits(qwen_model, per_layer):
    """Two prompts of different lengths prefilled into cache rows (prompt slots padded to whole blocks of 2, a ring
    of 6 generated slots), then 5 tokens fed one step at a time: each step's logits are the full-sequence forward's
    at that position, for every row (its own prompt length, its ring slots only)."""
    cfg = SamplerConfig(n=1, max_new_tokens=6, sampling=SamplingParams(), rows=2, buckets=(8,), kv_block=2,
                        per_layer=per_layer)
    lens, steps = np.array([5, 8], np.int32), 5
    prompts = random_prompts(qwen_model.cfg.vocab_size, lens, seed=3)
    fed = np.array(random_prompts(qwen_model.cfg.vocab_size, (steps, steps), seed=4), np.int32)  # [B, steps]
    tokens = np.zeros((2, 8), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    prompt_slots, block = cfg.prompt_slots(8), cfg.block(8)
    graphdef, params = nnx.split(qwen_model)
    layers = qwen_model.layer_slices() if per_layer else None

    @jax.jit
    def prefill(params, layers):
        logits, (k, v) = nnx.merge(graphdef, params).prefill(tokens, lens, layers)
        cache = (LayerKV if per_layer else KVCache).zeros(qwen_model.cfg, 2, cfg.cache_len(8))
        return logits, put_prompts(cache, jnp.arange(2), PromptKV(k=k, v=v))

    @jax.jit
    def step(params, layers, cache, t):
        return decode_step(nnx.merge(graphdef, params), jnp.asarray(fed)[:, t], jnp.asarray(lens) + t, cache,
                           prompt_lens=jnp.asarray(lens), counts=jnp.full((2,), t + 1), ring_index=t,
                           prompt_slots=prompt_slots, block=block, layers=layers)

    logits, cache = prefill(params, layers)
    got = [logits]
    for t in range(steps):
        logits, cache = step(params, layers, cache, jnp.int32(t))
        got.append(logits)
    got = np.stack([np.asarray(x) for x in got], axis=1)  # [B, steps + 1, V]: after the prompt, after each fed token
    for b, p in enumerate(prompts):
        want = model_logits(qwen_model, np.array([p + fed[b].tolist()]))[0, len(p) - 1:]
        np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=0)


def test_stacked_and_per_layer_cache_layouts_draw_the_same_rows(qwen_model, sampled, monkeypatch):
    """TPU/GPU decode (stacked cache read in blocks, a scan over the stacked layer weights) and CPU decode (a
    per-layer cache read whole, layers unrolled; what `sampled` ran): the same tokens and log-probs."""
    assert per_layer_decode(jax.default_backend())
    monkeypatch.setattr(engine, "per_layer_decode", lambda platform: False)
    out = generate(qwen_model, PROMPTS, **{**SAMPLED, "prompts_per_call": 1})
    np.testing.assert_array_equal(out.tokens, sampled.tokens)
    np.testing.assert_allclose(out.logprobs, sampled.logprobs, atol=1e-5, rtol=0)


def test_per_layer_weights_copied_in_the_compute_dtype_draw_what_fp32_copies_draw(qwen2_dir, monkeypatch):
    """fp32 weights, bf16 compute: the CPU layout's per-layer copy is made in bf16 once (`layer_weights`, half the
    bytes of an fp32 copy); every layer casts its weights to the compute dtype before use, so the rows are those
    an fp32 copy draws."""
    model = load_pretrained(qwen2_dir, compute_dtype="bfloat16")
    graphdef, params = nnx.split(model)
    assert {w.dtype for w in jax.tree.leaves(layer_weights(graphdef, params))} == {jnp.dtype(jnp.bfloat16)}
    bf16_copy = generate(model, PROMPTS, **SAMPLED)
    monkeypatch.setattr(engine, "layer_weights",
                        jax.jit(lambda graphdef, params: nnx.merge(graphdef, params).layer_slices(), static_argnums=0))
    fp32_copy = generate(model, PROMPTS, **SAMPLED)
    np.testing.assert_array_equal(bf16_copy.tokens, fp32_copy.tokens)
    np.testing.assert_array_equal(bf16_copy.logprobs, fp32_copy.logprobs)


def test_the_copy_publish_hands_the_sampler_draws_what_the_fp32_params_draw(qwen2_dir, monkeypatch):
    """fp32 weights, bf16 compute, the stacked TPU/GPU layout: the copy `Trainer.publish` hands the rollout thread
    (every weight in bf16, `in_compute_dtype`: half the bytes) draws the rows the fp32 params draw."""
    monkeypatch.setattr(engine, "per_layer_decode", lambda platform: False)
    model = load_pretrained(qwen2_dir, compute_dtype="bfloat16")
    graphdef, params = nnx.split(model)
    copy = nnx.merge(graphdef, in_compute_dtype(params, "bfloat16"))
    assert {w.dtype for w in jax.tree.leaves(nnx.state(copy))} == {jnp.dtype(jnp.bfloat16)}
    fp32 = generate(model, PROMPTS, **{**SAMPLED, "prompts_per_call": 1})
    bf16 = generate(copy, PROMPTS, **{**SAMPLED, "prompts_per_call": 1})
    np.testing.assert_array_equal(bf16.tokens, fp32.tokens)
    np.testing.assert_array_equal(bf16.logprobs, fp32.logprobs)

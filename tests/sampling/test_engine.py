"""The host engine (`prime_jax.sampling.engine`): greedy parity with transformers, log-probs, stop handling, sharded
determinism, continuous batching (a row's tokens do not depend on its slot or on when it was inserted), the tail in
smaller batches, rows streamed as they stop, an early stop, and input errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax.mesh import batch_sharding, make_mesh
from prime_jax.models import load_pretrained
from prime_jax.sampling import SamplerConfig, SamplingParams, decode, empty_state, engine, generate, insert
from tests.fixtures import SAMPLED, hf_greedy, random_prompts, reference_logprobs
from tests.fixtures import SAMPLED_PROMPTS as PROMPTS

PAD = 0


@pytest.mark.parametrize("ckpt", ["qwen2_dir", "llama_dir"])
def test_greedy_matches_transformers_generate(ckpt, request):
    path = request.getfixturevalue(ckpt)
    model = load_pretrained(path)
    prompts = random_prompts(model.cfg.vocab_size, (9, 4, 1, 6), seed=1)
    r = 10
    free = hf_greedy(path, prompts, r, (), PAD)
    # Two stop ids taken from the unstopped output, so rows stop at different steps (HF gets them as eos ids).
    stops = (int(free[2, 1]), int(free[3, 4]))
    ref = hf_greedy(path, prompts, r, stops, PAD)
    out = generate(model, prompts, max_new_tokens=r, temperature=0, stop_ids=stops, seed=0, pad_id=PAD, buckets=(8, 16))
    np.testing.assert_array_equal(out.tokens, ref)
    np.testing.assert_array_equal(np.where(out.mask == 1, out.tokens, -1), np.where(out.mask == 1, free, -1))
    assert out.lengths.min() < r
    # Greedy log-probs are the temperature-1 log-probs of the chosen tokens.
    np.testing.assert_allclose(out.logprobs, reference_logprobs(model, out), atol=1e-4, rtol=0)
    # One host round trip per decode step, or a few per response: the same tokens.
    for k in (1, 3):
        again = generate(model, prompts, max_new_tokens=r, temperature=0, stop_ids=stops, seed=0, pad_id=PAD,
                         buckets=(8, 16), steps_per_sync=k, kv_block=3)
        np.testing.assert_array_equal(again.tokens, out.tokens)


def test_sampled_logprobs_equal_recomputed_response_logprobs(qwen_model, sampled):
    ref = reference_logprobs(qwen_model, sampled, SAMPLED["temperature"])
    np.testing.assert_allclose(sampled.logprobs, ref, atol=1e-4, rtol=0)


def test_stop_ids_mask_and_pad(sampled):
    out, stops, pad, r = sampled, SAMPLED["stop_ids"], SAMPLED["pad_id"], SAMPLED["max_new_tokens"]
    for row in range(out.tokens.shape[0]):
        hits = np.flatnonzero(np.isin(out.tokens[row], stops))
        length = hits[0] + 1 if hits.size else r
        assert out.lengths[row] == length
        np.testing.assert_array_equal(out.mask[row], np.arange(r) < length)
        assert (out.tokens[row, length:] == pad).all() and (out.logprobs[row, length:] == 0).all()
        assert (out.logprobs[row, :length] < 0).all()
    assert out.lengths.min() < r and out.lengths.max() == r  # both cases occurred
    assert len(set(out.tokens[out.mask == 1]) & set(stops)) >= 2  # several stop ids did stop rows
    n = SAMPLED["n"]
    np.testing.assert_array_equal(out.prompt_tokens, np.repeat(out.prompt_tokens[::n], n, axis=0))
    assert [row[m == 1].tolist() for row, m in zip(out.prompt_tokens[::n], out.prompt_mask[::n])] == PROMPTS


def test_another_seed_gives_other_tokens(qwen_model, sampled):
    reseeded = generate(qwen_model, PROMPTS, **{**SAMPLED, "seed": 6})
    assert (reseeded.tokens != sampled.tokens).mean() > 0.5


def test_sharded_mesh_gives_the_same_tokens(qwen2_dir, sampled):
    """Same tokens on 8 devices as on one, also with a wider prompt bucket, 3 prompts' rows in 4 slots each
    (rows inserted into freed slots; batch split 4 ways) and the params gathered once per decode call."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_pretrained(qwen2_dir, mesh=mesh)
    for kw in ({"buckets": (32,)}, {"prompts_per_call": 1, "steps_per_sync": 2},
               {"prompts_per_call": 1, "steps_per_sync": 2, "gather_params": True}):
        out = generate(model, PROMPTS, mesh=mesh, **{**SAMPLED, **kw})
        np.testing.assert_array_equal(out.tokens, sampled.tokens, err_msg=str(kw))
        np.testing.assert_allclose(out.logprobs, sampled.logprobs, atol=1e-5, err_msg=str(kw))
    # The sampler state lives on the mesh (batch over data+fsdp, the 2 KV heads over tensor), in and out of decode.
    graphdef, params = nnx.split(model)
    cfg = SamplerConfig(n=2, max_new_tokens=4, sampling=SamplingParams(stop_ids=(3,)), rows=8, buckets=(8,),
                        data_parallel=4)
    P = jax.sharding.PartitionSpec
    with jax.set_mesh(mesh):
        stacked = decode(graphdef, params, empty_state(model.cfg, cfg, 8), jnp.int32(9))
        per_layer = decode(graphdef, params, empty_state(model.cfg, dataclasses.replace(cfg, per_layer=True), 8),
                           jnp.int32(9))
    for kv, spec in [(stacked.cache.k, P(None, None, "tensor", None, ("data", "fsdp"))),  # [L, S, K, Dh, N]
                     (stacked.cache.v, P(None, None, "tensor", ("data", "fsdp"), None)),  # [L, S, K, N, Dh]
                     (per_layer.cache[1].k, P(("data", "fsdp"), "tensor", None, None))]:  # [N, K, Dh, S]
        assert kv.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), kv.ndim)
    assert stacked.tokens.sharding.is_equivalent_to(batch_sharding(mesh, 2), 2)


@pytest.mark.parametrize("refill", [False, True])
@pytest.mark.parametrize("kw", [{"prompts_per_call": 1}, {"prompts_per_call": 2, "steps_per_sync": 3},
                                {"prompts_per_call": 1, "n": 4, "steps_per_sync": 1, "kv_block": 8}])
def test_rows_draw_the_same_tokens_whatever_slot_and_insertion_time(qwen_model, sampled, kw, refill, monkeypatch):
    """All 12 rows in the first batch vs 4 or 8 slots where most rows are inserted into slots freed by rows that
    stopped: identical rows. Each prompt is prefilled once: samples that start after its first ones (too few free
    slots then) start from its held cache, by a later `insert` or, with `refill`, inside `decode` in the slot
    freed mid-round."""
    monkeypatch.setattr(engine, "refills_on_device", lambda platform, data_parallel: refill)
    inserted, prefilled, from_held = [], [], []
    real = engine.insert

    def recording(graphdef, params, state, tokens, lens, slots, rows, *args):
        started = np.asarray(slots) < state.done.shape[0]
        rows = np.asarray(rows)
        inserted.append(rows[started])
        prefilled.extend(np.unique(rows[:, :-1][started[:, :-1]] // SAMPLED["n"]).tolist())
        from_held.extend(rows[:, -1][started[:, -1]].tolist())
        return real(graphdef, params, state, tokens, lens, slots, rows, *args)

    monkeypatch.setattr(engine, "insert", recording)
    out = generate(qwen_model, PROMPTS, **{**SAMPLED, **kw})
    by_host, rows = np.concatenate(inserted).tolist(), list(range(len(PROMPTS) * SAMPLED["n"]))
    by_decode = sorted(set(rows) - set(by_host))
    assert len(inserted) >= 2 and len(set(by_host)) == len(by_host) and set(by_host) <= set(rows)
    assert sorted(prefilled) == list(range(len(PROMPTS))), prefilled
    assert by_decode if refill else (from_held and not by_decode), (by_decode, from_held)
    for name in ("prompt_tokens", "prompt_mask", "tokens", "mask", "lengths"):
        np.testing.assert_array_equal(getattr(out, name), getattr(sampled, name), err_msg=name)
    np.testing.assert_allclose(out.logprobs, sampled.logprobs, atol=1e-5, rtol=0)


def test_the_tail_runs_in_smaller_batches_and_draws_the_same_rows(qwen_model, monkeypatch):
    """Once no prompt waits, the live rows move into halved batches (12 slots -> 6, 3, 1 as rows stop): the same
    rows as the same call without compaction."""
    sizes = []
    real = engine.compact

    def recording(state, rows, keep):
        sizes.append(rows)
        return real(state, rows, keep)

    monkeypatch.setattr(engine, "compact", recording)
    kw = {**SAMPLED, "max_new_tokens": 40, "steps_per_sync": 2}
    out = generate(qwen_model, PROMPTS, **kw)
    assert len(sizes) >= 2 and sizes == sorted(set(sizes), reverse=True) and set(sizes) <= {6, 3, 1}, sizes
    kept = generate(qwen_model, PROMPTS, **kw, compact_tail=False)
    assert len(np.unique(kept.lengths)) > 3
    np.testing.assert_array_equal(out.tokens, kept.tokens)
    np.testing.assert_array_equal(out.lengths, kept.lengths)
    np.testing.assert_allclose(out.logprobs, kept.logprobs, atol=1e-5, rtol=0)


def test_stop_ends_the_call_and_drops_the_rows_still_decoding(qwen_model, sampled):
    """`stop` is asked once per decode round after `on_rows` saw the round before: once 3 rows are handed over,
    the call returns those rows as a full run draws them and length 0 (mask 0, pad tokens) for every other row."""
    handed = []
    out = generate(qwen_model, PROMPTS, on_rows=lambda rows, tokens, lengths: handed.extend(rows.tolist()),
                   stop=lambda: len(handed) >= 3, **{**SAMPLED, "prompts_per_call": 1, "steps_per_sync": 1})
    total = len(PROMPTS) * SAMPLED["n"]
    assert 3 <= len(handed) < total and sorted(np.flatnonzero(out.lengths > 0).tolist()) == sorted(handed)
    np.testing.assert_array_equal(out.tokens[handed], sampled.tokens[handed])
    dropped = np.setdiff1d(np.arange(total), handed)
    assert (out.mask[dropped] == 0).all() and (out.tokens[dropped] == SAMPLED["pad_id"]).all()


def test_rows_are_handed_over_as_they_stop(qwen_model, sampled):
    """on_rows sees every row once, with its final tokens and length; short rows come before long ones."""
    seen = {}
    order = []

    def on_rows(rows, tokens, lengths):
        for row, t, length in zip(rows, tokens, lengths):
            assert row not in seen
            seen[int(row)] = (t.copy(), int(length))
            order.append(int(row))

    generate(qwen_model, PROMPTS, on_rows=on_rows, **{**SAMPLED, "prompts_per_call": 1, "steps_per_sync": 1})
    assert sorted(seen) == list(range(len(PROMPTS) * SAMPLED["n"]))
    for row, (t, length) in seen.items():
        np.testing.assert_array_equal(t, sampled.tokens[row])
        assert length == sampled.lengths[row]
    first_prompt = [r for r in order if r < SAMPLED["n"]]
    assert [sampled.lengths[r] for r in first_prompt] == sorted(sampled.lengths[r] for r in first_prompt)


@pytest.mark.parametrize("prompts,kw,match", [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([], {}, "no prompts"),
    ([[1] * 17], {}, "more than the largest bucket 16"),
    ([[1, 2]], {"n": 0}, "n .* must be >= 1"),
    ([[1, 2]], {"temperature": -0.5}, "temperature must be >= 0"),
    ([[1, 2]], {"top_p": 0.0}, "top_p must be in"),
    ([[1, 2]], {"top_k": -1}, "top_k must be >= 0"),
    ([[1, 200]], {}, "outside the vocabulary"),
    ([[1.5, 2.0]], {}, "not a flat list of token ids"),
    ([[1, 2]], {"stop_ids": (500,)}, "stop ids"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ([[1, 2]], {"prompts_per_call": -1}, "prompts_per_call must be >= 0"),
    ([[1, 2]], {"steps_per_sync": 0}, "steps_per_sync .* must be >= 1"),
    ([[1, 2]], {"kv_block": 0}, "kv_block must be >= 1"),
])
def test_bad_input_raises_before_compiling(peaked_model, prompts, kw, match):
    args = dict(max_new_tokens=4, stop_ids=(), seed=0, buckets=(8, 16)) | kw
    before = (empty_state._cache_size(), insert._cache_size(), decode._cache_size())
    with pytest.raises(ValueError, match=match):
        generate(peaked_model, prompts, **args)
    assert (empty_state._cache_size(), insert._cache_size(), decode._cache_size()) == before

"""Rollout sampler: greedy parity with transformers, sampling distribution, top-k/top-p sets, log-probs,
stop handling, sharded determinism, continuous batching (a row's tokens do not depend on its slot or on when
it was inserted), rows streamed as they stop, and input errors."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx

from prime_jax import sampling
from prime_jax.mesh import batch_sharding, make_mesh
from prime_jax.models import Decoder, abstract_model, load_pretrained, response_logprobs
from prime_jax.sampling import (SamplerConfig, SamplingParams, decode, empty_state, filter_logits, generate, insert,
                                layer_weights)
from tests.fixtures import tiny_config

PAD = 0


def _prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=k).tolist() for k in lengths]


def _hf_greedy(path, prompts, max_new_tokens, stop_ids) -> np.ndarray:
    """transformers greedy generate on the same left-padded batch; [B, max_new_tokens], pad after a stop."""
    p = max(map(len, prompts))
    ids = np.zeros((len(prompts), p), np.int64)
    mask = np.zeros_like(ids)
    for i, q in enumerate(prompts):
        ids[i, p - len(q):], mask[i, p - len(q):] = q, 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
                      max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids) or None, pad_token_id=PAD)
    out = out[:, p:].numpy()
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=PAD)  # HF stops when all did


def _chi_square_p(samples: np.ndarray, probs: np.ndarray) -> float:
    """Pearson goodness of fit; cells expecting < 5 counts are pooled; any sample where probs is 0 -> p = 0."""
    counts = np.bincount(samples, minlength=probs.size)
    if counts[probs == 0].sum():
        return 0.0
    expected = probs * samples.size
    big = expected >= 5
    obs = np.append(counts[big], counts[~big & (probs > 0)].sum())
    exp = np.append(expected[big], expected[~big & (probs > 0)].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(scipy.stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@functools.partial(jax.jit, static_argnums=0, static_argnames="temperature")
def _recomputed_logprobs(graphdef, params, prompt_tokens, prompt_mask, tokens, mask, *, temperature=1.0):
    """The model's own `response_logprobs` of a rollout (one compile instead of op-by-op)."""
    return response_logprobs(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, tokens, mask,
                             temperature=temperature)


def _reference_logprobs(model: Decoder, out, temperature: float = 1.0) -> np.ndarray:
    graphdef, params = nnx.split(model)
    lp = _recomputed_logprobs(graphdef, params, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask,
                              temperature=temperature)
    return np.asarray(lp) * out.mask


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, tokens, mask):
    return nnx.merge(graphdef, params)(tokens, attention_mask=mask)


def _logits(model: Decoder, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Full-sequence logits [B, T, V] as float64 (the independent reference for the sampler's draws)."""
    graphdef, params = nnx.split(model)
    mask = np.ones_like(tokens) if mask is None else mask
    return np.asarray(_full_logits(graphdef, params, tokens, mask), np.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_keep_set(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Spec reference, one row: top-k first, then the smallest prefix of the renormalised rest with mass >= top_p."""
    order = np.argsort(-logits, kind="stable")
    k = top_k if top_k > 0 else logits.size
    probs = _softmax(logits[order[:k]].astype(np.float64))
    before = np.cumsum(probs) - probs
    keep = np.zeros(logits.size, bool)
    keep[order[:k][before < top_p]] = True
    return keep


@pytest.fixture(scope="module")
def peaked_model(qwen2_dir) -> Decoder:
    """The tiny Qwen2 with its LM head scaled up: a next-token distribution far from uniform (top token ~0.3,
    entropy ~3.2 nats at T=0.7), so a wrong temperature or filter shows."""
    model = load_pretrained(qwen2_dir)
    model.lm_head[...] = model.lm_head[...] * 8
    return model


# One sampled rollout shared by the log-prob, stop, padding and sharding tests (one compile).
PROMPTS = _prompts(97, (7, 3, 12), seed=4)
SAMPLED = dict(n=4, max_new_tokens=10, temperature=0.7, top_p=0.9, stop_ids=(3, 17, 50, 71, 88), seed=5, pad_id=96,
               buckets=(16,))


@pytest.fixture(scope="module")
def qwen_model(qwen2_dir) -> Decoder:
    return load_pretrained(qwen2_dir)


@pytest.fixture(scope="module")
def sampled(qwen_model):
    return generate(qwen_model, PROMPTS, **SAMPLED)


@pytest.mark.parametrize("ckpt", ["qwen2_dir", "llama_dir"])
def test_greedy_matches_transformers_generate(ckpt, request):
    path = request.getfixturevalue(ckpt)
    model = load_pretrained(path)
    prompts = _prompts(model.cfg.vocab_size, (9, 4, 1, 6), seed=1)
    r = 10
    free = _hf_greedy(path, prompts, r, ())
    # Two stop ids taken from the unstopped output, so rows stop at different steps (HF gets them as eos ids).
    stops = (int(free[2, 1]), int(free[3, 4]))
    ref = _hf_greedy(path, prompts, r, stops)
    out = generate(model, prompts, max_new_tokens=r, temperature=0, stop_ids=stops, seed=0, pad_id=PAD, buckets=(8, 16))
    np.testing.assert_array_equal(out.tokens, ref)
    np.testing.assert_array_equal(np.where(out.mask == 1, out.tokens, -1), np.where(out.mask == 1, free, -1))
    assert out.lengths.min() < r
    # Greedy log-probs are the temperature-1 log-probs of the chosen tokens.
    np.testing.assert_allclose(out.logprobs, _reference_logprobs(model, out), atol=1e-4, rtol=0)
    # One host round trip per decode step, or a few per response: the same tokens.
    for k in (1, 3):
        again = generate(model, prompts, max_new_tokens=r, temperature=0, stop_ids=stops, seed=0, pad_id=PAD,
                         buckets=(8, 16), steps_per_sync=k, kv_block=3)
        np.testing.assert_array_equal(again.tokens, out.tokens)


def test_next_token_distribution_matches_softmax_at_temperature(peaked_model):
    prompt, t, n = [5, 6, 7], 0.7, 4000
    out = generate(peaked_model, [prompt], n=n, max_new_tokens=2, temperature=t, stop_ids=(), seed=11, buckets=(4,))
    first = out.tokens[:, 0]
    t0 = int(np.bincount(first).argmax())
    logits = _logits(peaked_model, np.array([prompt + [t0]]))[0, -2:]  # next-token logits after prompt, prompt+t0
    assert _chi_square_p(first, _softmax(logits[0] / t)) > 1e-3
    assert _chi_square_p(first, _softmax(logits[0])) < 1e-6  # the statistic does see a wrong temperature
    # Second token (drawn in the decode loop), conditioned on the most frequent first token.
    rows = first == t0
    assert rows.sum() > 500
    assert _chi_square_p(out.tokens[rows, 1], _softmax(logits[1] / t)) > 1e-3


def test_filter_logits_matches_numpy_reference():
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.8), (10, 0.6), (0, 1e-6)]:
        kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p)))
        ref = np.stack([_numpy_keep_set(row, top_k, top_p) for row in logits])
        np.testing.assert_array_equal(kept, ref, err_msg=f"top_k={top_k} top_p={top_p}")


def test_top_k_top_p_never_leave_their_set(peaked_model):
    prompt, t, r, top_k, top_p = [5, 6, 7], 0.7, 4, 6, 0.92
    out = generate(peaked_model, [prompt], n=1500, max_new_tokens=r, temperature=t, top_k=top_k, top_p=top_p,
                   stop_ids=(), seed=2, buckets=(4,))
    p = out.prompt_tokens.shape[1]
    full = np.concatenate([out.prompt_tokens, out.tokens], axis=1)
    attn = np.concatenate([out.prompt_mask, out.mask], axis=1)
    logits = _logits(peaked_model, full, attn)[:, p - 1:-1] / t  # [N, R, V]
    cut_by = set()
    for j in range(r):
        uniq, idx = np.unique(full[:, : p + j], axis=0, return_inverse=True)
        for u in range(len(uniq)):  # one reference set per distinct prefix
            rows = np.flatnonzero(idx.reshape(-1) == u)
            keep = _numpy_keep_set(logits[rows[0], j], top_k, top_p)
            assert keep[out.tokens[rows, j]].all(), f"step {j}: token outside the top_k={top_k} top_p={top_p} set"
            cut_by.add("k" if keep.sum() == top_k else "p")
    assert cut_by == {"k", "p"}  # each filter was the binding one somewhere
    keep0 = _numpy_keep_set(logits[0, 0], top_k, top_p)
    probs = np.where(keep0, _softmax(np.where(keep0, logits[0, 0], -np.inf)), 0.0)
    assert 1 < keep0.sum()
    assert _chi_square_p(out.tokens[:, 0], probs) > 1e-3


def test_sampled_logprobs_equal_recomputed_response_logprobs(qwen_model, sampled):
    ref = _reference_logprobs(qwen_model, sampled, SAMPLED["temperature"])
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
    for kv, spec in [(stacked.cache.k, P(None, ("data", "fsdp"), "tensor", None, None)),  # [L, N, K, S, Dh]
                     (per_layer.cache[1].k, P(("data", "fsdp"), "tensor", None, None))]:  # [N, K, Dh, S]
        assert kv.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), kv.ndim)
    assert stacked.tokens.sharding.is_equivalent_to(batch_sharding(mesh, 2), 2)


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_data_split_decode_step_syncs_the_devices_once(qwen_model, per_layer):
    """On a batch split 4 ways, a decode step's only collective is the loop condition's one all-reduce: writing
    the new tokens gathers no indices across the devices (a scatter would all-gather them every step)."""
    mesh = make_mesh({"data": 4}, jax.devices()[:4])
    graphdef, params = nnx.split(qwen_model)
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    cfg = SamplerConfig(n=2, max_new_tokens=8, sampling=SamplingParams(stop_ids=(3,)), rows=8, buckets=(8,),
                        data_parallel=4, per_layer=per_layer)
    with jax.set_mesh(mesh):
        state = empty_state(qwen_model.cfg, cfg, 8)
        layers = layer_weights(graphdef, params) if per_layer else None
        hlo = decode.lower(graphdef, params, state, jnp.int32(9), layers).compile().as_text()
    collectives = re.findall(r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\(", hlo)
    assert collectives == ["all-reduce"], collectives


@pytest.mark.parametrize("refill", [False, True])
@pytest.mark.parametrize("kw", [{"prompts_per_call": 1}, {"prompts_per_call": 2, "steps_per_sync": 3},
                                {"prompts_per_call": 1, "n": 4, "steps_per_sync": 1, "kv_block": 8}])
def test_rows_draw_the_same_tokens_whatever_slot_and_insertion_time(qwen_model, sampled, kw, refill, monkeypatch):
    """All 12 rows in the first batch vs 4 or 8 slots where most rows are inserted into slots freed by rows that
    stopped: identical rows. Each prompt is prefilled once: samples that start after its first ones (too few free
    slots then) start from its held cache, by a later `insert` or, with `refill`, inside `decode` in the slot
    freed mid-round."""
    monkeypatch.setattr(sampling, "refills_on_device", lambda platform, data_parallel: refill)
    inserted, prefilled, from_held = [], [], []
    real = sampling.insert

    def recording(graphdef, params, state, tokens, lens, slots, rows, *args):
        started = np.asarray(slots) < state.done.shape[0]
        rows = np.asarray(rows)
        inserted.append(rows[started])
        prefilled.extend(np.unique(rows[:, :-1][started[:, :-1]] // SAMPLED["n"]).tolist())
        from_held.extend(rows[:, -1][started[:, -1]].tolist())
        return real(graphdef, params, state, tokens, lens, slots, rows, *args)

    monkeypatch.setattr(sampling, "insert", recording)
    out = generate(qwen_model, PROMPTS, **{**SAMPLED, **kw})
    by_host, rows = np.concatenate(inserted).tolist(), list(range(len(PROMPTS) * SAMPLED["n"]))
    by_decode = sorted(set(rows) - set(by_host))
    assert len(inserted) >= 2 and len(set(by_host)) == len(by_host) and set(by_host) <= set(rows)
    assert sorted(prefilled) == list(range(len(PROMPTS))), prefilled
    assert by_decode if refill else (from_held and not by_decode), (by_decode, from_held)
    for name in ("prompt_tokens", "prompt_mask", "tokens", "mask", "lengths"):
        np.testing.assert_array_equal(getattr(out, name), getattr(sampled, name), err_msg=name)
    np.testing.assert_allclose(out.logprobs, sampled.logprobs, atol=1e-5, rtol=0)


def test_stacked_and_per_layer_cache_layouts_draw_the_same_rows(qwen_model, sampled, monkeypatch):
    """TPU/GPU decode (stacked cache read in blocks, a scan over the stacked layer weights) and CPU decode (a
    per-layer cache read whole, layers unrolled; what `sampled` ran): the same tokens and log-probs."""
    assert sampling.per_layer_decode(jax.default_backend())
    monkeypatch.setattr(sampling, "per_layer_decode", lambda platform: False)
    out = generate(qwen_model, PROMPTS, **{**SAMPLED, "prompts_per_call": 1})
    np.testing.assert_array_equal(out.tokens, sampled.tokens)
    np.testing.assert_allclose(out.logprobs, sampled.logprobs, atol=1e-5, rtol=0)


def test_refill_needs_an_unsplit_batch():
    assert sampling.refills_on_device("cpu", 1) and not sampling.refills_on_device("cpu", 2)
    assert not sampling.refills_on_device("tpu", 1)
    with pytest.raises(ValueError, match="refill .* needs an unsplit batch"):
        SamplerConfig(n=2, max_new_tokens=8, sampling=SamplingParams(), rows=8, data_parallel=2, refill=True)


def test_tail_sizes_halve_at_most_three_times_in_whole_data_parallel_groups():
    def sizes(rows: int, dp: int = 1, on: bool = True) -> tuple[int, ...]:
        return SamplerConfig(n=4, max_new_tokens=8, sampling=SamplingParams(), rows=rows, data_parallel=dp,
                             compact_tail=on).tail_sizes()

    assert sizes(64) == (32, 16, 8) and sizes(8) == (4, 2, 1) and sizes(12) == (6, 3, 1)
    assert sizes(12, dp=4) == (8, 4) and sizes(4, dp=4) == () and sizes(64, on=False) == ()


def test_the_tail_runs_in_smaller_batches_and_draws_the_same_rows(qwen_model, monkeypatch):
    """Once no prompt waits, the live rows move into halved batches (12 slots -> 6, 3, 1 as rows stop): the same
    rows as the same call without compaction."""
    sizes = []
    real = sampling.compact

    def recording(state, rows, keep):
        sizes.append(rows)
        return real(state, rows, keep)

    monkeypatch.setattr(sampling, "compact", recording)
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


@pytest.mark.parametrize("per_layer", [False, True])
def test_programs_lower_from_abstract_inputs_and_donate_their_state(per_layer):
    """What the AOT compiler does: lower insert (with a prefill batch, and of the held prompt alone) and decode from
    shapes only, in either cache layout; all alias every state input they read."""
    graphdef, params = nnx.split(abstract_model(tiny_config()))
    cfg = SamplerConfig(n=2, max_new_tokens=8, sampling=SamplingParams(temperature=0.7, top_p=0.9, stop_ids=(3,)),
                        rows=8, buckets=(16,), kv_block=8, pad_id=PAD, per_layer=per_layer)
    state = jax.eval_shape(lambda: empty_state(tiny_config(), cfg, 16))
    kv = state.cache[1] if per_layer else state.cache
    # [L, N, K, S, Dh], prompt 16 + ring 8; per layer: k [N, K, Dh, S], v [N, K, S, Dh], no block padding
    assert state.tokens.shape == (8, 8) and (kv.k.shape, kv.v.shape) == (
        ((8, 2, 8, 24), (8, 2, 24, 8)) if per_layer else ((2, 8, 2, 24, 8),) * 2)
    layers = jax.eval_shape(layer_weights, graphdef, params) if per_layer else None
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    texts = [decode.trace(graphdef, params, state, scalar, layers).lower().as_text()]
    for b in (cfg.max_prefill, 0):
        prompt, lens = jax.ShapeDtypeStruct((b, 16), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)
        slots = jax.ShapeDtypeStruct((2, b + 1), jnp.int32)
        lowered = insert.trace(graphdef, params, state, prompt, lens, slots, slots, scalar, rng, layers).lower()
        texts.append(lowered.as_text())
    # Every state input but one scalar that the program replaces unread: decode's fin_count, insert's rng.
    leaves = len(jax.tree.leaves(state))
    assert [text.count("tf.aliasing_output") for text in texts] == [leaves - 1] * 3


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

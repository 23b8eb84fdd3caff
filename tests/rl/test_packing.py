"""Host layout of a step's sequences: packed rows vs the padded batch, bounded shapes, packed log-probs equal to
padded ones (length-1 responses, a row-filling sequence), segment isolation, bad input named by its config key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax.models import packed_logprobs, resolve_attention, slot_logprobs
from prime_jax.rl.packing import PackSpec, first_fit_decreasing, from_slots, lay_out, segment_cumsum
from tests.fixtures import logp_fn, tiny_model

P, R = 4, 5
ROW = P + R


def batch_of(prompt_lens, response_lens, seed=0):
    """Left-padded prompts [B, P], right-padded responses [B, R] of the given lengths, random ids 1..96."""
    rng = np.random.default_rng(seed)
    p, r = np.asarray(prompt_lens), np.asarray(response_lens)
    prompt_mask = (np.arange(P)[None] >= P - p[:, None]).astype(np.int32)
    mask = (np.arange(R)[None] < r[:, None]).astype(np.float32)
    return dict(prompt_tokens=(rng.integers(1, 97, (len(p), P)) * prompt_mask).astype(np.int32), prompt_mask=prompt_mask,
                tokens=(rng.integers(1, 97, (len(p), R)) * mask).astype(np.int32), mask=mask)


def spec(layout="packed", mini=4, micro=2, tokens=2 * ROW, dp=1, row=ROW):
    return PackSpec("actor", mini_batch_size=mini, micro_batch_size=micro, data_parallel=dp, layout=layout,
                    row_length=row, micro_batch_tokens=tokens)


def shared_batch(seed=0):
    """PROMPTS / RESPONSES with rows 0, 2, 5 sharing row 2's prompt and rows 4, 7 row 7's (their lengths too)."""
    batch = batch_of([3, 4, 3, 3, 3, 3, 1, 3], RESPONSES, seed)
    for dst, src in ((0, 2), (5, 2), (4, 7)):
        batch["prompt_tokens"][dst] = batch["prompt_tokens"][src]
    return batch


# Lengths: a length-1 response after a 1-token prompt, a sequence filling a whole row, a padding row (no response).
PROMPTS, RESPONSES = [1, 4, 2, 3, 4, 2, 1, 3], [1, 5, 3, 0, 2, 1, 4, 5]


def test_packed_rows_hold_each_sequence_once_with_restarting_positions():
    batch = batch_of(PROMPTS, RESPONSES)
    mini = np.array([[3, 0, 5, 1], [2, 4, 6, 7]])
    layout = lay_out(batch, mini, spec())
    a = layout.arrays
    assert a["tokens"].shape[:2] == (2, 2) and a["tokens"].shape[3] == ROW   # [M, k, r, L]
    for m, rows in enumerate(mini):
        seen = set()
        for row_tokens, seg, pos, tgt, idx in zip(*(a[k][m].reshape(-1, ROW) for k in
                                                    ("tokens", "segment_ids", "positions", "targets", "index"))):
            for s in set(seg.tolist()) - {0}:
                where = np.flatnonzero(seg == s)
                assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))   # contiguous
                b = int(idx[where][idx[where] < len(PROMPTS) * R][0] // R)
                seen.add(b)
                p, n = PROMPTS[b], RESPONSES[b]
                want = np.concatenate([batch["prompt_tokens"][b, P - p:], batch["tokens"][b, :n]])
                np.testing.assert_array_equal(row_tokens[where], want)
                np.testing.assert_array_equal(pos[where], np.arange(p + n))
                pred = where[p - 1:p + n - 1]
                np.testing.assert_array_equal(idx[pred], b * R + np.arange(n))
                np.testing.assert_array_equal(tgt[pred], batch["tokens"][b, :n])
        assert seen == {b for b in rows.tolist() if RESPONSES[b] > 0}   # the padding row 3 is left out
    real = sum(p + r for p, r in zip(PROMPTS, RESPONSES) if r)
    assert layout.real_tokens == real and layout.efficiency == pytest.approx(real / a["tokens"].size)


def test_padded_layout_is_the_batch_row_by_row():
    batch = batch_of(PROMPTS, RESPONSES)
    mini = np.array([[3, 0, 5, 1], [2, 4, 6, 7]])
    a = lay_out(batch, mini, spec("padded")).arrays
    assert a["tokens"].shape == (2, 2, 2, ROW)
    row = a["tokens"].reshape(8, ROW)[1]   # mini-batch 0, second row: batch row 0
    np.testing.assert_array_equal(row, np.concatenate([batch["prompt_tokens"][0], batch["tokens"][0]]))
    assert a["index"].reshape(8, ROW)[1].tolist() == [40] * 3 + [0] + [40] * 5   # slot P - 1 predicts token 0


def test_unpack_inverts_index_and_segment_cumsum_restarts():
    batch = batch_of(PROMPTS, RESPONSES)
    lay = lay_out(batch, np.array([[3, 0, 5, 1], [2, 4, 6, 7]]), spec())
    flat = lay.arrays["index"].reshape(-1)
    for b, j in zip(*np.nonzero(batch["mask"])):
        assert flat[lay.unpack[b, j]] == b * R + j
    assert np.all(lay.unpack[batch["mask"] == 0] == flat.size)
    x = np.arange(1.0, 8.0)[None]
    np.testing.assert_array_equal(segment_cumsum(x, np.array([[1, 1, 2, 2, 2, 0, 0]])), [[1, 3, 3, 7, 12, 6, 13]])


def test_first_fit_decreasing_fills_rows():
    bins = first_fit_decreasing(np.array([5, 4, 3, 3, 2, 1]), 6)
    assert sorted(sorted(b) for b in bins) == [[0, 5], [1, 4], [2, 3]]


def test_shapes_are_a_small_bounded_set():
    s = spec(mini=256, tokens=16 * 4096, dp=8, row=4096)   # 16 rows per micro-batch, up to 256 rows per mini-batch
    assert s.shapes() == [(1, 8), (1, 16), (2, 16), (3, 16), (4, 16), (5, 16), (6, 16), (7, 16), (8, 16), (10, 16),
                          (12, 16), (14, 16), (16, 16)]
    assert s.shape_for(9) == (1, 16) and s.shape_for(17) == (2, 16) and s.shape_for(200) == (14, 16)
    assert spec(mini=40, tokens=5 * ROW).shapes() == [(1, 1), (1, 2), (1, 3), (1, 5), (2, 5), (3, 5), (4, 5), (5, 5),
                                                      (6, 5), (7, 5), (8, 5)]
    qwen7b = spec(mini=256, tokens=8 * 4096, dp=8, row=4096)
    assert len(qwen7b.shapes()) == 16   # r = 8 only (dp 8); k = 1, 2, 3, 4, 5, 6, 7, 8, 10, ..., 28, 32


def test_packed_logprobs_equal_padded_and_segments_are_isolated():
    graphdef, params = tiny_model(0)
    batch = batch_of(PROMPTS, RESPONSES, seed=1)
    mini = np.arange(8).reshape(1, 8)
    padded, _ = logp_fn(graphdef)(params, batch)
    fn = jax.jit(lambda p, a: packed_logprobs(nnx.merge(graphdef, p), a["tokens"], a["segment_ids"], a["positions"],
                                              a["targets"]))

    def packed(b):
        lay = lay_out(b, mini, spec(mini=8, tokens=8 * ROW))
        a = lay.arrays
        assert a["segment_ids"].max() > 1                          # several sequences share rows
        flat = {k: v.reshape(-1, ROW) for k, v in a.items()}
        return np.asarray(from_slots(fn(params, flat), lay.unpack)), a

    ours, a = packed(batch)
    np.testing.assert_allclose(ours, np.asarray(padded) * batch["mask"], atol=1e-5)
    # Change the tokens of batch row 2 (prompt and response): no other row's log-probs move.
    other = {k: v.copy() for k, v in batch.items()}
    other["prompt_tokens"][2, P - 2:] = [7, 8]
    other["tokens"][2, :3] = [9, 10, 11]
    changed, a2 = packed(other)
    assert np.array_equal(a2["segment_ids"], a["segment_ids"])      # same packing, different tokens
    keep = np.arange(8) != 2
    np.testing.assert_array_equal(changed[keep], ours[keep])
    assert np.abs(changed[2] - ours[2]).max() > 1e-3


def test_shared_prompt_layout_holds_each_prompt_once_per_micro_batch():
    batch = shared_batch()
    p_len = batch["prompt_mask"].sum(1)
    mini = np.array([[3, 0, 5, 1, 2, 4, 6, 7]])
    lay = lay_out(batch, mini, spec("shared_prompt", mini=8, micro=4))
    a = lay.arrays
    # Rows sorted by prompt: the 4 distinct trained prompts ({0, 2, 5}, {4, 7}, {1}, {6}) in 2 micro-batches of 4
    # rows, the padding row 3 (no prompt) last: 3 prompts in one of them at most, so g = 4 (of 1, 2, 4).
    assert a["tokens"].shape == (1, 2, 4, R) and a["prefix_tokens"].shape == (1, 2, 4, P - 1)
    assert a["prefix_of"].shape == (1, 2, 4, 4) and a["index"][0, 1, 3, 0] == 8 * R       # row 3 last
    for q in range(2):
        used = a["prefix_of"][0, q].sum(0) > 0
        prompts = [tuple(t) for t in a["prefix_tokens"][0, q][used]]
        assert len(set(prompts)) == len(prompts) and not a["prefix_segment_ids"][0, q][~used].any()
    for q in range(2):
        for s in range(4):
            idx = a["index"][0, q, s]
            if not np.any(idx < 8 * R):
                assert a["prefix_of"][0, q, s].sum() == 0 and a["segment_ids"][0, q, s].sum() == 0
                continue
            b, n = int(idx[0]) // R, RESPONSES[int(idx[0]) // R]
            prompt = batch["prompt_tokens"][b, P - p_len[b]:]
            g = int(np.argmax(a["prefix_of"][0, q, s]))
            assert a["prefix_of"][0, q, s].sum() == 1
            np.testing.assert_array_equal(a["prefix_tokens"][0, q, g, :p_len[b] - 1], prompt[:-1])
            assert a["prefix_segment_ids"][0, q, g].tolist() == [1] * (p_len[b] - 1) + [0] * (P - p_len[b])
            np.testing.assert_array_equal(a["tokens"][0, q, s, :n], np.concatenate([prompt[-1:], batch["tokens"][b, :n - 1]]))
            np.testing.assert_array_equal(a["targets"][0, q, s, :n], batch["tokens"][b, :n])
            np.testing.assert_array_equal(a["positions"][0, q, s, :n], p_len[b] - 1 + np.arange(n))
            np.testing.assert_array_equal(idx, np.where(np.arange(R) < n, b * R + np.arange(R), 8 * R))
            assert a["segment_ids"][0, q, s].tolist() == [1] * n + [0] * (R - n)
    real = sum(int(p) + r for p, r in zip(p_len, RESPONSES) if r)
    computed = a["tokens"].size + a["prefix_tokens"].size
    assert lay.real_tokens == real and lay.efficiency == pytest.approx(real / computed)
    assert spec("shared_prompt", mini=64, micro=64, dp=2).prompt_rows(9) == 16   # 8, 16, 32, 64


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prompt_logprobs_and_gradients_equal_padded(remat):
    graphdef, params = tiny_model(0)
    batch = shared_batch(seed=1)
    mask = batch["mask"]
    padded = np.asarray(logp_fn(graphdef)(params, batch)[0]) * mask
    lay = lay_out(batch, np.arange(8).reshape(1, 8), spec("shared_prompt", mini=8, micro=8))
    assert lay.arrays["prefix_tokens"].shape[2] == 4                 # 8 rows, 4 distinct trained prompts: 8 / 2

    def shared(p):
        micro = {k: v[0, 0] for k, v in lay.arrays.items()}
        return from_slots(slot_logprobs(nnx.merge(graphdef, p), micro, remat=remat), lay.unpack)

    ours = np.asarray(jax.jit(shared)(params))
    np.testing.assert_allclose(ours, padded, atol=1e-5)
    packed_lay = lay_out(batch, np.arange(8).reshape(1, 8), spec(mini=8, tokens=8 * ROW))

    def packed(p):
        micro = {k: v[0, 0] for k, v in packed_lay.arrays.items()}
        return from_slots(slot_logprobs(nnx.merge(graphdef, p), micro), packed_lay.unpack)

    weights = np.random.default_rng(0).normal(size=mask.shape) * mask
    grad = lambda f: jax.jit(jax.grad(lambda p: jnp.sum(f(p) * weights)))(params)  # noqa: E731
    for x, y in zip(jax.tree.leaves(grad(shared)), jax.tree.leaves(grad(packed)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_bad_batches_are_named():
    batch = batch_of(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="train.pack_length=8: row 1 has a sequence of 9 tokens"):
        lay_out(batch, np.arange(8).reshape(2, 4), spec(row=8, tokens=16))
    holes = {**batch, "mask": batch["mask"].copy()}
    holes["mask"][1, 1] = 0
    with pytest.raises(ValueError, match="prefix"):
        lay_out(holes, np.arange(8).reshape(2, 4), spec())


def test_attention_implementation_the_backend_lacks_is_named():
    assert resolve_attention("auto", "gpu", "bfloat16") == "cudnn"
    assert resolve_attention("auto", "tpu", "bfloat16") == resolve_attention("splash", "tpu", "float32") == "splash"
    assert resolve_attention("auto", "tpu", "float32") == resolve_attention("auto", "gpu", "float32") == "xla"
    with pytest.raises(ValueError, match="config.model.attention='cudnn': needs a GPU backend"):
        resolve_attention("cudnn", "cpu", "bfloat16")
    assert resolve_attention("auto", "tpu", "float16") == "xla"
    for platform, dtype in (("gpu", "bfloat16"), ("tpu", "float16")):
        with pytest.raises(ValueError, match="config.model.attention='splash': the Pallas splash kernel needs a TPU"):
            resolve_attention("splash", platform, dtype)
    with pytest.raises(ValueError, match="config.model.attention='splash_interpret'"):
        resolve_attention("splash_interpret", "cpu", "float32")  # the tests' interpret mode is no config value

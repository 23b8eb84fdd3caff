"""Token selection (`prime_jax.sampling.select`): the top-k / top-p sets against a numpy reference, and the
distribution of sampled tokens against the model's softmax at the temperature, with and without the filters."""

import jax.numpy as jnp
import numpy as np

from prime_jax.sampling import filter_logits, generate
from tests.fixtures import chi_square_p, model_logits, numpy_keep_set, softmax


def test_filter_logits_matches_numpy_reference():
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.8), (10, 0.6), (0, 1e-6)]:
        kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p)))
        ref = np.stack([numpy_keep_set(row, top_k, top_p) for row in logits])
        np.testing.assert_array_equal(kept, ref, err_msg=f"top_k={top_k} top_p={top_p}")


def test_next_token_distribution_matches_softmax_at_temperature(peaked_model):
    prompt, t, n = [5, 6, 7], 0.7, 4000
    out = generate(peaked_model, [prompt], n=n, max_new_tokens=2, temperature=t, stop_ids=(), seed=11, buckets=(4,))
    first = out.tokens[:, 0]
    t0 = int(np.bincount(first).argmax())
    logits = model_logits(peaked_model, np.array([prompt + [t0]]))[0, -2:]  # next-token logits after prompt, prompt+t0
    assert chi_square_p(first, softmax(logits[0] / t)) > 1e-3
    assert chi_square_p(first, softmax(logits[0])) < 1e-6  # the statistic does see a wrong temperature
    # Second token (drawn in the decode loop), conditioned on the most frequent first token.
    rows = first == t0
    assert rows.sum() > 500
    assert chi_square_p(out.tokens[rows, 1], softmax(logits[1] / t)) > 1e-3


def test_top_k_top_p_never_leave_their_set(peaked_model):
    prompt, t, r, top_k, top_p = [5, 6, 7], 0.7, 4, 6, 0.92
    out = generate(peaked_model, [prompt], n=1500, max_new_tokens=r, temperature=t, top_k=top_k, top_p=top_p,
                   stop_ids=(), seed=2, buckets=(4,))
    p = out.prompt_tokens.shape[1]
    full = np.concatenate([out.prompt_tokens, out.tokens], axis=1)
    attn = np.concatenate([out.prompt_mask, out.mask], axis=1)
    logits = model_logits(peaked_model, full, attn)[:, p - 1:-1] / t  # [N, R, V]
    cut_by = set()
    for j in range(r):
        uniq, idx = np.unique(full[:, : p + j], axis=0, return_inverse=True)
        for u in range(len(uniq)):  # one reference set per distinct prefix
            rows = np.flatnonzero(idx.reshape(-1) == u)
            keep = numpy_keep_set(logits[rows[0], j], top_k, top_p)
            assert keep[out.tokens[rows, j]].all(), f"step {j}: token outside the top_k={top_k} top_p={top_p} set"
            cut_by.add("k" if keep.sum() == top_k else "p")
    assert cut_by == {"k", "p"}  # each filter was the binding one somewhere
    keep0 = numpy_keep_set(logits[0, 0], top_k, top_p)
    probs = np.where(keep0, softmax(np.where(keep0, logits[0, 0], -np.inf)), 0.0)
    assert 1 < keep0.sum()
    assert chi_square_p(out.tokens[:, 0], probs) > 1e-3

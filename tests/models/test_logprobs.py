"""Chunked token log-probs: equal to gather(log_softmax(full logits)), and lighter in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from prime_jax.mesh import make_mesh
from prime_jax.models import (Decoder, load_pretrained, logprobs_from_hidden, packed_logprobs, response_logprobs,
                              token_logprobs)
from prime_jax.models.config import REMAT_SAVES
from tests.fixtures import tiny_config


def _reference(logits, tokens):
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1)
    return np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_token_logprobs_equal_full_log_softmax(qwen2_dir, left_padded_batch, chunk):
    tokens, mask = left_padded_batch
    model = load_pretrained(qwen2_dir, logits_chunk=chunk)
    ours = np.asarray(token_logprobs(model, tokens, mask))
    ref = _reference(model(tokens, attention_mask=mask), tokens)
    assert ours.shape == (3, 11) and ours.dtype == np.float32
    real = mask[:, 1:].astype(bool)
    assert np.max(np.abs(ours[real] - ref[real])) < 1e-5


def test_response_logprobs_slice_of_token_logprobs_and_entropy(qwen2_dir):
    model = load_pretrained(qwen2_dir)
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, 90, (2, 5)).astype(np.int32)
    pmask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    resp = rng.integers(1, 90, (2, 4)).astype(np.int32)
    rmask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
    logp, ent = response_logprobs(model, prompt, pmask, resp, rmask, temperature=0.7, with_entropy=True)
    full = np.concatenate([prompt, resp], 1)
    fmask = np.concatenate([pmask, rmask], 1)
    ref = np.asarray(token_logprobs(model, full, fmask, temperature=0.7))[:, 4:]
    np.testing.assert_allclose(np.asarray(logp)[rmask == 1], ref[rmask == 1], atol=1e-5)
    logits = np.asarray(model(full, attention_mask=fmask), np.float64)[:, 4:-1] / 0.7
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ent)[rmask == 1], (-(p * np.log(p)).sum(-1))[rmask == 1], atol=1e-4)


def test_logprob_gradients_match_full_logits():
    h = jax.random.normal(jax.random.key(0), (2, 9, 8))
    w = jax.random.normal(jax.random.key(1), (8, 50))
    t = jax.random.randint(jax.random.key(2), (2, 9), 0, 50)
    full = lambda h, w: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h @ w), t[..., None], -1))  # noqa: E731
    chunked = lambda h, w: jnp.sum(logprobs_from_hidden(h, w, t, chunk=4))  # noqa: E731
    for a, b in zip(jax.grad(full, (0, 1))(h, w), jax.grad(chunked, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_peak_memory_below_full_logits_at_large_vocab():
    """Compiled temp memory of the gradient at V=32k, 512 tokens: chunked vs full [B,T,V] logits."""
    cfg = tiny_config(vocab_size=32768, logits_chunk=128)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def chunked(state, tokens):
        m = nnx.merge(graphdef, state)
        return jnp.sum(token_logprobs(m, tokens, jnp.ones_like(tokens)))

    def full(state, tokens):
        m = nnx.merge(graphdef, state)
        logits = m(tokens, attention_mask=jnp.ones_like(tokens))
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    def temp_bytes(fn):
        return jax.jit(jax.grad(fn)).lower(state, tokens).compile().memory_analysis().temp_size_in_bytes

    full_bytes, chunk_bytes = temp_bytes(full), temp_bytes(chunked)
    logits_bytes = 2 * 256 * 32768 * 4
    assert full_bytes > logits_bytes  # the full version holds at least one [B,T,V] fp32 buffer
    assert chunk_bytes < full_bytes / 4


def test_remat_keeps_values_and_gradients_and_saves_activation_memory():
    """packed_logprobs(remat=True) (layers and final norm recomputed in the backward pass, whatever cfg.remat says),
    keeping nothing or the matmul outputs (cfg.remat_saves): same log-probs and gradients as without remat, compiled
    temp memory for the gradient ordered nothing < dots < no remat."""
    graphdefs = {saves: nnx.split(Decoder(tiny_config(remat_saves=saves), rngs=nnx.Rngs(0)))[0]
                 for saves in REMAT_SAVES}
    params = nnx.split(Decoder(tiny_config(), rngs=nnx.Rngs(0)))[1]
    tokens = jax.random.randint(jax.random.key(0), (4, 128), 1, 97)
    segments = jnp.repeat(jnp.array([[1, 2]]), 64, axis=1).repeat(4, axis=0)   # two sequences of 64 per row
    positions = jnp.tile(jnp.arange(64), (4, 2))

    def loss(p, remat, saves):
        model = nnx.merge(graphdefs[saves], p)
        logp = packed_logprobs(model, tokens, segments, positions, jnp.roll(tokens, -1, 1), remat=remat)
        return jnp.sum(logp), logp

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
    runs = [(False, "nothing"), (True, "nothing"), (True, "dots")]
    (_, plain), g_plain = grad(params, *runs[0])
    for remat, saves in runs[1:]:
        (_, logp), g = grad(params, remat, saves)
        np.testing.assert_allclose(logp, plain, rtol=1e-6, atol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    plain_temp, nothing_temp, dots_temp = (grad.lower(params, *run).compile().memory_analysis().temp_size_in_bytes
                                           for run in runs)
    assert nothing_temp < dots_temp < plain_temp, (nothing_temp, dots_temp, plain_temp)


def test_sharded_batch_scores_its_own_rows_without_reducing_logits():
    """Rows split over 8 devices (fsdp), the head split over its hidden dim as FSDP stores it: each device makes the
    logits of its own rows, ~chunk tokens a block, and no [*, V] block of logits is all-reduced (blocks of the
    flattened tokens each sat on one device, and GSPMD all-reduced every fp32 [chunk, V] block); values equal numpy."""
    b, n, d, v, chunk = 8, 24, 16, 1031, 6
    rng = np.random.default_rng(0)
    hidden, head = rng.normal(size=(b, n, d)).astype(np.float32), rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, n)).astype(np.int32)
    mesh = make_mesh({"fsdp": 8})
    args = (jax.device_put(hidden, NamedSharding(mesh, P("fsdp"))), jax.device_put(head, NamedSharding(mesh, P("fsdp"))),
            jax.device_put(targets, NamedSharding(mesh, P("fsdp"))))
    fn = jax.jit(lambda h, w, t: logprobs_from_hidden(h, w, t, chunk=chunk))
    with jax.set_mesh(mesh):
        hlo = fn.lower(*args).compile().as_text()
        ours = np.asarray(fn(*args))
    reduced = [line for line in hlo.splitlines() if " all-reduce(" in line and f",{v}]" in line.split("=")[1]]
    assert not reduced, reduced[:1]
    assert f"f32[1,{chunk},{v}]" in hlo   # one row of chunk tokens a device per block
    logits = np.einsum("bnd,dv->bnv", hidden.astype(np.float64), head)
    ref = np.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    assert np.max(np.abs(ours - np.asarray(ref))) < 1e-4

"""Full-sequence attention (`prime_jax.models.attention`): the Pallas splash kernel (`model.attention=splash`) against
XLA's attention, run in Pallas interpret mode on CPU: packed rows (length-1 segments, a full-length one, a padded
tail), outputs and gradients, on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax.mesh import make_mesh, shard_state
from prime_jax.models import Decoder, packed_logprobs
from prime_jax.models.attention import causal_attention
from tests.fixtures import tiny_config


def packed_segments(rows: int, length: int) -> np.ndarray:
    """[rows, length] segment ids: row 0 two length-1 segments, a long one, a short one and an empty tail (0);
    row 1 one full-length segment; further rows alternate the two."""
    first = np.zeros(length, np.int32)
    first[0], first[1], first[2:length - 40], first[length - 40:length - 7] = 1, 2, 3, 4
    full = np.ones(length, np.int32)
    return np.stack([first if r % 2 == 0 else full for r in range(rows)])


def positions_of(segments: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 in each segment. [rows, length] int32"""
    start = np.concatenate([np.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    idx = np.arange(segments.shape[1])[None].repeat(len(segments), 0)
    return (idx - np.maximum.accumulate(np.where(start, idx, 0), axis=1)).astype(np.int32)


def attention_and_grads(implementation, q, k, v, segments, cotangent):
    """attend(q, k, v) and the gradients of <attend, cotangent> w.r.t. q, k, v."""
    attend = causal_attention(implementation, segments, q.shape[1])
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)


@pytest.mark.parametrize("length", [256, 200])  # 200: padded to a whole 128-slot block inside
def test_splash_matches_xla_one_device(length):
    b, h, kv, dh = 2, 4, 2, 16
    q, k, v, cot = (jax.random.normal(key, shape, jnp.float32) for key, shape in zip(
        jax.random.split(jax.random.key(0), 4), [(b, length, h, dh), (b, kv, length, dh), (b, kv, length, dh),
                                                 (b, length, h, dh)]))
    segments = jnp.asarray(packed_segments(b, length))
    want = attention_and_grads("xla", q, k, v, segments, cot)
    got = attention_and_grads("splash_interpret", q, k, v, segments, cot)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5)
    # without segment ids (the sampler's prefill): causal only
    np.testing.assert_allclose(np.asarray(causal_attention("splash_interpret", None, length)(q, k, v)),
                               np.asarray(causal_attention("xla", None, length)(q, k, v)), atol=2e-5)


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1}])
def test_splash_decoder_matches_xla_on_eight_devices(axes):
    """The whole decoder (scanned, rematerialised layers) on packed rows: log-probs and parameter gradients; with
    tensor=2 each device runs the kernel on one KV head and its two query heads."""
    cfg = tiny_config(head_dim=16, remat=True)
    rows, length = 8, 128
    segments = packed_segments(rows, length)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (rows, length), 0, cfg.vocab_size), np.int32)
    targets = np.where(segments > 0, np.roll(tokens, -1, axis=1), 0).astype(np.int32)
    mesh = make_mesh(axes)
    state = shard_state(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0))), mesh)

    def run(implementation):
        g = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg.replace(attention=implementation), rngs=nnx.Rngs(0))))

        @jax.jit
        def loss_and_grads(state):
            def loss(state):
                logp = packed_logprobs(nnx.merge(g, state), tokens, segments, positions_of(segments), targets)
                return jnp.sum(jnp.where(segments > 0, logp, 0.0)), logp
            return jax.grad(loss, has_aux=True)(state)

        with jax.set_mesh(mesh):
            return loss_and_grads(state)

    (want_grads, want), (got_grads, got) = run("xla"), run("splash_interpret")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for w, g in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)

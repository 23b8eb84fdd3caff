"""Tiny model and batches shared by the PRM-step and PPO-step tests."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prime_jax.mesh import make_mesh
from prime_jax.models import Decoder, response_logprobs
from prime_jax.rl.packing import Layout, PackSpec, lay_out
from tests.fixtures import tiny_config

PROMPT_LEN, RESPONSE_LEN = 5, 6


@functools.cache
def tiny_model(seed: int = 0):
    """(graphdef, params) of the 2-layer test decoder, initialised in one jitted program (eager
    initialisation compiles every small op on its own and is several times slower)."""
    cfg = tiny_config()
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed))))
    params = jax.jit(lambda: nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))[1])()
    return graphdef, params


def one_device_mesh():
    return make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])


def make_batch(seed: int, rows: int, vocab: int = 97, prompt_len: int = PROMPT_LEN,
               response_len: int = RESPONSE_LEN) -> dict[str, np.ndarray]:
    """Left-padded prompts [B, P], right-padded responses [B, R] with lengths 1..R, acc [B] with every
    group of 4 listed symmetrically (so all-zero scores give dpo_acc exactly 0.5)."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(2, prompt_len + 1, rows)
    prompt_mask = (np.arange(prompt_len)[None] >= prompt_len - prompt_lens[:, None]).astype(np.int32)
    prompt_tokens = (rng.integers(1, vocab, (rows, prompt_len)) * prompt_mask).astype(np.int32)
    lengths = rng.integers(1, response_len + 1, rows)
    lengths[0] = response_len
    mask = (np.arange(response_len)[None] < lengths[:, None]).astype(np.float32)
    tokens = (rng.integers(1, vocab, (rows, response_len)) * mask).astype(np.int32)
    acc = np.tile(np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0], np.float32), rows // 8 + 1)[:rows]
    return dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens, mask=mask, acc=acc)


@functools.cache
def logp_fn(graphdef):
    """jitted (params, batch) -> (logp, entropy) [B, R] for the tiny model (one device), shared by the modules."""
    @jax.jit
    def fn(params, b):
        model = nnx.merge(graphdef, params)
        return response_logprobs(model, b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["mask"], with_entropy=True)
    return fn


def copy_tree(tree):
    """Fresh buffers (steps donate their state)."""
    return jax.tree.map(jnp.array, tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def layout(batch: dict[str, np.ndarray], minibatches: np.ndarray, micro: int, packed: bool, dp: int = 1) -> Layout:
    """The step's slots: `micro` rows per micro-batch padded, a budget of `micro` full rows packed (a row holds the
    longest sequence, P + R slots)."""
    row = batch["prompt_tokens"].shape[1] + batch["tokens"].shape[1]
    spec = PackSpec("test", mini_batch_size=minibatches.shape[1], micro_batch_size=micro, data_parallel=dp,
                    packed=packed, row_length=row, micro_batch_tokens=max(micro, dp) * row)
    return lay_out(batch, minibatches, spec)

"""The sampler state: every array the device programs carry from call to call, its shardings, and the empty state.

`SamplerState` holds N = `cfg.rows` slots: the KV cache (`prime_jax.sampling.cache`, either layout), each slot's
row bookkeeping ([N] vectors: prompt length, last token, PRNG key, steps, done, the row it runs), the tokens and
log-probs drawn so far ([N, R]), the held prompt (prefilled, not all of its samples started: its cache
[L, 1, K, prompt_len, Dh], logits [1, V] and length), and the `fin_*` buffers of rows whose slots `decode` refilled.
Under a mesh every array is pinned to one sharding (`constrain_state`), batch over the data axes and KV heads over
`tensor` (`_state_axes`), the same at every jit boundary, so the programs donate the state and update it in place;
`sampler_state_shardings` gives those shardings to the AOT compiler. `empty_state`: every slot free.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from prime_jax.mesh import logical_to_spec
from prime_jax.models.config import ModelConfig
from prime_jax.sampling.cache import KVCache, LayerKV, PromptKV
from prime_jax.sampling.config import SamplerConfig

Array = jax.Array


@flax.struct.dataclass
class SamplerState:
    """Everything the programs carry; N = cfg.rows slots, R = max_new_tokens, P = cfg.prompt_slots(prompt_len).

    cache: KV of every layer, S = cfg.cache_len(prompt_len) slots per row: `KVCache` (k [L, S, K, Dh, N], v
    [L, S, K, N, Dh]), or with cfg.per_layer one `LayerKV` per layer (k [N, K, Dh, S], v [N, K, S, Dh]); row
    b's prompt in slots 0..prompt_lens[b]-1, its generated tokens in a ring over slots P..S-1, all rows
    writing at P + ring each step; prompt_lens [N] int32; ring: int32 scalar, the ring slot the next step
    writes; last [N] int32 the row's last drawn token, fed at the next step; keys [N] per-row PRNG keys; steps
    [N] int32 tokens drawn (stop included); tokens [N, R] int32 (pad after stop); logprobs [N, R] float32 (0
    after stop); done [N] bool (a free slot is done); held: the `PromptKV` [L, 1, K, prompt_len, Dh] of the
    held prompt (prefilled, not all of its samples started yet; `insert`), held_logits [1, V] float32 its
    next-token logits, held_len [1] int32 its length; slot_row [N] int32 the row each slot started last (-1:
    none yet); next_row: int32 scalar, the row the next start takes (the held prompt has samples left to start
    while next_row % n != 0); rng: the call's PRNG key (a row's key is fold_in(rng, row)); fin_rows [F],
    fin_tokens [F, R], fin_logprobs [F, R], fin_lens [F]: the rows (slot_row values, -1 or already collected
    ones included) whose slots `decode` refilled in its current call, fin_count of them (F = N with
    cfg.refill, else 0). `cfg` and `prompt_len` (the largest prompt the cache holds) are static.
    """

    cache: KVCache | tuple[LayerKV, ...]
    held: PromptKV
    held_logits: Array
    held_len: Array
    prompt_lens: Array
    ring: Array
    last: Array
    keys: Array
    steps: Array
    tokens: Array
    logprobs: Array
    done: Array
    slot_row: Array
    next_row: Array
    rng: Array
    fin_rows: Array
    fin_tokens: Array
    fin_logprobs: Array
    fin_lens: Array
    fin_count: Array
    cfg: SamplerConfig = flax.struct.field(pytree_node=False)
    prompt_len: int = flax.struct.field(pytree_node=False)


def _state_axes(state: SamplerState) -> SamplerState:
    """The logical axes of every state array (its tree, an axes tuple per array): batch over data/fsdp, KV heads
    over tensor."""
    b1, b2 = ("batch",), ("batch", None)
    if isinstance(state.cache, KVCache):
        cache = KVCache(k=("layers", None, "kv_heads", "head_dim", "batch"),
                        v=("layers", None, "kv_heads", "batch", "head_dim"))
    else:
        cache = tuple(LayerKV(k=("batch", "kv_heads", "head_dim", None), v=("batch", "kv_heads", None, "head_dim"))
                      for _ in state.cache)
    held = ("layers", None, "kv_heads", None, "head_dim")
    return state.replace(cache=cache, held=PromptKV(k=held, v=held), held_logits=(None, None), held_len=(None,),
                         prompt_lens=b1, ring=(), last=b1, keys=b1, steps=b1, tokens=b2, logprobs=b2,
                         done=b1, slot_row=b1, next_row=(), rng=(), fin_rows=(None,), fin_tokens=(None, None),
                         fin_logprobs=(None, None), fin_lens=(None,), fin_count=())


def map_state(fn: Callable[[Any, tuple[str | None, ...]], Any], state: SamplerState) -> SamplerState:
    """fn(array, its logical axes) over every state array (`_state_axes`) -> a state of the results."""
    return jax.tree.map(fn, state, _state_axes(state))  # the axes tree is the state's up to its arrays


def sampler_state_shardings(state: SamplerState, mesh: Mesh) -> SamplerState:
    """NamedShardings of a (real or abstract) sampler state on `mesh`, as the programs constrain them."""
    return map_state(lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)), state)


def constrain_state(state: SamplerState) -> SamplerState:
    """Under a mesh, pins every state array to its sharding, the same at every jit boundary, so `insert` and
    `decode` donate in place; no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return state
    return map_state(lambda x, axes: jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh)), state)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def empty_state(model_cfg: ModelConfig, cfg: SamplerConfig, prompt_len: int) -> SamplerState:
    """Every slot free (done) and a zero KV cache for prompts of at most `prompt_len` tokens."""
    n, r = cfg.rows, cfg.max_new_tokens
    f = n if cfg.refill else 0
    zeros = jnp.zeros((n,), jnp.int32)
    cache = (LayerKV if cfg.per_layer else KVCache).zeros(model_cfg, n, cfg.cache_len(prompt_len))
    return constrain_state(SamplerState(
        cache=cache, held=PromptKV.zeros(model_cfg, 1, prompt_len),
        held_logits=jnp.zeros((1, model_cfg.vocab_size), jnp.float32), held_len=jnp.ones((1,), jnp.int32),
        prompt_lens=jnp.ones((n,), jnp.int32),
        ring=jnp.zeros((), jnp.int32), last=zeros, keys=jax.random.split(jax.random.key(0), n), steps=zeros,
        tokens=jnp.full((n, r), cfg.pad_id, jnp.int32), logprobs=jnp.zeros((n, r), jnp.float32),
        done=jnp.ones((n,), jnp.bool_), slot_row=jnp.full((n,), -1, jnp.int32), next_row=jnp.zeros((), jnp.int32),
        rng=jax.random.key(0), fin_rows=jnp.zeros((f,), jnp.int32), fin_tokens=jnp.zeros((f, r), jnp.int32),
        fin_logprobs=jnp.zeros((f, r), jnp.float32), fin_lens=jnp.zeros((f,), jnp.int32),
        fin_count=jnp.zeros((), jnp.int32), cfg=cfg, prompt_len=prompt_len))

"""Rollout sampler: one jitted prefill per prompt, then one `lax.while_loop` KV-cache decode in one jit.

Two pure functions of explicit state, so the trainer and the AOT compiler can lower them:
- `prefill(graphdef, params, prompt_tokens, prompt_mask, rng, first_row, n=, max_new_tokens=, sampling=)`: runs
  the B left-padded prompts once, broadcasts their KV cache to the B*n samples and samples the first token.
- `decode(graphdef, params, state)`: the decode loop; `state` (cache included) is donated and updated in
  place; it stops as soon as every row has emitted a stop token or `max_new_tokens` tokens.
Under `jax.set_mesh(mesh)` every sampler-state array is constrained to the batch split over the data axes
(KV heads over `tensor` where they divide), so in and out shardings of `decode` are the same and the
model params are read with their own sharding, in place. `generate` is the host wrapper around both.

Randomness: row r (= prompt i * n + sample j) draws step t from `fold_in(fold_in(rng, r), t)`, so the
tokens do not depend on batch padding, prompt-length bucket, sharding, or how many calls the prompts are
split into (`generate(..., prompts_per_call=)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from prime_jax.mesh import batch_sharding, data_parallel_size, global_to_host, host_to_global, logical_to_spec
from prime_jax.models.decoder import Decoder, KVCache, positions_from_mask

Array = jax.Array


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Prompt-length buckets: powers of two from `smallest` below `max_len`, then `max_len` itself."""
    if max_len < 1 or smallest < 1:
        raise ValueError(f"length_buckets: max_len and smallest must be >= 1, got {max_len}, {smallest}")
    out = []
    b = smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


DEFAULT_BUCKETS = length_buckets(1024)  # PRIME's prompts are at most 1024 tokens


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn; hashable, a static jit argument. temperature 0 = greedy; top_k 0 = off;
    top_p 1.0 = off. `stop_ids`: tokens that end a response (kept, masked 1)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"sampling: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling: top_k must be >= 0 (0 = off), got {self.top_k}")
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))


@flax.struct.dataclass
class SamplerState:
    """Everything the decode loop carries; N = padded batch * n rows, S = prompt bucket + max_new_tokens - 1.

    cache: KV of every layer [L, N, K, S, Dh]; kv_mask [N, S] bool (prompt padding False); prompt_len [N]
    int32 (real prompt tokens); keys [N] per-row PRNG keys; tokens [N, R] int32 (pad after stop);
    logprobs [N, R] float32 (0 after stop); lengths [N] int32 (valid tokens, stop included); done [N] bool;
    step: int32 scalar, tokens generated so far. `sampling` and `pad_id` are static (part of the tree
    structure), so `decode` needs nothing else.
    """

    cache: KVCache
    kv_mask: Array
    prompt_len: Array
    keys: Array
    tokens: Array
    logprobs: Array
    lengths: Array
    done: Array
    step: Array
    sampling: SamplingParams = flax.struct.field(pytree_node=False)
    pad_id: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass
class Rollout:
    """Host (numpy) result of `generate`; rows of prompt i are i*n ... i*n+n-1.

    prompt_tokens, prompt_mask: [B*n, P] left-padded; tokens: [B*n, R] right-padded with pad_id;
    logprobs: [B*n, R] float32, log softmax(logits / temperature) of each sampled token (temperature 1
    when greedy), 0 on padding; mask: [B*n, R] int32, 1 up to and including the first stop token;
    lengths: [B*n] int32.
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray


# --- token selection ---------------------------------------------------------------------------------

def _sortable(x: Array) -> Array:
    """float32 -> uint32 keys with the same order (so a threshold can be bisected bit by bit)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _nucleus_threshold(logits: Array, top_p: float) -> Array:
    """The smallest logit of the nucleus, as a sortable key: the largest t with P(logit >= t) >= top_p.
    {logit >= t} is the smallest top set whose probability reaches top_p (ties with its last token kept),
    the same set as sorting and cutting the cumulative sum, found by 32 bisection steps over the key bits
    instead of a [N, V] sort (140 ms per step at V=4k, N=64 on CPU; slow on TPU too). [N, V] -> [N, 1] uint32."""
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _sortable(logits)
    lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1) + 1  # P(>= lo) = 1 >= top_p; P(>= hi) = 0 < top_p

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(jnp.where(keys >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return lo[:, None]


def filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
    """-inf outside the top-k set, then outside the nucleus of the renormalised remainder (HF/vLLM order).

    logits: [N, V] float32 (already divided by the temperature). Ties with a cutoff are kept.
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
        logits = jnp.where(_sortable(logits) >= _nucleus_threshold(logits, top_p), logits, -jnp.inf)
    return logits


def select_tokens(logits: Array, keys: Array, step: Array, sampling: SamplingParams) -> tuple[Array, Array]:
    """Draws one token per row and returns its log-prob under softmax(logits / temperature).

    logits: [N, V] float32; keys: [N] PRNG keys; step: int32 scalar -> tokens [N] int32, logprobs [N] float32.
    Greedy (temperature 0) takes the argmax and reports its temperature-1 log-prob. Sampling is Gumbel-max
    over the filtered logits, with the noise of row r drawn from fold_in(keys[r], step).
    """
    if sampling.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits
    else:
        scaled = logits / sampling.temperature
        kept = filter_logits(scaled, sampling.top_k, sampling.top_p)
        # Written out rather than jax.random.categorical, which is ~5x slower on CPU at [64, 4096].
        uniform = lambda key: jax.random.uniform(jax.random.fold_in(key, step), logits.shape[-1:],  # noqa: E731
                                                 minval=jnp.finfo(jnp.float32).tiny)
        gumbel = -jnp.log(-jnp.log(jax.vmap(uniform)(keys)))
        tokens = jnp.argmax(kept + gumbel, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _is_stop(tokens: Array, stop_ids: tuple[int, ...]) -> Array:
    """[N] bool: the token is one of the stop ids."""
    if not stop_ids:
        return jnp.zeros(tokens.shape, jnp.bool_)
    return jnp.any(tokens[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)


# --- sharding of the sampler state -------------------------------------------------------------------

def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Under a mesh, pins `x` to the sharding its logical axes give (batch over data/fsdp); no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def _constrain_state(state: SamplerState) -> SamplerState:
    """The same shardings for every state at the jit boundaries, so `decode` donates in place."""
    kv = ("layers", "batch", "kv_heads", None, "head_dim")
    cache = KVCache(k=_constrain(state.cache.k, kv), v=_constrain(state.cache.v, kv), index=state.cache.index)
    b1, b2 = ("batch",), ("batch", None)
    return state.replace(cache=cache, kv_mask=_constrain(state.kv_mask, b2), prompt_len=_constrain(state.prompt_len, b1),
                         keys=_constrain(state.keys, b1), tokens=_constrain(state.tokens, b2),
                         logprobs=_constrain(state.logprobs, b2), lengths=_constrain(state.lengths, b1),
                         done=_constrain(state.done, b1))


# --- the two jitted programs -------------------------------------------------------------------------

def _advance(state: SamplerState, tokens: Array, logprobs: Array) -> SamplerState:
    """Writes the tokens drawn at `state.step` (pad / 0 for finished rows) and marks rows that stopped."""
    live = ~state.done
    col = lambda buf, val: jax.lax.dynamic_update_index_in_dim(buf, val, state.step, axis=1)  # noqa: E731
    done = state.done | _is_stop(tokens, state.sampling.stop_ids) | (state.step + 1 >= state.tokens.shape[1])
    return state.replace(tokens=col(state.tokens, jnp.where(live, tokens, state.pad_id)),
                         logprobs=col(state.logprobs, jnp.where(live, logprobs, 0.0)),
                         lengths=state.lengths + live.astype(jnp.int32), done=done, step=state.step + 1)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("n", "max_new_tokens", "sampling", "pad_id"))
def prefill(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: Array, prompt_mask: Array, rng: Array,
            first_row: Array | int = 0, *, n: int, max_new_tokens: int, sampling: SamplingParams,
            pad_id: int = 0) -> SamplerState:
    """Runs the prompts once and samples each row's first token.

    prompt_tokens, prompt_mask: [B, P] left-padded (a row with no real token is a dummy: done at once);
    rng: a PRNG key; first_row: uint32 scalar, the index of this call's first row among all rows sampled
    with `rng` (a traced value: calls differing only in it share one compile).
    -> SamplerState with N = B*n rows (prompt i -> rows i*n ... i*n+n-1), step 1.
    """
    model: Decoder = nnx.merge(graphdef, params)
    b, p = prompt_tokens.shape
    r = max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.bool_)
    cache = KVCache.zeros(model.cfg, b, p + r - 1)
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((b, r - 1), jnp.bool_)], axis=1)
    logits, cache = model.forward_cached(prompt_tokens, positions_from_mask(prompt_mask), cache, kv_mask)
    rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    cache = KVCache(k=jnp.repeat(cache.k, n, axis=1), v=jnp.repeat(cache.v, n, axis=1), index=cache.index)
    rows = b * n
    row_ids = jnp.asarray(first_row, jnp.uint32) + jnp.arange(rows, dtype=jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids)
    state = SamplerState(cache=cache, kv_mask=rep(kv_mask), prompt_len=rep(jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)),
                         keys=keys, tokens=jnp.full((rows, r), pad_id, jnp.int32), logprobs=jnp.zeros((rows, r), jnp.float32),
                         lengths=jnp.zeros((rows,), jnp.int32), done=rep(~jnp.any(prompt_mask, axis=1)),
                         step=jnp.zeros((), jnp.int32), sampling=sampling, pad_id=pad_id)
    tokens, logprobs = select_tokens(rep(logits), keys, state.step, sampling)
    return _constrain_state(_advance(state, tokens, logprobs))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("state",))
def decode(graphdef: nnx.GraphDef, params: nnx.State, state: SamplerState) -> SamplerState:
    """Feeds each row's last token and draws the next until every row is done; `state` is donated.

    One `lax.while_loop`; each iteration writes one KV slot per layer at `cache.index` and one token column.
    """
    model: Decoder = nnx.merge(graphdef, params)
    r = state.tokens.shape[1]

    def cond(s: SamplerState) -> Array:
        return (s.step < r) & ~jnp.all(s.done)

    def body(s: SamplerState) -> SamplerState:
        last = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1)  # [N, 1]
        positions = (s.prompt_len + s.step - 1)[:, None]
        logits, cache = model.forward_cached(last, positions, s.cache, s.kv_mask)
        tokens, logprobs = select_tokens(logits, s.keys, s.step, s.sampling)
        return _constrain_state(_advance(s.replace(cache=cache), tokens, logprobs))

    return _constrain_state(jax.lax.while_loop(cond, body, _constrain_state(state)))


# --- host wrapper ------------------------------------------------------------------------------------

def _check_inputs(prompts: Sequence[Sequence[int]], vocab: int, n: int, max_new_tokens: int, pad_id: int,
                  buckets: Sequence[int], prompts_per_call: int) -> None:
    """Validates the host inputs before anything compiles."""
    if n < 1:
        raise ValueError(f"generate: n (samples per prompt) must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompts_per_call < 0:
        raise ValueError(f"generate: prompts_per_call must be >= 0 (0: all prompts in one call), got {prompts_per_call}")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"generate: pad_id {pad_id} is outside the vocabulary [0, {vocab})")
    if not buckets or any(b < 1 for b in buckets):
        raise ValueError(f"generate: buckets must be a non-empty list of positive lengths, got {tuple(buckets)}")
    if len(prompts) == 0:
        raise ValueError("generate: no prompts given")
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"generate: prompt {i} is not a flat list of token ids (got shape {ids.shape}, {ids.dtype})")
        if ids.size == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise ValueError(f"generate: prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5].tolist()}")
    longest = max(len(p) for p in prompts)
    if longest > max(buckets):
        raise ValueError(f"generate: a prompt has {longest} tokens, more than the largest bucket {max(buckets)}")


def left_pad(x: np.ndarray, width: int, value: int) -> np.ndarray:
    """[B, W] -> [B, width] with `value` prepended to each row (width >= W)."""
    return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Joins rollouts row-wise, re-left-padding the prompts to the widest prompt bucket among them."""
    width = max(r.prompt_tokens.shape[1] for r in parts)
    cat = lambda f: np.concatenate([f(r) for r in parts])  # noqa: E731
    return Rollout(prompt_tokens=cat(lambda r: left_pad(r.prompt_tokens, width, pad_id)),
                   prompt_mask=cat(lambda r: left_pad(r.prompt_mask, width, 0)), tokens=cat(lambda r: r.tokens),
                   logprobs=cat(lambda r: r.logprobs), mask=cat(lambda r: r.mask), lengths=cat(lambda r: r.lengths))


def _sample_call(graphdef: nnx.GraphDef, params: nnx.State, prompts: Sequence[Sequence[int]], batch: int,
                 buckets: Sequence[int], rng: Array, first_row: int, *, n: int, max_new_tokens: int,
                 sampling: SamplingParams, pad_id: int, mesh: Mesh | None) -> Rollout:
    """One prefill + decode over `prompts`, left-padded to their smallest bucket and padded with dummy
    prompts to `batch` rows (the dummies are dropped from the result)."""
    p_len = min(b for b in buckets if b >= max(len(p) for p in prompts))
    tokens = np.full((batch, p_len), pad_id, np.int32)
    mask = np.zeros((batch, p_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, p_len - len(p):] = np.asarray(p, np.int32)
        mask[i, p_len - len(p):] = 1
    if mesh is not None:
        tokens_in, mask_in = (host_to_global(x, batch_sharding(mesh, 2)) for x in (tokens, mask))
    else:
        tokens_in, mask_in = tokens, mask
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        state = prefill(graphdef, params, tokens_in, mask_in, rng, np.uint32(first_row), n=n,
                        max_new_tokens=max_new_tokens, sampling=sampling, pad_id=pad_id)
        state = decode(graphdef, params, state)
    b, rows = len(prompts), len(prompts) * n
    out_tokens, out_logprobs, lengths = (global_to_host(x)[:rows] for x in (state.tokens, state.logprobs, state.lengths))
    return Rollout(prompt_tokens=np.repeat(tokens[:b], n, axis=0), prompt_mask=np.repeat(mask[:b], n, axis=0),
                   tokens=out_tokens, logprobs=out_logprobs,
                   mask=(np.arange(max_new_tokens)[None, :] < lengths[:, None]).astype(np.int32), lengths=lengths)


def generate(model: Decoder, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int], seed: int,
             pad_id: int = 0, mesh: Mesh | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
             prompts_per_call: int = 0) -> Rollout:
    """Samples n responses of at most `max_new_tokens` tokens for each prompt (token-id lists).

    Prompts are left-padded to the smallest bucket that fits; the batch is padded with dummy prompts to a
    multiple of the mesh's data-parallel size (dropped from the result). `prompts_per_call` > 0 samples
    the prompts in calls of that many, each padded to the same batch: one compile per bucket whatever the
    number of prompts, and the sampler's memory bounded by the call; the tokens are those of one call.
    With `mesh`, the model must live on it (e.g. `load_pretrained(path, mesh=mesh)`); its params are read
    in place.
    """
    sampling = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                              stop_ids=tuple(stop_ids))
    vocab = model.cfg.vocab_size
    _check_inputs(prompts, vocab, n, max_new_tokens, pad_id, buckets, prompts_per_call)
    bad_stops = [t for t in sampling.stop_ids if not 0 <= t < vocab]
    if bad_stops:
        raise ValueError(f"generate: stop ids {bad_stops} are outside the vocabulary [0, {vocab})")
    graphdef, params = nnx.split(model)
    if mesh is not None:
        devices = set(mesh.devices.flat)
        if any(x.sharding.device_set != devices for x in jax.tree.leaves(params)):
            raise ValueError("generate: the model's params are not on `mesh`; load it with load_pretrained(path, mesh=mesh)")
    per_call = prompts_per_call or len(prompts)
    dp = 1 if mesh is None else data_parallel_size(mesh)
    batch = -(-min(per_call, len(prompts)) // dp) * dp
    rng = jax.random.key(seed)
    parts = [_sample_call(graphdef, params, prompts[i:i + per_call], batch, buckets, rng, i * n, n=n,
                          max_new_tokens=max_new_tokens, sampling=sampling, pad_id=pad_id, mesh=mesh)
             for i in range(0, len(prompts), per_call)]
    return concat_rollouts(parts, pad_id)


__all__ = ["DEFAULT_BUCKETS", "Rollout", "SamplerState", "SamplingParams", "concat_rollouts", "decode",
           "filter_logits", "generate", "left_pad", "length_buckets", "prefill", "select_tokens"]

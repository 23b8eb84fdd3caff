"""Rollout sampler with continuous batching: a fixed number of rows in flight, a row that stops frees its slot.

Jitted programs, pure functions of explicit state, which the trainer and the AOT compiler lower alike:
- `empty_state(model_cfg, cfg, prompt_len)`: the sampler state with every slot free;
- `insert(graphdef, params, state, prompt_tokens, prompt_lens, slots, rows, hold, rng, layers)`: runs a batch
  of right-padded new prompts once (`Decoder.prefill`), copies each prompt's KV cache into the free slots its
  samples take (a prompt with samples still to start is held in the state for a later insert), and samples
  their first tokens; `state` is donated;
- `decode(graphdef, params, state, until_free, layers)`: up to `steps_per_sync` decode steps of every live row
  (a `lax.while_loop`, which also ends once `until_free` slots are free), each row at its own position;
  `state` (one KV cache per layout) is donated and updated in place; with `SamplerConfig.refill`, a slot freed
  mid-round takes the held prompt's next sample right there, on the device (the row that stopped is kept for
  the host in the state's `fin_*` buffers);
- `compact(state, rows, keep)`: the live rows moved into a smaller batch, for the tail of a call;
- `layer_weights(graphdef, params)`: the per-layer weights the CPU layout reads (`SamplerConfig.per_layer`).
`generate` / `Sampler` is the host loop around them: insert the next waiting prompt-samples into the free
slots, decode K steps, read which rows stopped (one host round trip per K steps), hand them to `on_rows`
(e.g. the verifiers) and repeat; once no prompt waits, shrink the batch to the live rows (halving sizes).
Under `jax.set_mesh(mesh)` every sampler-state array is constrained to the batch split over the data axes
(KV heads over `tensor` where they divide), so in and out shardings of `insert` and `decode` are the same
and the model params are read with their own sharding, in place (with `SamplerConfig.gather_params`,
decode gathers them once per call instead).

Randomness: row r (= prompt i * n + sample j) draws its t-th token from `fold_in(fold_in(rng, r), t)`, so
a row's tokens do not depend on which slot it runs in, when it was inserted, batch padding, prompt-length
bucket, sharding or `prompts_per_call` (up to float rounding differences between batch shapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prime_jax.mesh import (batch_sharding, data_parallel_size, global_to_host, host_to_global, logical_to_spec,
                            replicate)
from prime_jax.models.config import ModelConfig
from prime_jax.models.decoder import Decoder, KVCache, LayerKV

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


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static settings of the sampler programs (hashable: part of their compile key).

    n: samples per prompt; max_new_tokens: R; rows: slots decoded at once, the most rows in flight (a
    multiple of `data_parallel`); buckets: prompt-length buckets (prefill shapes); steps_per_sync: decode
    steps between two host round trips (K >= 1); kv_block: cache slots per attention block; data_parallel:
    how many ways the batch is split; gather_params: `decode` gathers the params once per call, replicated in
    the compute dtype, instead of reading them with their own sharding (each layer's weights gathered each step);
    per_layer: the CPU layout (`per_layer_decode`): one KV cache per layer (`LayerKV`) read whole, layers
    unrolled over weights sliced once per sampler call (`layer_weights`), instead of the stacked cache read in
    blocks of kv_block by a scan over the stacked weights; compact_tail: once no prompt waits, the host loop
    moves the live rows into the fewest slots of `tail_sizes` that hold them (`compact`), so the tail of a
    call, its longest rows, does not pay for the freed slots; refill: `decode` itself starts the held prompt's next
    samples in slots freed mid-round (`refills_on_device`), so only a prompt that needs a prefill ends a round.
    """

    n: int
    max_new_tokens: int
    sampling: SamplingParams
    rows: int
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    pad_id: int = 0
    steps_per_sync: int = 8
    kv_block: int = 256
    data_parallel: int = 1
    gather_params: bool = False
    per_layer: bool = False
    compact_tail: bool = False
    refill: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))
        if self.n < 1:
            raise ValueError(f"sampler: n (samples per prompt) must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampler: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.steps_per_sync < 1:
            raise ValueError(f"sampler: steps_per_sync (decode steps between host round trips) must be >= 1, "
                             f"got {self.steps_per_sync}")
        if self.kv_block < 1:
            raise ValueError(f"sampler: kv_block must be >= 1, got {self.kv_block}")
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"sampler: buckets must be a non-empty list of positive lengths, got {self.buckets}")
        if self.refill and self.data_parallel > 1:
            raise ValueError("sampler: refill (on-device starts of the held prompt's samples) needs an unsplit batch "
                             f"(data_parallel 1, got {self.data_parallel})")
        if self.rows < 1 or self.rows % self.data_parallel:
            raise ValueError(f"sampler: rows in flight ({self.rows}) must be a positive multiple of the "
                             f"{self.data_parallel}-way data-parallel size")

    @property
    def max_prefill(self) -> int:
        """The most new prompts one `insert` prefills: enough for every slot (a multiple of data_parallel); a prompt
        whose samples straddle inserts is prefilled by the first and held until all its samples have started."""
        return _round_up(-(-self.rows // self.n), self.data_parallel)

    def prefill_sizes(self) -> tuple[int, ...]:
        """Prefill batch sizes (a bounded set of compiled shapes): data_parallel * 2^k, then max_prefill. (An
        insert of the held prompt's samples only has no prefill: batch 0.)"""
        sizes, b = [], self.data_parallel
        while b < self.max_prefill:
            sizes.append(b)
            b *= 2
        return (*sizes, self.max_prefill)

    def tail_sizes(self) -> tuple[int, ...]:
        """Slot counts a call's tail shrinks through (`compact_tail`), largest first: rows halved up to three times,
        rounded up to the data-parallel size, while that shrinks it; one compiled decode program each. (Below an
        eighth of the rows a step costs about what reading the weights costs: more sizes would add compile time,
        ~1 s a program on CPU, for ~2% of a call in `bench/sampler.py`'s setting.)"""
        sizes = [self.rows]
        while (self.compact_tail and len(sizes) <= 3
               and (half := _round_up(sizes[-1] // 2, self.data_parallel)) < sizes[-1]):
            sizes.append(half)
        return tuple(sizes[1:])

    def bucket(self, length: int) -> int:
        """The smallest prompt bucket that holds `length` tokens."""
        return min(b for b in self.buckets if b >= length)

    def block(self, prompt_len: int) -> int:
        """Cache slots per attention block (the prompt and the ring are padded to whole blocks); 1 in the per-layer
        layout, which reads the whole cache."""
        return 1 if self.per_layer else min(self.kv_block, self.max_new_tokens)

    def prompt_slots(self, prompt_len: int) -> int:
        """Cache slots of a row's prompt: `prompt_len` rounded up to whole blocks."""
        return _round_up(prompt_len, self.block(prompt_len))

    def cache_len(self, prompt_len: int) -> int:
        """Cache slots per row: the prompt's, then a ring of max_new_tokens generated tokens (whole blocks)."""
        return self.prompt_slots(prompt_len) + _round_up(self.max_new_tokens, self.block(prompt_len))

    def cache_bytes(self, model_cfg: ModelConfig, prompt_len: int) -> int:
        """Bytes of the KV cache of all rows (keys and values, every layer)."""
        per_slot = 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim
        return self.rows * self.cache_len(prompt_len) * per_slot * jnp.dtype(model_cfg.dtype).itemsize


def per_layer_decode(platform: str) -> bool:
    """Whether the sampler should use the per-layer layout (`SamplerConfig.per_layer`) on `platform`: CPU.
    XLA:CPU copies any dynamic slice before the dot that reads it: a layer scan copied every layer's weights at
    every decode step (a third of a step at 8 rows in flight) and blocked attention copied every KV block it
    read (half a step at 64 rows); with a per-layer cache and unrolled layers every dot reads its operands in
    place. TPU and GPU read those slices in place, where the blocked read follows each row's filled length."""
    return platform == "cpu"


def refills_on_device(platform: str, data_parallel: int) -> bool:
    """Whether `decode` starts the held prompt's samples in freed slots itself (`SamplerConfig.refill`) by default:
    on one CPU device, where it is measured (at 8 rows in flight a row stops every ~5 steps; the same calls with
    refill on vs off, timed in pairs: x1.03-1.04 at 8 steps per sync, x1.09-1.11 at 16, x1.05 at 64 rows). On a
    batch split over devices the refill's choice of slot and copy of the stopped row would be collectives every step."""
    return platform == "cpu" and data_parallel == 1


def compacts_tail(platform: str) -> bool:
    """Whether the sampler moves a call's tail into halved batches by default (`SamplerConfig.compact_tail`) on
    `platform`: CPU, where it is measured (`bench/sampler.py`). On TPU/GPU each tail size is one more decode
    program to compile, and `compact`'s gather across the batch-split cache is not costed yet (`prime_jax.aot`)."""
    return platform == "cpu"


@dataclasses.dataclass
class Rollout:
    """Host (numpy) result of `generate`; rows of prompt i are i*n ... i*n+n-1.

    prompt_tokens, prompt_mask: [B*n, P] left-padded; tokens: [B*n, R] right-padded with pad_id;
    logprobs: [B*n, R] float32, log softmax(logits / temperature) of each sampled token (temperature 1
    when greedy), 0 on padding; mask: [B*n, R] int32, 1 up to and including the first stop token;
    lengths: [B*n] int32 (0: not sampled, the call was stopped early); callbacks_hidden_s: seconds spent in
    `on_rows` / `stop` while the device was still decoding (they cost no wall time).
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    callbacks_hidden_s: float = 0.0


@flax.struct.dataclass
class SamplerState:
    """Everything the programs carry; N = cfg.rows slots, R = max_new_tokens, P = cfg.prompt_slots(prompt_len).

    cache: KV of every layer, S = cfg.cache_len(prompt_len) slots per row: `KVCache` [L, N, K, S, Dh], or with
    cfg.per_layer one `LayerKV` per layer (k [N, K, Dh, S], v [N, K, S, Dh]); row b's prompt in slots
    0..prompt_lens[b]-1, its generated tokens in a ring over slots P..S-1, all rows writing at P + ring each
    step; prompt_lens [N] int32; ring: int32 scalar, the ring slot the next step writes; last [N] int32 the
    row's last drawn token, fed at the next step; keys [N] per-row PRNG keys; steps [N] int32 tokens drawn
    (stop included); tokens [N, R] int32 (pad after stop); logprobs [N, R] float32 (0 after stop); done [N]
    bool (a free slot is done); held: the KV cache [L, 1, K, prompt_len, Dh] of the held prompt (prefilled, not all
    of its samples started yet; `insert`), held_logits [1, V] float32 its next-token logits, held_len [1] int32 its
    length; slot_row [N] int32 the row each slot started last (-1: none yet); next_row: int32 scalar, the row the
    next start takes (the held prompt has samples left to start while next_row % n != 0); rng: the call's PRNG key
    (a row's key is fold_in(rng, row)); fin_rows [F], fin_tokens [F, R], fin_logprobs [F, R], fin_lens [F]: the rows
    (slot_row values, -1 or already collected ones included) whose slots `decode` refilled in its current call,
    fin_count of them (F = N with cfg.refill, else 0). `cfg` and `prompt_len` (the largest prompt the cache holds)
    are static.
    """

    cache: KVCache | tuple[LayerKV, ...]
    held: KVCache
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

    logits: [N, V] float32; keys: [N] PRNG keys; step: int32, [N] or a scalar (the index of the token each
    row draws) -> tokens [N] int32, logprobs [N] float32.
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
        uniform = lambda key, t: jax.random.uniform(jax.random.fold_in(key, t), logits.shape[-1:],  # noqa: E731
                                                    minval=jnp.finfo(jnp.float32).tiny)
        gumbel = -jnp.log(-jnp.log(jax.vmap(uniform)(keys, jnp.broadcast_to(step, keys.shape))))
        tokens = jnp.argmax(kept + gumbel, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _is_stop(tokens: Array, stop_ids: tuple[int, ...]) -> Array:
    """[N] bool: the token is one of the stop ids."""
    if not stop_ids:
        return jnp.zeros(tokens.shape, jnp.bool_)
    return jnp.any(tokens[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)


# --- sharding of the sampler state -------------------------------------------------------------------

def _state_axes(state: SamplerState) -> SamplerState:
    """The logical axes of every state array (its tree, an axes tuple per array): batch over data/fsdp, KV heads
    over tensor."""
    b1, b2 = ("batch",), ("batch", None)
    if isinstance(state.cache, KVCache):
        stacked = ("layers", "batch", "kv_heads", None, "head_dim")
        cache = KVCache(k=stacked, v=stacked)
    else:
        cache = tuple(LayerKV(k=("batch", "kv_heads", "head_dim", None), v=("batch", "kv_heads", None, "head_dim"))
                      for _ in state.cache)
    held = ("layers", None, "kv_heads", None, "head_dim")
    return state.replace(cache=cache, held=KVCache(k=held, v=held), held_logits=(None, None), held_len=(None,),
                         prompt_lens=b1, ring=(), last=b1, keys=b1, steps=b1, tokens=b2, logprobs=b2,
                         done=b1, slot_row=b1, next_row=(), rng=(), fin_rows=(None,), fin_tokens=(None, None),
                         fin_logprobs=(None, None), fin_lens=(None,), fin_count=())


def _map_state(fn: Callable[[Any, tuple[str | None, ...]], Any], state: SamplerState) -> SamplerState:
    return jax.tree.map(fn, state, _state_axes(state))  # the axes tree is the state's up to its arrays


def sampler_state_shardings(state: SamplerState, mesh: Mesh) -> SamplerState:
    """NamedShardings of a (real or abstract) sampler state on `mesh`, as the programs constrain them."""
    return _map_state(lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)), state)


def _constrain_state(state: SamplerState) -> SamplerState:
    """Under a mesh, pins every state array to its sharding, the same at every jit boundary, so `insert` and
    `decode` donate in place; no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return state
    return _map_state(lambda x, axes: jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh)), state)


# --- the jitted programs -----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def empty_state(model_cfg: ModelConfig, cfg: SamplerConfig, prompt_len: int) -> SamplerState:
    """Every slot free (done) and a zero KV cache for prompts of at most `prompt_len` tokens."""
    n, r = cfg.rows, cfg.max_new_tokens
    f = n if cfg.refill else 0
    zeros = jnp.zeros((n,), jnp.int32)
    cache = (LayerKV if cfg.per_layer else KVCache).zeros(model_cfg, n, cfg.cache_len(prompt_len))
    return _constrain_state(SamplerState(
        cache=cache, held=KVCache.zeros(model_cfg, 1, prompt_len),
        held_logits=jnp.zeros((1, model_cfg.vocab_size), jnp.float32), held_len=jnp.ones((1,), jnp.int32),
        prompt_lens=jnp.ones((n,), jnp.int32),
        ring=jnp.zeros((), jnp.int32), last=zeros, keys=jax.random.split(jax.random.key(0), n), steps=zeros,
        tokens=jnp.full((n, r), cfg.pad_id, jnp.int32), logprobs=jnp.zeros((n, r), jnp.float32),
        done=jnp.ones((n,), jnp.bool_), slot_row=jnp.full((n,), -1, jnp.int32), next_row=jnp.zeros((), jnp.int32),
        rng=jax.random.key(0), fin_rows=jnp.zeros((f,), jnp.int32), fin_tokens=jnp.zeros((f, r), jnp.int32),
        fin_logprobs=jnp.zeros((f, r), jnp.float32), fin_lens=jnp.zeros((f,), jnp.int32),
        fin_count=jnp.zeros((), jnp.int32), cfg=cfg, prompt_len=prompt_len))


def _put_prompts(kv: KVCache | tuple[LayerKV, ...], idx: Array, prompt: KVCache) -> KVCache | tuple[LayerKV, ...]:
    """`kv` (either layout) with the first p slots of rows idx [B] (out of range: dropped) set to the prompt keys and
    values `prompt` [L, B or 1 (broadcast), K, p, Dh] (the prefill's layout)."""
    p = prompt.k.shape[3]
    if isinstance(kv, KVCache):
        return KVCache(k=kv.k.at[:, idx, :, :p].set(prompt.k, mode="drop"),
                       v=kv.v.at[:, idx, :, :p].set(prompt.v, mode="drop"))
    return tuple(LayerKV(k=c.k.at[idx, :, :, :p].set(prompt.k[i].transpose(0, 1, 3, 2), mode="drop"),
                         v=c.v.at[idx, :, :p].set(prompt.v[i], mode="drop")) for i, c in enumerate(kv))


def _row(x: Array, at: Array, axis: int) -> Array:
    """Row `at` of x along `axis` (kept, size 1; zeros if out of range) as a masked sum: with x split over that
    axis, each device reduces its part and one row crosses devices, where a dynamic slice would gather all of x."""
    mask = jnp.expand_dims(jnp.arange(x.shape[axis]) == at, [d for d in range(x.ndim) if d != axis])
    return jnp.sum(jnp.where(mask, x, jnp.zeros((), x.dtype)), axis=axis, keepdims=True, dtype=x.dtype)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("state",))
def insert(graphdef: nnx.GraphDef, params: nnx.State, state: SamplerState, prompt_tokens: Array, prompt_lens: Array,
           slots: Array, rows: Array, hold: Array, rng: Array,
           layers: list[dict[str, Array]] | None = None) -> SamplerState:
    """Starts samples in free slots, each prompt prefilled once per sampler call.

    Sources: a batch of B new prompts, prefilled here, and (source B) the held prompt, prefilled by an earlier
    insert that had too few free slots for all its samples. Each started sample gets its source's KV cache in
    its slot's first prompt slots (one copy per sample) and draws its first token from its source's logits.
    prompt_tokens: [B, P] right-padded (P <= state.prompt_len; B may be 0); prompt_lens: [B] int32 >= 1;
    slots: [n, B + 1] int32, the slot sample j of source b starts in (cfg.rows or more: not started); rows:
    [n, B + 1] int32, its row id (the RNG stream it draws from); hold: int32, the new prompt held from now on
    (B: the held one stays); rng: the sampler's PRNG key; layers: with cfg.per_layer, `layer_weights`' output
    (the prefill's layers then run unrolled over them). -> state (donated in).
    """
    model: Decoder = nnx.merge(graphdef, params)
    cfg = state.cfg
    b = prompt_tokens.shape[0]
    kv = state.cache
    if b:
        logits, cache = model.prefill(prompt_tokens, prompt_lens, layers if cfg.per_layer else None)
        kv = jax.lax.fori_loop(0, cfg.n, lambda j, kv: _put_prompts(kv, slots[j, :b], cache), kv)  # sample j
    else:  # the held prompt's samples only: nothing to prefill
        logits = jnp.zeros((0, model.cfg.vocab_size), jnp.float32)
    kv = _put_prompts(kv, slots[:, b], state.held)  # (a second loop here would copy the whole cache on TPU)
    held = (state.held, state.held_logits, state.held_len)
    if b:  # the prompt to hold: taken out of the batch, the held one kept where hold == B
        new = (KVCache(k=state.held.k.at[:, :, :, :cache.k.shape[3]].set(_row(cache.k, hold, 1)),
                       v=state.held.v.at[:, :, :, :cache.v.shape[3]].set(_row(cache.v, hold, 1))),
               _row(logits, hold, 0), _row(prompt_lens, hold, 0))
        held = jax.tree.map(lambda new, old: jnp.where(hold < b, new, old), new, held)

    # The batch's and the held prompt's draws apart, so the batch's [n * B, V] work stays split like the batch.
    last_row = jnp.max(jnp.where(slots < cfg.rows, rows, -1))  # the last row started here
    state = state.replace(cache=kv, held=held[0], held_logits=held[1], held_len=held[2], rng=rng,
                          next_row=jnp.maximum(state.next_row, last_row + 1))
    started = [_start_rows(state, logits, prompt_lens, slots[:, :b], rows[:, :b]),
               _start_rows(state, state.held_logits, state.held_len, slots[:, b:], rows[:, b:])]
    state = _put_rows(state, *(jnp.concatenate(x) for x in zip(*started)))
    return _constrain_state(state)


def _start_rows(state: SamplerState, logits: Array, lens: Array, slots: Array, rows: Array) -> tuple[Array, ...]:
    """First draws of samples of P prompts: logits [P, V] float32 and lens [P] of each prompt, slots and rows
    [k, P] int32 (sample j of prompt p starts row rows[j, p] in slot slots[j, p]); row r's key is
    fold_in(state.rng, r). -> (slots, rows, prompt lens, keys, tokens, logprobs), each [k * P], sample-major."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(state.rng, rows.reshape(-1).astype(jnp.uint32))
    k = slots.shape[0]
    tokens, logprobs = select_tokens(jnp.tile(logits, (k, 1)), keys, jnp.int32(0), state.cfg.sampling)
    return slots.reshape(-1), rows.reshape(-1), jnp.tile(lens, k), keys, tokens, logprobs


def _put_rows(state: SamplerState, slots: Array, rows: Array, prompt_lens: Array, keys: Array, tokens: Array,
              logprobs: Array) -> SamplerState:
    """`state` with rows [k] started in slots [k] (cfg.rows or more: dropped), having drawn their first tokens [k]
    (`_start_rows`); their prompts' keys/values must already be in those slots."""
    r = state.cfg.max_new_tokens
    put = lambda buf, val: buf.at[slots].set(val, mode="drop")  # noqa: E731
    first = lambda x, fill: jnp.full((slots.shape[0], r), fill, x.dtype).at[:, 0].set(x)  # noqa: E731
    return state.replace(
        prompt_lens=put(state.prompt_lens, prompt_lens), last=put(state.last, tokens), keys=put(state.keys, keys),
        steps=put(state.steps, jnp.ones_like(tokens)), slot_row=put(state.slot_row, rows),
        tokens=put(state.tokens, first(tokens, state.cfg.pad_id)), logprobs=put(state.logprobs, first(logprobs, 0.0)),
        done=put(state.done, _is_stop(tokens, state.cfg.sampling.stop_ids) | (r == 1)))


@functools.partial(jax.jit, static_argnums=(0,))
def layer_weights(graphdef: nnx.GraphDef, params: nnx.State) -> list[dict[str, Array]]:
    """The stacked layer weights as one dict per layer (`Decoder.layer_slices`), copied out once: what `decode`
    and `insert`'s prefill read in the per-layer (CPU) layout. The host loop slices them once per sampler call,
    not once per decode call. (`gather_params` does not apply to them: a CPU has nothing to gather.)"""
    return nnx.merge(graphdef, params).layer_slices()


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("state",))
def decode(graphdef: nnx.GraphDef, params: nnx.State, state: SamplerState, until_free: Array,
           layers: list[dict[str, Array]] | None = None) -> SamplerState:
    """Up to `cfg.steps_per_sync` decode steps of every live row; stops early once every row is done or once at
    least `until_free` (int32 scalar) slots are free (done), so that waiting rows can take them.

    One `lax.while_loop`; each iteration feeds each live row its last token at its own position, writes the
    keys/values of every row at one shared ring slot of the cache (in place), attends over each row's own
    prompt and generated slots only, and draws the next token. With `cfg.refill`, done slots then take the held
    prompt's next samples (`refill`), so `until_free` counts the done slots left once it has none to start.
    layers: with `cfg.per_layer`, the layer weights from `layer_weights(graphdef, params)` (sliced here when not
    given).
    """
    cfg = state.cfg
    model: Decoder = nnx.merge(graphdef, params)
    if cfg.gather_params:  # the same weights the layers cast to the compute dtype, cast and gathered up front
        cast = lambda x: x.astype(model.cfg.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        model = nnx.merge(graphdef, jax.tree.map(lambda x: replicate(cast(x)), params))
    r, block, prompt_slots = cfg.max_new_tokens, cfg.block(state.prompt_len), cfg.prompt_slots(state.prompt_len)
    ring = cfg.cache_len(state.prompt_len) - prompt_slots
    layers = (layers or model.layer_slices()) if cfg.per_layer else None  # loop invariants, outside the while loop

    def cond(carry) -> Array:  # one reduction over the batch: one all-reduce a step when the batch is split
        i, s = carry
        return (i < cfg.steps_per_sync) & (jnp.sum(s.done) < jnp.minimum(until_free, s.done.shape[0]))

    def refill(s: SamplerState) -> SamplerState:
        """Done slots take the held prompt's next samples, one by one while it has any (and fin has room): the row
        that was in the slot goes to the fin buffers, the held cache into the slot, and the new row draws its first
        token as `insert` would have drawn it."""
        def has_work(s: SamplerState) -> Array:
            return jnp.any(s.done) & (s.next_row % cfg.n != 0) & (s.fin_count < s.fin_rows.shape[0])

        def start_one(s: SamplerState) -> SamplerState:
            slot, row, at = jnp.argmax(s.done).astype(jnp.int32), s.next_row, s.fin_count
            started = _start_rows(s, s.held_logits, s.held_len, slot[None, None], row[None, None])
            s = s.replace(fin_rows=s.fin_rows.at[at].set(s.slot_row[slot]),
                          fin_tokens=s.fin_tokens.at[at].set(s.tokens[slot]),
                          fin_logprobs=s.fin_logprobs.at[at].set(s.logprobs[slot]),
                          fin_lens=s.fin_lens.at[at].set(s.steps[slot]), fin_count=at + 1,
                          cache=_put_prompts(s.cache, slot[None], s.held), next_row=row + 1)
            return _put_rows(s, *started)

        return jax.lax.while_loop(has_work, start_one, s) if cfg.refill else s

    def body(carry):
        i, s = carry
        live = ~s.done
        # A row sees the s.steps tokens it has fed (the one fed now included): consecutive ring slots, as
        # every step feeds every live row. A finished or free row sees only its prompt (its ring slots are
        # overwritten, and it is reset by `insert`, before anyone reads them again).
        logits, cache = model.decode_step(s.last, s.prompt_lens + s.steps - 1, s.cache, prompt_lens=s.prompt_lens,
                                          counts=jnp.where(live, s.steps, 0), ring_index=s.ring,
                                          prompt_slots=prompt_slots, block=block, layers=layers)
        tokens, logprobs = select_tokens(logits, s.keys, s.steps, cfg.sampling)
        # Each row's new token goes to its column s.steps (none when not live) by a select, not a scatter: a
        # scatter into a batch-split array all-gathers its indices across the data-parallel devices every step.
        at = live[:, None] & (jnp.arange(r)[None, :] == s.steps[:, None])  # [B, R]
        steps = s.steps + live
        s = s.replace(cache=cache, ring=(s.ring + 1) % ring, last=jnp.where(live, tokens, s.last), steps=steps,
                      tokens=jnp.where(at, tokens[:, None], s.tokens),
                      logprobs=jnp.where(at, logprobs[:, None], s.logprobs),
                      done=s.done | _is_stop(tokens, cfg.sampling.stop_ids) | (steps >= r))
        return i + 1, _constrain_state(refill(s))

    state = refill(_constrain_state(state).replace(fin_count=jnp.zeros((), jnp.int32)))  # the host has read fin
    return _constrain_state(jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1])


@functools.partial(jax.jit, static_argnums=(1,))
def compact(state: SamplerState, rows: int, keep: Array) -> SamplerState:
    """The state of a `rows`-slot sampler whose slot i is slot keep[i] of `state` (keep: [rows] int32): every
    array gathered along its batch axis, the rest (the ring index) as is. Decoding it draws the same tokens
    (each row keeps its PRNG key, steps and cache)."""
    take = lambda x, axes: jnp.take(x, keep, axis=axes.index("batch")) if "batch" in axes else x  # noqa: E731
    return _constrain_state(_map_state(take, state).replace(cfg=dataclasses.replace(state.cfg, rows=rows)))


# --- host loop ---------------------------------------------------------------------------------------

class _ReadyClock:
    """When an array became ready, as a helper thread that waits for it sees it."""

    def __init__(self, x: Array):
        self._at = float("inf")
        self._thread = threading.Thread(target=self._wait, args=(x,), daemon=True)
        self._thread.start()

    def _wait(self, x: Array) -> None:
        x.block_until_ready()
        self._at = time.perf_counter()

    def seen(self) -> float:
        """The perf_counter time at which the array was seen ready; inf if not yet (does not wait)."""
        return self._at


RowsCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (row ids [k], tokens [k, R], lengths [k])
StopCallback = Callable[[], bool]  # asked once per decode round: True ends the call early


def check_prompts(prompts: Sequence[Sequence[int]], vocab: int, buckets: Sequence[int]) -> None:
    """Validates host prompts (token-id lists) before anything compiles."""
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


class Sampler:
    """The sampler of one model architecture and `SamplerConfig`: `sampler(params, prompts, seed)` samples
    n responses per prompt with continuous batching (`cfg.rows` rows in flight) and returns a `Rollout`.

    With `mesh`, the params must live on it (e.g. `load_pretrained(path, mesh=mesh)`); they are read in place.
    Every host runs the same loop on the same prompts (multi-host: each process feeds its devices' shards).
    """

    def __init__(self, graphdef: nnx.GraphDef, model_cfg: ModelConfig, cfg: SamplerConfig, mesh: Mesh | None = None):
        dp = 1 if mesh is None else data_parallel_size(mesh)
        if cfg.data_parallel != dp:
            raise ValueError(f"sampler: cfg.data_parallel={cfg.data_parallel} but the mesh splits the batch {dp} ways")
        vocab = model_cfg.vocab_size
        bad_stops = [t for t in cfg.sampling.stop_ids if not 0 <= t < vocab]
        if bad_stops:
            raise ValueError(f"generate: stop ids {bad_stops} are outside the vocabulary [0, {vocab})")
        if not 0 <= cfg.pad_id < vocab:
            raise ValueError(f"generate: pad_id {cfg.pad_id} is outside the vocabulary [0, {vocab})")
        self.graphdef, self.model_cfg, self.cfg, self.mesh = graphdef, model_cfg, cfg, mesh

    def _put(self, x: np.ndarray, batch: bool) -> Array | np.ndarray:
        """Host array -> global array on the mesh (split over the batch axes, or replicated)."""
        if self.mesh is None:
            return x
        sharding = batch_sharding(self.mesh, x.ndim) if batch else NamedSharding(self.mesh, PartitionSpec())
        return host_to_global(x, sharding)

    def _insert(self, params: nnx.State, layers: list[dict[str, Array]] | None, state: SamplerState,
                prompts: Sequence[Sequence[int]], held: int, row_ids: np.ndarray, slots: np.ndarray,
                rng: Array) -> tuple[SamplerState, int]:
        """Starts rows `row_ids` (consecutive) in `slots`: the rows of prompt `held` (the held prompt, -1: none)
        from its held cache, the others from one prefill of their prompts, padded to a prefill size and to its
        smallest bucket. -> (state, the prompt held from now on: the last one, if not all its samples started)"""
        n = self.cfg.n
        prompt_of = row_ids // n
        new = np.unique(prompt_of[prompt_of != held])  # consecutive prompt ids
        batch = min(b for b in (0, *self.cfg.prefill_sizes()) if b >= new.size)
        width = self.cfg.bucket(max((len(prompts[i]) for i in new), default=1))
        tokens = np.full((batch, width), self.cfg.pad_id, np.int32)
        lens = np.ones((batch,), np.int32)  # dummy prompts: one pad token, no slot
        for b, i in enumerate(new):
            tokens[b, :len(prompts[i])], lens[b] = prompts[i], len(prompts[i])
        source = np.where(prompt_of == held, batch, prompt_of - (new[0] if new.size else 0))
        slot_of = np.full((n, batch + 1), self.cfg.rows, np.int32)
        row_of = np.zeros((n, batch + 1), np.int32)
        slot_of[row_ids % n, source], row_of[row_ids % n, source] = slots, row_ids
        partial = (row_ids[-1] + 1) % n != 0  # the last prompt has samples left: hold it
        hold = source[-1] if partial and prompt_of[-1] != held else batch
        state = insert(self.graphdef, params, state, self._put(tokens, True), self._put(lens, True),
                       self._put(slot_of, False), self._put(row_of, False), self._put(np.int32(hold), False), rng,
                       layers)
        return state, int(prompt_of[-1]) if partial else -1

    def __call__(self, params: nnx.State, prompts: Sequence[Sequence[int]], seed: int,
                 on_rows: RowsCallback | None = None, stop: StopCallback | None = None) -> Rollout:
        """n samples of each prompt; rows of prompt i are i*n ... i*n+n-1. `on_rows(rows, tokens, lengths)` is
        called with the rows that stopped, as they stop, while the device decodes the next steps. `stop()` is
        asked once per decode round, right after `on_rows` has seen the rows of the round before (so its answer
        can depend on exactly those rows, whatever the timing); True ends the call: no more rows start, rows
        still decoding are dropped, and every row not handed to `on_rows` has length 0 in the result."""
        cfg = self.cfg
        check_prompts(prompts, self.model_cfg.vocab_size, cfg.buckets)
        n, r, total = cfg.n, cfg.max_new_tokens, len(prompts) * cfg.n
        prompt_len = cfg.bucket(max(len(p) for p in prompts))
        out_tokens = np.full((total, r), cfg.pad_id, np.int32)
        out_logprobs = np.zeros((total, r), np.float32)
        lengths = np.zeros((total,), np.int32)
        slot_row = np.full(cfg.rows, -1)  # the row each slot decodes, -1: free
        held = -1  # the prompt whose prefilled cache the state holds for its samples still to start
        hidden_s = 0.0
        next_row = 0
        finished: list[np.ndarray] = []
        rng = jax.random.key(seed)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            state = empty_state(self.model_cfg, cfg, prompt_len)
            layers = layer_weights(self.graphdef, params) if cfg.per_layer else None
            while True:
                free = np.flatnonzero(slot_row < 0)
                if next_row < total and free.size:
                    # The next waiting samples, at most one per free slot (so at most max_prefill new prompts).
                    end = min(total, next_row + free.size)
                    row_ids = np.arange(next_row, end)
                    slot_row[free[:row_ids.size]] = row_ids
                    state, held = self._insert(params, layers, state, prompts, held, row_ids, free[:row_ids.size], rng)
                    next_row = end
                if (slot_row < 0).all():
                    break
                # While samples wait, the round ends once an eighth of the slots (at most as many as wait) are free.
                waiting = total - next_row
                until_free = max(1, min(waiting, state.cfg.rows // 8)) if waiting else state.cfg.rows + 1
                state = decode(self.graphdef, params, state, self._put(np.int32(until_free), False), layers)
                decoded = _ReadyClock(state.done) if on_rows is not None or stop is not None else None
                t0 = time.perf_counter()
                if on_rows is not None:  # the rows of the last round, while the device decodes
                    for rows in finished:
                        on_rows(rows, out_tokens[rows], lengths[rows])
                finished = []
                stopping = stop is not None and stop()
                if decoded is not None:  # the callbacks' seconds before the decode call had finished cost no wall time
                    hidden_s += max(0.0, min(time.perf_counter(), decoded.seen()) - t0)
                if stopping:  # rows still decoding were never collected: length 0
                    break
                done = global_to_host(state.done)
                if cfg.refill:  # the device started rows itself: its slot map, and the rows whose slots they took
                    slot_row = np.array(global_to_host(state.slot_row))
                    next_row, count = int(global_to_host(state.next_row)), int(global_to_host(state.fin_count))
                    held = next_row // n if next_row % n else -1
                    if count:  # fin is read only when the device refilled a slot
                        rows, tokens, logprobs, steps = (global_to_host(x)[:count] for x in (
                            state.fin_rows, state.fin_tokens, state.fin_logprobs, state.fin_lens))
                        keep = (rows >= 0) & (lengths[np.maximum(rows, 0)] == 0)  # not collected before
                        new = rows[keep]
                        out_tokens[new], out_logprobs[new], lengths[new] = tokens[keep], logprobs[keep], steps[keep]
                        if new.size:
                            finished.append(new)
                    slot_row[done & (slot_row >= 0) & (lengths[np.maximum(slot_row, 0)] > 0)] = -1  # collected before
                stopped = np.flatnonzero(done & (slot_row >= 0))
                if stopped.size:
                    rows = slot_row[stopped]
                    tokens, logprobs, steps = (global_to_host(x) for x in (state.tokens, state.logprobs, state.steps))
                    out_tokens[rows], out_logprobs[rows], lengths[rows] = tokens[stopped], logprobs[stopped], steps[stopped]
                    slot_row[stopped] = -1
                    finished.append(rows)
                live = np.flatnonzero(slot_row >= 0)
                if next_row >= total and live.size:  # the tail: the live rows into the fewest slots that hold them
                    size = min(s for s in (state.cfg.rows, *cfg.tail_sizes()) if s >= live.size)
                    if size < state.cfg.rows:
                        keep = np.concatenate([live, np.flatnonzero(slot_row < 0)])[:size].astype(np.int32)
                        state, slot_row = compact(state, size, self._put(keep, False)), slot_row[keep]
        if on_rows is not None:
            for rows in finished:
                on_rows(rows, out_tokens[rows], lengths[rows])
        width = prompt_len
        prompt_tokens = np.full((len(prompts), width), cfg.pad_id, np.int32)
        prompt_mask = np.zeros((len(prompts), width), np.int32)
        for i, p in enumerate(prompts):
            prompt_tokens[i, width - len(p):], prompt_mask[i, width - len(p):] = p, 1
        return Rollout(prompt_tokens=np.repeat(prompt_tokens, n, axis=0), prompt_mask=np.repeat(prompt_mask, n, axis=0),
                       tokens=out_tokens, logprobs=out_logprobs,
                       mask=(np.arange(r)[None, :] < lengths[:, None]).astype(np.int32), lengths=lengths,
                       callbacks_hidden_s=hidden_s)


def left_pad(x: np.ndarray, width: int, value: int) -> np.ndarray:
    """[B, W] -> [B, width] with `value` prepended to each row (width >= W)."""
    return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)


def rows_in_flight(prompts_per_call: int, num_prompts: int, n: int, data_parallel: int) -> int:
    """Slots of a sampler: `prompts_per_call` x n (0: all prompts), rounded up to the data-parallel size."""
    return _round_up(min(prompts_per_call or num_prompts, num_prompts) * n, data_parallel)


def generate(model: Decoder, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int], seed: int,
             pad_id: int = 0, mesh: Mesh | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
             prompts_per_call: int = 0, steps_per_sync: int = 8, kv_block: int = 256, gather_params: bool = False,
             compact_tail: bool | None = None, on_rows: RowsCallback | None = None,
             stop: StopCallback | None = None) -> Rollout:
    """Samples n responses of at most `max_new_tokens` tokens for each prompt (token-id lists).

    At most `prompts_per_call` x n rows are in flight (0: all prompts at once), rounded up to the mesh's
    data-parallel size; a row that stops frees its slot for the next waiting prompt-sample; once none waits,
    `compact_tail` (None: `compacts_tail` of the platform) moves the live rows into smaller batches. Host round
    trips every `steps_per_sync` decode steps. With `mesh`, the model must live on it (e.g.
    `load_pretrained(path, mesh=mesh)`); its params are read in place. See `Sampler`.
    """
    if prompts_per_call < 0:
        raise ValueError(f"generate: prompts_per_call must be >= 0 (0: all prompts at once), got {prompts_per_call}")
    sampling = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                              stop_ids=tuple(stop_ids))
    dp = 1 if mesh is None else data_parallel_size(mesh)
    graphdef, params = nnx.split(model)
    platform = next(iter(jax.tree.leaves(params)[0].sharding.device_set)).platform
    cfg = SamplerConfig(n=n, max_new_tokens=max_new_tokens, sampling=sampling,
                        rows=rows_in_flight(prompts_per_call, max(len(prompts), 1), max(n, 1), dp), buckets=tuple(buckets),
                        pad_id=pad_id, steps_per_sync=steps_per_sync, kv_block=kv_block, data_parallel=dp,
                        gather_params=gather_params, per_layer=per_layer_decode(platform),
                        compact_tail=compacts_tail(platform) if compact_tail is None else compact_tail,
                        refill=refills_on_device(platform, dp))
    if mesh is not None:
        devices = set(mesh.devices.flat)
        if any(x.sharding.device_set != devices for x in jax.tree.leaves(params)):
            raise ValueError("generate: the model's params are not on `mesh`; load it with load_pretrained(path, mesh=mesh)")
    return Sampler(graphdef, model.cfg, cfg, mesh)(params, prompts, seed, on_rows, stop)


__all__ = ["DEFAULT_BUCKETS", "Rollout", "Sampler", "SamplerConfig", "SamplerState", "SamplingParams", "StopCallback",
           "compact", "compacts_tail", "decode", "empty_state", "filter_logits", "generate", "insert", "layer_weights",
           "left_pad", "length_buckets", "per_layer_decode", "refills_on_device", "rows_in_flight",
           "sampler_state_shardings", "select_tokens"]

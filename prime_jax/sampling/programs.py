"""The sampler's device programs: jitted pure functions of an explicit `SamplerState`, which the host engine
(`prime_jax.sampling.engine`), the trainer and the AOT compiler (`prime_jax.aot`) call or lower alike.

- `insert(graphdef, params, state, prompt_tokens [B, P], prompt_lens [B], slots [n, B + 1], rows [n, B + 1], hold,
  rng, layers)`: runs a batch of right-padded new prompts once (`Decoder.prefill`), copies each prompt's KV cache
  into the free slots its samples take (a prompt with samples still to start is held in the state for a later
  insert), and samples their first tokens; `state` is donated;
- `decode(graphdef, params, state, until_free, layers)`: up to `steps_per_sync` decode steps of every live row
  (a `lax.while_loop`, which also ends once `until_free` slots are free), each row at its own position
  (`prime_jax.sampling.cache.decode_step`); `state` (one KV cache per layout) is donated and updated in place;
  with `SamplerConfig.refill`, a slot freed mid-round takes the held prompt's next sample right there, on the
  device (the row that stopped is kept for the host in the state's `fin_*` buffers);
- `compact(state, rows, keep [rows])`: the live rows moved into a smaller batch, for the tail of a call;
- `layer_weights(graphdef, params)`: the per-layer weights the CPU layout reads (`SamplerConfig.per_layer`).
A started row r draws its first token from fold_in(rng, r) (`_start_rows`) and is written into the state's slot
arrays by `_put_rows`, whether `insert` or `decode`'s refill starts it, so both draw the same tokens.
Under `jax.set_mesh(mesh)` every state array is constrained to its sharding (`constrain_state`), so in and out
shardings of `insert` and `decode` are the same and the model params are read with their own sharding, in place
(with `SamplerConfig.gather_params`, decode gathers them once per call instead).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.mesh import replicate
from prime_jax.models.decoder import Decoder, in_compute_dtype
from prime_jax.sampling.cache import PromptKV, decode_step, put_prompts
from prime_jax.sampling.select import is_stop, select_tokens
from prime_jax.sampling.state import SamplerState, constrain_state, map_state

Array = jax.Array


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
        logits, (k, v) = model.prefill(prompt_tokens, prompt_lens, layers if cfg.per_layer else None)
        prompt = PromptKV(k=k, v=v)
        kv = jax.lax.fori_loop(0, cfg.n, lambda j, kv: put_prompts(kv, slots[j, :b], prompt), kv)  # sample j
    else:  # the held prompt's samples only: nothing to prefill
        logits = jnp.zeros((0, model.cfg.vocab_size), jnp.float32)
    kv = put_prompts(kv, slots[:, b], state.held)  # (a second loop here would copy the whole cache on TPU)
    held = (state.held, state.held_logits, state.held_len)
    if b:  # the prompt to hold: taken out of the batch, the held one kept where hold == B
        new = (PromptKV(k=state.held.k.at[:, :, :, :prompt.k.shape[3]].set(_row(prompt.k, hold, 1)),
                        v=state.held.v.at[:, :, :, :prompt.v.shape[3]].set(_row(prompt.v, hold, 1))),
               _row(logits, hold, 0), _row(prompt_lens, hold, 0))
        held = jax.tree.map(lambda new, old: jnp.where(hold < b, new, old), new, held)

    # The batch's and the held prompt's draws apart, so the batch's [n * B, V] work stays split like the batch.
    last_row = jnp.max(jnp.where(slots < cfg.rows, rows, -1))  # the last row started here
    state = state.replace(cache=kv, held=held[0], held_logits=held[1], held_len=held[2], rng=rng,
                          next_row=jnp.maximum(state.next_row, last_row + 1))
    started = [_start_rows(state, logits, prompt_lens, slots[:, :b], rows[:, :b]),
               _start_rows(state, state.held_logits, state.held_len, slots[:, b:], rows[:, b:])]
    state = _put_rows(state, *(jnp.concatenate(x) for x in zip(*started)))
    return constrain_state(state)


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
        done=put(state.done, is_stop(tokens, state.cfg.sampling.stop_ids) | (r == 1)))


@functools.partial(jax.jit, static_argnums=(0,))
def layer_weights(graphdef: nnx.GraphDef, params: nnx.State) -> list[dict[str, Array]]:
    """The stacked layer weights as one dict per layer (`Decoder.layer_slices`), copied out once in the compute
    dtype (every layer casts its weights to it before use, so results are unchanged; an fp32 policy computing in
    bf16 keeps half the bytes): what `decode` and `insert`'s prefill read in the per-layer (CPU) layout. The host
    loop slices them once per sampler call, not once per decode call. (`gather_params` does not apply to them: a
    CPU has nothing to gather.)"""
    model = nnx.merge(graphdef, params)
    return jax.tree.map(lambda w: w.astype(model.cfg.dtype), model.layer_slices())


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
        model = nnx.merge(graphdef, jax.tree.map(replicate, in_compute_dtype(params, model.cfg.dtype)))
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
                          cache=put_prompts(s.cache, slot[None], s.held), next_row=row + 1)
            return _put_rows(s, *started)

        return jax.lax.while_loop(has_work, start_one, s) if cfg.refill else s

    def body(carry):
        i, s = carry
        live = ~s.done
        # A row sees the s.steps tokens it has fed (the one fed now included): consecutive ring slots, as
        # every step feeds every live row. A finished or free row sees only its prompt (its ring slots are
        # overwritten, and it is reset by `insert`, before anyone reads them again).
        logits, cache = decode_step(model, s.last, s.prompt_lens + s.steps - 1, s.cache, prompt_lens=s.prompt_lens,
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
                      done=s.done | is_stop(tokens, cfg.sampling.stop_ids) | (steps >= r))
        return i + 1, constrain_state(refill(s))

    state = refill(constrain_state(state).replace(fin_count=jnp.zeros((), jnp.int32)))  # the host has read fin
    return constrain_state(jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1])


@functools.partial(jax.jit, static_argnums=(1,))
def compact(state: SamplerState, rows: int, keep: Array) -> SamplerState:
    """The state of a `rows`-slot sampler whose slot i is slot keep[i] of `state` (keep: [rows] int32): every
    array gathered along its batch axis, the rest (the ring index) as is. Decoding it draws the same tokens
    (each row keeps its PRNG key, steps and cache)."""
    take = lambda x, axes: jnp.take(x, keep, axis=axes.index("batch")) if "batch" in axes else x  # noqa: E731
    return constrain_state(map_state(take, state).replace(cfg=dataclasses.replace(state.cfg, rows=rows)))

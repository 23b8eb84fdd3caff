"""The sampler's host engine: continuous batching around the device programs (`prime_jax.sampling.programs`).

`Sampler(graphdef, model_cfg, cfg, mesh)(params, prompts, seed, on_rows, stop)` / `generate(model, prompts, ...)`
keep a fixed number of rows in flight (N = `cfg.rows` slots); a row that stops frees its slot for the next waiting
prompt-sample. The loop: insert the next waiting prompt-samples into the free slots (`insert`, prompts padded to a
prefill size and a length bucket), decode K = `cfg.steps_per_sync` steps (`decode`), read which rows stopped (one
host round trip per K steps), hand them to `on_rows` (e.g. the verifiers) while the device decodes the next round,
ask `stop` whether to end the call, and repeat; once no prompt waits, shrink the batch to the live rows (`compact`,
halving sizes). The result is a host `Rollout`: tokens, log-probs and masks [B*n, R], rows of prompt i at
i*n ... i*n+n-1, prompts left-padded [B*n, P]. `generate` picks the `SamplerConfig` from the platform
(`per_layer_decode`, `compacts_tail`, `refills_on_device`).

Randomness: row r (= prompt i * n + sample j) draws its t-th token from `fold_in(fold_in(rng, r), t)`, so
a row's tokens do not depend on which slot it runs in, when it was inserted, batch padding, prompt-length
bucket, sharding or `prompts_per_call` (up to float rounding differences between batch shapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prime_jax.mesh import batch_sharding, data_parallel_size, global_to_host, host_to_global
from prime_jax.models.config import ModelConfig
from prime_jax.models.decoder import Decoder
from prime_jax.sampling.config import (DEFAULT_BUCKETS, SamplerConfig, compacts_tail, per_layer_decode,
                                       refills_on_device, rows_in_flight)
from prime_jax.sampling.programs import compact, decode, insert, layer_weights
from prime_jax.sampling.select import SamplingParams
from prime_jax.sampling.state import SamplerState, empty_state

Array = jax.Array


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


class _ReadyClock:
    """When an array became ready, as a helper thread that waits for it sees it."""

    def __init__(self, x: Array):
        self._at = float("inf")
        self._thread = threading.Thread(target=self._wait, args=(x,), daemon=True)
        self._thread.start()

    def _wait(self, x: Array) -> None:
        try:
            x.block_until_ready()
        except jax.errors.JaxRuntimeError:  # donated to the next decode call before this thread ran: nobody asks now
            return
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

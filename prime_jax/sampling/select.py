"""Token selection: how the sampler draws one token per row from its next-token logits, and when a row stops.

`SamplingParams` (temperature, top-k, top-p, stop ids) is hashable and a static argument of the sampler programs.
`select_tokens(logits [N, V] float32, keys [N], step)` -> (tokens [N] int32, logprobs [N] float32): greedy
(temperature 0, argmax) or Gumbel-max over `filter_logits`' top-k then top-p (nucleus) set, the noise of row r at
step t drawn from fold_in(keys[r], t), so a row's draws depend on its key and step only (not on its slot or the
batch). The nucleus cut is found by bisection over sortable float keys (`_sortable`, `_nucleus_threshold`) instead
of sorting [N, V] every step. `is_stop(tokens [N], stop_ids)` -> [N] bool.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


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


def _sortable(x: Array) -> Array:
    """float32 -> uint32 keys with the same order (so a threshold can be bisected bit by bit)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _nucleus_threshold(logits: Array, top_p: float) -> Array:
    """The smallest logit of the nucleus, as a sortable key: the largest t with P(logit >= t) >= top_p.
    {logit >= t} is the smallest top set whose probability reaches top_p (ties with its last token kept),
    the same set as sorting and cutting the cumulative sum, found by 32 bisection steps over the key bits
    instead of a [N, V] sort every step (slow on CPU and on TPU). [N, V] -> [N, 1] uint32."""
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
        # Written out rather than jax.random.categorical, which is several times slower on CPU.
        uniform = lambda key, t: jax.random.uniform(jax.random.fold_in(key, t), logits.shape[-1:],  # noqa: E731
                                                    minval=jnp.finfo(jnp.float32).tiny)
        gumbel = -jnp.log(-jnp.log(jax.vmap(uniform)(keys, jnp.broadcast_to(step, keys.shape))))
        tokens = jnp.argmax(kept + gumbel, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def is_stop(tokens: Array, stop_ids: tuple[int, ...]) -> Array:
    """[N] bool: the token is one of the stop ids."""
    if not stop_ids:
        return jnp.zeros(tokens.shape, jnp.bool_)
    return jnp.any(tokens[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)

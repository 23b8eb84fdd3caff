"""The sampler's static settings: `SamplerConfig`, the platform defaults for its layout choices, prompt buckets.

`SamplerConfig` is hashable and part of every sampler program's compile key. It fixes the shapes: N = `rows` slots
in flight, R = `max_new_tokens`, prompt buckets (prefill widths), prefill batch sizes (`prefill_sizes`), the KV
cache of a row (`cache_len`: the prompt's slots, then a ring of R generated tokens, both whole attention blocks of
`block`), and the smaller batches a call's tail moves into (`tail_sizes`). It also picks the cache layout
(`per_layer`), the tail compaction (`compact_tail`) and on-device refills (`refill`); `per_layer_decode`,
`compacts_tail` and `refills_on_device` are their defaults by platform, and `rows_in_flight` the default N of
`generate`. `length_buckets` / `DEFAULT_BUCKETS`: powers-of-two prompt widths (one compiled prefill shape each).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from prime_jax.models.config import ModelConfig
from prime_jax.sampling.select import SamplingParams


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
        eighth of the rows a step costs about what reading the weights costs: more sizes would add a compiled
        program each and save little.)"""
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
    every decode step and blocked attention copied every KV block it read; with a per-layer cache and unrolled
    layers every dot reads its operands in place. TPU and GPU read those slices in place, where the blocked read
    follows each row's filled length."""
    return platform == "cpu"


def refills_on_device(platform: str, data_parallel: int) -> bool:
    """Whether `decode` starts the held prompt's samples in freed slots itself (`SamplerConfig.refill`) by default:
    on one CPU device. There, with few rows in flight, a row stops every few steps, and each freed slot would sit
    idle until the round ends (or end it early: one more host round trip) before the host inserts a row into it;
    the refill is a local copy of the held prompt's cache. On a batch split over devices the refill's choice of slot
    and copy of the stopped row would be collectives every step."""
    return platform == "cpu" and data_parallel == 1


def compacts_tail(platform: str) -> bool:
    """Whether the sampler moves a call's tail into halved batches by default (`SamplerConfig.compact_tail`) on
    `platform`: CPU, where a decode step's cost follows the batch, so the tail's freed slots would cost to the end
    of the call (`bench/sampler.py` times it). On TPU/GPU each tail size is one more decode program to compile, and
    `compact`'s gather across the batch-split cache is not costed yet (`prime_jax.aot`)."""
    return platform == "cpu"


def rows_in_flight(prompts_per_call: int, num_prompts: int, n: int, data_parallel: int) -> int:
    """Slots of a sampler: `prompts_per_call` x n (0: all prompts), rounded up to the data-parallel size."""
    return _round_up(min(prompts_per_call or num_prompts, num_prompts) * n, data_parallel)

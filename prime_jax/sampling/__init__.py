"""Rollout sampler with continuous batching: a fixed number of rows in flight, a row that stops frees its slot.

Layers, each a module, bottom up:
- `select`: token selection, one token per row from its logits (`SamplingParams`, `select_tokens`, top-k/top-p);
- `config`: the static settings (`SamplerConfig`: shapes, cache layout, tail compaction, refill) and their
  platform defaults;
- `cache`: the KV-cache layouts (`KVCache` stacked and slot-major, per-layer `LayerKV`; `PromptKV` a prefill's), the
  attention of one new token over them, and the one-token decode step through the decoder's layers;
- `state`: `SamplerState`, everything the device programs carry, its shardings, and `empty_state`;
- `programs`: the jitted device programs `insert`, `decode`, `compact`, `layer_weights` (pure functions of the
  state, which the trainer and the AOT compiler lower alike);
- `engine`: the host loop around them (`Sampler`, `generate` -> `Rollout`), streaming stopped rows to `on_rows`.
The names below are the package's API; `from prime_jax.sampling import X` is the way to import them.
"""

from prime_jax.sampling.cache import KVCache, LayerKV, PromptKV, decode_step
from prime_jax.sampling.config import (DEFAULT_BUCKETS, SamplerConfig, compacts_tail, length_buckets, per_layer_decode,
                                       refills_on_device, rows_in_flight)
from prime_jax.sampling.engine import (Rollout, RowsCallback, Sampler, StopCallback, check_prompts, generate,
                                       left_pad)
from prime_jax.sampling.programs import compact, decode, insert, layer_weights
from prime_jax.sampling.select import SamplingParams, filter_logits, select_tokens
from prime_jax.sampling.state import SamplerState, empty_state, sampler_state_shardings

__all__ = ["DEFAULT_BUCKETS", "KVCache", "LayerKV", "PromptKV", "Rollout", "RowsCallback", "Sampler", "SamplerConfig",
           "SamplerState", "SamplingParams", "StopCallback", "check_prompts", "compact", "compacts_tail", "decode",
           "decode_step", "empty_state", "filter_logits", "generate", "insert", "layer_weights", "left_pad",
           "length_buckets", "per_layer_decode", "refills_on_device", "rows_in_flight", "sampler_state_shardings",
           "select_tokens"]

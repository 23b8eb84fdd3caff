"""The sampler's KV-cache layouts, the attention of one new token per row over them, and the one-token decode step.

Each row of the cache holds its prompt in slots 0..P-1 (P = `SamplerConfig.prompt_slots`) and its generated tokens
in a ring over slots P..S-1, written by every row at one shared ring index each step (one in-place slice per layer,
no per-row scatter); row b attends its first prompt_lens[b] slots and the counts[b] ring slots written last
(`sampler_visible`, [B, S] bool). Two layouts (`SamplerConfig.per_layer`), because the fastest read differs:
- `KVCache`: k [L, S, K, Dh, B], v [L, S, K, B, Dh] (slot-major, as the TPU decode loop keeps it), every layer
  stacked, the layers scanned over the stacked weights; attention (`cached_attention`) reads each row's filled
  slots in place, block by block, with an online softmax, so a step's work follows the filled length, not S (TPU,
  GPU);
- a tuple of L `LayerKV`: k [B, K, Dh, S] (slot-minor, so the scores are a plain matmul), v [B, K, S, Dh], the
  layers unrolled over weights sliced once per sampler call; attention (`whole_cache_attention`) reads the layer's
  whole cache in two matmuls, which is what XLA:CPU runs fastest (it copies every dynamic slice before a dot).
`decode_step` runs the decoder's layers (`prime_jax.models.decoder`'s layer helpers) for one token per row over
either layout; `put_prompts` copies a prefill's keys/values (`PromptKV`, [L, B, K, T, Dh]) into rows of either layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from prime_jax.models.config import ModelConfig
from prime_jax.models.decoder import Decoder, layer_qkv, output_and_mlp, rms_norm, rope_frequencies

Array = jax.Array


@flax.struct.dataclass
class PromptKV:
    """Keys and values of every layer of a batch of prompts, as `Decoder.prefill` returns them (and the sampler holds
    a prompt whose samples wait for slots): `k`, `v` [L, B, K, T, Dh] compute dtype."""

    k: Array
    v: Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> PromptKV:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@flax.struct.dataclass
class KVCache:
    """The sampler's stacked cache of every layer, slot-major: `k` [L, S, K, Dh, B], `v` [L, S, K, B, Dh] compute
    dtype. Each row's prompt is in the first slots and its generated tokens in a ring after them
    (`cached_attention`). Slot-major, rows minor: the layout XLA:TPU gives the decode loop's carried cache, so the
    program takes it in place (in the head-major [L, B, K, S, Dh] the v5p decode copied both caches into this
    layout before its loop and back after it: docs/aot.md)."""

    k: Array
    v: Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
        shape, dtype = (cfg.num_layers, length, cfg.num_kv_heads), jnp.dtype(cfg.dtype)
        return cls(k=jnp.zeros((*shape, cfg.head_dim, batch), dtype), v=jnp.zeros((*shape, batch, cfg.head_dim), dtype))

    @property
    def length(self) -> int:
        """S, the slots per row."""
        return self.k.shape[1]


@flax.struct.dataclass
class LayerKV:
    """One layer's keys and values in the per-layer cache layout (`decode_step` on CPU): k [B, K, Dh, S]
    slot-minor, so that the scores q.k are a plain matmul (XLA:CPU runs a dot whose operand is slot-major,
    [S, Dh] contracted on Dh, slower: it repacks the keys each time); v [B, K, S, Dh]."""

    k: Array
    v: Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> tuple[LayerKV, ...]:
        """A zero cache of every layer."""
        shape, dtype = (batch, cfg.num_kv_heads, length, cfg.head_dim), jnp.dtype(cfg.dtype)
        return tuple(cls(k=jnp.zeros((*shape[:2], shape[3], shape[2]), dtype), v=jnp.zeros(shape, dtype))
                     for _ in range(cfg.num_layers))


def cached_attention(q: Array, k_cache: Array, v_cache: Array, layer: Array, visible: Array, counts: Array,
                     ring_index: Array, prompt_slots: int, block: int) -> Array:
    """Attention of one new token per row over layer `layer` of the sampler's stacked cache, read in place.

    q: [B, 1, H, Dh]; k_cache [L, S, K, Dh, B], v_cache [L, S, K, B, Dh] (`KVCache`), slots 0..prompt_slots-1 the
    row's prompt, the rest a ring of generated tokens written at a shared index; visible: [B, S] bool, the slots
    each row attends (`sampler_visible`); counts: [B] the ring slots each row sees. The cache is read in blocks of
    `block` slots (prompt_slots and the ring are whole blocks): the prompt blocks up to the longest prompt and the
    ring blocks of the longest response so far, with an online softmax in fp32 (while loops), so the work follows
    the filled length, not S; a slot a row does not see adds exactly nothing. -> [B, 1, H, Dh]
    """
    b, _, h, dh = q.shape
    kv, ring = k_cache.shape[2], k_cache.shape[1] - prompt_slots
    qg = q.reshape(b, kv, h // kv, dh)

    def accumulate(start: Array, carry):
        m, denom, acc = carry
        kb = jax.lax.dynamic_slice(k_cache, (layer, start, 0, 0, 0), (1, block, kv, dh, b))[0].astype(q.dtype)
        vb = jax.lax.dynamic_slice(v_cache, (layer, start, 0, 0, 0), (1, block, kv, b, dh))[0].astype(q.dtype)
        scores = jnp.einsum("bkgd,skdb->bkgs", qg, kb, preferred_element_type=jnp.float32) / math.sqrt(dh)
        scores = jnp.where(jax.lax.dynamic_slice_in_dim(visible, start, block, 1)[:, None, None], scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))  # m starts finite, so a block nobody sees is a no-op
        scale = jnp.exp(m - m_new)
        probs = jnp.exp(scores - m_new[..., None])
        acc = acc * scale[..., None] + jnp.einsum("bkgs,skbd->bkgd", probs.astype(vb.dtype), vb,
                                                  preferred_element_type=jnp.float32)
        return m_new, denom * scale + jnp.sum(probs, axis=-1), acc

    longest = jnp.max(counts)
    first = (ring_index - longest + 1) % ring // block  # the ring block of the oldest slot anyone sees
    ring_block = lambda j, carry: accumulate(prompt_slots + (first + j) % (ring // block) * block, carry)  # noqa: E731
    prompt_blocks = jnp.max(jnp.sum(visible[:, :prompt_slots], axis=1) + block - 1) // block  # up to the longest prompt
    init = (jnp.full((b, kv, h // kv), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((b, kv, h // kv), jnp.float32), jnp.zeros((b, kv, h // kv, dh), jnp.float32))
    carry = jax.lax.fori_loop(0, prompt_blocks, lambda j, carry: accumulate(j * block, carry), init)
    ring_blocks = jnp.where(longest > 0, jnp.minimum((longest + block - 1) // block + 1, ring // block), 0)
    _, denom, acc = jax.lax.fori_loop(0, ring_blocks, ring_block, carry)
    return (acc / denom[..., None]).astype(q.dtype).reshape(b, 1, h, dh)


def sampler_visible(prompt_lens: Array, counts: Array, ring_index: Array, prompt_slots: int, length: int) -> Array:
    """[B, length] bool: the cache slots row b attends in the sampler's layout, the first prompt_lens[b] of the
    prompt's slots and the counts[b] ring slots (after prompt_slots) written last, up to and including ring_index."""
    slots = jnp.arange(length)
    age = (ring_index - (slots - prompt_slots)) % (length - prompt_slots)  # steps since a ring slot was written
    return jnp.where(slots < prompt_slots, slots[None, :] < prompt_lens[:, None], age[None, :] < counts[:, None])


def whole_cache_attention(q: Array, kv: LayerKV, visible: Array) -> Array:
    """Attention of one new token per row over one layer's whole cache (per-layer layout), fp32 softmax.

    q: [B, 1, H, Dh]; kv.k [B, K, Dh, S], kv.v [B, K, S, Dh]; visible: [B, S] bool (`sampler_visible`). Two
    plain matmuls over every slot read in place: on XLA:CPU that is faster than reading only the filled blocks,
    each of which is copied out of the cache before its dot. -> [B, 1, H, Dh]
    """
    b, _, h, dh = q.shape
    kvh = kv.k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, dh)
    scores = jnp.einsum("bkgd,bkds->bkgs", qg, kv.k.astype(q.dtype), preferred_element_type=jnp.float32) / math.sqrt(dh)
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(kv.v.dtype), kv.v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, 1, h, dh)


def put_prompts(kv: KVCache | tuple[LayerKV, ...], idx: Array, prompt: PromptKV) -> KVCache | tuple[LayerKV, ...]:
    """`kv` (either layout) with the first p slots of rows idx [B] (out of range: dropped) set to the prompt keys and
    values `prompt` [L, B or 1 (broadcast), K, p, Dh] (the prefill's layout)."""
    p = prompt.k.shape[3]
    if isinstance(kv, KVCache):
        return KVCache(k=kv.k.at[:, :p, :, :, idx].set(prompt.k.transpose(0, 3, 2, 4, 1), mode="drop"),
                       v=kv.v.at[:, :p, :, idx].set(prompt.v.transpose(0, 3, 2, 1, 4), mode="drop"))
    return tuple(LayerKV(k=c.k.at[idx, :, :, :p].set(prompt.k[i].transpose(0, 1, 3, 2), mode="drop"),
                         v=c.v.at[idx, :, :p].set(prompt.v[i], mode="drop")) for i, c in enumerate(kv))


def decode_step(model: Decoder, tokens: Array, positions: Array, cache: KVCache | tuple[LayerKV, ...], *,
                prompt_lens: Array, counts: Array, ring_index: Array, prompt_slots: int, block: int,
                layers: Sequence[dict[str, Array]] | None = None) -> tuple[Array, KVCache | tuple[LayerKV, ...]]:
    """One token per row through `model`'s layers: tokens [B] int32 at RoPE positions [B] int32, written for every
    row at the shared cache slot prompt_slots + ring_index (one in-place slice per layer, no per-row scatter).

    A row's prompt is in slots 0..prompt_slots-1 of its cache and its generated tokens in a ring after them;
    row b attends its first prompt_lens[b] slots and the counts[b] ring slots written last (this one included).
    cache: `KVCache` (k [L, S, K, Dh, B], v [L, S, K, B, Dh]), read in place in blocks of `block`
    (`cached_attention`); or a tuple of per-layer `LayerKV`, each read whole (`whole_cache_attention`; see
    `prime_jax.sampling.config.per_layer_decode` for when that pays), which needs `layers`. layers: the layer
    weights already sliced (`layer_slices`, once outside a decode loop): the layers run unrolled over them; without,
    a scan over the stacked weights.
    -> (logits [B, V] float32, cache).
    """
    cfg = model.cfg
    inv_freq = rope_frequencies(cfg)
    slot = prompt_slots + ring_index
    x = model.embed_tokens(tokens[:, None])
    qkv = lambda p, x: layer_qkv(cfg, p, x, positions[:, None], inv_freq)  # noqa: E731  (k, v: [B, K, 1, Dh])
    visible = sampler_visible(prompt_lens, counts, ring_index, prompt_slots,
                              cache.length if isinstance(cache, KVCache) else cache[0].v.shape[2])
    if isinstance(cache, KVCache):
        def layer(carry, p):
            x, k_cache, v_cache, i = carry
            q, k, v = qkv(p, x)
            k = k.transpose(2, 1, 3, 0)[None].astype(k_cache.dtype)   # [B, K, 1, Dh] -> [1, 1, K, Dh, B]
            v = v.transpose(2, 1, 0, 3)[None].astype(v_cache.dtype)   # [B, K, 1, Dh] -> [1, 1, K, B, Dh]
            k_cache = jax.lax.dynamic_update_slice(k_cache, k, (i, slot, 0, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v, (i, slot, 0, 0, 0))
            attn = cached_attention(q, k_cache, v_cache, i, visible, counts, ring_index, prompt_slots, block)
            return (output_and_mlp(cfg, p, x, attn), k_cache, v_cache, i + 1), None

        (x, k, v, _), _ = model.over_layers(layer, (x, cache.k, cache.v, jnp.int32(0)), layers)
        cache = KVCache(k=k, v=v)
    else:
        if layers is None or len(layers) != len(cache):
            raise ValueError("decode_step: a per-layer cache needs the per-layer weights (`layers`)")
        new = []
        for p, kv in zip(layers, cache):
            q, k, v = qkv(p, x)
            k = k.transpose(0, 1, 3, 2)  # [B, K, Dh, 1], the per-layer keys' layout
            kv = LayerKV(k=jax.lax.dynamic_update_slice(kv.k, k.astype(kv.k.dtype), (0, 0, 0, slot)),
                         v=jax.lax.dynamic_update_slice(kv.v, v.astype(kv.v.dtype), (0, 0, slot, 0)))
            x = output_and_mlp(cfg, p, x, whole_cache_attention(q, kv, visible))
            new.append(kv)
        cache = tuple(new)
    return model.head_logits(rms_norm(x[:, 0], model.final_norm[...], cfg.rms_norm_eps)), cache

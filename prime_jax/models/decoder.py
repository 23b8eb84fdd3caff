"""The Qwen2 / Qwen2.5 / Llama-3 decoder as one Flax NNX module with stacked, scanned layers.

Every weight is an `nnx.Param` carrying `axes`, a tuple of logical axis names that
`prime_jax.mesh` maps onto mesh axes. Per-layer weights are stacked with a leading `layers`
axis and the blocks run in one `lax.scan`, so compile time does not grow with depth.

Two entry points share one block function:
- `model(tokens, attention_mask=..., positions=...)` / `model.hidden_states(..., segment_ids=...)`: full-sequence
  forward (training, scoring), attention through `jax.nn.dot_product_attention` with the implementation
  `cfg.attention` (cuDNN on GPU, XLA elsewhere); with `segment_ids` several sequences share a row (packing).
- `model.forward_cached(tokens, positions, cache, kv_mask)`: writes the new keys/values into a
  preallocated `KVCache` at `cache.index` and attends over the cache (sampler prefill + decode).
  The cache is carried through the layer scan and updated in place, never copied per step.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.mesh import constrain_batch
from prime_jax.models.config import ATTENTION_IMPLEMENTATIONS, ModelConfig

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, head-major so attention reads them without transposes.
    `k`, `v`: [L, B, K, S, Dh] compute dtype; `index`: the next slot to write, int32 scalar."""

    k: Array
    v: Array
    index: Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), index=jnp.zeros((), jnp.int32))


def positions_from_mask(attention_mask: Array) -> Array:
    """Position ids that make left padding exact: 0 at the first real token. [B, T] int32."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def rope_frequencies(cfg: ModelConfig) -> Array:
    """Inverse frequencies [Dh/2] float32, with Llama-3 scaling when configured (as transformers computes them)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotary embedding, rotate-half convention. x: [B, T, N, Dh]; positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm: statistics in fp32, scale applied in the input (compute) dtype, as transformers does, so
    an fp32 master copy and a bf16 copy of the same weights compute identically."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention with softmax in fp32.

    q: [B, T, H, Dh]; k, v: [B, K, S, Dh] (head-major); mask: [B, T, S] bool (True = may attend). -> [B, T, H, Dh]
    """
    b, t, h, dh = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, dh)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(dh)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def resolve_attention(name: str, platform: str, compute_dtype: str) -> str:
    """The `jax.nn.dot_product_attention` implementation for config value `model.attention` on `platform`.

    "auto": cuDNN flash attention on GPU at 16-bit compute, XLA otherwise (CPU, TPU, fp32). An implementation the
    backend lacks is a ValueError naming the key, raised before anything compiles. TPU runs XLA's fused attention:
    the Pallas splash kernel is not wired in (it needs shard_map around the kernel for the sharded batch).
    """
    if name == "auto":
        return "cudnn" if platform == "gpu" and compute_dtype in ("bfloat16", "float16") else "xla"
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={name!r}: expected auto or one of {ATTENTION_IMPLEMENTATIONS}")
    if name == "cudnn" and (platform != "gpu" or compute_dtype not in ("bfloat16", "float16")):
        raise ValueError(f"config.model.attention='cudnn': needs a GPU backend and 16-bit model.compute_dtype "
                         f"(this run: {platform}, {compute_dtype}); use auto or xla")
    return name


def fused_attention(q: Array, k: Array, v: Array, mask: Array, implementation: str) -> Array:
    """`jax.nn.dot_product_attention` (grouped-query) over head-major k, v.

    q: [B, T, H, Dh]; k, v: [B, K, S, Dh]; mask: [B, T, S] bool (True = may attend). -> [B, T, H, Dh]
    "cudnn" (flash attention) turns the mask into a [B, 1, T, S] bias in the compute dtype and keeps no scores;
    "xla" computes fp32 scores [B, H, T, S] per layer (CPU, and TPU until a Pallas splash kernel is wired in).
    """
    return jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask[:, None],
                                        implementation=implementation)


def _qkv(cfg: ModelConfig, p: dict[str, Array], x: Array, positions: Array, inv_freq: Array) -> tuple[Array, Array, Array]:
    """Attention inputs of one layer: q [B, T, H, Dh]; k, v head-major [B, K, T, Dh], RoPE applied."""
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    w = lambda name: p[name].astype(x.dtype)  # noqa: E731  (weights cast to the compute dtype)
    q = jnp.einsum("btd,dhk->bthk", h, w("q"))
    k = jnp.einsum("btd,dhk->bthk", h, w("k"))
    v = jnp.einsum("btd,dhk->bthk", h, w("v"))
    if cfg.attention_bias:
        q, k, v = q + w("q_bias"), k + w("k_bias"), v + w("v_bias")
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _attend_and_mlp(cfg: ModelConfig, p: dict[str, Array], x: Array, q: Array, k: Array, v: Array, mask: Array,
                    fused: bool) -> Array:
    """The rest of one layer: attention over k, v [B, K, S, Dh] (`fused_attention` with `cfg.attention` when
    `fused`, else the einsum `attention`), output projection, SwiGLU MLP. -> [B, T, D]"""
    w = lambda name: p[name].astype(x.dtype)  # noqa: E731
    k, v = k.astype(x.dtype), v.astype(x.dtype)
    attn = fused_attention(q, k, v, mask, cfg.attention) if fused else attention(q, k, v, mask)
    x = x + jnp.einsum("bthk,hkd->btd", attn, w("o"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = jnp.einsum("btd,df->btf", h, w("gate"))
    up = jnp.einsum("btd,df->btf", h, w("up"))
    return constrain_batch(x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w("down")))


class LayerStack(nnx.Module):
    """The weights of all decoder layers, stacked along a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        normal = lambda *shape: nnx.initializers.normal(0.02)(rngs.params(), shape, pd)  # noqa: E731
        self.attn_norm = nnx.Param(jnp.ones((L, D), pd), axes=("layers", "norm"))
        self.q = nnx.Param(normal(L, D, H, Dh), axes=("layers", "embed", "heads", "head_dim"))
        self.k = nnx.Param(normal(L, D, K, Dh), axes=("layers", "embed", "kv_heads", "head_dim"))
        self.v = nnx.Param(normal(L, D, K, Dh), axes=("layers", "embed", "kv_heads", "head_dim"))
        if cfg.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((L, H, Dh), pd), axes=("layers", "heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((L, K, Dh), pd), axes=("layers", "kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((L, K, Dh), pd), axes=("layers", "kv_heads", "head_dim"))
        self.o = nnx.Param(normal(L, H, Dh, D), axes=("layers", "heads", "head_dim", "embed"))
        self.mlp_norm = nnx.Param(jnp.ones((L, D), pd), axes=("layers", "norm"))
        self.gate = nnx.Param(normal(L, D, F), axes=("layers", "embed", "mlp"))
        self.up = nnx.Param(normal(L, D, F), axes=("layers", "embed", "mlp"))
        self.down = nnx.Param(normal(L, F, D), axes=("layers", "mlp", "embed"))


class Decoder(nnx.Module):
    """Causal LM: embedding -> L scanned blocks -> RMSNorm -> LM head (tied or not)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd),
                               axes=("vocab", "embed"))
        self.layers = LayerStack(cfg, rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), pd), axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pd),
                                     axes=("embed", "vocab"))

    def head_weight(self) -> Array:
        """LM head as [D, V] (the transposed embedding when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def _run_layers(self, tokens: Array, positions: Array, mask: Array, cache: KVCache | None):
        cfg = self.cfg
        x = constrain_batch(jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype))
        params = nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))
        inv_freq = rope_frequencies(cfg)

        def layer(carry, p):
            x, k_cache, v_cache, i = carry
            q, k, v = _qkv(cfg, p, x, positions, inv_freq)
            if k_cache is not None:
                # Write only the new slots of layer i in place; attend over that layer's whole cache.
                at = (i, 0, 0, cache.index, 0)
                k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
                v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
                k = jax.lax.dynamic_index_in_dim(k_cache, i, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(v_cache, i, keepdims=False)
            return (_attend_and_mlp(cfg, p, x, q, k, v, mask, cache is None), k_cache, v_cache, i + 1), None

        if cfg.remat:
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
        init = (x, None if cache is None else cache.k, None if cache is None else cache.v, jnp.int32(0))
        (x, k, v, _), _ = jax.lax.scan(layer, init, params)
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        new_cache = None if cache is None else KVCache(k=k, v=v, index=cache.index + tokens.shape[1])
        return x, new_cache

    def hidden_states(self, tokens: Array, *, attention_mask: Array | None = None, positions: Array | None = None,
                      segment_ids: Array | None = None) -> Array:
        """Final-norm hidden states [B, T, D] (compute dtype); causal attention restricted to `attention_mask`.

        segment_ids: [B, T] int (packed rows): a token attends, causally, only to tokens of its own segment;
        `positions` must then be given (restarting at 0 in each segment) and `attention_mask` is not used.
        """
        t = tokens.shape[1]
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        if segment_ids is not None:
            if positions is None:
                raise ValueError("hidden_states: segment_ids need positions (restarting at 0 in each segment)")
            x, _ = self._run_layers(tokens, positions, causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :]),
                                    None)
            return x
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        # Each query may always see itself, so fully padded rows stay finite.
        mask = (causal[None] & attention_mask[:, None, :]) | jnp.eye(t, dtype=jnp.bool_)[None]
        x, _ = self._run_layers(tokens, positions, mask, None)
        return x

    def __call__(self, tokens: Array, *, attention_mask: Array | None = None, positions: Array | None = None) -> Array:
        """Logits [B, T, V] float32. tokens: [B, T] int32; attention_mask: [B, T] (1 = real token)."""
        h = self.hidden_states(tokens, attention_mask=attention_mask, positions=positions)
        return jnp.einsum("btd,dv->btv", h, self.head_weight().astype(h.dtype), preferred_element_type=jnp.float32)

    def forward_cached(self, tokens: Array, positions: Array, cache: KVCache, kv_mask: Array) -> tuple[Array, KVCache]:
        """Runs `tokens` [B, T] written at cache slots index..index+T-1; returns last-position logits [B, V] f32.

        kv_mask: [B, S] bool, which cache slots hold real tokens (prompt padding is False). Query t may
        attend slot s iff kv_mask[s] and s <= index + t.
        """
        t, s = tokens.shape[1], cache.k.shape[3]
        slot = cache.index + jnp.arange(t)
        mask = (jnp.arange(s)[None, :] <= slot[:, None])[None] & kv_mask[:, None, :].astype(jnp.bool_)
        mask = mask | (jnp.arange(s)[None, :] == slot[:, None])[None]
        h, cache = self._run_layers(tokens, positions, mask, cache)
        logits = jnp.einsum("bd,dv->bv", h[:, -1], self.head_weight().astype(h.dtype), preferred_element_type=jnp.float32)
        return logits, cache

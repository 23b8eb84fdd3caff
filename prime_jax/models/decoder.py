"""The Qwen2 / Qwen2.5 / Llama-3 decoder as one Flax NNX module with stacked, scanned layers.

Every weight is an `nnx.Param` carrying `axes`, a tuple of logical axis names that
`prime_jax.mesh` maps onto mesh axes. Per-layer weights are stacked with a leading `layers`
axis and the blocks run in one `lax.scan`, so compile time does not grow with depth (the CPU sampler runs them
unrolled over per-layer slices instead: XLA:CPU copies a dynamically sliced weight before each dot).

Three entry points share the layer functions:
- `model(tokens, attention_mask=..., positions=...)` / `model.hidden_states(..., segment_ids=...)`: full-sequence
  forward (training, scoring), attention by `cfg.attention` (`causal_attention`: the splash kernel on TPU, cuDNN on
  GPU, XLA elsewhere); with `segment_ids` several sequences share a row (packing).
- `model.prefill(tokens, lengths, layers)`: right-padded prompts once (the same attention); returns the
  keys/values of every layer stacked (`KVCache`, row b's sequence from slot 0), which the sampler copies
  into its cache.
- `model.decode_step(tokens, positions, cache, ...)`: one token per row, written into the cache at one
  shared slot. Two cache layouts: `KVCache` (stacked [L, ...], layers scanned; attention reads each row's own
  filled slots in place, block by block, `cached_attention`) and a tuple of per-layer `LayerKV` (layers
  unrolled over weights sliced once per sampler call; attention reads the layer's whole cache,
  `whole_cache_attention`), which is what XLA:CPU runs fastest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from prime_jax.mesh import constrain_batch, logical_to_spec
from prime_jax.models.config import CONFIG_ATTENTION, ModelConfig

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, head-major so attention reads them without transposes.
    `k`, `v`: [L, B, K, S, Dh] compute dtype. The sampler keeps each row's prompt in the first slots and
    its generated tokens in a ring after them (`cached_attention`)."""

    k: Array
    v: Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@flax.struct.dataclass
class LayerKV:
    """One layer's keys and values in the per-layer cache layout (`decode_step` on CPU): k [B, K, Dh, S]
    slot-minor, so that the scores q.k are a plain matmul (XLA:CPU runs a dot whose operand is slot-major,
    [S, Dh] contracted on Dh, ~2x slower: it repacks the keys each time); v [B, K, S, Dh]."""

    k: Array
    v: Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> tuple[LayerKV, ...]:
        """A zero cache of every layer."""
        shape, dtype = (batch, cfg.num_kv_heads, length, cfg.head_dim), jnp.dtype(cfg.dtype)
        return tuple(cls(k=jnp.zeros((*shape[:2], shape[3], shape[2]), dtype), v=jnp.zeros(shape, dtype))
                     for _ in range(cfg.num_layers))


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


def resolve_attention(name: str, platform: str, compute_dtype: str) -> str:
    """The training attention implementation (`causal_attention`) for config value `model.attention` on `platform`.

    "auto": cuDNN flash attention on GPU at 16-bit compute, the Pallas splash kernel on TPU at bfloat16, XLA otherwise
    (CPU, fp32). An implementation the backend lacks is a ValueError naming the key, raised before anything compiles
    (Mosaic compiles splash at bfloat16 and float32, not float16).
    """
    sixteen_bit = compute_dtype in ("bfloat16", "float16")
    if name == "auto":
        return ("cudnn" if platform == "gpu" and sixteen_bit else
                "splash" if platform == "tpu" and compute_dtype == "bfloat16" else "xla")
    if name not in CONFIG_ATTENTION:
        raise ValueError(f"config.model.attention={name!r}: expected auto or one of {CONFIG_ATTENTION}")
    if name == "cudnn" and (platform != "gpu" or not sixteen_bit):
        raise ValueError(f"config.model.attention='cudnn': needs a GPU backend and 16-bit model.compute_dtype "
                         f"(this run: {platform}, {compute_dtype}); use auto or xla")
    if name == "splash" and (platform != "tpu" or compute_dtype == "float16"):
        raise ValueError(f"config.model.attention='splash': the Pallas splash kernel needs a TPU backend and "
                         f"model.compute_dtype bfloat16 or float32 (this run: {platform}, {compute_dtype}); use auto or xla")
    return name


def causal_attention(implementation: str, segment_ids: Array | None, length: int) -> Callable[[Array, Array, Array], Array]:
    """Causal self-attention over `length` slots, a token seeing only tokens of its own segment.

    segment_ids: [B, T] int (None: one sequence per row). Returns attend(q [B, T, H, Dh], k, v [B, K, T, Dh]
    head-major, grouped-query) -> [B, T, H, Dh], scaled by 1/sqrt(Dh), softmax in fp32:
    "xla", "cudnn": `jax.nn.dot_product_attention` with a [B, T, T] bool mask built here once for all layers;
      "xla" forms fp32 scores [B, H, T, T] per layer, "cudnn" (flash attention) keeps none;
    "splash": the Pallas TPU splash kernel (`splash_attention`), no scores in HBM; "splash_interpret": the
      same kernel in Pallas interpret mode, on any backend (tests).
    """
    if implementation in ("splash", "splash_interpret"):
        return lambda q, k, v: splash_attention(q, k, v, segment_ids, interpret=implementation == "splash_interpret")
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return lambda q, k, v: jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                                        mask=mask[:, None], implementation=implementation)


SPLASH_LANES = 128  # the splash kernel's sequence blocks are multiples of the TPU lane width


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, *, interpret: bool = False) -> Array:
    """Causal attention within segments by the Pallas TPU splash kernel (`jax.experimental.pallas.ops.tpu`).

    q: [B, T, H, Dh]; k, v: [B, K, T, Dh]; segment_ids: [B, T] int or None. -> [B, T, H, Dh]
    The sequence is padded to whole 128-slot blocks (the padding comes last, so causality hides it). Under a
    mesh (`jax.set_mesh`) the kernel runs per device in `jax.shard_map`: rows split like the batch, heads over
    the tensor axis where it divides the KV heads (so each device keeps whole query groups), else replicated.
    """
    t, dh = q.shape[1], q.shape[3]
    padded = -(-t // SPLASH_LANES) * SPLASH_LANES
    block = next(n for n in (512, 256, 128) if padded % n == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                              block_q_dq=block, block_kv_dq=block)
    pad = lambda x, axis=2: jnp.pad(x, [(0, padded - t) if i == axis else (0, 0) for i in range(x.ndim)])  # noqa: E731
    q = pad((q.astype(jnp.float32) / math.sqrt(dh)).astype(q.dtype).transpose(0, 2, 1, 3))
    args = (q, pad(k), pad(v)) + (() if segment_ids is None else (pad(segment_ids, 1),))

    def local(q, k, v, segments=None):  # one device's rows and heads
        mask = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * q.shape[1])
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        if segments is None:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(s, s)))(q, k, v, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        spec = logical_to_spec(("batch", "kv_heads", None, "head_dim"), k.shape, mesh)
        specs = (spec,) * 3 + (() if segment_ids is None else (P(spec[0], None),))
        local = jax.shard_map(local, in_specs=specs, out_specs=spec, check_vma=False)
    return local(*args)[:, :, :t].transpose(0, 2, 1, 3)


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


def cached_attention(q: Array, k_cache: Array, v_cache: Array, layer: Array, visible: Array, counts: Array,
                     ring_index: Array, prompt_slots: int, block: int) -> Array:
    """Attention of one new token per row over layer `layer` of the sampler's stacked cache, read in place.

    q: [B, 1, H, Dh]; k_cache, v_cache: [L, B, K, S, Dh], slots 0..prompt_slots-1 the row's prompt, the rest a
    ring of generated tokens written at a shared index; visible: [B, S] bool, the slots each row attends
    (`sampler_visible`); counts: [B] the ring slots each row sees. The cache is read in blocks of `block` slots
    (prompt_slots and the ring are whole blocks): the prompt blocks up to the longest prompt and the ring
    blocks of the longest response so far, with an online softmax in fp32 (while loops), so the work follows
    the filled length, not S; a slot a row does not see adds exactly nothing. -> [B, 1, H, Dh]
    """
    b, _, h, dh = q.shape
    kv, ring = k_cache.shape[2], k_cache.shape[3] - prompt_slots
    qg = q.reshape(b, kv, h // kv, dh)

    def accumulate(start: Array, carry):
        m, denom, acc = carry
        kb = jax.lax.dynamic_slice(k_cache, (layer, 0, 0, start, 0), (1, b, kv, block, dh))[0].astype(q.dtype)
        vb = jax.lax.dynamic_slice(v_cache, (layer, 0, 0, start, 0), (1, b, kv, block, dh))[0].astype(q.dtype)
        scores = jnp.einsum("bkgd,bksd->bkgs", qg, kb, preferred_element_type=jnp.float32) / math.sqrt(dh)
        scores = jnp.where(jax.lax.dynamic_slice_in_dim(visible, start, block, 1)[:, None, None], scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))  # m starts finite, so a block nobody sees is a no-op
        scale = jnp.exp(m - m_new)
        probs = jnp.exp(scores - m_new[..., None])
        acc = acc * scale[..., None] + jnp.einsum("bkgs,bksd->bkgd", probs.astype(vb.dtype), vb,
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


def _attend_and_mlp(cfg: ModelConfig, p: dict[str, Array], x: Array, q: Array, k: Array, v: Array,
                    attend: Callable[[Array, Array, Array], Array]) -> Array:
    """The rest of one layer: attention over k, v [B, K, T, Dh] (`attend`, from `causal_attention`), output
    projection, SwiGLU MLP. -> [B, T, D]"""
    return _output_and_mlp(cfg, p, x, attend(q, k.astype(x.dtype), v.astype(x.dtype)))


def _output_and_mlp(cfg: ModelConfig, p: dict[str, Array], x: Array, attn: Array) -> Array:
    """Output projection of the attention [B, T, H, Dh] and the SwiGLU MLP, both residual. -> [B, T, D]"""
    w = lambda name: p[name].astype(x.dtype)  # noqa: E731
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

    def _layer_params(self) -> dict[str, Array]:
        return nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))

    def layer_slices(self) -> list[dict[str, Array]]:
        """The stacked layer weights [L, ...] as L per-layer dicts (static slices)."""
        stacked = self._layer_params()
        return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(self.cfg.num_layers)]

    def _over_layers(self, fn: Callable, carry, layers: Sequence[dict[str, Array]] | None = None):
        """carry, outs = fn(carry, p) over the layers: a scan over the stacked weights, or unrolled over `layers`
        (per-layer weight dicts, `layer_slices`). -> (carry, outs stacked [L, ...])"""
        if layers is None:
            return jax.lax.scan(fn, carry, self._layer_params())
        outs = []
        for p in layers:
            carry, out = fn(carry, p)
            outs.append(out)
        return carry, jax.tree.map(lambda *o: jnp.stack(o), *outs)

    def _embed(self, tokens: Array) -> Array:
        return constrain_batch(jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.dtype))

    def _logits(self, h: Array) -> Array:
        """[..., D] final-norm hidden states -> [..., V] float32 logits."""
        return jnp.einsum("...d,dv->...v", h, self.head_weight().astype(h.dtype), preferred_element_type=jnp.float32)

    def _run_layers(self, tokens: Array, positions: Array, segment_ids: Array, remat: bool) -> Array:
        cfg = self.cfg
        inv_freq = rope_frequencies(cfg)
        attend = causal_attention(cfg.attention, segment_ids, tokens.shape[1])

        def layer(x, p):
            q, k, v = _qkv(cfg, p, x, positions, inv_freq)
            return _attend_and_mlp(cfg, p, x, q, k, v, attend), None

        norm = rms_norm
        if remat:
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
            norm = jax.checkpoint(rms_norm, static_argnums=(2,))
        x, _ = self._over_layers(layer, self._embed(tokens))
        return norm(x, self.final_norm[...], cfg.rms_norm_eps)

    def hidden_states(self, tokens: Array, *, attention_mask: Array | None = None, positions: Array | None = None,
                      segment_ids: Array | None = None, remat: bool | None = None) -> Array:
        """Final-norm hidden states [B, T, D] (compute dtype); causal attention restricted to `attention_mask`.

        segment_ids: [B, T] int (packed rows): a token attends, causally, only to tokens of its own segment;
        `positions` must then be given (restarting at 0 in each segment) and `attention_mask` is not used.
        remat (default `cfg.remat`): under differentiation, keep only each layer's input and recompute the layers and
        the final norm in the backward pass. The differentiated forward then saves nothing the undifferentiated one
        does not materialise, so it compiles to the same arithmetic (`make_prm_step` relies on this).
        Without segment ids the attention mask serves as segment ids (real tokens see real tokens, padding sees
        padding, so padded positions, whose values are undefined, stay finite).
        """
        remat = self.cfg.remat if remat is None else remat
        if segment_ids is not None:
            if positions is None:
                raise ValueError("hidden_states: segment_ids need positions (restarting at 0 in each segment)")
            return self._run_layers(tokens, positions, segment_ids, remat)
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.bool_)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        return self._run_layers(tokens, positions, attention_mask.astype(jnp.int32), remat)

    def __call__(self, tokens: Array, *, attention_mask: Array | None = None, positions: Array | None = None) -> Array:
        """Logits [B, T, V] float32. tokens: [B, T] int32; attention_mask: [B, T] (1 = real token)."""
        h = self.hidden_states(tokens, attention_mask=attention_mask, positions=positions)
        return jnp.einsum("btd,dv->btv", h, self.head_weight().astype(h.dtype), preferred_element_type=jnp.float32)

    def prefill(self, tokens: Array, lengths: Array,
                layers: Sequence[dict[str, Array]] | None = None) -> tuple[Array, KVCache]:
        """Runs right-padded prompts once: tokens [B, T], row b's real tokens at 0..lengths[b]-1 (lengths >= 1);
        with `layers` (already sliced, `layer_slices`) the layers run unrolled over them.

        -> logits after each row's last real token [B, V] float32, and the keys/values of all T positions of
        every layer, KVCache [L, B, K, T, Dh] (slot = position; slots past a row's length are never read).
        """
        cfg = self.cfg
        t = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        attend = causal_attention(cfg.attention, None, t)
        inv_freq = rope_frequencies(cfg)

        def layer(x, p):
            q, k, v = _qkv(cfg, p, x, positions, inv_freq)
            return _attend_and_mlp(cfg, p, x, q, k, v, attend), (k.astype(cfg.dtype), v.astype(cfg.dtype))

        x, (k, v) = self._over_layers(layer, self._embed(tokens), layers)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self._logits(rms_norm(last, self.final_norm[...], cfg.rms_norm_eps)), KVCache(k=k, v=v)

    def decode_step(self, tokens: Array, positions: Array, cache: KVCache | tuple[LayerKV, ...], *, prompt_lens: Array,
                    counts: Array, ring_index: Array, prompt_slots: int, block: int,
                    layers: Sequence[dict[str, Array]] | None = None) -> tuple[Array, KVCache | tuple[LayerKV, ...]]:
        """One token per row: tokens [B] int32 at RoPE positions [B] int32, written for every row at the shared
        cache slot prompt_slots + ring_index (one in-place slice per layer, no per-row scatter).

        A row's prompt is in slots 0..prompt_slots-1 of its cache and its generated tokens in a ring after them;
        row b attends its first prompt_lens[b] slots and the counts[b] ring slots written last (this one included).
        cache: `KVCache` [L, B, K, S, Dh], read in place in blocks of `block` (`cached_attention`); or a tuple of
        per-layer `LayerKV`, each read whole (`whole_cache_attention`; see `prime_jax.sampling.per_layer_decode` for
        when that pays), which needs `layers`. layers: the layer weights already sliced (`layer_slices`, once
        outside a decode loop): the layers run unrolled over them; without, a scan over the stacked weights.
        -> (logits [B, V] float32, cache).
        """
        cfg = self.cfg
        inv_freq = rope_frequencies(cfg)
        slot = prompt_slots + ring_index
        x = self._embed(tokens[:, None])
        qkv = lambda p, x: _qkv(cfg, p, x, positions[:, None], inv_freq)  # noqa: E731  (k, v: [B, K, 1, Dh])
        visible = sampler_visible(prompt_lens, counts, ring_index, prompt_slots,
                                  cache.k.shape[3] if isinstance(cache, KVCache) else cache[0].v.shape[2])
        if isinstance(cache, KVCache):
            def layer(carry, p):
                x, k_cache, v_cache, i = carry
                q, k, v = qkv(p, x)
                k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (i, 0, 0, slot, 0))
                v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (i, 0, 0, slot, 0))
                attn = cached_attention(q, k_cache, v_cache, i, visible, counts, ring_index, prompt_slots, block)
                return (_output_and_mlp(cfg, p, x, attn), k_cache, v_cache, i + 1), None

            (x, k, v, _), _ = self._over_layers(layer, (x, cache.k, cache.v, jnp.int32(0)), layers)
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
                x = _output_and_mlp(cfg, p, x, whole_cache_attention(q, kv, visible))
                new.append(kv)
            cache = tuple(new)
        return self._logits(rms_norm(x[:, 0], self.final_norm[...], cfg.rms_norm_eps)), cache

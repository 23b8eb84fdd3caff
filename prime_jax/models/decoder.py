"""The Qwen2 / Qwen2.5 / Llama-3 decoder as one Flax NNX module with stacked, scanned layers.

Every weight is an `nnx.Param` carrying `axes`, a tuple of logical axis names that
`prime_jax.mesh` maps onto mesh axes. Per-layer weights are stacked with a leading `layers`
axis and the blocks run in one `lax.scan`, so compile time does not grow with depth. On CPU they run unrolled over
per-layer slices instead (`cfg.scan_layers=False`, config `model.layers`, `config.scan_layers_for`; the sampler
always does on CPU).

Two entry points share the layer functions:
- `model(tokens, attention_mask=..., positions=...)` / `model.hidden_states(..., segment_ids=...)`: full-sequence
  forward (training, scoring), attention by `cfg.attention` (`prime_jax.models.attention.causal_attention`: the
  splash kernel on TPU, cuDNN on GPU, XLA elsewhere); with `segment_ids` several sequences share a row (packing).
- `model.prefill(tokens, lengths, layers)`: right-padded prompts once (the same attention); returns the
  keys/values of every layer stacked, k and v [L, B, K, T, Dh] (row b's sequence from slot 0), which the sampler
  copies into its cache.
The sampler's one-token decode step (`prime_jax.sampling.cache.decode_step`) runs the same layers over its own KV
cache layouts through the layer helpers here: `layer_qkv` (a layer's attention inputs), `output_and_mlp` (the
rest of a layer), and the `Decoder` methods `embed_tokens`, `over_layers` (scanned or unrolled) and `head_logits`.
This module knows nothing of the sampler's cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.mesh import constrain_batch
from prime_jax.models.attention import causal_attention
from prime_jax.models.config import ModelConfig

Array = jax.Array


def in_compute_dtype(params: Any, dtype: Any) -> Any:
    """`params` with every floating-point leaf cast to `dtype`, the compute dtype. Every layer, the embedding and the
    head cast their weights to it before use, so such a copy computes exactly what the master copy computes, in
    fewer bytes (half for fp32 params computing in bf16)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


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


def dense(x: Array, w: Array) -> Array:
    """x [..., D] @ w [D, F] -> [..., F] as one 2-D matmul with the tokens as rows.

    The product of the einsum "...d,df->...f"; written 2-D, XLA:CPU takes the MLP's weight gradients as plain matmuls
    instead of first copying the activations transposed (6% of a forward-backward on CPU; the compiled TPU programs are
    the same). The attention projections stay einsums: on TPU a 2-D output projection costs a relayout."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def layer_qkv(cfg: ModelConfig, p: dict[str, Array], x: Array, positions: Array,
              inv_freq: Array) -> tuple[Array, Array, Array]:
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


def _attend_and_mlp(cfg: ModelConfig, p: dict[str, Array], x: Array, q: Array, k: Array, v: Array,
                    attend: Callable[[Array, Array, Array], Array]) -> Array:
    """The rest of one layer: attention over k, v [B, K, T, Dh] (`attend`, from `causal_attention`), output
    projection, SwiGLU MLP. -> [B, T, D]"""
    return output_and_mlp(cfg, p, x, attend(q, k.astype(x.dtype), v.astype(x.dtype)))


def output_and_mlp(cfg: ModelConfig, p: dict[str, Array], x: Array, attn: Array) -> Array:
    """Output projection of the attention [B, T, H, Dh] and the SwiGLU MLP, both residual. -> [B, T, D]"""
    w = lambda name: p[name].astype(x.dtype)  # noqa: E731
    x = x + jnp.einsum("bthk,hkd->btd", attn, w("o"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    return constrain_batch(x + dense(jax.nn.silu(dense(h, w("gate"))) * dense(h, w("up")), w("down")))


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

    def over_layers(self, fn: Callable, carry, layers: Sequence[dict[str, Array]] | None = None):
        """carry, outs = fn(carry, p) over the layers: a scan over the stacked weights, or unrolled over `layers`
        (per-layer weight dicts, `layer_slices`). -> (carry, outs stacked [L, ...])"""
        if layers is None:
            return jax.lax.scan(fn, carry, self._layer_params())
        outs = []
        for p in layers:
            carry, out = fn(carry, p)
            outs.append(out)
        return carry, jax.tree.map(lambda *o: jnp.stack(o), *outs)

    def embed_tokens(self, tokens: Array) -> Array:
        """Token ids [B, T] -> embeddings [B, T, D] in the compute dtype, constrained to the batch sharding."""
        return constrain_batch(jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.dtype))

    def head_logits(self, h: Array) -> Array:
        """[..., D] final-norm hidden states -> [..., V] float32 logits."""
        return jnp.einsum("...d,dv->...v", h, self.head_weight().astype(h.dtype), preferred_element_type=jnp.float32)

    def _run_layers(self, tokens: Array, positions: Array, segment_ids: Array, remat: bool) -> Array:
        cfg = self.cfg
        inv_freq = rope_frequencies(cfg)
        attend = causal_attention(cfg.attention, segment_ids, tokens.shape[1])

        def layer(x, p):
            q, k, v = layer_qkv(cfg, p, x, positions, inv_freq)
            return _attend_and_mlp(cfg, p, x, q, k, v, attend), None

        return self._layers_then_norm(layer, self.embed_tokens(tokens), remat, lambda x: x)

    def _layers_then_norm(self, layer: Callable, carry: Any, remat: bool, hidden: Callable[[Any], Array]) -> Array:
        """carry, _ = layer(carry, p) over the layers (scanned or unrolled, `cfg.scan_layers`), then the final norm of
        hidden(carry). remat: each layer and the norm rematerialised (`hidden_states`), each layer keeping what
        `cfg.remat_saves` names."""
        norm = rms_norm
        if remat:
            policy = {"nothing": jax.checkpoint_policies.nothing_saveable,
                      "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[self.cfg.remat_saves]
            layer = jax.checkpoint(layer, policy=policy)
            norm = jax.checkpoint(rms_norm, static_argnums=(2,))
        carry, _ = self.over_layers(layer, carry, None if self.cfg.scan_layers else self.layer_slices())
        return norm(hidden(carry), self.final_norm[...], self.cfg.rms_norm_eps)

    def shared_prompt_hidden_states(self, prompt_tokens: Array, prompt_segments: Array, tokens: Array,
                                    segment_ids: Array, positions: Array, prompt_of: Array,
                                    remat: bool | None = None) -> Array:
        """Final-norm hidden states [N, L, D] of N continuations, each of one of G prompts computed once.

        prompt_tokens, prompt_segments: [G, Lp] int (prompt g's tokens from slot 0, segment 1 on its tokens, 0 on
        padding); tokens, segment_ids, positions: [N, L] int, continuation n's tokens (segment 1, 0 on padding) at
        positions that go on from its prompt's; prompt_of: [N, G] one-hot (a zero row: no prompt).
        A continuation attends to every token of its prompt and, causally, to its own tokens, so its hidden states
        are those of the concatenated sequence (`prime_jax.rl.packing`'s shared-prompt layout puts the prompt's last
        token at slot 0 of each continuation). The prompt's keys and values reach its continuations by a one-hot
        contraction (exact, and a contraction again in the backward pass); the attention is XLA's. remat: see
        `hidden_states`.
        """
        cfg = self.cfg
        remat = cfg.remat if remat is None else remat
        inv_freq = rope_frequencies(cfg)
        lp = prompt_tokens.shape[1]
        prompt_positions = jnp.broadcast_to(jnp.arange(lp, dtype=jnp.int32), prompt_tokens.shape)
        attend_prompt = causal_attention("xla", prompt_segments, lp)
        prompt_of = prompt_of.astype(cfg.dtype)
        sees_prompt = (jnp.einsum("ng,gt->nt", prompt_of, (prompt_segments > 0).astype(cfg.dtype)) > 0)
        own = jnp.tril(jnp.ones((tokens.shape[1],) * 2, jnp.bool_))[None] & (
            segment_ids[:, :, None] == segment_ids[:, None, :])
        mask = jnp.concatenate([jnp.broadcast_to((sees_prompt[:, None, :] & (segment_ids[:, :, None] > 0)),
                                                 (*tokens.shape, lp)), own], axis=-1)[:, None]   # [N, 1, L, Lp + L]

        def attend(q, kp, vp, k, v):
            k = jnp.concatenate([jnp.einsum("ng,gktd->nktd", prompt_of, kp.astype(q.dtype)), k.astype(q.dtype)], axis=2)
            v = jnp.concatenate([jnp.einsum("ng,gktd->nktd", prompt_of, vp.astype(q.dtype)), v.astype(q.dtype)], axis=2)
            return jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask,
                                                implementation="xla")

        def layer(carry, p):
            xp, x = carry
            qp, kp, vp = layer_qkv(cfg, p, xp, prompt_positions, inv_freq)
            q, k, v = layer_qkv(cfg, p, x, positions, inv_freq)
            return (_attend_and_mlp(cfg, p, xp, qp, kp, vp, attend_prompt),
                    output_and_mlp(cfg, p, x, attend(q, kp, vp, k, v))), None

        return self._layers_then_norm(layer, (self.embed_tokens(prompt_tokens), self.embed_tokens(tokens)), remat,
                                      lambda carry: carry[1])

    def hidden_states(self, tokens: Array, *, attention_mask: Array | None = None, positions: Array | None = None,
                      segment_ids: Array | None = None, remat: bool | None = None) -> Array:
        """Final-norm hidden states [B, T, D] (compute dtype); causal attention restricted to `attention_mask`.

        segment_ids: [B, T] int (packed rows): a token attends, causally, only to tokens of its own segment;
        `positions` must then be given (restarting at 0 in each segment) and `attention_mask` is not used.
        remat (default `cfg.remat`): under differentiation, keep only each layer's input (and its matmul outputs with
        `cfg.remat_saves="dots"`) and recompute the rest of the layers and the final norm in the backward pass.
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
                layers: Sequence[dict[str, Array]] | None = None) -> tuple[Array, tuple[Array, Array]]:
        """Runs right-padded prompts once: tokens [B, T], row b's real tokens at 0..lengths[b]-1 (lengths >= 1);
        with `layers` (already sliced, `layer_slices`) the layers run unrolled over them.

        -> logits after each row's last real token [B, V] float32, and the keys/values of all T positions of
        every layer, (k, v) each [L, B, K, T, Dh] in the compute dtype (slot = position; slots past a row's length
        are never read).
        """
        cfg = self.cfg
        t = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        attend = causal_attention(cfg.attention, None, t)
        inv_freq = rope_frequencies(cfg)

        def layer(x, p):
            q, k, v = layer_qkv(cfg, p, x, positions, inv_freq)
            return _attend_and_mlp(cfg, p, x, q, k, v, attend), (k.astype(cfg.dtype), v.astype(cfg.dtype))

        x, (k, v) = self.over_layers(layer, self.embed_tokens(tokens), layers)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self.head_logits(rms_norm(last, self.final_norm[...], cfg.rms_norm_eps)), (k, v)

"""Full-sequence causal attention for training, scoring and prefill: which implementation runs, and the kernels.

`resolve_attention` picks the implementation of config value `model.attention` for a backend and compute dtype
(before anything compiles); `causal_attention` builds the attend(q, k, v) function every layer of one forward
calls: q [B, T, H, Dh], k and v head-major [B, K, T, Dh] (grouped-query: H a multiple of K) -> [B, T, H, Dh].
"xla" and "cudnn" go through `jax.nn.dot_product_attention` with one [B, T, T] causal (and segment) mask built
once for all layers; "splash" runs the Pallas TPU splash kernel (`splash_attention`), which keeps no scores in
HBM. The sampler's one-token decode attention over its KV cache is not here: it lives with the cache layouts in
`prime_jax.sampling.cache`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from prime_jax.mesh import logical_to_spec
from prime_jax.models.config import CONFIG_ATTENTION

Array = jax.Array


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

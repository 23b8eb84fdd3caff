"""Token log-probs without materialising [B, T, V] float32 logits.

The LM head is applied to a fixed number of tokens a device at a time inside a `lax.scan`, each block
rematerialised in the backward pass, so peak memory is one [chunk, V] block a device rather than the whole
[B, T, V] tensor (152k vocab x 4k tokens x 4 bytes = 2.5 GB per sequence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prime_jax.mesh import batch_split, constrain_batch
from prime_jax.models.decoder import Decoder

Array = jax.Array


def logprobs_from_hidden(hidden: Array, head: Array, targets: Array, *, chunk: int, temperature: float = 1.0,
                         with_entropy: bool = False) -> Array | tuple[Array, Array]:
    """log softmax(h @ head / temperature)[target] per token, in fp32.

    The logits are made `chunk` tokens a device at a time: each device's rows (split over the batch axes) are
    flattened and scanned in blocks of `chunk` tokens, all devices in step, so each device scores its own rows with
    the gathered head and none holds a [tokens, V] block of other rows. (Blocks of all rows' flattened tokens would
    each sit on one device, and GSPMD then splits the head's contraction over the devices and all-reduces every
    fp32 [chunk, V] block of logits.) On one device: plain blocks of `chunk` tokens.
    hidden: [B, N, D]; head: [D, V]; targets: [B, N] int32 -> [B, N] float32 (and entropy [B, N]).
    """
    if temperature <= 0:
        raise ValueError(f"log-prob temperature must be > 0, got {temperature}")
    b, n, d = hidden.shape
    _, ways = batch_split(b)
    per_device = b // ways * n
    size = min(chunk, per_device)
    pad = -per_device % size

    def blocks(x: Array) -> Array:   # [B, N, ...] -> [blocks, ways, size, ...]
        x = x.reshape(ways, per_device, *x.shape[2:])
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(ways, -1, size, *x.shape[2:]).swapaxes(0, 1)

    def unblock(x: Array) -> Array:  # [blocks, ways, size] -> [B, N]
        return x.swapaxes(0, 1).reshape(ways, -1)[:, :per_device].reshape(b, n)

    w = head.astype(hidden.dtype)

    @jax.checkpoint
    def one_chunk(_, xs):
        hc, tc = xs
        logits = constrain_batch(jnp.einsum("wnd,dv->wnv", constrain_batch(hc), w,
                                            preferred_element_type=jnp.float32)) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - lse
        ent = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1) if with_entropy else jnp.zeros_like(lse)
        return None, (lp, ent)

    _, (lp, ent) = jax.lax.scan(one_chunk, None, (blocks(hidden), blocks(targets)))
    return (unblock(lp), unblock(ent)) if with_entropy else unblock(lp)


def token_logprobs(model: Decoder, tokens: Array, attention_mask: Array, *, positions: Array | None = None,
                   temperature: float = 1.0) -> Array:
    """Log-prob of each next token: out[:, t] = log p(tokens[:, t+1] | tokens[:, :t+1]). -> [B, T-1] float32."""
    h = model.hidden_states(tokens, attention_mask=attention_mask, positions=positions)
    return logprobs_from_hidden(h[:, :-1], model.head_weight(), tokens[:, 1:], chunk=model.cfg.logits_chunk,
                                temperature=temperature)


def response_logprobs(model: Decoder, prompt_tokens: Array, prompt_mask: Array, tokens: Array, mask: Array, *,
                      temperature: float = 1.0, with_entropy: bool = False) -> Array | tuple[Array, Array]:
    """Log-probs of the response tokens given a left-padded prompt; the LM head runs on response positions only.

    prompt_tokens, prompt_mask: [B, P]; tokens, mask: [B, R] (mask = 1 up to and including the first stop).
    -> logp [B, R] float32 (and entropy [B, R] when `with_entropy`).
    """
    p = prompt_tokens.shape[1]
    full = jnp.concatenate([prompt_tokens, tokens], axis=1)
    attn = jnp.concatenate([prompt_mask.astype(jnp.bool_), mask.astype(jnp.bool_)], axis=1)
    h = model.hidden_states(full, attention_mask=attn)
    return logprobs_from_hidden(h[:, p - 1:-1], model.head_weight(), tokens, chunk=model.cfg.logits_chunk,
                                temperature=temperature, with_entropy=with_entropy)


def packed_logprobs(model: Decoder, tokens: Array, segment_ids: Array, positions: Array, targets: Array, *,
                    temperature: float = 1.0, with_entropy: bool = False,
                    remat: bool | None = None) -> Array | tuple[Array, Array]:
    """Log-prob of `targets` at every slot of packed rows (several sequences per row, see `prime_jax.rl.packing`).

    tokens, segment_ids, positions, targets: [N, L] int32; targets[n, t] is the token predicted at slot t
    (the next token of the same segment; any id where nothing is predicted). -> logp [N, L] float32
    (and entropy [N, L] when `with_entropy`). remat: see `Decoder.hidden_states`.
    """
    h = model.hidden_states(tokens, segment_ids=segment_ids, positions=positions, remat=remat)
    return logprobs_from_hidden(h, model.head_weight(), targets, chunk=model.cfg.logits_chunk,
                                temperature=temperature, with_entropy=with_entropy)


def slot_logprobs(model: Decoder, micro: dict[str, Array], *, temperature: float = 1.0, with_entropy: bool = False,
                  remat: bool | None = None) -> Array | tuple[Array, Array]:
    """Log-prob of `targets` at every slot of one micro-batch of a `prime_jax.rl.packing` layout: the LAYOUT_KEYS
    arrays [r, L] (packed or padded rows: `packed_logprobs`) and, in the shared-prompt layout, the PREFIX_KEYS arrays
    (`Decoder.shared_prompt_hidden_states`). -> logp [r, L] float32 (and entropy [r, L] when `with_entropy`)."""
    if "prefix_tokens" not in micro:
        return packed_logprobs(model, micro["tokens"], micro["segment_ids"], micro["positions"], micro["targets"],
                               temperature=temperature, with_entropy=with_entropy, remat=remat)
    h = model.shared_prompt_hidden_states(micro["prefix_tokens"], micro["prefix_segment_ids"], micro["tokens"],
                                          micro["segment_ids"], micro["positions"], micro["prefix_of"], remat=remat)
    return logprobs_from_hidden(h, model.head_weight(), micro["targets"], chunk=model.cfg.logits_chunk,
                                temperature=temperature, with_entropy=with_entropy)

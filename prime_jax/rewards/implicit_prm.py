"""Implicit process reward model (PRIME_SPEC §1.4, §5): token rewards, CE loss, batch_norm, dpo_acc.

The implicit PRM is a causal LM pi_phi trained with an outcome (CE) objective on the sequence
log-ratio beta * sum_t log(pi_phi / pi_ref); its per-token log-ratio is the process reward.
All arrays are [B, R] over response tokens, rows of one prompt contiguous (n per group).
"""
from typing import Literal

import jax
import jax.numpy as jnp

from prime_jax.rl.advantages import last_token_mask

Granularity = Literal["token", "whole"]
GRANULARITIES = ("token", "whole")
NORM_EPS = 1e-6


def token_rewards(logp_prm: jax.Array, logp_ref: jax.Array, mask: jax.Array, *,
                  include_eos: bool = True, granularity: Granularity = "token") -> jax.Array:
    """Implicit process rewards: logp_prm, logp_ref, mask [B, R] -> rewards [B, R] float32.

    q_t = logp_prm_t - logp_ref_t on valid tokens, 0 on padding; no beta (ORIG: beta only
    enters the loss, and batch_norm rescales anyway).
    - include_eos=True (ORIG default): the last valid token (the EOS) keeps its q;
      False (VERL): it is set to 0.
    - granularity "token" (default): reward q_t on each token; "whole": the sum of the
      token rewards above is placed on the last valid token, 0 elsewhere.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
    mask = mask.astype(jnp.float32)
    last = last_token_mask(mask)
    keep = mask if include_eos else mask - last
    q = (logp_prm.astype(jnp.float32) - logp_ref.astype(jnp.float32)) * keep
    if granularity == "whole":
        return jnp.sum(q, axis=-1, keepdims=True) * last
    return q


def sequence_log_ratio(logp_prm: jax.Array, logp_ref: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t (logp_prm - stop_grad(logp_ref)) * mask: [B, R] -> [B] float32."""
    q = logp_prm.astype(jnp.float32) - jax.lax.stop_gradient(logp_ref.astype(jnp.float32))
    return jnp.sum(q * mask.astype(jnp.float32), axis=-1)


def prm_loss_terms(logp_prm: jax.Array, logp_ref: jax.Array, mask: jax.Array, acc: jax.Array, *,
                   beta: float = 0.05) -> jax.Array:
    """Per-row CE of sigmoid(z) vs acc, z = beta * sum_t q_t: -> [B] float32.

    Stable form softplus(z) - acc * z (= -acc log sigmoid(z) - (1-acc) log(1-sigmoid(z)));
    ORIG clamps the log at -100, which only matters for |z| > 100. Gradient flows only
    through logp_prm.
    """
    z = beta * sequence_log_ratio(logp_prm, logp_ref, mask)
    return jax.nn.softplus(z) - acc.astype(jnp.float32) * z


def prm_loss(logp_prm: jax.Array, logp_ref: jax.Array, mask: jax.Array, acc: jax.Array, *,
             beta: float = 0.05) -> jax.Array:
    """PRM CE loss, mean over rows: logp_prm, logp_ref, mask [B, R], acc [B] -> scalar float32."""
    return jnp.mean(prm_loss_terms(logp_prm, logp_ref, mask, acc, beta=beta))


def batch_norm(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """ORIG `prime_norm: batch_norm`: rewards / (max |reverse cumsum over time| + 1e-6).

    rewards, mask [..., B, R] -> [..., B, R]; the max is over the last two axes, so [B, R] is
    one global scope and [S, B/S, R] normalises each of S data shards on its own (ORIG: each
    of 8 workers over its 128-row chunk). A pure rescale, so beta never reaches the policy.
    """
    r = rewards.astype(jnp.float32) * mask.astype(jnp.float32)
    to_go = jnp.flip(jnp.cumsum(jnp.flip(r, axis=-1), axis=-1), axis=-1)
    scale = jnp.max(jnp.abs(to_go), axis=(-2, -1), keepdims=True) + NORM_EPS
    return r / scale


def dpo_acc(seq_scores: jax.Array, acc: jax.Array, n: int) -> jax.Array:
    """Pairwise ranking accuracy of sequence scores vs outcome (§5): seq_scores, acc [B] -> scalar.

    Per group, over pairs i < j: sum 1[(s_i - s_j > 0) == (a_i - a_j > 0)] * |a_i - a_j| / sum |a_i - a_j|;
    a group whose acc are all equal counts 0.5; mean over groups. Ties in score count as
    "i not above j" (ORIG), so with all-zero scores the value depends on the order of acc.
    """
    if seq_scores.shape[0] % n:
        raise ValueError(f"batch of {seq_scores.shape[0]} rows is not a multiple of n={n}")
    s = seq_scores.astype(jnp.float32).reshape(-1, n)
    a = acc.astype(jnp.float32).reshape(-1, n)
    ds = s[:, :, None] - s[:, None, :]                            # [G, n, n]: s_i - s_j
    da = a[:, :, None] - a[:, None, :]
    upper = jnp.triu(jnp.ones((n, n), dtype=jnp.float32), k=1)
    weight = jnp.abs(da) * upper
    agree = ((ds > 0) == (da > 0)).astype(jnp.float32)
    total = jnp.sum(weight, axis=(1, 2))
    per_group = jnp.where(total > 0, jnp.sum(agree * weight, axis=(1, 2)) / jnp.where(total > 0, total, 1.0), 0.5)
    return jnp.mean(per_group)

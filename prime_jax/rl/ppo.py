"""PPO-clip policy loss (PRIME_SPEC §1.7).

All arrays are [B, R] over response tokens.
"""
from typing import Literal

import jax
import jax.numpy as jnp

Aggregation = Literal["token", "seq-mean-token-mean"]
AGGREGATIONS = ("token", "seq-mean-token-mean")


def policy_loss_terms(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
                      clip: float = 0.2, clip_high: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO-clip loss and clipped-branch indicator: [B, R] -> ([B, R], [B, R]) float32.

    ratio = exp(logp - old_logp); loss = max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip_high))
    with clip_high = clip unless given (DAPO-style asymmetric clip). The indicator is 1 where
    the clipped branch is strictly larger (ORIG `pg_clipfrac`).
    """
    high = clip if clip_high is None else clip_high
    adv = advantages.astype(jnp.float32)
    ratio = jnp.exp(logp.astype(jnp.float32) - old_logp.astype(jnp.float32))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + high)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def aggregate(x: jax.Array, mask: jax.Array, agg: Aggregation) -> jax.Array:
    """Masked mean of x [B, R]: "token" = over all valid tokens; "seq-mean-token-mean" = per-row
    token mean, then mean over rows (ORIG with 1 sequence per micro-batch). -> scalar."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg={agg!r}: expected one of {AGGREGATIONS}")
    mask = mask.astype(jnp.float32)
    if agg == "token":
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    row = jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return jnp.mean(row)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip: float = 0.2, clip_high: float | None = None,
                agg: Aggregation = "token") -> tuple[jax.Array, jax.Array]:
    """PPO-clip loss and clip fraction: logp, old_logp, advantages, mask [B, R] -> (loss, clipfrac) scalars.

    Both aggregated with `agg`; ORIG's effective mode is "seq-mean-token-mean" (token mean per
    1-sequence micro-batch), VERL's default is "token".
    """
    loss, clipped = policy_loss_terms(logp, old_logp, advantages, clip=clip, clip_high=clip_high)
    return aggregate(loss, mask, agg), aggregate(clipped, mask, agg)

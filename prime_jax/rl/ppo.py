"""PPO-clip policy loss and the jitted policy step (PRIME_SPEC §1.7).

All arrays are [B, R] over response tokens.
"""
import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prime_jax.models import response_logprobs
from prime_jax.rl.optim import (TrainState, accumulate_gradients, apply_gradients, batch_prefix_sharding,
                                check_batch, split_micro_batches, train_state_shardings, validate_batching)

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


def aggregate_sum(x: jax.Array, mask: jax.Array, agg: Aggregation) -> jax.Array:
    """Numerator of `aggregate`: sum of x * mask ("token") or sum of per-row token means. -> scalar.

    Additive over row subsets, so micro-batch sums divided by the mini-batch's `aggregate_count`
    give the mini-batch mean exactly, whatever the micro-batch split.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg={agg!r}: expected one of {AGGREGATIONS}")
    mask = mask.astype(jnp.float32)
    if agg == "token":
        return jnp.sum(x * mask)
    return jnp.sum(jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))


def aggregate_count(mask: jax.Array, agg: Aggregation) -> jax.Array:
    """Denominator of `aggregate`: valid tokens ("token") or rows, at least 1. -> scalar float32."""
    if agg == "token":
        return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    return jnp.float32(max(mask.shape[0], 1))


def aggregate(x: jax.Array, mask: jax.Array, agg: Aggregation) -> jax.Array:
    """Masked mean of x [B, R]: "token" = over all valid tokens; "seq-mean-token-mean" = per-row
    token mean, then mean over rows (ORIG with 1 sequence per micro-batch). -> scalar."""
    return aggregate_sum(x, mask, agg) / aggregate_count(mask, agg)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip: float = 0.2, clip_high: float | None = None,
                agg: Aggregation = "token") -> tuple[jax.Array, jax.Array]:
    """PPO-clip loss and clip fraction: logp, old_logp, advantages, mask [B, R] -> (loss, clipfrac) scalars.

    Both aggregated with `agg`; ORIG's effective mode is "seq-mean-token-mean" (token mean per
    1-sequence micro-batch), VERL's default is "token".
    """
    loss, clipped = policy_loss_terms(logp, old_logp, advantages, clip=clip, clip_high=clip_high)
    return aggregate(loss, mask, agg), aggregate(clipped, mask, agg)


PPO_BATCH_KEYS = ("prompt_tokens", "prompt_mask", "tokens", "mask", "old_logp", "advantages")


@dataclasses.dataclass(frozen=True)
class PpoStepConfig:
    """Policy step settings (PRIME_SPEC §1.7, §3.2).

    mini_batch_size / micro_batch_size: responses per optimiser step / per forward-backward
    (ORIG 256 / 8); epochs: passes over the batch (ORIG 1), each in a fresh random order when
    `shuffle` (ORIG shuffles within each GPU's shard; here globally, so results do not depend on
    the device count). agg: loss aggregation, default ORIG's effective "seq-mean-token-mean".
    entropy_coef: bonus -coef * entropy (ORIG script 0). kl_coef: k3 ("low_var_kl") penalty to a
    reference policy whose log-probs come in batch["ref_logp"] (ORIG 0). temperature: divides
    the logits as in the sampler (ORIG 1.0).
    """
    mini_batch_size: int
    micro_batch_size: int
    epochs: int = 1
    clip: float = 0.2
    clip_high: float | None = None
    agg: Aggregation = "seq-mean-token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    temperature: float = 1.0
    shuffle: bool = True

    def validate(self, mesh: Mesh) -> None:
        """Raise ValueError naming the bad key, before anything is traced."""
        if self.epochs < 1:
            raise ValueError(f"actor.epochs={self.epochs}: must be >= 1")
        if not 0 < self.clip < 1:
            raise ValueError(f"actor.clip={self.clip}: must be in (0, 1)")
        if self.clip_high is not None and self.clip_high <= 0:
            raise ValueError(f"actor.clip_high={self.clip_high}: must be > 0")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"actor.agg={self.agg!r}: expected one of {AGGREGATIONS}")
        if self.entropy_coef < 0 or self.kl_coef < 0:
            raise ValueError(f"actor.entropy_coef={self.entropy_coef}, actor.kl_coef={self.kl_coef}: must be >= 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"actor.temperature={self.temperature}: must be > 0")
        validate_batching("actor", mini_batch_size=self.mini_batch_size,
                          micro_batch_size=self.micro_batch_size, mesh=mesh)

    def updates_per_iteration(self, batch_size: int) -> int:
        """Optimiser steps per call (for the lr schedule): epochs * B / mini_batch_size."""
        return self.epochs * (batch_size // self.mini_batch_size)


def low_var_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0. [B, R]."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def make_ppo_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: PpoStepConfig, *,
                  mesh: Mesh, state: TrainState,
                  lr_schedule: optax.Schedule) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted policy program: (state, batch, key) -> (new state, metrics).

    batch: prompt_tokens [B, P] int32 (left-padded), prompt_mask [B, P], tokens [B, R] int32,
    mask [B, R], old_logp [B, R] f32, advantages [B, R] f32 (+ ref_logp [B, R] if kl_coef > 0);
    key: PRNG key for the mini-batch shuffle. Per epoch the rows are permuted and cut into
    mini-batches; each mini-batch's gradient is accumulated exactly over micro-batches, then
    clipped and applied by `tx`. `state` (real or abstract) fixes the shardings (params and
    Adam moments by logical axes); it is donated. `lr_schedule` (the one inside `tx`) gives
    actor/lr. Metrics, means over mini-batches: actor/pg_loss, actor/pg_clipfrac, actor/ppo_kl
    (old_logp - logp), actor/entropy, actor/grad_norm (pre-clip), actor/lr, and actor/kl_loss
    when kl_coef > 0.
    """
    cfg.validate(mesh)
    state_sh = train_state_shardings(state, mesh)
    batch_sh = batch_prefix_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    keys = PPO_BATCH_KEYS + (("ref_logp",) if cfg.kl_coef > 0 else ())
    micro_per_mini = cfg.mini_batch_size // cfg.micro_batch_size

    def micro_loss(params: Any, mb: dict[str, jax.Array], count: jax.Array):
        model = nnx.merge(graphdef, params)
        logp, entropy = response_logprobs(model, mb["prompt_tokens"], mb["prompt_mask"], mb["tokens"], mb["mask"],
                                          temperature=cfg.temperature, with_entropy=True)
        mask = mb["mask"]
        mean = lambda x: aggregate_sum(x, mask, cfg.agg) / count  # noqa: E731  (share of the mini-batch mean)
        pg, clipped = policy_loss_terms(logp, mb["old_logp"], mb["advantages"], clip=cfg.clip, clip_high=cfg.clip_high)
        parts = {"actor/pg_loss": mean(pg), "actor/pg_clipfrac": mean(clipped),
                 "actor/ppo_kl": mean(mb["old_logp"] - logp), "actor/entropy": mean(entropy)}
        loss = parts["actor/pg_loss"] - cfg.entropy_coef * parts["actor/entropy"]
        if cfg.kl_coef > 0:
            parts["actor/kl_loss"] = mean(low_var_kl(logp, mb["ref_logp"]))
            loss = loss + cfg.kl_coef * parts["actor/kl_loss"]
        return loss, jax.tree.map(jax.lax.stop_gradient, parts)

    def step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            b = check_batch("actor", batch, keys, cfg.mini_batch_size)
            batch = {k: batch[k] for k in keys}
            if cfg.shuffle:
                order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), b)
                                         for e in range(cfg.epochs)])
            else:
                order = jnp.tile(jnp.arange(b), cfg.epochs)
            rows = {k: v[order] for k, v in batch.items()} if cfg.shuffle or cfg.epochs > 1 else batch
            micro = split_micro_batches(rows, micro_batch_size=cfg.micro_batch_size,
                                        micro_per_mini=micro_per_mini, mesh=mesh)

            def minibatch(state, mb):
                count = aggregate_count(mb["mask"].reshape(-1, mb["mask"].shape[-1]), cfg.agg)
                lr = lr_schedule(state.step)
                _, grads, parts = accumulate_gradients(lambda p, m: micro_loss(p, m, count), state.params, mb)
                metrics = {k: jnp.sum(v) for k, v in parts.items()}
                metrics.update({"actor/grad_norm": optax.tree.norm(grads), "actor/lr": jnp.asarray(lr, jnp.float32)})
                return apply_gradients(state, grads, tx), metrics

            new_state, metrics = jax.lax.scan(minibatch, state, micro)
            return new_state, {k: jnp.mean(v) for k, v in metrics.items()}

    return jax.jit(step, in_shardings=(state_sh, batch_sh, replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=0)

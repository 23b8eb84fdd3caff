"""PPO-clip policy loss and the jitted policy step (docs/prime_spec.md §1.7).

All arrays are [B, R] over response tokens; the policy's forward-backward runs on the slots of
`prime_jax.rl.packing` (packed rows or shared prompts), the loss terms are gathered there from the [B, R] layout.
"""
import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prime_jax.models import slot_logprobs
from prime_jax.rl.packing import to_slots
from prime_jax.rl.optim import (TrainState, accumulate_gradients, apply_gradients, batch_prefix_sharding,
                                check_batch, check_layout, layout_sharding, skipped_updates, train_state_shardings)

Aggregation = Literal["token", "seq-mean-token-mean"]
AGGREGATIONS = ("token", "seq-mean-token-mean")


def policy_loss_terms(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
                      clip: float = 0.2, clip_high: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO-clip loss and clipped-branch indicator: [B, R] -> ([B, R], [B, R]) float32.

    ratio = exp(logp - old_logp); loss = max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip_high))
    with clip_high = clip unless given (DAPO-style asymmetric clip). The indicator is 1 where
    the clipped branch is strictly larger (reference `pg_clipfrac`).
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
    token mean, then mean over rows (reference with 1 sequence per micro-batch). -> scalar."""
    return aggregate_sum(x, mask, agg) / aggregate_count(mask, agg)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip: float = 0.2, clip_high: float | None = None,
                agg: Aggregation = "token") -> tuple[jax.Array, jax.Array]:
    """PPO-clip loss and clip fraction: logp, old_logp, advantages, mask [B, R] -> (loss, clipfrac) scalars.

    Both aggregated with `agg`; the reference's effective mode is "seq-mean-token-mean" (token mean per
    1-sequence micro-batch), VERL's default is "token".
    """
    loss, clipped = policy_loss_terms(logp, old_logp, advantages, clip=clip, clip_high=clip_high)
    return aggregate(loss, mask, agg), aggregate(clipped, mask, agg)


PPO_BATCH_KEYS = ("mask", "old_logp", "advantages")


@dataclasses.dataclass(frozen=True)
class PpoStepConfig:
    """Policy step settings (docs/prime_spec.md §1.7, §3.2).

    mini_batch_size / micro_batch_size: responses per optimiser step / per forward-backward
    (reference 256 / 8); epochs: passes over the batch (reference 1), each in a fresh random order when
    `shuffle` (reference shuffles within each GPU's shard; here globally, on the host, so results do not
    depend on the device count; see `ppo_minibatches`). agg: loss aggregation, default the reference's effective "seq-mean-token-mean".
    entropy_coef: bonus -coef * entropy (reference script 0). kl_coef: k3 ("low_var_kl") penalty to a
    reference policy whose log-probs come in batch["ref_logp"] (reference 0). temperature: divides
    the logits as in the sampler (reference 1.0).
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

    def updates_per_iteration(self, batch_size: int) -> int:
        """Optimiser steps per call (for the lr schedule): epochs * B / mini_batch_size."""
        return self.epochs * (batch_size // self.mini_batch_size)


def low_var_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0. [B, R]."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def ppo_minibatches(batch_size: int, cfg: PpoStepConfig, seed: int | tuple[int, ...]) -> np.ndarray:
    """Row ids of each policy mini-batch in update order: [epochs * B / mini_batch_size, mini_batch_size].
    Each epoch is a fresh permutation from numpy's generator seeded with `seed` (in order without `shuffle`)."""
    rng = np.random.default_rng(seed)
    order = [rng.permutation(batch_size) if cfg.shuffle else np.arange(batch_size) for _ in range(cfg.epochs)]
    return np.concatenate(order).reshape(-1, cfg.mini_batch_size)


def make_ppo_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: PpoStepConfig, *,
                  mesh: Mesh, state: TrainState,
                  lr_schedule: optax.Schedule) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted policy program: (state, batch, layout) -> (new state, metrics).

    batch: mask [B, R], old_logp [B, R] f32, advantages [B, R] f32 (+ ref_logp [B, R] if kl_coef > 0);
    layout: the sequences' slots [M, k, r, L] from `prime_jax.rl.packing.lay_out` with the rows of
    `ppo_minibatches` (M = epochs * B / mini_batch_size mini-batches of k micro-batches). Each
    mini-batch's gradient is accumulated exactly over its micro-batches, then clipped and applied by
    `tx`. `state` (real or abstract) fixes the shardings (params and Adam moments by logical axes); it
    is donated. `lr_schedule` (the one inside `tx`) gives actor/lr. Metrics, means over mini-batches:
    actor/pg_loss, actor/pg_clipfrac, actor/ppo_kl (old_logp - logp), actor/entropy, actor/grad_norm
    (pre-clip), actor/lr, and actor/kl_loss when kl_coef > 0; actor/skipped_nonfinite: the mini-batch updates
    of this call skipped (loss or gradients not finite, nothing applied; read from `tx`'s apply_if_finite state).
    """
    state_sh = train_state_shardings(state, mesh)
    batch_sh = batch_prefix_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    keys = PPO_BATCH_KEYS + (("ref_logp",) if cfg.kl_coef > 0 else ())

    def micro_loss(params: Any, mb: dict[str, jax.Array], count: jax.Array):
        model = nnx.merge(graphdef, params)
        logp, entropy = slot_logprobs(model, mb, temperature=cfg.temperature, with_entropy=True)
        weight = mb["weight"]
        logp = jnp.where(weight > 0, logp, mb["old_logp"])   # slots that predict nothing stay finite in exp()
        mean = lambda x: jnp.sum(x * weight) / count  # noqa: E731  (share of the mini-batch mean)
        pg, clipped = policy_loss_terms(logp, mb["old_logp"], mb["advantages"], clip=cfg.clip, clip_high=cfg.clip_high)
        parts = {"actor/pg_loss": mean(pg), "actor/pg_clipfrac": mean(clipped),
                 "actor/ppo_kl": mean(mb["old_logp"] - logp), "actor/entropy": mean(entropy)}
        loss = parts["actor/pg_loss"] - cfg.entropy_coef * parts["actor/entropy"]
        if cfg.kl_coef > 0:
            parts["actor/kl_loss"] = mean(low_var_kl(logp, mb["ref_logp"]))
            loss = loss + cfg.kl_coef * parts["actor/kl_loss"]
        return loss, jax.tree.map(jax.lax.stop_gradient, parts)

    def step(state: TrainState, batch: dict[str, jax.Array], layout: dict[str, jax.Array]):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            b = check_batch("actor", batch, keys, cfg.mini_batch_size)
            check_layout("actor", layout, cfg.updates_per_iteration(b))
            mask = batch["mask"].astype(jnp.float32)
            # "token": each valid token weighs 1; "seq-mean-token-mean": 1 / its row's length (aggregate_sum).
            weight = mask if cfg.agg == "token" else mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
            slots = {**layout, "weight": to_slots(weight, layout["index"]), "valid": to_slots(mask, layout["index"])}
            slots.update({k: to_slots(batch[k].astype(jnp.float32), layout["index"]) for k in keys if k != "mask"})

            def minibatch(state, mb):
                count = jnp.maximum(jnp.sum(mb["valid"]), 1.0) if cfg.agg == "token" else jnp.float32(cfg.mini_batch_size)
                lr = lr_schedule(state.step)
                micro = {k: v for k, v in mb.items() if k != "valid"}
                loss, grads, parts = accumulate_gradients(lambda p, m: micro_loss(p, m, count), state.params, micro)
                metrics = {k: jnp.sum(v) for k, v in parts.items()}
                metrics.update({"actor/grad_norm": optax.tree.norm(grads), "actor/lr": jnp.asarray(lr, jnp.float32)})
                return apply_gradients(state, grads, tx, loss), metrics

            new_state, metrics = jax.lax.scan(minibatch, state, slots)
            metrics = {k: jnp.mean(v) for k, v in metrics.items()}
            skipped = skipped_updates(new_state.opt_state) - skipped_updates(state.opt_state)
            return new_state, {**metrics, "actor/skipped_nonfinite": skipped.astype(jnp.float32)}

    return jax.jit(step, in_shardings=(state_sh, batch_sh, layout_sharding(mesh)),
                   out_shardings=(state_sh, replicated), donate_argnums=0)

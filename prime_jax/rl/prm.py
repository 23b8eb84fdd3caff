"""Implicit process reward model (docs/prime_spec.md §1.4, §5): token rewards, CE loss, batch_norm, dpo_acc.

The implicit PRM is a causal LM pi_phi trained with an outcome (CE) objective on the sequence
log-ratio beta * sum_t log(pi_phi / pi_ref); its per-token log-ratio is the process reward.
All arrays are [B, R] over response tokens, rows of one prompt contiguous (n per group).

`make_prm_step` builds the one jitted program of §1.4: reference log-probs, the PRM's
mini-batch updates in order with micro-batch gradient accumulation, and the token rewards.
The model passes run on the slots of `prime_jax.rl.packing` (packed rows or shared prompts); their log-probs come
back in the [B, R] layout, where the loss, rewards and metrics are computed.
"""
import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prime_jax.models import in_compute_dtype, slot_logprobs
from prime_jax.rl.packing import from_slots, segment_cumsum, to_slots
from prime_jax.rl.advantages import last_token_mask
from prime_jax.rl.optim import (TrainState, accumulate_gradients, apply_gradients, batch_prefix_sharding,
                                check_batch, check_layout, layout_sharding, skipped_updates, train_state_shardings)

Granularity = Literal["token", "whole"]
GRANULARITIES = ("token", "whole")
Ties = Literal["not_above", "half"]
TIES = ("not_above", "half")
NORM_EPS = 1e-6
LN2 = np.float32(np.log(2.0))   # the PRM loss of a row with z = 0 (softplus(0))


def token_rewards(logp_prm: jax.Array, logp_ref: jax.Array, mask: jax.Array, *,
                  include_eos: bool = True, granularity: Granularity = "token") -> jax.Array:
    """Implicit process rewards: logp_prm, logp_ref, mask [B, R] -> rewards [B, R] float32.

    q_t = logp_prm_t - logp_ref_t on valid tokens, 0 on padding; no beta (the reference: beta only
    enters the loss, and batch_norm rescales anyway).
    - include_eos=True (reference default): the last valid token (the EOS) keeps its q;
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
    The reference clamps the log at -100, which only matters for |z| > 100. Gradient flows only
    through logp_prm.
    """
    z = beta * sequence_log_ratio(logp_prm, logp_ref, mask)
    return jax.nn.softplus(z) - acc.astype(jnp.float32) * z


def prm_loss(logp_prm: jax.Array, logp_ref: jax.Array, mask: jax.Array, acc: jax.Array, *,
             beta: float = 0.05) -> jax.Array:
    """PRM CE loss, mean over rows: logp_prm, logp_ref, mask [B, R], acc [B] -> scalar float32.

    Averaged as ln 2 + mean(term - ln 2): every term is ln 2 (its value at z = 0) plus a part of the size of z, and
    summing only those parts keeps the rounding of B additions off ln 2 (plain float32 means of B = 128 copies of
    ln 2 come out a few ulp high), so PRM == reference gives exactly ln 2.
    """
    return LN2 + jnp.mean(prm_loss_terms(logp_prm, logp_ref, mask, acc, beta=beta) - LN2)


def batch_norm(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """The reference's `prime_norm: batch_norm`: rewards / (max |reverse cumsum over time| + 1e-6).

    rewards, mask [..., B, R] -> [..., B, R]; the max is over the last two axes, so [B, R] is
    one global scope and [S, B/S, R] normalises each of S data shards on its own (the reference: each
    of 8 workers over its 128-row chunk). A pure rescale, so beta never reaches the policy.
    """
    r = rewards.astype(jnp.float32) * mask.astype(jnp.float32)
    to_go = jnp.flip(jnp.cumsum(jnp.flip(r, axis=-1), axis=-1), axis=-1)
    scale = jnp.max(jnp.abs(to_go), axis=(-2, -1), keepdims=True) + NORM_EPS
    return r / scale


def dpo_acc(seq_scores: jax.Array, acc: jax.Array, n: int, *, ties: Ties = "not_above") -> jax.Array:
    """Pairwise ranking accuracy of sequence scores vs outcome (§5): seq_scores, acc [B] -> scalar.

    Per group, over pairs i < j: sum agree_ij * |a_i - a_j| / sum |a_i - a_j|; a group whose acc are all equal
    counts 0.5; mean over groups. agree_ij = 1[(s_i - s_j > 0) == (a_i - a_j > 0)], and a tie in score
    (s_i == s_j) counts as "i not above j" with ties="not_above" (the reference: with all-zero scores the value
    depends on the order of acc), or 0.5 with ties="half" (tie-neutral: all-equal scores give exactly 0.5).
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: expected one of {TIES}")
    if seq_scores.shape[0] % n:
        raise ValueError(f"batch of {seq_scores.shape[0]} rows is not a multiple of n={n}")
    s = seq_scores.astype(jnp.float32).reshape(-1, n)
    a = acc.astype(jnp.float32).reshape(-1, n)
    ds = s[:, :, None] - s[:, None, :]                            # [G, n, n]: s_i - s_j
    da = a[:, :, None] - a[:, None, :]
    upper = jnp.triu(jnp.ones((n, n), dtype=jnp.float32), k=1)
    weight = jnp.abs(da) * upper
    agree = ((ds > 0) == (da > 0)).astype(jnp.float32)
    if ties == "half":
        agree = jnp.where(ds == 0, 0.5, agree)
    total = jnp.sum(weight, axis=(1, 2))
    per_group = jnp.where(total > 0, jnp.sum(agree * weight, axis=(1, 2)) / jnp.where(total > 0, total, 1.0), 0.5)
    return jnp.mean(per_group)


UPDATE_MODES = ("after", "before", "none")
NORM_SCOPES = ("global", "shard")
PRM_BATCH_KEYS = ("mask", "acc", "unpack")


@dataclasses.dataclass(frozen=True)
class PrmStepConfig:
    """Implicit-PRM step settings (docs/prime_spec.md §1.4, §3; reference defaults except where noted).

    mini_batch_size / micro_batch_size: rows per PRM optimiser step / per forward-backward
    (reference 256 / 8). update: "after" = single forward, each row's reward from the PRM before
    the update on its own mini-batch (reference default); "before" = update on the whole batch, then
    a second forward for the rewards (VERL default, the paper's App. B.2 "double forward");
    "none" = no update. shuffle_labels: the label-shuffled control (`shuffled_labels`; the trainer passes the
    step its `labels`): the PRM learns from the outcome labels permuted across the batch, so its rewards carry no
    information about the responses. num_shards: the batch is seen as that many contiguous chunks (the reference:
    one per GPU, 8) and mini-batch m takes the m-th slice of every chunk, in order; it is also the
    scope of batch_norm when norm_scope="shard" (the reference's effective scope). Default 1 and
    "global": one scope over the batch, independent of the device count.
    """
    n: int
    mini_batch_size: int
    micro_batch_size: int
    beta: float = 0.05
    update: Literal["after", "before", "none"] = "after"
    norm_scope: Literal["global", "shard"] = "global"
    num_shards: int = 1
    include_eos: bool = True
    granularity: Granularity = "token"
    shuffle_labels: bool = False

    def updates_per_iteration(self, batch_size: int) -> int:
        """PRM optimiser steps per call (for the lr schedule): B / mini_batch_size, or 0 for "none"."""
        return 0 if self.update == "none" else batch_size // self.mini_batch_size


class PrmStepOutput(NamedTuple):
    """rm_scores: normalised token rewards [B, R] (what the advantage reads); raw: un-normalised [B, R];
    before: un-normalised token rewards of the PRM before its update on each row's mini-batch [B, R] (what
    dpo_acc_before and the host's step diagnostics read; = raw unless update="before"); metrics: scalar dict
    (reward_model/...)."""
    rm_scores: jax.Array
    raw: jax.Array
    before: jax.Array
    metrics: dict[str, jax.Array]


def same_weights(params: Any, ref_params: Any, dtype: Any) -> jax.Array:
    """Whether the PRM computes exactly what the reference computes: every weight equal once cast to the compute
    `dtype` (both models cast their weights to it before use). -> scalar bool"""
    a, b = in_compute_dtype(params, dtype), in_compute_dtype(ref_params, dtype)
    return jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]))


def minibatch_order(batch_size: int, mini_batch_size: int, num_shards: int) -> np.ndarray:
    """Row permutation putting the batch in mini-batch order: [B] int.

    The batch is num_shards contiguous chunks; mini-batch m is the m-th run of mini/num_shards rows
    of every chunk (the reference: each GPU walks its own chunk in order, gradients all-reduced).
    """
    rows = np.arange(batch_size).reshape(num_shards, batch_size // mini_batch_size, mini_batch_size // num_shards)
    return rows.transpose(1, 0, 2).reshape(-1)


def prm_minibatches(batch_size: int, cfg: PrmStepConfig) -> np.ndarray:
    """Row ids of each PRM mini-batch, in update order: [B / mini_batch_size, mini_batch_size] (the layout's order)."""
    return minibatch_order(batch_size, cfg.mini_batch_size, cfg.num_shards).reshape(-1, cfg.mini_batch_size)


def shuffled_labels(acc: np.ndarray, trained: np.ndarray, seed: int, step: int) -> np.ndarray:
    """The label-shuffled control's PRM targets: acc [B] with the trained rows' values permuted among themselves by a
    (seed, step) generator (padding rows keep theirs) -> [B] float32. Same class balance, no tie to the response."""
    labels = np.asarray(acc, np.float32).copy()
    rows = np.flatnonzero(trained)
    labels[rows] = labels[np.random.default_rng([seed, step]).permutation(rows)]
    return labels


def make_prm_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: PrmStepConfig, *,
                  mesh: Mesh, state: TrainState, ref_params: Any) -> Callable[..., tuple[TrainState, PrmStepOutput]]:
    """The jitted PRM program: (state, ref_params, batch, layout) -> (new state, PrmStepOutput).

    batch: mask [B, R] float32, acc [B] float32, unpack [B, R] int32, and optionally labels [B] float32: the loss's
    targets when they are not acc (`shuffled_labels`; the metrics still read acc); layout: the sequences' slots
    [M, k, r, L] from `prime_jax.rl.packing.lay_out` (and its `unpack`) with the rows of `prm_minibatches`
    (M mini-batches of k micro-batches).
    `state` / `ref_params` (real or abstract) fix the shardings: params and Adam moments by their logical
    axes, the batch over the data axes, the layout's rows (r) too; the state is donated. PRM log-probs use
    temperature 1 (the reference). Metrics: reward_model/prm_loss (mean of the mini-batch losses; reference logs the last
    micro-batch's), reward_model/grad_norm (pre-clip, mean over mini-batches), reward_model/dpo_acc_before,
    reward_model/dpo_acc_before_tie_neutral (score ties count half: `dpo_acc` ties="half"), and
    reward_model/dpo_acc_after for update="before"; with an update, reward_model/skipped_nonfinite: the mini-batch
    updates of this call skipped (loss or gradients not finite, nothing applied; read from `tx`'s apply_if_finite
    state).
    """
    state_sh = train_state_shardings(state, mesh)
    ref_sh = train_state_shardings(ref_params, mesh)
    compute_dtype = nnx.merge(graphdef, state.params).cfg.dtype
    batch_sh = batch_prefix_sharding(mesh)
    slots_sh = layout_sharding(mesh)
    replicated = NamedSharding(mesh, P())

    def logps(params: Any, micro: dict[str, jax.Array]) -> jax.Array:
        """Log-probs at the slots of one micro-batch: [r, L] float32."""
        return slot_logprobs(nnx.merge(graphdef, params), micro)

    def rewards_of(logp_prm: jax.Array, logp_ref: jax.Array, mask: jax.Array) -> jax.Array:
        return token_rewards(jax.lax.stop_gradient(logp_prm), logp_ref, mask,
                             include_eos=cfg.include_eos, granularity=cfg.granularity)

    def step(state: TrainState, ref_params: Any, batch: dict[str, jax.Array], layout: dict[str, jax.Array]):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            b = check_batch("prm", batch, PRM_BATCH_KEYS, cfg.mini_batch_size)
            if b % cfg.n:
                raise ValueError(f"prm batch of {b} rows is not a multiple of prm.n={cfg.n}")
            check_layout("prm", layout, b // cfg.mini_batch_size)
            acc = batch["acc"].astype(jnp.float32)
            labels = batch["labels"].astype(jnp.float32) if "labels" in batch else acc
            valid = to_slots(batch["mask"], layout["index"]) > 0
            # The slot predicting a sequence's last response token: the next slot (that token's own) predicts nothing.
            last = valid & ~jnp.concatenate([valid[..., 1:], jnp.zeros_like(valid[..., :1])], axis=-1)
            layout = {**layout, "valid": valid, "last": last,
                      "acc": to_slots(labels, layout["index"] // batch["mask"].shape[1])}

            def micro_loss(params, mb, same):
                logp_ref = jax.lax.stop_gradient(logps(ref_params, mb))
                logp_prm = logps(params, mb)
                # A PRM equal to the reference (step 1) gives q = 0 exactly (`same_weights`), with the gradient of
                # logp_prm: its differentiated forward may round differently from the reference's (XLA compiles
                # it differently, for some shapes), and batch_norm would scale that noise up to reward size.
                logp_prm = jnp.where(same, logp_ref + (logp_prm - jax.lax.stop_gradient(logp_prm)), logp_prm)
                # z = beta * sum_t q_t of each sequence, read at its last predicting slot
                z = cfg.beta * segment_cumsum(jnp.where(mb["valid"], logp_prm - logp_ref, 0.0), mb["segment_ids"])
                terms = jnp.where(mb["last"], jax.nn.softplus(z) - mb["acc"] * z, 0.0)   # prm_loss_terms per sequence
                return jnp.sum(terms) / cfg.mini_batch_size, (jax.lax.stop_gradient(logp_prm), logp_ref)

            def minibatch(state, mb):
                same = same_weights(state.params, ref_params, compute_dtype)
                if cfg.update == "none":
                    _, slots = jax.lax.map(lambda m: micro_loss(state.params, m, same), mb)
                    return state, (jnp.zeros(()), slots)
                loss, grads, slots = accumulate_gradients(lambda p, m: micro_loss(p, m, same), state.params, mb)
                return apply_gradients(state, grads, tx, loss), (optax.tree.norm(grads), slots)

            new_state, (grad_norms, (prm_slots, ref_slots)) = jax.lax.scan(minibatch, state, layout)
            logp_prm = from_slots(prm_slots, batch["unpack"])
            logp_ref = from_slots(ref_slots, batch["unpack"])
            before = raw = rewards_of(logp_prm, logp_ref, batch["mask"])
            seq_before = jnp.sum(before, axis=-1)
            # The mean of the mini-batch losses (each a sum over its rows / mini_batch_size) is the batch mean.
            metrics = {"reward_model/prm_loss": prm_loss(logp_prm, logp_ref, batch["mask"], labels, beta=cfg.beta),
                       "reward_model/dpo_acc_before": dpo_acc(seq_before, acc, cfg.n),
                       "reward_model/dpo_acc_before_tie_neutral": dpo_acc(seq_before, acc, cfg.n, ties="half")}
            if cfg.update != "none":
                metrics["reward_model/grad_norm"] = jnp.mean(grad_norms)
                skipped = skipped_updates(new_state.opt_state) - skipped_updates(state.opt_state)
                metrics["reward_model/skipped_nonfinite"] = skipped.astype(jnp.float32)
            if cfg.update == "before":
                flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), layout)
                after = from_slots(jax.lax.map(lambda m: logps(new_state.params, m), flat), batch["unpack"])
                after = jnp.where(same_weights(new_state.params, ref_params, compute_dtype), logp_ref, after)
                raw = rewards_of(after, logp_ref, batch["mask"])
                metrics["reward_model/dpo_acc_after"] = dpo_acc(jnp.sum(raw, axis=-1), acc, cfg.n)
            scope = cfg.num_shards if cfg.norm_scope == "shard" else 1
            rm_scores = batch_norm(raw.reshape(scope, b // scope, -1),
                                   batch["mask"].reshape(scope, b // scope, -1)).reshape(b, -1)
            return new_state, PrmStepOutput(rm_scores, raw, before, metrics)

    return jax.jit(step, in_shardings=(state_sh, ref_sh, batch_sh, slots_sh),
                   out_shardings=(state_sh, PrmStepOutput(batch_sh, batch_sh, batch_sh, replicated)), donate_argnums=0)

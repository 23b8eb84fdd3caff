"""The device programs of a PRIME run, built from its settings: the training and evaluation samplers, the PRM
step, advantages, the PPO step, and the host-side layouts (`prime_jax.rl.packing`) the PRM and PPO steps read.

The trainer, evaluation and the AOT compiler all build their programs here, so they run exactly the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prime_jax.rl.advantages import compute_advantages
from prime_jax.rl.optim import TrainState, init_train_state, make_lr_schedule, make_optimizer, train_state_shardings
from prime_jax.rl.packing import Layout, lay_out
from prime_jax.rl.ppo import make_ppo_step, ppo_minibatches
from prime_jax.rl.prm import make_prm_step, prm_minibatches
from prime_jax.sampling import Rollout, Sampler, SamplingParams
from prime_jax.settings import AdvantageSettings, RunSettings


def optimizers(s: RunSettings) -> tuple[optax.GradientTransformation, optax.GradientTransformation, optax.Schedule]:
    """(policy tx, PRM tx, policy lr schedule), each stepped once per PRIME iteration."""
    ppo_updates = s.ppo.updates_per_iteration(s.rows_per_step)
    prm_updates = max(1, s.prm.updates_per_iteration(s.rows_per_step))
    return (make_optimizer(s.actor_optim, ppo_updates), make_optimizer(s.prm_optim, prm_updates),
            make_lr_schedule(s.actor_optim, ppo_updates))


def init_states(s: RunSettings, policy_params: nnx.State,
                prm_params: nnx.State | None) -> tuple[TrainState, TrainState | None]:
    """Fresh optimiser states, created on device with the params' shardings (Adam moments fp32, like params); no PRM
    state without PRM params (outcome-only RL). The params are donated: the states hold them, with no second copy
    (the arrays passed in are deleted)."""
    policy_tx, prm_tx, _ = optimizers(s)

    def init(params, tx):
        abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
        return jax.jit(lambda p: init_train_state(p, tx), out_shardings=train_state_shardings(abstract, s.mesh),
                       donate_argnums=0)(params)

    return init(policy_params, policy_tx), None if prm_params is None else init(prm_params, prm_tx)


def make_advantages(a: AdvantageSettings) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """The jitted advantage program: (rm_scores [B, R], acc [B], mask [B, R]) -> (advantages [B, R], metrics)."""

    @jax.jit
    def advantages(rm_scores, acc, mask):
        adv, returns = compute_advantages(rm_scores, acc, mask, **a.kwargs())
        m = mask.astype(jnp.float32)
        valid = m > 0
        stats = {}
        for name, x in (("advantages", adv), ("returns", returns)):
            stats[f"critic/{name}/mean"] = jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
            stats[f"critic/{name}/max"] = jnp.max(jnp.where(valid, x, -jnp.inf))
            stats[f"critic/{name}/min"] = jnp.min(jnp.where(valid, x, jnp.inf))
        process = jnp.sum(rm_scores * m, axis=1)
        stats["train_reward/reward_model"] = jnp.mean(process)
        stats["train_reward/verifier"] = jnp.mean(acc)
        stats["train_reward/reward_all"] = jnp.mean(a.rm_coef * process + a.verifier_coef * acc)
        return adv, stats

    return advantages


@dataclasses.dataclass
class Programs:
    """sampler(params, prompts, seed, on_rows, stop) -> Rollout; eval_sample(params, prompts, *, n, max_new_tokens,
    temperature, top_p, seed, buckets, prompts_per_call) -> Rollout, validation's sampling with the training
    sampler's knobs (a Sampler built once per shape, then shared);
    prm_step(state, ref_params, batch, slots) -> (state, PrmStepOutput), None without a PRM (outcome-only RL);
    advantages(rm, acc, mask) -> (adv,
    metrics); ppo_step(state, batch, slots) -> (state, metrics). On the host: prm_layout(batch) and
    ppo_layout(batch, seed) -> the steps' `Layout` (slots) from the host batch (prompt_tokens, prompt_mask,
    tokens, mask)."""

    sampler: Sampler
    eval_sample: Callable[..., Rollout]
    prm_step: Callable[..., Any] | None
    advantages: Callable[..., Any]
    ppo_step: Callable[..., Any]
    prm_layout: Callable[[dict[str, np.ndarray]], Layout]
    ppo_layout: Callable[[dict[str, np.ndarray], Any], Layout]


def make_programs(s: RunSettings, graphdef: nnx.GraphDef, policy: TrainState, prm: TrainState | None,
                  ref_params: nnx.State | None, stop_ids: Sequence[int], pad_id: int) -> Programs:
    """Builds (does not compile) the jitted programs for these (real or abstract) states (no PRM step without a PRM
    state); `stop_ids` and `pad_id` come from the tokenizer."""
    policy_tx, prm_tx, lr_schedule = optimizers(s)
    model_cfg = nnx.merge(graphdef, policy.params).cfg
    train_sampling = dataclasses.replace(s.sampler.sampling, stop_ids=tuple(stop_ids))
    sampler_cfg = dataclasses.replace(s.sampler, sampling=train_sampling, pad_id=pad_id)

    @functools.cache
    def eval_sampler(prompts: int, max_new_tokens: int, buckets: tuple[int, ...], n: int, temperature: float,
                     top_p: float) -> Sampler:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, stop_ids=tuple(stop_ids))
        cfg = s.sampler_config(n=n, max_new_tokens=max_new_tokens, prompts=prompts, buckets=buckets,
                               sampling=sampling, pad_id=pad_id)
        return Sampler(graphdef, model_cfg, cfg, s.mesh)

    def eval_sample(params: nnx.State, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int,
                    temperature: float, top_p: float, seed: int, buckets: Sequence[int],
                    prompts_per_call: int) -> Rollout:
        sampler = eval_sampler(prompts_per_call, max_new_tokens, tuple(buckets), n, float(temperature), float(top_p))
        return sampler(params, prompts, seed)

    return Programs(
        sampler=Sampler(graphdef, model_cfg, sampler_cfg, s.rollout_mesh),
        eval_sample=eval_sample,
        prm_step=None if prm is None else make_prm_step(graphdef, prm_tx, s.prm, mesh=s.mesh, state=prm,
                                                         ref_params=ref_params),
        advantages=make_advantages(s.advantages),
        ppo_step=make_ppo_step(graphdef, policy_tx, s.ppo, mesh=s.mesh, state=policy, lr_schedule=lr_schedule),
        prm_layout=lambda batch: lay_out(batch, prm_minibatches(len(batch["mask"]), s.prm), s.prm_pack),
        ppo_layout=lambda batch, seed: lay_out(batch, ppo_minibatches(len(batch["mask"]), s.ppo, seed), s.ppo_pack),
    )

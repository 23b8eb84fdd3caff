"""The device programs of a PRIME run, built from its config: sampler, PRM kernel, advantages, PPO step,
and the host-side layouts (`prime_jax.packing`) the PRM and PPO steps read.

This is the one place where the ml_collections config is mapped onto the typed settings of the
jitted programs, so the trainer and the AOT compiler build exactly the same programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from prime_jax.mesh import data_parallel_size
from prime_jax.models import ModelConfig, resolve_attention
from prime_jax.packing import Layout, PackSpec, lay_out
from prime_jax.rewards.implicit_prm import PrmStepConfig, make_prm_step, prm_minibatches
from prime_jax.rl.advantages import compute_advantages, validate_advantage_args
from prime_jax.rl.optim import (OptimConfig, TrainState, init_train_state, make_lr_schedule, make_optimizer,
                                train_state_shardings)
from prime_jax.rl.ppo import PpoStepConfig, make_ppo_step, ppo_minibatches
from prime_jax.sampling import (Sampler, SamplerConfig, SamplingParams, compacts_tail, length_buckets, per_layer_decode,
                                refills_on_device, rows_in_flight)


def rows_per_step(c: ml_collections.ConfigDict) -> int:
    return c.train.batch_size * c.rollout.n_samples


def sampler_prompts(c: ml_collections.ConfigDict) -> int:
    """Prompts in flight in the sampler: `rollout.prompts_per_call`, at most (and by default)
    `train.batch_size`; the sampler decodes this many prompts x n_samples rows at once, also in a first
    round that holds the prompt buffer too, so the sampler compiles once per prompt bucket."""
    return min(c.rollout.prompts_per_call or c.train.batch_size, c.train.batch_size)


def sampler_config(c: ml_collections.ConfigDict, mesh: Mesh, stop_ids: Sequence[int], pad_id: int) -> SamplerConfig:
    """The rollout sampler's settings (stop ids and pad id come from the tokenizer)."""
    r = c.rollout
    dp = data_parallel_size(mesh)
    platform = mesh.devices.flat[0].platform
    sampling = SamplingParams(temperature=float(r.temperature), top_p=float(r.top_p), top_k=int(r.top_k),
                              stop_ids=tuple(stop_ids))
    return SamplerConfig(n=r.n_samples, max_new_tokens=r.max_response_length, sampling=sampling,
                         rows=rows_in_flight(sampler_prompts(c), sampler_prompts(c), r.n_samples, dp),
                         buckets=length_buckets(c.data.max_prompt_length), pad_id=pad_id,
                         steps_per_sync=r.steps_per_sync, kv_block=r.kv_block, data_parallel=dp,
                         gather_params=r.gather_params, per_layer=per_layer_decode(platform),
                         compact_tail=compacts_tail(platform) if r.compact_tail == "auto" else r.compact_tail == "on",
                         refill=refills_on_device(platform, dp))


def check_kv_cache(c: ml_collections.ConfigDict, mesh: Mesh, model_cfg: ModelConfig) -> None:
    """Fails, naming the config key, when the sampler's KV cache exceeds `rollout.kv_cache_gib` per device."""
    budget = c.rollout.kv_cache_gib
    cfg = sampler_config(c, mesh, (), 0)
    per_device = cfg.cache_bytes(model_cfg, c.data.max_prompt_length) / data_parallel_size(mesh) / 2**30
    if budget and per_device > budget:
        raise ValueError(f"config.rollout.prompts_per_call: {cfg.rows} rows in flight ({sampler_prompts(c)} prompts x "
                         f"{c.rollout.n_samples}) need a {per_device:.2f} GiB/device KV cache, above "
                         f"rollout.kv_cache_gib={budget}")


def make_sampler(c: ml_collections.ConfigDict, mesh: Mesh, graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                 stop_ids: Sequence[int], pad_id: int) -> Sampler:
    """The rollout sampler of the run."""
    check_kv_cache(c, mesh, model_cfg)
    return Sampler(graphdef, model_cfg, sampler_config(c, mesh, stop_ids, pad_id), mesh)


def runs_prm(c: ml_collections.ConfigDict) -> bool:
    """Whether a step runs the PRM kernel: not for outcome-only RL (`algorithm.process_coef=0` with
    `prm.update_mode=none`), whose process rewards would be unused and whose PRM never changes."""
    return c.algorithm.process_coef != 0 or c.prm.update_mode != "none"


def prm_step_config(c: ml_collections.ConfigDict, mesh: Mesh) -> PrmStepConfig:
    return PrmStepConfig(n=c.rollout.n_samples, mini_batch_size=c.prm.mini_batch_size,
                         micro_batch_size=c.prm.micro_batch_size, beta=c.prm.beta, update=c.prm.update_mode,
                         norm_scope=c.prm.norm_scope,
                         num_shards=data_parallel_size(mesh) if c.prm.norm_scope == "shard" else 1,
                         include_eos=c.prm.include_eos, granularity=c.prm.granularity)


def ppo_step_config(c: ml_collections.ConfigDict) -> PpoStepConfig:
    return PpoStepConfig(mini_batch_size=c.actor.mini_batch_size, micro_batch_size=c.actor.micro_batch_size,
                         epochs=c.actor.ppo_epochs, clip=c.actor.clip_ratio, clip_high=c.actor.clip_ratio_high or None,
                         agg=c.actor.loss_agg, entropy_coef=c.actor.entropy_coeff,
                         temperature=c.rollout.temperature or 1.0)


def pack_length(c: ml_collections.ConfigDict) -> int:
    """Slots per packed row: `train.pack_length`, by default the longest possible sequence."""
    return c.train.pack_length or c.data.max_prompt_length + c.rollout.max_response_length


def pack_spec(c: ml_collections.ConfigDict, mesh: Mesh, section: str) -> PackSpec:
    """How the `section` ("prm" or "actor") pass lays out its sequences; the micro-batch token budget defaults to
    `micro_batch_size` full rows."""
    s, length = c[section], pack_length(c)
    return PackSpec(section, mini_batch_size=s.mini_batch_size, micro_batch_size=s.micro_batch_size,
                    data_parallel=data_parallel_size(mesh), packed=c.train.packing, row_length=length,
                    micro_batch_tokens=s.micro_batch_tokens or s.micro_batch_size * length)


def attention_implementation(c: ml_collections.ConfigDict, platform: str) -> str:
    """`model.attention` resolved for the devices' platform ("gpu", "tpu", "cpu")."""
    return resolve_attention(c.model.attention, platform, c.model.compute_dtype)


def optimizers(c: ml_collections.ConfigDict, mesh: Mesh) -> tuple[optax.GradientTransformation, optax.GradientTransformation, optax.Schedule]:
    """(policy tx, PRM tx, policy lr schedule), each stepped once per PRIME iteration."""
    rows = rows_per_step(c)
    ppo_updates = ppo_step_config(c).updates_per_iteration(rows)
    prm_updates = max(1, prm_step_config(c, mesh).updates_per_iteration(rows))
    actor = OptimConfig(lr=c.actor.lr, weight_decay=c.actor.weight_decay, grad_clip=c.actor.grad_clip,
                        warmup_iterations=c.actor.warmup_steps, zero_lr_first_iteration=c.actor.zero_lr_first_iteration)
    prm = OptimConfig(lr=c.prm.lr, weight_decay=c.prm.weight_decay, grad_clip=c.prm.grad_clip,
                      warmup_iterations=c.prm.warmup_steps, zero_lr_first_iteration=c.prm.zero_lr_first_iteration)
    return make_optimizer(actor, ppo_updates), make_optimizer(prm, prm_updates), make_lr_schedule(actor, ppo_updates)


def validate_programs(c: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The programs' own checks (batching vs mesh, estimator, KV cache budget), before anything is loaded or traced."""
    prm_step_config(c, mesh).validate(mesh)
    ppo_step_config(c).validate(mesh)
    pack_spec(c, mesh, "prm").validate()
    pack_spec(c, mesh, "actor").validate()
    attention_implementation(c, mesh.devices.flat[0].platform)
    validate_advantage_args(n=c.rollout.n_samples, estimator=c.algorithm.adv_estimator,
                            rloo_formula=c.algorithm.process_formula, process_credit=c.algorithm.process_credit,
                            gamma_process=c.algorithm.gamma_process)
    if c.rollout.kv_cache_gib:
        from prime_jax.memory_plan import architecture  # memory_plan imports this module

        check_kv_cache(c, mesh, architecture(c).replace(dtype=c.model.compute_dtype))
    rows = rows_per_step(c)
    if rows % data_parallel_size(mesh):
        raise ValueError(f"config.train.batch_size: {rows} rows per step do not split over the {data_parallel_size(mesh)}-way data-parallel mesh")


@dataclasses.dataclass
class Programs:
    """sampler(params, prompts, seed, on_rows) -> Rollout; prm_step(state, ref_params, batch, slots) -> (state,
    PrmStepOutput); advantages(rm, acc, mask) -> (adv, metrics); ppo_step(state, batch, slots) -> (state, metrics).
    On the host: prm_layout(batch) and ppo_layout(batch, seed) -> the steps' `Layout` (slots) from the host batch
    (prompt_tokens, prompt_mask, tokens, mask)."""

    sampler: Sampler
    prm_step: Callable[..., Any]
    advantages: Callable[..., Any]
    ppo_step: Callable[..., Any]
    prm_layout: Callable[[dict[str, np.ndarray]], Layout]
    ppo_layout: Callable[[dict[str, np.ndarray], Any], Layout]


def init_states(c: ml_collections.ConfigDict, mesh: Mesh, policy_params: nnx.State, prm_params: nnx.State) -> tuple[TrainState, TrainState]:
    """Fresh optimiser states, created on device with the params' shardings (Adam moments fp32, like params)."""
    policy_tx, prm_tx, _ = optimizers(c, mesh)

    def init(params, tx):
        abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
        return jax.jit(lambda p: init_train_state(p, tx), out_shardings=train_state_shardings(abstract, mesh))(params)

    return init(policy_params, policy_tx), init(prm_params, prm_tx)


def make_programs(c: ml_collections.ConfigDict, mesh: Mesh, graphdef: nnx.GraphDef, policy: TrainState, prm: TrainState,
                  ref_params: nnx.State, stop_ids: Sequence[int], pad_id: int) -> Programs:
    """Builds (does not compile) the jitted programs for these (real or abstract) states."""
    policy_tx, prm_tx, lr_schedule = optimizers(c, mesh)
    n = c.rollout.n_samples
    a = c.algorithm

    @jax.jit
    def advantages(rm_scores, acc, mask):
        adv, returns = compute_advantages(rm_scores, acc, mask, n=n, estimator=a.adv_estimator,
                                          gamma_process=a.gamma_process, gamma_outcome=a.gamma_outcome,
                                          process_coef=a.process_coef, rloo_formula=a.process_formula,
                                          process_credit=a.process_credit)
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

    prm_cfg, ppo_cfg = prm_step_config(c, mesh), ppo_step_config(c)
    prm_spec, ppo_spec = pack_spec(c, mesh, "prm"), pack_spec(c, mesh, "actor")
    model_cfg = nnx.merge(graphdef, policy.params).cfg
    return Programs(
        sampler=make_sampler(c, mesh, graphdef, model_cfg, stop_ids, pad_id),
        prm_step=make_prm_step(graphdef, prm_tx, prm_cfg, mesh=mesh, state=prm, ref_params=ref_params),
        advantages=advantages,
        ppo_step=make_ppo_step(graphdef, policy_tx, ppo_cfg, mesh=mesh, state=policy, lr_schedule=lr_schedule),
        prm_layout=lambda batch: lay_out(batch, prm_minibatches(len(batch["mask"]), prm_cfg), prm_spec),
        ppo_layout=lambda batch, seed: lay_out(batch, ppo_minibatches(len(batch["mask"]), ppo_cfg, seed), ppo_spec),
    )

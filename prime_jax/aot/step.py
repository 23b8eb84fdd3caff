"""Roofline seconds of one whole PRIME step at the config's length mix (`length_mix`), from the compiled
programs' loop-aware costs: the decode of train.batch_size prompts x n samples (rollout.prompts_per_call prompts
in flight), then one PRM step (reference + PRM passes, PRM update) and one PPO step. Host work (verification,
filtering, logging) and the further prompts a step's sampler call decodes until the filter has its batch are not
counted.

With a sampler mesh of its own (rollout.devices = a: the slice's first a chips sample, the other t train), each
update's policy is then copied to the sampler's chips (`Trainer.publish`, blocking the trainer); with rollouts
ahead of training (rollout.max_staleness >= 1) the sampler samples step j + 1 while the trainer trains step j, so
a step takes max(sampler, trainer + copy) seconds, else sampler + trainer + copy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx

from prime_jax.aot.report import ProgramReport
from prime_jax.aot.topology import Chip
from prime_jax.models import abstract_model
from prime_jax.settings import LengthMix, RunSettings

SAMPLER_PROGRAMS = ("sampler_prefill", "sampler_decode")
TRAINER_PROGRAMS = ("prm_step", "ppo_step")
STEP_PROGRAMS = SAMPLER_PROGRAMS + TRAINER_PROGRAMS


def decode_steps(s: RunSettings, mix: LengthMix) -> float:
    """Decode steps of train.batch_size prompts' samples at this mix with continuous batching: the batch's responses
    (rows x mean length) spread over the rows in flight (a slot takes the next sample when its row stops), but no
    fewer than the longest response, which reaches max_response_length - 1 when any row is clipped (probability
    1 - (1 - f)^rows) and at least the mean otherwise. A lower bound: slots idle in the last wave are not counted."""
    rows = s.rows_per_step
    in_flight = min(rows, s.prompts_per_call * s.collect.n)
    r = s.sampler.max_new_tokens
    p_clipped = 1.0 - (1.0 - mix.clipped_fraction) ** rows
    longest = p_clipped * (r - 1) + (1.0 - p_clipped) * mix.response_tokens
    return max(rows * mix.response_tokens / in_flight, longest)


def published_bytes(s: RunSettings) -> int:
    """Bytes of the policy params as `Trainer.publish` copies them to the sampler: all of them, in the compute dtype
    (model.compute_dtype)."""
    _, params = nnx.split(abstract_model(s.model.config(s.model.compute_dtype)))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))


def transfer_seconds(s: RunSettings, chip: Chip) -> float:
    """Roofline seconds of the copy of the policy from the t training chips to the a sampling chips: each training
    chip sends its 1/t of the bytes and each sampling chip receives its 1/a, at most chip.ici_bandwidth each (no
    hop or contention counted, as the compute roofline counts no ICI time)."""
    chips = min(s.rollout_mesh.devices.size, s.mesh.devices.size)
    return published_bytes(s) / (chips * chip.ici_bandwidth)


def step_seconds(s: RunSettings, reports: Sequence[ProgramReport], chip: Chip) -> dict[str, float] | None:
    """{program: roofline seconds it takes in one step, "step": the step's}; None unless every program of a step
    was compiled (and fitted). Packed training steps count at the mix's shape (`<name>@mix`) when compiled. On one
    mesh the step is their sum; with a sampler mesh of its own the dict also holds "sampler" (prefill + decode),
    "trainer" (PRM + PPO step) and "transfer" (`transfer_seconds`), and the step is max(sampler, trainer + transfer)
    with rollout.max_staleness >= 1, else sampler + trainer + transfer."""
    by_name = {r.name: r for r in reports}
    if any(p not in by_name or by_name[p].error for p in STEP_PROGRAMS):
        return None
    mix = s.length_mix
    waves = math.ceil(s.collect.batch_size / s.prompts_per_call)  # prefills of the largest insert, at least
    # The decode report is one whole response of every row: ceil((R - 1) / K) calls of K steps.
    k = s.sampler.steps_per_sync
    per_step = by_name["sampler_decode"].seconds / (math.ceil((s.sampler.max_new_tokens - 1) / k) * k)
    train = {name: by_name.get(f"{name}@mix", by_name[name]).seconds for name in TRAINER_PROGRAMS}
    out = {"sampler_prefill": waves * by_name["sampler_prefill"].seconds,
           "sampler_decode": per_step * decode_steps(s, mix), **train}
    if s.rollout_mesh is s.mesh:
        out["step"] = sum(out.values())
        return out
    sampler, trainer = sum(out[p] for p in SAMPLER_PROGRAMS), sum(out[p] for p in TRAINER_PROGRAMS)
    out.update(sampler=sampler, trainer=trainer, transfer=transfer_seconds(s, chip))
    out["step"] = (max(sampler, trainer + out["transfer"]) if s.max_staleness
                   else sampler + trainer + out["transfer"])
    return out

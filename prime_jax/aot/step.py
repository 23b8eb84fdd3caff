"""Roofline seconds of one whole PRIME step at the config's length mix (`length_mix`), from the compiled
programs' loop-aware costs: the decode of train.batch_size prompts x n samples (rollout.prompts_per_call prompts
in flight), then one PRM step (reference + PRM passes, PRM update) and one PPO step. Host work (verification,
filtering, logging) and the further prompts a step's sampler call decodes until the filter has its batch are not
counted."""

from __future__ import annotations

import math
from collections.abc import Sequence

from prime_jax.aot.report import ProgramReport
from prime_jax.settings import LengthMix, RunSettings

STEP_PROGRAMS = ("sampler_prefill", "sampler_decode", "prm_step", "ppo_step")


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


def step_seconds(s: RunSettings, reports: Sequence[ProgramReport]) -> dict[str, float] | None:
    """{program: roofline seconds it takes in one step, "step": their sum}; None unless every program of a step
    was compiled (and fitted). Packed training steps count at the mix's shape (`<name>@mix`) when compiled."""
    by_name = {r.name: r for r in reports}
    if any(p not in by_name or by_name[p].error for p in STEP_PROGRAMS):
        return None
    mix = s.length_mix
    waves = math.ceil(s.collect.batch_size / s.prompts_per_call)  # prefills of the largest insert, at least
    # The decode report is one whole response of every row: ceil((R - 1) / K) calls of K steps.
    k = s.sampler.steps_per_sync
    per_step = by_name["sampler_decode"].seconds / (math.ceil((s.sampler.max_new_tokens - 1) / k) * k)
    train = {name: by_name.get(f"{name}@mix", by_name[name]).seconds for name in ("prm_step", "ppo_step")}
    out = {"sampler_prefill": waves * by_name["sampler_prefill"].seconds,
           "sampler_decode": per_step * decode_steps(s, mix), **train}
    out["step"] = sum(out.values())
    return out

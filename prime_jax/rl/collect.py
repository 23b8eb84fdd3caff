"""Rollouts on the host: sample, verify, filter, and "collect until full" with a prompt buffer (docs/prime_spec.md §1.1-1.3).

An `Experience` is a batch of prompt groups (n contiguous rows per prompt) as numpy arrays plus
the examples they came from. `collect` offers one sampler call up to `max_rounds` batches of prompts (the
leftover buffer first), scores the responses in the verifier pool (each row as soon as the sampler stops it,
while decoding goes on: `verifiers.streaming.StreamingVerifier`) and stops the call once the online filter
(`accepted_groups`) has accepted `batch_size` groups; the prompts it did not use go back to the buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from prime_jax.data.example import Example
from prime_jax.rl.filter import accuracy_filter
from prime_jax.sampling import Rollout, RowsCallback, StopCallback
from prime_jax.verifiers.pool import VerifierPool
from prime_jax.verifiers.streaming import Decoder, StreamingVerifier


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt to sample from: its example and chat-templated token ids."""

    example: Example
    ids: tuple[int, ...]


@dataclasses.dataclass
class Experience:
    """Groups of n rows, host numpy. prompt_tokens/prompt_mask [G*n, P] (left-padded); tokens, mask,
    old_logp [G*n, R] (the sampler's log-probs: the behaviour policy's); acc [G*n] float32; trained [G*n] bool
    (False: a padding row that carries no loss); version [G*n] int64, the policy version (updates applied) that
    sampled each row; prompts [G] (one per group)."""

    prompts: list[Prompt]
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    old_logp: np.ndarray
    acc: np.ndarray
    trained: np.ndarray
    version: np.ndarray
    n: int

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    def groups(self, idx: Sequence[int]) -> Experience:
        """The given groups, in that order."""
        idx = np.asarray(idx, np.int64)
        rows = (idx[:, None] * self.n + np.arange(self.n)).reshape(-1)
        return Experience([self.prompts[i] for i in idx], self.prompt_tokens[rows], self.prompt_mask[rows],
                          self.tokens[rows], self.mask[rows], self.old_logp[rows], self.acc[rows], self.trained[rows],
                          self.version[rows], self.n)

    def device_batch(self) -> dict[str, np.ndarray]:
        """The arrays the PRM and PPO programs and their layouts (`Programs.prm_layout` / `ppo_layout`) read.
        Padding rows get an all-zero response mask, so they enter no loss, no advantage statistics and no
        whitening, and packing leaves them out."""
        mask = self.mask * self.trained[:, None]
        return {"prompt_tokens": self.prompt_tokens.astype(np.int32), "prompt_mask": self.prompt_mask.astype(np.int32),
                "tokens": self.tokens.astype(np.int32), "mask": mask.astype(np.float32),
                "old_logp": self.old_logp.astype(np.float32), "acc": self.acc.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """batch_size: groups per step. A step offers the sampler `max_rounds` x `batch_size` prompts (the reference's
    generation rounds, as one continuous call); if they do not yield enough accepted groups, the batch is padded
    with rejected groups that carry no loss, so every step has the same static shape (the reference instead keeps
    generating until the batch is full)."""

    batch_size: int
    n: int
    filter_accuracy: bool = True
    lower: float = 0.2
    upper: float = 0.8
    filter_truncated: bool = False
    max_rounds: int = 8


# (prompts, seed, on_rows, stop) -> Rollout of n rows each (`prime_jax.sampling.Sampler.__call__`)
Sampler = Callable[[list[Prompt], int, RowsCallback, StopCallback], Rollout]


def accepted_groups(acc: np.ndarray, lengths: np.ndarray, n: int, cfg: CollectConfig, limit: int) -> np.ndarray:
    """[G] bool: the groups of n rows (acc, lengths [G*n]) the online filter keeps: mean accuracy within
    [lower, upper] (`filter_accuracy`) and no response at the `limit` of R tokens (`filter_truncated`)."""
    ok = np.ones(len(acc) // n, bool)
    if cfg.filter_accuracy:
        ok[:] = False
        ok[accuracy_filter(acc, n, lo=cfg.lower, hi=cfg.upper)] = True
    if cfg.filter_truncated:
        ok &= ~(np.asarray(lengths).reshape(-1, n) >= limit).any(1)
    return ok


def collect(sample: Sampler, next_prompts: Callable[[int], list[Prompt]], buffer: list[Prompt], decode: Decoder,
            pool: VerifierPool, cfg: CollectConfig, seed: int, version: int) -> tuple[Experience, list[Prompt], dict[str, float]]:
    """Collects exactly `cfg.batch_size` groups for one step with policy `version` (the one `sample` samples
    with: every row of the step, so every group, is that one version). Returns (experience, new buffer, metrics).

    One sampler call is offered `max_rounds` x `batch_size` prompts (the buffer's first, then fresh ones) and
    decodes them with continuous batching while the verifiers score its rows; it stops once the online filter
    has accepted `batch_size` groups (`StreamingVerifier.enough`). The batch is the first `batch_size` accepted
    groups, padded with rejected ones (no loss) if the offer ran out first. The prompts of surplus accepted groups
    and of groups the call did not finish go back to the buffer, in their order (responses discarded, as the
    reference re-queues its surplus); rejected groups are used up.

    Metrics: train_verify_score/{all,<ability>} over the rows of the finished groups (pre-filter), counts of
    finished, kept, padding and unsampled groups, the new buffer's size, response tokens generated (rows handed
    over; rows dropped by the early stop not counted) and verifier faults (of every row scored, rows outside the
    batch included); timing/verify (first row handed to the verifiers to last
    score, mostly overlapped with decoding) and timing/verify_exposed (the part that was not).
    """
    target, n = cfg.batch_size, cfg.n
    offer = cfg.max_rounds * target
    prompts = buffer[:offer] + next_prompts(max(0, offer - len(buffer)))
    verifier = StreamingVerifier(prompts, n, decode, pool)
    accept = lambda acc, lengths, limit: accepted_groups(acc, lengths, n, cfg, limit)  # noqa: E731
    rollout = sample(prompts, seed, verifier, lambda: verifier.enough(accept, target))
    acc, counts, span = verifier.finish()
    sampled = verifier.sampled
    exp = Experience(prompts, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask,
                     rollout.logprobs, acc, np.ones(len(acc), bool), np.full(len(acc), version, np.int64), n)
    ok = sampled & accepted_groups(acc, rollout.lengths, n, cfg, rollout.mask.shape[1])
    kept = np.flatnonzero(ok)[:target]
    padding = np.flatnonzero(sampled & ~ok)[:target - kept.size]
    batch = exp.groups(np.concatenate([kept, padding]))
    batch.trained[kept.size * n:] = False
    used = sampled & ~ok  # rejected groups are used up, batch padding or not
    used[kept] = True
    new_buffer = [p for p, u in zip(prompts, used) if not u] + buffer[offer:]
    rows = np.repeat(sampled, n)
    abilities = np.array([p.example.ability for p in prompts])[np.flatnonzero(rows) // n]
    metrics = {f"train_verify_score/{a}": float(acc[rows][abilities == a].mean()) for a in sorted(set(abilities))}
    metrics["train_verify_score/all"] = float(acc[rows].mean())  # rows: at least batch_size groups
    metrics.update({"train/groups_sampled": int(sampled.sum()), "train/groups_kept": int(kept.size),
                    "train/groups_padding": int(target - kept.size), "train/groups_unsampled": int((~sampled).sum()),
                    "train/prompt_buffer": len(new_buffer), "train/gen_tokens": int(rollout.lengths.sum())})
    metrics.update({f"verifier/{k}": int(v) for k, v in sorted(counts.items())})
    metrics["timing/verify"] = span
    # Both sides time the same callbacks with their own clocks; where decoding hid all of them the difference is
    # timer noise of either sign, so it is clamped at 0.
    metrics["timing/verify_exposed"] = max(0.0, verifier.exposed_s - rollout.callbacks_hidden_s)
    return batch, new_buffer, metrics

"""Rollouts on the host: sample, verify, filter, and "collect until full" with a prompt buffer (PRIME_SPEC §1.1-1.3).

An `Experience` is a batch of prompt groups (n contiguous rows per prompt) as numpy arrays plus
the examples they came from. `collect` offers one sampler call up to `max_rounds` batches of prompts (the
leftover buffer first), scores the responses in the verifier pool (each row as soon as the sampler stops it,
while decoding goes on) and stops the call once the online filter has accepted `batch_size` groups; the
prompts it did not use go back to the buffer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from prime_jax.data.example import Example
from prime_jax.mesh import allgather_rows, process_rows
from prime_jax.verifiers.pool import COUNT_KEYS, VerifierPool, VerifyItem
from prime_jax.rl.filter import accuracy_filter
from prime_jax.sampling import Rollout, RowsCallback, StopCallback


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt to sample from: its example and chat-templated token ids."""

    example: Example
    ids: tuple[int, ...]


@dataclasses.dataclass
class Experience:
    """Groups of n rows, host numpy. prompt_tokens/prompt_mask [G*n, P] (left-padded); tokens, mask,
    old_logp [G*n, R]; acc [G*n] float32; trained [G*n] bool (False: a padding row that carries no loss);
    prompts [G] (one per group)."""

    prompts: list[Prompt]
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    old_logp: np.ndarray
    acc: np.ndarray
    trained: np.ndarray
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
                          self.n)

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
Decoder = Callable[[np.ndarray], str]  # response ids -> text


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


def _gather_scores(local: np.ndarray, counts: dict[str, int], rows: int) -> tuple[np.ndarray, dict[str, int]]:
    """Every process's share of the scores -> all `rows` scores on every host; failure counts summed."""
    local_counts = np.asarray([[counts[k] for k in COUNT_KEYS]], np.int64)  # one row per process
    total = allgather_rows(local_counts, jax.process_count()).sum(axis=0)
    return allgather_rows(np.asarray(local, np.float32), rows), dict(zip(COUNT_KEYS, total.tolist()))


class StreamingVerifier:
    """Scores one sampler call's rows in the verifier pool as the sampler hands them over (`on_rows`), while it decodes,
    and tells the sampler when the online filter has accepted enough groups (`enough`). The decision looks at the
    groups that were complete one decode round earlier, so their rows had that round to be scored behind decoding;
    once it says enough, only those groups are kept (`finish`): later rows are not waited for.

    Multi-host: each process scores its own share of the rows (`process_rows`); every host sees every handed
    row's length; scores are gathered on every host. `exposed_s`: host seconds spent in verification (handing
    rows over, polling, waiting), of which the sampler reports the part the device's decoding hid
    (`Rollout.callbacks_hidden_s`); `span_s`: from the first row handed over to the last score.
    """

    def __init__(self, prompts: Sequence[Prompt], n: int, decode: Decoder, pool: VerifierPool) -> None:
        self.prompts, self.n, self.decode = prompts, n, decode
        self.share = process_rows(len(prompts) * n)
        self.here = range(len(prompts) * n)[self.share]  # this process's rows; position = (row - start) // step
        self.stream = pool.stream()
        self.slots: list[int] = []  # stream index -> position among this process's rows
        self.index = np.full(len(self.here), -1, np.int64)  # position -> stream index
        self.handed = np.zeros(len(prompts) * n, bool)
        self.lengths = np.zeros(len(prompts) * n, np.int64)
        self.limit = 0  # R, from the first rows handed over
        self.exposed_s = 0.0
        self.started: float | None = None
        self.local_acc = np.zeros(len(self.here), np.float32)  # this process's rows' scores
        self.local_known = np.zeros(len(self.here), bool)  # ... that have come back
        self.complete_before = np.zeros(len(prompts), bool)  # groups all handed over at the last `enough` call
        self.decided: np.ndarray | None = None  # [G] bool: the groups `enough` said were enough from

    def __call__(self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.started = t0 if self.started is None else self.started
        self.handed[rows], self.lengths[rows], self.limit = True, lengths, tokens.shape[1]
        items = []
        for row, toks, length in zip(rows.tolist(), tokens, lengths):
            if row in self.here:
                ex = self.prompts[row // self.n].example
                items.append(VerifyItem(self.decode(toks[:int(length)]), ex.ability, ex.ground_truth))
                position = self.here.index(row)
                self.index[position] = len(self.slots)
                self.slots.append(position)
        self.stream.add(items)
        self._take(self.stream.poll())
        self.exposed_s += time.perf_counter() - t0

    def _take(self, finished: list[int]) -> None:
        """Records the scores of the stream's items `finished` (final since the last poll or wait)."""
        if finished:
            index = np.asarray(finished, np.int64)
            positions = np.asarray(self.slots, np.int64)[index]
            self.local_acc[positions] = np.asarray(self.stream.scores, np.float32)[index]
            self.local_known[positions] = True

    def _scores(self) -> tuple[np.ndarray, dict[str, int]]:
        """Waits for the score of every row handed over so far that can enter the batch (after an early stop: the
        decided groups' rows; the others no worker has taken yet are dropped) -> (acc [rows] float32 on every host, 0 for
        rows not scored; pool counts summed over processes). A collective: every process calls it together."""
        t0 = time.perf_counter()
        if self.decided is not None:
            dropped = ~np.repeat(self.decided, self.n)[self.share] & (self.index >= 0)
            self.stream.cancel(self.index[dropped].tolist())
        result = self.stream.finish()
        local = np.zeros(len(self.here), np.float32)
        local[np.asarray(self.slots, np.int64)] = result.scores
        out = _gather_scores(local, result.counts, len(self.prompts) * self.n)
        self.exposed_s += time.perf_counter() - t0
        return out

    def enough(self, cfg: CollectConfig, needed: int) -> bool:
        """Whether the online filter keeps at least `needed` of the groups whose n rows had all been handed over
        at the previous call (one decode round ago: their scores had that round to come back). The answer is the
        one all their scores give, whatever the timing (the sampler asks once per decode round, every host at
        the same round), but it waits for scores only until they settle it: until the accepted groups reach
        `needed`, or the groups still unscored could no longer make up the difference. Waits for one more of
        those rows' scores at a time (multi-host: 1, 2, 4, ... a process, a collective after each wait, every
        host alike). True also fixes the call's groups: those (`sampled`)."""
        complete, self.complete_before = self.complete_before, self.handed.reshape(-1, self.n).all(1)
        if complete.sum() < needed:
            return False
        t0 = time.perf_counter()
        more = 1
        while True:
            scores = allgather_rows(np.stack([self.local_acc, self.local_known], 1), len(self.prompts) * self.n)
            scored = complete & (scores[:, 1] > 0).reshape(-1, self.n).all(1)
            kept = int((scored & accepted_groups(scores[:, 0], self.lengths, self.n, cfg, self.limit)).sum())
            if kept >= needed or kept + int((complete & ~scored).sum()) < needed:
                break
            unscored = np.repeat(complete, self.n)[self.share] & ~self.local_known & (self.index >= 0)
            self._take(self.stream.wait(self.index[unscored].tolist(), more))
            more = more * 2 if jax.process_count() > 1 else 1
        self.exposed_s += time.perf_counter() - t0
        if kept >= needed:
            self.decided = complete
        return kept >= needed

    @property
    def sampled(self) -> np.ndarray:
        """[G] bool: the groups the call yields: those `enough` decided from, else every group fully handed over."""
        return self.handed.reshape(-1, self.n).all(1) if self.decided is None else self.decided

    def finish(self) -> tuple[np.ndarray, dict[str, int], float]:
        """Waits for the scores the call needs -> (acc [rows] float32 on every host, pool counts, span seconds)."""
        acc, counts = self._scores()
        end = time.perf_counter()
        return acc, counts, end - (end if self.started is None else self.started)


def verify(rollout: Rollout, prompts: Sequence[Prompt], n: int, decode: Decoder, pool: VerifierPool) -> tuple[np.ndarray, dict[str, int]]:
    """Outcome reward of every row: decode its valid tokens, score with the pool. -> acc [B*n] float32, pool counts.

    Multi-host: each process verifies its own share of the rows; the scores are then gathered so that
    every host takes the same filtering decisions, and the failure counts summed over processes."""
    rows = len(prompts) * n
    items = []
    for row in range(rows)[process_rows(rows)]:
        ex = prompts[row // n].example
        items.append(VerifyItem(decode(rollout.tokens[row, : int(rollout.lengths[row])]), ex.ability, ex.ground_truth))
    result = pool.score_batch(items)
    return _gather_scores(result.scores, result.counts, rows)


def collect(sample: Sampler, next_prompts: Callable[[int], list[Prompt]], buffer: list[Prompt], decode: Decoder,
            pool: VerifierPool, cfg: CollectConfig, seed: int) -> tuple[Experience, list[Prompt], dict[str, float]]:
    """Collects exactly `cfg.batch_size` groups for one step. Returns (experience, new buffer, metrics).

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
    rollout = sample(prompts, seed, verifier, lambda: verifier.enough(cfg, target))
    acc, counts, span = verifier.finish()
    sampled = verifier.sampled
    exp = Experience(prompts, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask,
                     rollout.logprobs, acc, np.ones(len(acc), bool), n)
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
    metrics["timing/verify_exposed"] = verifier.exposed_s - rollout.callbacks_hidden_s
    return batch, new_buffer, metrics

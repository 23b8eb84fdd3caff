"""Outcome rewards of a sampler call's rows, on the host: `StreamingVerifier` scores the rows in the verifier pool as
the sampler hands them over (while it decodes) and tells it when the online filter has accepted enough groups;
`verify` scores a finished rollout in one batch (evaluation). Multi-host: each process scores its own share of the
rows and every host gets all the scores (`_gather_scores`), so every host takes the same decisions.

Here, not in `rl.collect`, because evaluation (`eval.scoring`) scores with it too and because it is about verifying
rows, not about the batch a step trains on: it knows the online filter only as a function of the scores
(`GroupFilter`; `rl.collect.accepted_groups` is the one training uses).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import jax
import numpy as np

from prime_jax.mesh import allgather_rows, process_rows
from prime_jax.sampling import Rollout
from prime_jax.verifiers.pool import COUNT_KEYS, VerifierPool, VerifyItem

if TYPE_CHECKING:  # data.eurus imports verifiers.code: the example type only, not a package cycle
    from prime_jax.data.example import Example

Decoder = Callable[[np.ndarray], str]  # response ids -> text
# (acc [rows], lengths [rows], limit R) -> [groups] bool: the groups of n rows the online filter keeps
GroupFilter = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


class Prompted(Protocol):
    """What a row's prompt must tell the verifier: the example it came from (`rl.collect.Prompt` does)."""

    @property
    def example(self) -> Example: ...


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

    def __init__(self, prompts: Sequence[Prompted], n: int, decode: Decoder, pool: VerifierPool) -> None:
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

    def enough(self, accept: GroupFilter, needed: int) -> bool:
        """Whether the online filter `accept` keeps at least `needed` of the groups whose n rows had all been handed
        over at the previous call (one decode round ago: their scores had that round to come back). The answer is the
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
            kept = int((scored & accept(scores[:, 0], self.lengths, self.limit)).sum())
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


def verify(rollout: Rollout, prompts: Sequence[Prompted], n: int, decode: Decoder,
           pool: VerifierPool) -> tuple[np.ndarray, dict[str, int]]:
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

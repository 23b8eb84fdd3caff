"""Prompt stream for RL: chat-templated, length-filtered, per-host sharded, reshuffled every epoch, resumable.

Each host keeps every `num_shards`-th example starting at `shard_index` (disjoint shards, no
communication), drops prompts whose templated length exceeds `max_prompt_len` (as PRIME does at
load time), and walks a permutation of the rest drawn from (seed, epoch). The position in that walk
is the whole state: `state()` after k prompts, `restore()` in a new process, and the next prompt
is exactly the one the old run would have produced.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from prime_jax.data.example import Example
from prime_jax.models.tokenizer import Tokenizer

_ENCODE_CHUNK = 1024  # prompts tokenised per batch call when filtering by length


class PromptDataset:
    """Infinite, deterministic stream of (Example, prompt token ids) for one host."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Tokenizer,
        *,
        max_prompt_len: int,
        seed: int,
        shard_index: int = 0,
        num_shards: int = 1,
    ):
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index} / {num_shards}")
        if max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        self._tokenizer = tokenizer
        self._seed = int(seed)
        self._shard = (shard_index, num_shards)
        self.skipped: collections.Counter = collections.Counter()
        # Only examples are kept; ids are recomputed when served (cheap, and saves memory on 482k rows).
        self._examples: list[Example] = []
        shard = examples[shard_index::num_shards]
        for start in range(0, len(shard), _ENCODE_CHUNK):
            chunk = shard[start : start + _ENCODE_CHUNK]
            texts = [tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True) for ex in chunk]
            for ex, ids in zip(chunk, tokenizer.encode_batch(texts), strict=True):
                if len(ids) > max_prompt_len:
                    self.skipped["prompt_too_long"] += 1
                else:
                    self._examples.append(ex)
        if not self._examples:
            raise ValueError(
                f"no prompts on shard {shard_index}/{num_shards} within max_prompt_len={max_prompt_len} "
                f"({sum(self.skipped.values())} dropped as too long)"
            )
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    def encode(self, example: Example) -> list[int]:
        """Prompt token ids: the chat template with the generation prompt, tokenised."""
        text = self._tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True)
        return self._tokenizer.encode(text)

    def __len__(self) -> int:
        """Prompts on this shard after length filtering (one epoch)."""
        return len(self._examples)

    @property
    def epoch(self) -> int:
        return self._epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(len(self._examples))

    def next_prompts(self, k: int) -> list[tuple[Example, list[int]]]:
        """The next `k` prompts of this shard, continuing into a reshuffled next epoch as needed."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        out = []
        for _ in range(k):
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._permutation(self._epoch)
            ex = self._examples[self._order[self._position]]
            self._position += 1
            out.append((ex, self.encode(ex)))
        return out

    def state(self) -> dict:
        """Position as plain ints (checkpointable as JSON), plus what it is only valid for."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "num_prompts": len(self._examples),
            "shard_index": self._shard[0],
            "num_shards": self._shard[1],
        }

    def restore(self, state: dict) -> None:
        """Continue from `state()` of a dataset built from the same data, tokenizer and settings."""
        mine = self.state()
        missing = set(mine) - set(state)
        if missing:
            raise ValueError(f"dataset state lacks keys {sorted(missing)}")
        for key in ("seed", "num_prompts", "shard_index", "num_shards"):
            if int(state[key]) != mine[key]:
                raise ValueError(
                    f"dataset state {key}={state[key]} does not match this dataset's {key}={mine[key]}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self._examples):
            raise ValueError(f"dataset state out of range: epoch={epoch}, position={position}")
        self._epoch, self._position = epoch, position
        self._order = self._permutation(epoch)

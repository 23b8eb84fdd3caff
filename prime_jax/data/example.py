"""The `Example` record every dataset in prime_jax yields: a chat prompt plus its outcome-verifier truth."""

from __future__ import annotations

import dataclasses

ABILITIES = ("math", "code")


@dataclasses.dataclass(frozen=True)
class Example:
    """One RL prompt.

    prompt: chat messages [{"role": ..., "content": ...}, ...] (system message, then the user turn).
    ability: "math" (ground_truth = final answer, LaTeX) or "code" (ground_truth = JSON test cases,
      APPS `{"inputs", "outputs", "fn_name"?}` or assert-style `{"prelude", "asserts"}`).
    data_source: where it came from (e.g. "numina_olympiads", "math500"); validation metrics group by it.
    uid: unique within its dataset, stable across runs.
    """

    prompt: list[dict]
    ability: str
    ground_truth: str
    data_source: str
    uid: str

    def question(self) -> str:
        """Content of the last user message."""
        return next(m["content"] for m in reversed(self.prompt) if m["role"] == "user")

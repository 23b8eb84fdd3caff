"""Fixtures for the data tests: a tiny sentencepiece tokenizer trained on synthetic task text."""

import pytest

from prime_jax.data.prompts import SYSTEM_PROMPT
from prime_jax.data.synthetic import make_tasks, reference_solution
from prime_jax.models.tokenizer import train_sentencepiece


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    tasks = make_tasks(200, seed=123, difficulty=3)
    texts = [SYSTEM_PROMPT] + [t.question() for t in tasks] + [reference_solution(t) for t in tasks]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("sp") / "tok", vocab_size=512)

"""Models and the shared sampled rollout of the sampler tests, loaded once per test session."""

import pytest

from prime_jax.models import Decoder, load_pretrained
from prime_jax.sampling import Rollout, generate
from tests.fixtures import SAMPLED, SAMPLED_PROMPTS


@pytest.fixture(scope="session")
def qwen_model(qwen2_dir) -> Decoder:
    return load_pretrained(qwen2_dir)


@pytest.fixture(scope="session")
def peaked_model(qwen2_dir) -> Decoder:
    """The tiny Qwen2 with its LM head scaled up: a next-token distribution far from uniform (top token ~0.3,
    entropy ~3.2 nats at T=0.7), so a wrong temperature or filter shows."""
    model = load_pretrained(qwen2_dir)
    model.lm_head[...] = model.lm_head[...] * 8
    return model


@pytest.fixture(scope="session")
def sampled(qwen_model) -> Rollout:
    """`SAMPLED_PROMPTS` sampled with `SAMPLED`: every row in the first batch, on one device."""
    return generate(qwen_model, SAMPLED_PROMPTS, **SAMPLED)

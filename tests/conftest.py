"""Shared test setup: 8 fake CPU devices for sharding tests, one persistent compilation cache for the session, and
the session fixtures (tiny checkpoints, a GCS emulator, a sentencepiece tokenizer, sampled rollouts).

XLA_FLAGS must be set before jax is imported, so it is set here, at collection time.
Single-device tests simply use the default device; sharding tests build meshes over all 8.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 fake devices; backend optimisation level 0 halves XLA:CPU compile time, which dominates the suite.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache for the session, this process and the runs it starts (`python -m prime_jax.main`,
# about twenty): a program compiles once, whichever test or process meets it first (docs/benchmarks.md, "The test
# suite"). Multi-process runs go without (`fixtures.env`).
_JIT_CACHE = tempfile.TemporaryDirectory(prefix="prime_jax_test_jit_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JIT_CACHE.name
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from prime_jax.data.prompts import SYSTEM_PROMPT  # noqa: E402
from prime_jax.data.synthetic import make_tasks, reference_solution  # noqa: E402
from prime_jax.models import Decoder, load_pretrained  # noqa: E402
from prime_jax.models.tokenizer import train_sentencepiece  # noqa: E402
from prime_jax.sampling import Rollout, generate  # noqa: E402

from tests.fixtures import (SAMPLED, SAMPLED_PROMPTS, gcs_emulator, tiny_config, tiny_llama_config,  # noqa: E402
                            write_hf_checkpoint)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2 checkpoint written by transformers."""
    return write_hf_checkpoint(tiny_config(), tmp_path_factory.mktemp("qwen2"), seed=0)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama 3 checkpoint (tied embeddings, rope scaling) written by transformers."""
    return write_hf_checkpoint(tiny_llama_config(), tmp_path_factory.mktemp("llama"), seed=1)


@pytest.fixture(scope="session")
def gcs_bucket():
    """gs://<bucket> on a local GCS emulator started for this test session (stopped at its end)."""
    with gcs_emulator() as bucket:
        yield bucket


@pytest.fixture
def left_padded_batch():
    """tokens [3, 12] int32 with rows of 12, 7 and 3 real tokens, left padded; attention mask [3, 12]."""
    rng = np.random.default_rng(0)
    lengths = [12, 7, 3]
    tokens = rng.integers(1, 90, size=(3, 12)).astype(np.int32)
    mask = np.zeros((3, 12), np.int32)
    for i, n in enumerate(lengths):
        mask[i, 12 - n:] = 1
        tokens[i, : 12 - n] = 0
    return tokens, mask


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A sentencepiece tokenizer trained on synthetic task text (vocabulary 512)."""
    tasks = make_tasks(200, seed=123, difficulty=3)
    texts = [SYSTEM_PROMPT] + [t.question() for t in tasks] + [reference_solution(t) for t in tasks]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("sp") / "tok", vocab_size=512)


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

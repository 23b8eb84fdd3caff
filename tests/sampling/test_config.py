"""Sampler settings (`prime_jax.sampling.config`): the refill's and the tail's constraints."""

import pytest

from prime_jax.sampling import SamplerConfig, SamplingParams, refills_on_device


def test_refill_needs_an_unsplit_batch():
    assert refills_on_device("cpu", 1) and not refills_on_device("cpu", 2)
    assert not refills_on_device("tpu", 1)
    with pytest.raises(ValueError, match="refill .* needs an unsplit batch"):
        SamplerConfig(n=2, max_new_tokens=8, sampling=SamplingParams(), rows=8, data_parallel=2, refill=True)


def test_tail_sizes_halve_at_most_three_times_in_whole_data_parallel_groups():
    def sizes(rows: int, dp: int = 1, on: bool = True) -> tuple[int, ...]:
        return SamplerConfig(n=4, max_new_tokens=8, sampling=SamplingParams(), rows=rows, data_parallel=dp,
                             compact_tail=on).tail_sizes()

    assert sizes(64) == (32, 16, 8) and sizes(8) == (4, 2, 1) and sizes(12) == (6, 3, 1)
    assert sizes(12, dp=4) == (8, 4) and sizes(4, dp=4) == () and sizes(64, on=False) == ()

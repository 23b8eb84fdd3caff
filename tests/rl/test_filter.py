"""Online accuracy filter: inclusive bounds, all-or-nothing per group, clear errors."""
import numpy as np
import pytest

from prime_jax.rl.filter import accuracy_filter


def test_binary_groups_keep_one_to_three_correct():
    acc = np.array([0, 0, 0, 0,  1, 0, 0, 0,  1, 1, 0, 0,  1, 1, 1, 0,  1, 1, 1, 1], float)
    np.testing.assert_array_equal(accuracy_filter(acc, 4), [1, 2, 3])


def test_bounds_are_inclusive_and_fractional_acc_uses_group_mean():
    acc = np.array([1, 0, 0, 0, 0,  1, 1, 1, 1, 0,  0.1, 0.1, 0.1, 0, 0.1])  # means 0.2, 0.8, 0.08
    np.testing.assert_array_equal(accuracy_filter(acc, 5), [0, 1])
    np.testing.assert_array_equal(accuracy_filter(acc, 5, lo=0.0, hi=0.1), [2])
    np.testing.assert_array_equal(accuracy_filter(acc, 5, lo=0.21, hi=0.79), [])


def test_float32_fractional_means_at_the_bounds_are_kept():
    # Code partial credit: every group's float32 mean is float32(0.8) (or 0.2), which read in float64
    # is 0.8000000119 > 0.8: the float64 comparison dropped them, the reference (float32) keeps them.
    acc = np.array([0.8, 0.8, 0.8, 0.8,  1, 1, 0.6, 0.6,  0.6, 1, 0.6, 1,  0.2, 0.2, 0.2, 0.2,
                    1, 1, 0.6, 0.7], np.float32)  # last group: mean 0.825, dropped
    assert np.float64(acc[:4].mean(dtype=np.float32)) > 0.8  # the float64 reading that dropped them
    np.testing.assert_array_equal(accuracy_filter(acc, 4), [0, 1, 2, 3])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="n=4"):
        accuracy_filter(np.zeros(6), 4)
    with pytest.raises(ValueError, match="lo=0.9"):
        accuracy_filter(np.zeros(4), 4, lo=0.9, hi=0.1)
    with pytest.raises(ValueError, match="non-finite"):
        accuracy_filter(np.array([0.0, np.nan]), 2)
    with pytest.raises(ValueError, match="1-D"):
        accuracy_filter(np.zeros((2, 2)), 2)

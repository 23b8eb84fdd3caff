"""Advantage estimators vs the numpy reference (tests/rl/numpy_reference.py) and hand-computed values."""
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.rl import advantages as adv
from tests.rl import numpy_reference as ref

N = 4


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    mask, acc = ref.random_batch(rng, groups=4, n=N, length=10)
    process = rng.normal(0.0, 0.1, mask.shape) * mask
    return process, acc, mask


def _j(x):
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("formula", ["reference", "paper"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_rloo_process_and_outcome_match_reference(batch, formula, gamma):
    process, acc, mask = batch
    got = adv.rloo_returns(_j(process), _j(mask), n=N, gamma=gamma, formula=formula)
    np.testing.assert_allclose(np.asarray(got), ref.rloo_returns(process, mask, N, gamma, formula),
                               rtol=1e-5, atol=1e-5)
    gt, last = ref.outcome_source(acc, mask)
    np.testing.assert_allclose(np.asarray(adv.last_token_mask(_j(mask))), last)
    got = adv.rloo_returns(_j(gt), _j(last), n=N, gamma=gamma, formula=formula)
    np.testing.assert_allclose(np.asarray(got), ref.rloo_returns(gt, last, N, gamma, formula),
                               rtol=1e-5, atol=1e-5)


def test_rloo_outcome_is_plain_leave_one_out():
    # acc [1, 0, 0, 1]: r~_i = acc_i - mean of the other three, constant up to the last token
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    acc = np.array([1.0, 0.0, 0.0, 1.0])
    gt, last = ref.outcome_source(acc, mask)
    got = np.asarray(adv.rloo_returns(_j(gt), _j(last), n=4))
    want_row = np.array([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    np.testing.assert_allclose(got, want_row[:, None] * mask, rtol=1e-6, atol=1e-7)


def test_rloo_formulas_agree_at_first_token(batch):
    # the reference formula's extra term sums to 0 over each response's tokens (docs/prime_spec.md §1.6)
    process, _, mask = batch
    a = np.asarray(adv.rloo_returns(_j(process), _j(mask), n=N, formula="reference"))
    b = np.asarray(adv.rloo_returns(_j(process), _j(mask), n=N, formula="paper"))
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-6)
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_grpo_and_reinforce_match_reference(batch, gamma):
    process, acc, mask = batch
    gt, last = ref.outcome_source(acc, mask)
    for rewards, m in ((process, mask), (gt, last)):
        np.testing.assert_allclose(np.asarray(adv.grpo_returns(_j(rewards), _j(m), n=N, gamma=gamma)),
                                   ref.grpo_returns(rewards, m, N, gamma), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(adv.reinforce_returns(_j(rewards), _j(m), gamma=gamma)),
                                   ref.reinforce_returns(rewards, m, gamma), rtol=1e-5, atol=1e-5)


def test_whiten_matches_reference(batch):
    process, _, mask = batch
    x = process * 7.0 + 3.0
    got = np.asarray(adv.whiten(_j(x), _j(mask)))
    np.testing.assert_allclose(got, ref.whiten(x, mask), rtol=1e-5, atol=1e-5)
    valid = got[mask > 0]
    np.testing.assert_allclose([valid.mean(), valid.std(ddof=1)], [0.0, 1.0], atol=1e-5)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce"])
def test_compute_advantages_matches_reference(batch, estimator):
    process, acc, mask = batch
    got_adv, got_ret = adv.compute_advantages(_j(process), _j(acc), _j(mask), n=N, estimator=estimator)
    want_adv, want_ret = ref.advantages(process, acc, mask, N, estimator=estimator)
    np.testing.assert_allclose(np.asarray(got_ret), want_ret, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_adv), want_adv, rtol=1e-4, atol=1e-4)


def test_min_form_returns_are_the_min_of_future_process_rewards(batch):
    process, _, mask = batch
    shaped = np.asarray(adv.min_form_rewards(_j(process), _j(mask)))
    np.testing.assert_allclose(shaped, ref.min_form_rewards(process, mask), rtol=1e-5, atol=1e-6)
    length = int(mask[0].sum())  # row 0 is full length: its return at t is min(process[0, t:])
    to_go = np.cumsum(shaped[0, ::-1])[::-1]
    np.testing.assert_allclose(to_go, np.minimum.accumulate(process[0, :length][::-1])[::-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce"])
def test_min_credit_advantages_match_reference(batch, estimator):
    process, acc, mask = batch
    got_adv, got_ret = adv.compute_advantages(_j(process), _j(acc), _j(mask), n=N, estimator=estimator,
                                              process_credit="min")
    want_adv, want_ret = ref.advantages(ref.min_form_rewards(process, mask), acc, mask, N, estimator=estimator)
    np.testing.assert_allclose(np.asarray(got_ret), want_ret, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_adv), want_adv, rtol=1e-4, atol=1e-4)


def test_coefficients_scale_each_source(batch):
    process, acc, mask = batch
    _, ret_outcome_only = adv.compute_advantages(_j(process), _j(acc), _j(mask), n=N, process_coef=0.0)
    gt, last = ref.outcome_source(acc, mask)
    np.testing.assert_allclose(np.asarray(ret_outcome_only), ref.rloo_returns(gt, last, N) * mask,
                               rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise(batch):
    process, acc, mask = batch
    with pytest.raises(ValueError, match="estimator='ppo': is not one of"):
        adv.compute_advantages(_j(process), _j(acc), _j(mask), n=N, estimator="ppo")
    with pytest.raises(ValueError, match="n=1"):
        adv.compute_advantages(_j(process), _j(acc), _j(mask), n=1)
    with pytest.raises(ValueError, match="rloo_formula"):
        adv.compute_advantages(_j(process), _j(acc), _j(mask), n=N, rloo_formula="eq5")
    with pytest.raises(ValueError, match="process_credit='max': is not one of"):
        adv.compute_advantages(_j(process), _j(acc), _j(mask), n=N, process_credit="max")
    with pytest.raises(ValueError, match="gamma_process=0.9"):
        adv.compute_advantages(_j(process), _j(acc), _j(mask), n=N, process_credit="min", gamma_process=0.9)
    with pytest.raises(ValueError, match="n=3"):
        adv.rloo_returns(_j(process), _j(mask), n=3)

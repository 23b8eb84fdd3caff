"""Implicit-PRM maths vs the numpy reference (tests/rl/numpy_reference.py) and sanity values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.rl import prm
from tests.rl import numpy_reference as ref

N = 4


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    mask, acc = ref.random_batch(rng, groups=4, n=N, length=11)
    logp_prm = rng.normal(-2.0, 1.0, mask.shape)
    logp_ref = logp_prm + rng.normal(0.0, 0.3, mask.shape)
    return logp_prm, logp_ref, mask, acc


@pytest.mark.parametrize("include_eos", [True, False])
@pytest.mark.parametrize("granularity", ["token", "whole"])
def test_token_rewards_match_reference(batch, include_eos, granularity):
    logp_prm, logp_ref, mask, _ = batch
    got = prm.token_rewards(jnp.asarray(logp_prm, jnp.float32), jnp.asarray(logp_ref, jnp.float32),
                            jnp.asarray(mask), include_eos=include_eos, granularity=granularity)
    want = ref.token_rewards(logp_prm, logp_ref, mask, include_eos, granularity)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_prm_loss_and_gradient_match_reference(batch):
    logp_prm, logp_ref, mask, acc = batch
    args = [jnp.asarray(x, jnp.float32) for x in (logp_prm, logp_ref, mask, acc)]
    loss, (g_prm, g_ref) = jax.value_and_grad(prm.prm_loss, argnums=(0, 1))(*args, beta=0.05)
    want_loss, want_grad = ref.prm_loss_and_grad(logp_prm, logp_ref, mask, acc, beta=0.05)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_prm), want_grad, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g_ref) == 0.0), "gradient must not flow into the reference log-probs"


def test_prm_loss_is_stable_for_large_log_ratios():
    mask = jnp.ones((2, 3))
    logp_ref = jnp.zeros((2, 3))
    logp_prm = jnp.array([[3000.0] * 3, [-3000.0] * 3])           # z = +-450
    loss = prm.prm_loss(logp_prm, logp_ref, mask, jnp.array([1.0, 0.0]))
    assert np.isfinite(float(loss)) and float(loss) < 1e-30
    loss_wrong = prm.prm_loss(logp_prm, logp_ref, mask, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(float(loss_wrong), 450.0, rtol=1e-6)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_batch_norm_matches_reference(batch, shards):
    logp_prm, logp_ref, mask, _ = batch
    rewards = ref.token_rewards(logp_prm, logp_ref, mask)
    r, m = jnp.asarray(rewards, jnp.float32), jnp.asarray(mask)
    b, length = rewards.shape
    got = prm.batch_norm(r.reshape(shards, b // shards, length), m.reshape(shards, b // shards, length))
    want = ref.batch_norm(rewards, mask, shards=shards)
    np.testing.assert_allclose(np.asarray(got).reshape(b, length), want, rtol=1e-5, atol=1e-6)
    # the largest |return-to-go| in every scope becomes (almost exactly) 1
    to_go = np.flip(np.cumsum(np.flip(want, -1), -1), -1).reshape(shards, -1)
    np.testing.assert_allclose(np.abs(to_go).max(axis=1), 1.0, rtol=1e-5)


def test_dpo_acc_matches_reference():
    rng = np.random.default_rng(1)
    for _ in range(5):
        scores = rng.normal(size=8 * N)
        scores[::5] = scores[1::5][: len(scores[::5])]                  # some ties
        acc = rng.integers(0, 3, size=8 * N) / 2.0
        acc[:N] = 1.0                                                    # a flat group -> 0.5
        got = prm.dpo_acc(jnp.asarray(scores, jnp.float32), jnp.asarray(acc, jnp.float32), N)
        np.testing.assert_allclose(float(got), ref.dpo_acc(scores, acc, N), rtol=1e-6)


def test_tie_neutral_dpo_acc_matches_reference():
    rng = np.random.default_rng(3)
    for _ in range(5):
        scores = np.round(rng.normal(size=8 * N), 0)                    # rounded: many ties
        acc = rng.integers(0, 3, size=8 * N) / 2.0
        acc[:N] = 1.0                                                    # a flat group -> 0.5
        got = prm.dpo_acc(jnp.asarray(scores, jnp.float32), jnp.asarray(acc, jnp.float32), N, ties="half")
        np.testing.assert_allclose(float(got), ref.dpo_acc(scores, acc, N, tie=0.5), rtol=1e-6)
        assert ref.dpo_acc(scores, acc, N, tie=0.5) != ref.dpo_acc(scores, acc, N)   # the ties matter here


def test_tie_neutral_dpo_acc_hand_computed():
    # acc [1, 0, 0, 1], scores [1, 1, 0, 2]; pairs with da != 0: (0,1) da 1, ds 0: a tie; (0,2) da 1, ds 1: agree;
    # (1,3) da -1, ds -1: agree; (2,3) da -1, ds -2: agree. Ties half: (0.5 + 3) / 4; "not above": 3 / 4
    scores, acc = jnp.array([1.0, 1.0, 0.0, 2.0]), jnp.array([1.0, 0.0, 0.0, 1.0])
    assert float(prm.dpo_acc(scores, acc, 4, ties="half")) == 0.875
    assert float(prm.dpo_acc(scores, acc, 4)) == 0.75
    # all-equal scores: exactly 0.5 whatever the order of acc ("not above" reads 0.0 for [1, 1, 0, 0], 1.0 for [0, 1])
    for acc in ([1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.5, 0.0, 1.0]):
        assert float(prm.dpo_acc(jnp.full(4, 0.3), jnp.array(acc), 4, ties="half")) == 0.5
    assert float(prm.dpo_acc(jnp.zeros(4), jnp.array([1.0, 1.0, 0.0, 0.0]), 4)) == 0.0
    assert float(prm.dpo_acc(jnp.zeros(2), jnp.array([0.0, 1.0]), 2)) == 1.0


def test_dpo_acc_hand_computed():
    # group 1: acc [1, 0, 0, 1], scores rank the two correct ones on top -> 1.0
    # group 2: acc [1, 0.5, 0, 0], scores [0, 1, 2, 3] -> every pair with da != 0 disagrees -> 0.0
    scores = jnp.array([2.0, 0.0, 1.0, 3.0, 0.0, 1.0, 2.0, 3.0])
    acc = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(float(prm.dpo_acc(scores, acc, 4)), 0.5)
    np.testing.assert_allclose(float(prm.dpo_acc(scores[:4], acc[:4], 4)), 1.0)
    np.testing.assert_allclose(float(prm.dpo_acc(scores[4:], acc[4:], 4)), 0.0)


def test_prm_equal_to_reference_gives_zero_rewards_ln2_loss_and_half_dpo_acc(batch):
    logp, _, mask, _ = batch
    logp = jnp.asarray(logp, jnp.float32)
    m = jnp.asarray(mask)
    rewards = prm.token_rewards(logp, logp, m)
    assert np.all(np.asarray(rewards) == 0.0)
    assert np.all(np.asarray(prm.batch_norm(rewards, m)) == 0.0)
    acc = jnp.asarray(np.random.default_rng(2).integers(0, 2, size=mask.shape[0]), jnp.float32)
    assert float(prm.prm_loss(logp, logp, m, acc)) == np.float32(np.log(2.0))   # exactly (a plain mean: 2 ulp off)
    # zero scores: dpo_acc is 0.5 when each group lists its acc symmetrically (ties count as "not above")
    sym_acc = jnp.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(float(prm.dpo_acc(jnp.zeros(8), sym_acc, 4)), 0.5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="granularity"):
        prm.token_rewards(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), granularity="step")
    with pytest.raises(ValueError, match="n=4"):
        prm.dpo_acc(jnp.zeros(6), jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="ties"):
        prm.dpo_acc(jnp.zeros(4), jnp.zeros(4), 4, ties="below")
